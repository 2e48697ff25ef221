# ImageNet-1k classification: Vim-B, 81.9% (the release gives no recipe script for B: Vim-S settings, drop path 0.1 = VisionMamba default).
_base_ = '../_base_/cls/in1k_300e.py'

model = dict(
    backbone=dict(type='mmssm.Vim', arch='base', drop_path_rate=0.1),
    neck=None,
    head=dict(in_channels=768))
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=5)
]
custom_hooks = [dict(type='EMAHook', momentum=4e-05, priority='ABOVE_NORMAL')]
