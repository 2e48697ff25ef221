# ImageNet-1k classification: V2M-S + local window, 81.3% (LocalMamba recipe).
_base_ = '../_base_/cls/in1k_300e.py'

model = dict(
    backbone=dict(type='mmssm.V2M', arch='small', local_window=True, cls_position='middle', drop_path_rate=0.1),
    neck=None,
    head=dict(in_channels=384))
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.04))
