# A few-iteration CPU schedule for the tiny datasets (smoke runs, tests, README
# main job). Schedule keys only, so it combines with any task's default_runtime;
# leaf configs set `default_hooks` (checkpoint every 4 iters, log every iter).
train_cfg = dict(type='IterBasedTrainLoop', max_iters=8, val_interval=8)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
optim_wrapper = dict(type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.05),
                     clip_grad=dict(max_norm=5.0))
auto_scale_lr = dict(enable=False, base_batch_size=2)
