# ImageNet-1k classification: ConvNeXt-S4ND-T, 82.2% (official: lr 4e-3 at batch 3840, wd 0.05, drop path 0.1, 310 epochs; lr scaled to batch 1024).
_base_ = '../_base_/cls/in1k_300e.py'

model = dict(
    backbone=dict(type='mmssm.ConvNeXtS4ND', arch='tiny', img_size=224, drop_path_rate=0.1, out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(in_channels=768))
# The S4 kernels ask for their own lr (1e-3) and no weight decay (param._optim, as the
# official S4ND training does); this constructor honours that.
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05),
                     constructor='mmssm.LayerDecayOptimWrapperConstructor',
                     paramwise_cfg=dict(layer_decay_rate=1.0))
