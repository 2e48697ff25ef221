# Tiny ADE20K-layout set written by tools/misc/make_tiny_datasets.py
# (label 0 = unlabelled, 1 = background, 2.. = shapes; reduce_zero_label).
_base_ = 'mmseg::_base_/datasets/ade20k.py'

dataset_type = 'BaseSegDataset'  # ADE20KDataset hard-codes its 150 classes
data_root = '{{$MMSSM_TINY_DATA:data/tiny}}/ade/'
metainfo = dict(classes=('background', 'circle', 'square', 'triangle'),
                palette=[[120, 120, 120], [230, 40, 40], [40, 200, 40], [30, 140, 230]])
crop_size = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
                 data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo,
                 img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
                 data_prefix=dict(img_path='images/validation',
                                  seg_map_path='annotations/validation'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
