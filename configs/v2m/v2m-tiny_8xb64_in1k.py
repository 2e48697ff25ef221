# ImageNet-1k classification: V2M-T, 76.2% (official script: batch 512, lr 5e-4, wd 0.1, no drop path).
_base_ = '../_base_/cls/in1k_300e.py'

model = dict(
    backbone=dict(type='mmssm.V2M', arch='tiny', cls_position='middle', drop_path_rate=0.0),
    neck=None,
    head=dict(in_channels=192))
optim_wrapper = dict(optimizer=dict(lr=5e-4, weight_decay=0.1))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=5)
]
