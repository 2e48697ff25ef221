# Full ImageNet-1k (data/imagenet) with the Swin/DeiT recipe pipeline
# (RandAugment, random erasing), batch 128 per GPU.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py'
train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader
