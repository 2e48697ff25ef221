"""Train a classifier, detector, segmentor or video recognizer from an MM config.

The task library is taken from the config's ``default_scope`` (mmpretrain,
mmdet, mmseg or mmaction). Examples::

    python tools/train.py configs/mask_rcnn/v2m_s_1x.py --work-dir work_dirs/x
    python tools/train.py CONFIG --resume            # latest checkpoint in work_dir
    python tools/train.py CONFIG --resume PATH.pth   # a given checkpoint
    bash tools/dist_train.sh CONFIG 8 --amp
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from _runner_utils import (add_common_args, build_runner, check_or_exit,  # noqa: E402
                           finish_distributed, load_config)


def parse_args():
    parser = argparse.ArgumentParser(description='Train a model (mmssm)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from PATH, or from the latest checkpoint in '
                        'the work dir when no path is given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the actual total batch size')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_config(args)
    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            print('AMP is already enabled in the config.')
        else:
            assert wrapper == 'OptimWrapper', (
                f'--amp needs optim_wrapper.type OptimWrapper, got {wrapper}')
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
            # CPU autocast supports bf16 only (mmengine's AmpOptimWrapper refuses CPU);
            # on GPU keep the fp16 default.
            import torch
            if not torch.cuda.is_available():
                cfg.optim_wrapper.type = 'mmssm.CPUAmpOptimWrapper'
                cfg.optim_wrapper.setdefault('dtype', 'bfloat16')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    # resumed runs draw the same random numbers as uninterrupted ones
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(str(h.get('type', '')).endswith('RNGStateHook') for h in hooks):
        cfg.custom_hooks = hooks + [dict(type='mmssm.RNGStateHook')]
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    check_or_exit(cfg, 'train')
    runner = build_runner(cfg)
    runner.train()
    finish_distributed()


if __name__ == '__main__':
    main()
