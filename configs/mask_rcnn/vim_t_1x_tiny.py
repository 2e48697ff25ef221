# Mask R-CNN with a reduced plain Vim on the tiny COCO-format set: stride-16
# maps -> SimplePyramid -> FPN, with layer-wise lr decay.
_base_ = '../_base_/det/mask_rcnn_tiny.py'

model = dict(
    backbone=dict(type='mmssm.Vim', arch=dict(embed_dims=32, num_layers=4), img_size=64,
                  out_type='featmap', out_indices=(0, 1, 2, 3)),
    neck=[
        dict(type='mmssm.SimplePyramid', in_channels=32, in_index=(0, 1, 2, 3),
             norm_cfg=dict(type='GN', num_groups=8)),
        dict(type='FPN', in_channels=[32] * 4, out_channels=64, num_outs=5),
    ])
optim_wrapper = dict(constructor='mmssm.LayerDecayOptimWrapperConstructor',
                     paramwise_cfg=dict(layer_decay_rate=0.9))
