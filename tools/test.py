"""Test (evaluate) a checkpoint with an MM config of any supported task.

    python tools/test.py CONFIG CHECKPOINT [--out results.pkl] [--show-dir vis]
    bash tools/dist_test.sh CONFIG CHECKPOINT 8
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from _runner_utils import (add_common_args, build_runner, check_or_exit,  # noqa: E402
                           finish_distributed, load_config)


def parse_args():
    parser = argparse.ArgumentParser(description='Test a model (mmssm)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='dump the raw predictions to this pickle file')
    parser.add_argument('--show-dir', help='save drawn predictions (mmdet: work_dir/<timestamp>/SHOW_DIR; '
                        'mmseg/mmpretrain: SHOW_DIR)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation '
                        '(needs tta_model and tta_pipeline in the config)')
    add_common_args(parser)
    return parser.parse_args()


def add_visualization(cfg, show_dir: str) -> None:
    """Turn on drawing; each library's hook names the output folder differently."""
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise RuntimeError('--show-dir needs a `visualization` hook in default_hooks')
    vis = hooks.visualization
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        vis.draw, vis.test_out_dir = True, show_dir
    elif scope == 'mmseg':
        vis.draw = True
        cfg.visualizer.save_dir = show_dir
    elif scope == 'mmpretrain':
        vis.enable, vis.out_dir = True, show_dir
    else:
        raise RuntimeError(f'--show-dir is not supported for default_scope={scope!r}')


def main():
    args = parse_args()
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    if args.show_dir:
        add_visualization(cfg, args.show_dir)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise RuntimeError('--tta needs tta_model and tta_pipeline in the config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    check_or_exit(cfg, 'test')
    runner = build_runner(cfg)
    if args.out:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must name a .pkl or .pickle file')
        if cfg.get('default_scope') == 'mmdet':  # masks as RLE, as mmdet's own tools/test.py
            from mmdet.evaluation import DumpDetResults as DumpResults
        else:
            from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    runner.test()
    finish_distributed()


if __name__ == '__main__':
    main()
