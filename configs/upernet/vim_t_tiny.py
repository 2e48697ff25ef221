# UPerNet with a reduced plain Vim on the tiny ADE20K-layout set (SimplePyramid neck).
_base_ = '../_base_/seg/upernet_tiny.py'

model = dict(
    backbone=dict(type='mmssm.Vim', arch=dict(embed_dims=32, num_layers=4), img_size=64,
                  out_type='featmap', out_indices=(0, 1, 2, 3)),
    neck=dict(type='mmssm.SimplePyramid', in_channels=32, in_index=(0, 1, 2, 3)),
    decode_head=dict(in_channels=[32] * 4),
    auxiliary_head=dict(in_channels=32))
