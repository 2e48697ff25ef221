# UPerNet on ADE20K 512x512, 160k iterations: AdamW 6e-5, wd 0.01, linear
# warm-up 1500 iterations then poly (VMamba / LocalMamba / Swin recipe),
# batch 2 per GPU x 8 GPUs, sliding-window testing. Leaf configs set
# `model.backbone` and the heads' in_channels.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    '../datasets/ade20k.py',
    'mmseg::_base_/schedules/schedule_160k.py',
    'mmseg::_base_/default_runtime.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,  # the backbone's init_cfg loads weights
    backbone=dict(_delete_=True),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(in_index=2, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys=dict(
        norm=dict(decay_mult=0.), pos_embed=dict(decay_mult=0.), cls_token=dict(decay_mult=0.),
        A_log=dict(decay_mult=0.), A_logs=dict(decay_mult=0.), Ds=dict(decay_mult=0.))))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False)
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
