# Video recognition on the tiny rawframes set with a reduced ConvNeXt-S4ND-3D, 8 iterations.
_base_ = [
    '../_base_/datasets/video_tiny.py',
    '../_base_/schedules/tiny_iters.py',
    'mmaction::_base_/default_runtime.py',
]
model = dict(
    type='Recognizer3D',
    backbone=dict(type='mmssm.ConvNeXtS4ND3D', arch=dict(depths=[1, 1, 1, 1],
                  dims=[16, 32, 64, 128]), img_size=(8, 32, 32), out_indices=(3, )),
    neck=dict(type='mmssm.SelectFeature'),
    cls_head=dict(type='I3DHead', num_classes=4, in_channels=128, spatial_type='avg',
                  average_clips='prob'),
    data_preprocessor=dict(type='ActionDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], format_shape='NCTHW'))
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(by_epoch=False, interval=4, max_keep_ckpts=2,
                                     save_best=None))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
