# ImageNet-1k classification: V2M-T + local window, 76.4% (LocalMamba recipe: lr 1e-3, wd 0.04, drop path 0.1, 20 warm-up epochs).
_base_ = '../_base_/cls/in1k_300e.py'

model = dict(
    backbone=dict(type='mmssm.V2M', arch='tiny', local_window=True, cls_position='middle', drop_path_rate=0.1),
    neck=None,
    head=dict(in_channels=192))
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.04))
