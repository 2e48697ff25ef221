# Mask R-CNN with a reduced VMamba (v2 blocks) on the tiny COCO-format set.
_base_ = '../_base_/det/mask_rcnn_tiny.py'

model = dict(
    backbone=dict(type='mmssm.VMamba', arch=dict(depths=[1, 1, 1, 1], dims=16),
                  out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[16, 32, 64, 128]))
