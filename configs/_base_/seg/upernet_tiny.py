# UPerNet on the tiny ADE20K-layout set (4 classes, 128 crops), 8 iterations.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    '../datasets/ade20k_tiny.py',
    '../schedules/tiny_iters.py',
    'mmseg::_base_/default_runtime.py',
]
crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,  # the backbone's init_cfg loads weights
    backbone=dict(_delete_=True),
    decode_head=dict(channels=64, num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_index=2, channels=32, num_classes=4, norm_cfg=norm_cfg),
    test_cfg=dict(mode='whole'))
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
# mmseg keeps its hooks in the schedule files, which this tiny run replaces
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
