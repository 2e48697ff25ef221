# Pieces of the Mask R-CNN 3x recipe, kept under their own names so that every
# `*_3x.py` inherits its `*_1x.py` model and swaps just these in: DETR-style
# multi-scale training (short side 480-800, long 1333, or resize + RandomCrop
# (384-600) + resize) and 36 epochs with lr steps at 27 and 33 (plus AMP).
_multi_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                 (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
ms_crop_train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice', transforms=[
        [dict(type='RandomChoiceResize', scales=_multi_scales, keep_ratio=True)],
        [dict(type='RandomChoiceResize', keep_ratio=True,
              scales=[(400, 1333), (500, 1333), (600, 1333)]),
         dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
              allow_negative_crop=True),
         dict(type='RandomChoiceResize', scales=_multi_scales, keep_ratio=True)],
    ]),
    dict(type='PackDetInputs')
]
param_scheduler_3x = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1)
]
