# Image classification on the tiny ImageNet-style set (3 classes, 64 px), 8 iterations.
_base_ = [
    '../datasets/imagenet_tiny.py',
    '../schedules/tiny_iters.py',
    'mmpretrain::_base_/default_runtime.py',
]
model = dict(
    type='ImageClassifier',
    backbone=dict(),
    head=dict(type='LinearClsHead', num_classes=3, loss=dict(type='CrossEntropyLoss')))
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(by_epoch=False, interval=4, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
