# Full COCO 2017 instances (data/coco), as mmdet ships it.
_base_ = 'mmdet::_base_/datasets/coco_instance.py'
