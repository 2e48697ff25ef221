# Mask R-CNN + FPN, 1x schedule, COCO, backbone VMamba-B (s2l15).
_base_ = '../_base_/det/mask_rcnn_1x.py'

# ImageNet-1k weights of VMamba-B (s2l15): an mmssm classification checkpoint
# (tools/train.py with configs/vmamba/), or an official file where one
# exists (Vim / VMamba release files load directly: the 'model' entry is read).
pretrained = 'checkpoints/vmamba_b_s2l15_in1k.pth'

model = dict(
    backbone=dict(
        type='mmssm.VMamba', arch='base-s2l15', out_indices=(0, 1, 2, 3), drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
