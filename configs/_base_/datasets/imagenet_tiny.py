# Tiny ImageNet-style class folders written by tools/misc/make_tiny_datasets.py.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs64.py'

dataset_type = 'CustomDataset'
data_root = '{{$MMSSM_TINY_DATA:data/tiny}}/imagenet/'
data_preprocessor = dict(num_classes=3)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=64, crop_ratio_range=(0.6, 1.0)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=64, edge='short'),
    dict(type='CenterCrop', crop_size=64),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type=dataset_type, data_root=data_root, data_prefix='train',
                 ann_file='', with_label=True, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type=dataset_type, data_root=data_root, data_prefix='val',
                 ann_file='', with_label=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
