# UPerNet with a reduced V2M-S* (pyramid) backbone on the tiny ADE20K-layout set.
_base_ = '../_base_/seg/upernet_tiny.py'

model = dict(
    backbone=dict(type='mmssm.V2MPyramid', arch=dict(depths=[1, 1, 1, 1], dims=16),
                  out_indices=(0, 1, 2, 3)),
    decode_head=dict(in_channels=[16, 32, 64, 128]),
    auxiliary_head=dict(in_channels=64))
