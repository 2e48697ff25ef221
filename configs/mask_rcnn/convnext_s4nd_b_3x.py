# Mask R-CNN + FPN, 3x schedule, COCO, backbone ConvNeXt-S4ND-B.
_base_ = '../_base_/det/mask_rcnn_3x.py'

# ImageNet-1k weights of ConvNeXt-S4ND-B: an mmssm classification checkpoint
# (tools/train.py with configs/convnext_s4nd/), or an official file where one
# exists (Vim / VMamba release files load directly: the 'model' entry is read).
pretrained = 'checkpoints/convnext_s4nd_b_in1k.pth'

model = dict(
    backbone=dict(
        type='mmssm.ConvNeXtS4ND', arch='base', out_indices=(0, 1, 2, 3), drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
