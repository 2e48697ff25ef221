# The README main job: Mask R-CNN with a reduced V2M-S* (pyramid) backbone on the
# tiny COCO-format set, 8 iterations on CPU, then COCO bbox/segm metrics.
_base_ = '../_base_/det/mask_rcnn_tiny.py'

model = dict(
    backbone=dict(type='mmssm.V2MPyramid', arch=dict(depths=[1, 1, 2, 1], dims=32),
                  out_indices=(0, 1, 2, 3), drop_path_rate=0.1),
    neck=dict(in_channels=[32, 64, 128, 256]))
