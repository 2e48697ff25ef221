# Tiny rawframes set written by tools/misc/make_tiny_datasets.py: 4 classes
# (the direction a shape moves in), 8 frames of 48 px.
_base_ = './hmdb51_rawframes.py'

data_root = '{{$MMSSM_TINY_DATA:data/tiny}}/video/'
clip_len = 8
train_pipeline = [
    dict(type='SampleFrames', clip_len=clip_len, frame_interval=1, num_clips=1),
    dict(type='RawFrameDecode'),
    dict(type='RandomCrop', size=32),
    dict(type='FormatShape', input_format='NCTHW'),
    dict(type='PackActionInputs')
]
val_pipeline = [
    dict(type='SampleFrames', clip_len=clip_len, frame_interval=1, num_clips=1, test_mode=True),
    dict(type='RawFrameDecode'),
    dict(type='CenterCrop', crop_size=32),
    dict(type='FormatShape', input_format='NCTHW'),
    dict(type='PackActionInputs')
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(ann_file=data_root + 'train_list.txt',
                 data_prefix=dict(img=data_root + 'rawframes'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(ann_file=data_root + 'val_list.txt',
                 data_prefix=dict(img=data_root + 'rawframes'), pipeline=val_pipeline))
test_dataloader = val_dataloader
