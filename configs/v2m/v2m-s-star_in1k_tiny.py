# Tiny-data classification run (3 classes, 64 px, 8 iterations) with a reduced
# backbone of the same family: tests and smoke runs on CPU.
_base_ = '../_base_/cls/tiny.py'

model = dict(backbone=dict(type='mmssm.V2MPyramid', arch=dict(depths=[1, 1, 1, 1], dims=16), out_indices=(3, )), neck=dict(type='GlobalAveragePooling'), head=dict(in_channels=128))
