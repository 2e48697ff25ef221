# Mask R-CNN + FPN, 3x schedule, COCO, plain backbone Vim-S:
# layers (5, 11, 17, 23) (stride 16) -> SimplePyramid (strides 4-32) -> FPN,
# with layer-wise lr decay over the backbone's layers.
_base_ = '../_base_/det/mask_rcnn_3x.py'

# ImageNet-1k weights of Vim-S: an mmssm classification checkpoint
# (tools/train.py with configs/vim/), or an official file where one
# exists (Vim / VMamba release files load directly: the 'model' entry is read).
pretrained = 'checkpoints/vim_s_in1k.pth'

model = dict(
    backbone=dict(
        type='mmssm.Vim', arch='small', img_size=224, out_type='featmap',
        out_indices=(5, 11, 17, 23), drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=[
        dict(type='mmssm.SimplePyramid', in_channels=384, in_index=(0, 1, 2, 3),
             norm_cfg=dict(type='GN', num_groups=32)),
        dict(type='FPN', in_channels=[384] * 4, out_channels=256, num_outs=5),
    ])
optim_wrapper = dict(
    constructor='mmssm.LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.9))
