# Mask R-CNN + FPN, 3x schedule, COCO, backbone V2M-S* (pyramid).
_base_ = '../_base_/det/mask_rcnn_3x.py'

# ImageNet-1k weights of V2M-S* (pyramid): an mmssm classification checkpoint
# (tools/train.py with configs/v2m/), or an official file where one
# exists (Vim / VMamba release files load directly: the 'model' entry is read).
pretrained = 'checkpoints/v2m_s_in1k.pth'

model = dict(
    backbone=dict(
        type='mmssm.V2MPyramid', arch='small', out_indices=(0, 1, 2, 3), drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
