# Mask R-CNN on the tiny COCO-format set: a narrow FPN and heads, 8 iterations,
# checkpoints every 4. Used by the tests and the README main job.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    '../datasets/coco_instance_tiny.py',
    '../schedules/tiny_iters.py',
    'mmdet::_base_/default_runtime.py',
]
model = dict(
    backbone=dict(_delete_=True),
    neck=dict(out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=64),
                  bbox_head=dict(in_channels=64, fc_out_channels=128, num_classes=3),
                  mask_roi_extractor=dict(out_channels=64),
                  mask_head=dict(in_channels=64, conv_out_channels=64, num_classes=3)))
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(by_epoch=False, interval=4, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
