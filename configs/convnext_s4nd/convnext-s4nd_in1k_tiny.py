# Tiny-data classification run (3 classes, 64 px, 8 iterations) with a reduced
# backbone of the same family: tests and smoke runs on CPU.
_base_ = '../_base_/cls/tiny.py'

model = dict(backbone=dict(type='mmssm.ConvNeXtS4ND', arch=dict(depths=[1, 1, 1, 1], dims=[16, 32, 64, 128]), img_size=64, out_indices=(3, )), neck=dict(type='GlobalAveragePooling'), head=dict(in_channels=128))
