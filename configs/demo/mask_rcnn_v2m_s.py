# `make demo`: Mask R-CNN with a reduced V2M-S* (pyramid) backbone, trained on CPU
# on the generated 128 px shapes set (tools/misc/make_tiny_datasets.py --tasks
# coco_demo: 320 train images) and evaluated with pycocotools on its 64 held-out
# val images. Root: $MMSSM_TINY_DATA (default data/tiny) + /coco_demo/.
_base_ = '../_base_/det/mask_rcnn_tiny.py'

max_iters = 300
# CPU cost: a 32-channel FPN and heads; torchvision's RoIAlign (3x faster than
# mmcv's CPU kernel in fwd+bwd, same op) with 2x2 samples per bin; 200
# proposals per level into NMS and 64 sampled RoIs per image (1-3 objects each).
roi_layer = dict(type='RoIAlign', sampling_ratio=2, use_torchvision=True)
model = dict(
    backbone=dict(type='mmssm.V2MPyramid', arch=dict(depths=[1, 1, 1, 1], dims=16),
                  out_indices=(0, 1, 2, 3), drop_path_rate=0.0),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32, roi_layer=dict(roi_layer, output_size=7)),
        bbox_head=dict(in_channels=32),
        mask_roi_extractor=dict(out_channels=32, roi_layer=dict(roi_layer, output_size=14)),
        mask_head=dict(in_channels=32, conv_out_channels=32)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100)))

data_root = '{{$MMSSM_TINY_DATA:data/tiny}}/coco_demo/'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=4, sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
# no validation inside training (val_begin after the end): tools/test.py
# evaluates the last checkpoint on the held-out val images
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters,
                 val_begin=max_iters + 1)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=max_iters, eta_min=1e-5),
]
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05), clip_grad=dict(max_norm=10.0))
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
