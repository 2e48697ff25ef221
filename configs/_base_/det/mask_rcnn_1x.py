# Mask R-CNN + FPN, COCO, 1x (12 epochs, lr steps at 8 and 11), AdamW as in the
# VMamba / LocalMamba detection recipes (Swin-T Mask R-CNN base). Batch 2 per
# GPU x 8 GPUs. Leaf configs set `model.backbone` and `model.neck.in_channels`;
# their `*_3x.py` twins swap in the pieces of ./ms_3x_parts.py.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    '../datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    './ms_3x_parts.py',
]
model = dict(backbone=dict(_delete_=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys=dict(
        norm=dict(decay_mult=0.), pos_embed=dict(decay_mult=0.), cls_token=dict(decay_mult=0.),
        A_log=dict(decay_mult=0.), A_logs=dict(decay_mult=0.), Ds=dict(decay_mult=0.))))
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
