# Mask R-CNN + FPN, 1x schedule, COCO, backbone ConvNeXt-S4ND-S.
_base_ = '../_base_/det/mask_rcnn_1x.py'

# ImageNet-1k weights of ConvNeXt-S4ND-S: an mmssm classification checkpoint
# (tools/train.py with configs/convnext_s4nd/), or an official file where one
# exists (Vim / VMamba release files load directly: the 'model' entry is read).
pretrained = 'checkpoints/convnext_s4nd_s_in1k.pth'

model = dict(
    backbone=dict(
        type='mmssm.ConvNeXtS4ND', arch='small', out_indices=(0, 1, 2, 3), drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
