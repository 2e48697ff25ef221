# ImageNet-1k classification: VMamba-B (s1l20), 83.8%.
_base_ = '../_base_/cls/in1k_300e.py'

model = dict(
    backbone=dict(type='mmssm.VMamba', arch='base', out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(in_channels=1024))
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05))
custom_hooks = [dict(type='EMAHook', momentum=0.0001, priority='ABOVE_NORMAL')]
