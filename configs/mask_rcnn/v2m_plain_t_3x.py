# Mask R-CNN + FPN, 3x schedule (36 epochs, multi-scale + crop, AMP), COCO,
# backbone V2M-T (plain): the 1x model with the 3x recipe pieces.
_base_ = './v2m_plain_t_1x.py'

train_dataloader = dict(dataset=dict(pipeline={{_base_.ms_crop_train_pipeline}}))
train_cfg = dict(max_epochs=36)
param_scheduler = {{_base_.param_scheduler_3x}}
optim_wrapper = dict(type='AmpOptimWrapper')
