# Full ADE20K (data/ade/ADEChallengeData2016), 512x512 crops, as mmseg ships it.
_base_ = 'mmseg::_base_/datasets/ade20k.py'
