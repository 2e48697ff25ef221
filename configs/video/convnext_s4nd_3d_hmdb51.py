# ConvNeXt-S4ND-3D (T x H x W S4ND in every block) on HMDB-51 split 1, through
# mmaction2 (optional extra: WITH_VIDEO=1 make setup). The 2-D ImageNet
# ConvNeXt-S4ND-T checkpoint is inflated on load: spatial kernels copied,
# a fresh temporal kernel. Recipe of the S4ND README command: AdamW lr 1e-4,
# wd 0.2, cosine, 50 epochs, global batch 64 (8 GPUs x 8), AMP.
_base_ = [
    '../_base_/datasets/hmdb51_rawframes.py',
    'mmaction::_base_/default_runtime.py',
]
pretrained = 'checkpoints/convnext_s4nd_t_in1k.pth'
model = dict(
    type='Recognizer3D',
    backbone=dict(type='mmssm.ConvNeXtS4ND3D', arch='tiny', img_size=(30, 224, 224),
                  out_indices=(3, ), drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(type='mmssm.SelectFeature'),
    cls_head=dict(type='I3DHead', num_classes=51, in_channels=768, spatial_type='avg',
                  dropout_ratio=0.5, average_clips='prob'),
    data_preprocessor=dict(type='ActionDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], format_shape='NCTHW'))
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=50, val_begin=1, val_interval=5)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [dict(type='CosineAnnealingLR', T_max=50, eta_min=0, by_epoch=True)]
optim_wrapper = dict(type='AmpOptimWrapper',
                     optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.2),
                     clip_grad=dict(max_norm=40, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=64)
