# ImageNet-1k classification: ConvNeXt-S4ND-B (ConvNeXt-B depths/dims; tiny recipe, drop path 0.5 as ConvNeXt-B).
_base_ = '../_base_/cls/in1k_300e.py'

model = dict(
    backbone=dict(type='mmssm.ConvNeXtS4ND', arch='base', img_size=224, drop_path_rate=0.5, out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(in_channels=1024))
# The S4 kernels ask for their own lr (1e-3) and no weight decay (param._optim, as the
# official S4ND training does); this constructor honours that.
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05),
                     constructor='mmssm.LayerDecayOptimWrapperConstructor',
                     paramwise_cfg=dict(layer_decay_rate=1.0))
