"""FLOPs and parameters of a model from its config, without a dataset.

    python tools/analysis_tools/get_flops.py configs/vmamba/vmamba-tiny_8xb128_in1k.py --shape 224 224
    python tools/analysis_tools/get_flops.py configs/mask_rcnn/vmamba_t_1x.py --shape 1280 800
    python tools/analysis_tools/get_flops.py configs/video/convnext_s4nd_3d_hmdb51.py --shape 30 224 224

The model is built in the task library of ``default_scope`` (mmpretrain,
mmdet, mmseg, mmaction) and traced by mmengine's ``FlopAnalyzer`` on one dummy
(1, 3, H, W) input (video: one (3, T, H, W) clip) through its ``mode='tensor'``
path (video recognizer: backbone, neck and cls_head; classifier: backbone,
neck and head; detector: ``_forward`` = backbone, neck, RPN head, proposal
post-processing and RoI heads on fake image metas; segmentor: ``_forward`` =
backbone, neck and decode head, no auxiliary head). The data preprocessor
(normalisation, padding) is not counted. Counting convention (see
:mod:`mmssm.utils.flops`): 1 multiply-add = 1 flop, element-wise ops not
counted, selective scan = 9*B*L*D*N (+B*D*L for D, +B*D*L for the z gate),
scan-order permutations 0, FFTs 2.5 N log2 N (real) / 5 N log2 N (complex).
"""
import argparse
import json
import os.path as osp
import sys
import warnings
from typing import Dict, Optional, Sequence

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _model_utils import (build_model, dummy_input, load_config, parse_shape,  # noqa: E402
                          task_of, tensor_forward)

from mmssm.utils.flops import count_flops  # noqa: E402


def human(x: float, unit: str = '') -> str:
    for scale, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
        if abs(x) >= scale:
            return f'{x / scale:.3f}{suffix}{unit}'
    return f'{x:.0f}{unit}'


def model_complexity(cfg, shape: Sequence[int], with_flops: bool = True,
                     device: str = 'cpu') -> Dict[str, Optional[float]]:
    """Parameters (total/backbone) and, if asked, FLOPs (total/backbone) at (H, W)
    (video: (T, H, W))."""
    task = task_of(cfg)
    x = dummy_input(task, shape, device=device)  # checks the shape before the build
    h, w = shape[-2:]
    model = build_model(cfg, device=device, init=False)
    params = sum(p.numel() for p in model.parameters())
    bb_params = sum(p.numel() for p in model.backbone.parameters())
    res = dict(task=task, params=params, backbone_params=bb_params, flops=None,
               backbone_flops=None, height=h, width=w, input_shape=list(x.shape),
               unsupported={})
    if not with_flops:
        return res
    model.forward = tensor_forward(model, task, 1, h, w)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        analyzer = count_flops(model, (x, ))
        by_module = analyzer.by_module()
        res.update(flops=int(analyzer.total()), backbone_flops=int(by_module.get("backbone", 0)),
                   unsupported=dict(analyzer.unsupported_ops()),
                   by_operator=dict(analyzer.by_operator()))
    res['analyzer'] = analyzer
    return res


def parse_args():
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='FLOPs and parameters of a model (mmssm)')
    parser.add_argument('config', help='config file (or mmpretrain::path style)')
    parser.add_argument('--shape', type=int, nargs='+', default=[224, 224],
                        help='input size: H W, one value for a square, or T H W (video)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value pairs')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--table', type=int, default=0, metavar='DEPTH',
                        help='also print the per-module table down to this depth')
    parser.add_argument('--json', help='also write the numbers to this JSON file')
    return parser.parse_args()


def main():
    args = parse_args()
    shape = parse_shape(args.shape)
    cfg = load_config(args.config, args.cfg_options)
    res = model_complexity(cfg, shape, device=args.device)
    analyzer = res.pop('analyzer')
    line = '=' * 60
    print(line)
    print(f'Config:          {args.config}')
    print(f'Task:            {res["task"]}')
    print(f'Input shape:     {tuple(res["input_shape"])}')
    print(f'FLOPs:           {human(res["flops"])}  ({res["flops"]})')
    print(f'Backbone FLOPs:  {human(res["backbone_flops"])}  ({res["backbone_flops"]})')
    print(f'Params:          {human(res["params"])}  ({res["params"]})')
    print(f'Backbone params: {human(res["backbone_params"])}  ({res["backbone_params"]})')
    print('FLOPs by operator: ' + ', '.join(
        f'{k}={human(v)}' for k, v in sorted(res['by_operator'].items(), key=lambda kv: -kv[1])))
    if res['unsupported']:
        print('Not counted (no handle): ' + ', '.join(
            f'{k} x{v}' for k, v in sorted(res['unsupported'].items())))
    print(line)
    print('1 multiply-add = 1 FLOP (fvcore convention); element-wise ops and the data '
          'preprocessor are not counted.')
    if args.table:
        from mmengine.analysis import flop_count_table
        print(flop_count_table(analyzer, max_depth=args.table))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
