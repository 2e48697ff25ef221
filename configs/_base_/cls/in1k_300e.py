# ImageNet-1k, 300 epochs, DeiT/Swin recipe: AdamW (lr 5e-4 x batch/512 in the
# papers: 1e-3 at batch 1024), cosine with linear warm-up, label smoothing 0.1,
# mixup 0.8 / cutmix 1.0, RandAugment m9, random erasing 0.25, grad clip 5.
# Batch 128 per GPU x 8 GPUs. Leaf configs set the backbone, head in_channels,
# lr / weight decay / warm-up, and EMA where the paper uses it.
_base_ = [
    '../datasets/imagenet_bs128_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
model = dict(
    type='ImageClassifier',
    backbone=dict(),
    head=dict(type='LinearClsHead', num_classes=1000,
              loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
              init_cfg=dict(type='TruncNormal', layer='Linear', std=.02, bias=0.)),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]))
optim_wrapper = dict(
    optimizer=dict(lr=1e-3, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0,
                       custom_keys={'.pos_embed': dict(decay_mult=0.0),
                                    '.cls_token': dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0))
auto_scale_lr = dict(base_batch_size=1024)
