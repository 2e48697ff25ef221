# UPerNet, ADE20K 512x512, 160k iterations, plain backbone Vim-Ti:
# layers (5, 11, 17, 23) (stride 16) -> SimplePyramid (strides 4-32) -> UPerHead,
# with layer-wise lr decay (Vim's segmentation recipe uses 0.92-0.95).
_base_ = '../_base_/seg/upernet_160k.py'

# ImageNet-1k weights of Vim-Ti: an mmssm classification checkpoint
# (tools/train.py with configs/vim/), or an official file where one
# exists (Vim / VMamba release files load directly: the 'model' entry is read).
pretrained = 'checkpoints/vim_t_in1k.pth'

model = dict(
    backbone=dict(
        type='mmssm.Vim', arch='tiny', img_size=224, out_type='featmap',
        out_indices=(5, 11, 17, 23), drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(type='mmssm.SimplePyramid', in_channels=192, in_index=(0, 1, 2, 3),
              norm_cfg=dict(type='SyncBN', requires_grad=True)),
    decode_head=dict(in_channels=[192] * 4, channels=192),
    auxiliary_head=dict(in_channels=192))
optim_wrapper = dict(
    constructor='mmssm.LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.92))
