# Mask R-CNN + FPN, 1x schedule, COCO, backbone Vanilla-VMamba-T.
_base_ = '../_base_/det/mask_rcnn_1x.py'

# ImageNet-1k weights of Vanilla-VMamba-T: an mmssm classification checkpoint
# (tools/train.py with configs/vmamba/), or an official file where one
# exists (Vim / VMamba release files load directly: the 'model' entry is read).
pretrained = 'checkpoints/vmamba_vanilla_t_in1k.pth'

model = dict(
    backbone=dict(
        type='mmssm.VMamba', arch='vanilla-tiny', out_indices=(0, 1, 2, 3), drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
