# Tiny-data classification run (3 classes, 64 px, 8 iterations) with a reduced
# backbone of the same family: tests and smoke runs on CPU.
_base_ = '../_base_/cls/tiny.py'

model = dict(backbone=dict(type='mmssm.Vim', arch=dict(embed_dims=32, num_layers=2), img_size=64), neck=None, head=dict(in_channels=32))
