"""Export an mmssm model (classifier, segmentor, detector, video recognizer, or its
backbone / backbone + neck) to an ONNX file in standard operators, and check it.

    python tools/deployment/pytorch2onnx.py configs/vim/vim_in1k_tiny.py \\
        [work_dirs/x/iter_8.pth] --shape 64 64 --dynamic --verify --out vim.onnx

The input is the data preprocessor's output (normalised (B, 3, H, W) images; video:
(B, 3, T, H, W) clips with ``--shape T H W``). What each task exports: see
:mod:`mmssm.deploy.wrappers` and docs/deployment.md. ``--verify`` runs the file with
onnxruntime (CPU) and prints the max abs / relative error against PyTorch, at a second
input size too when ``--dynamic``.
"""
import argparse
import os
import os.path as osp
import sys
import time

import torch

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'analysis_tools'))
from _model_utils import build_model, load_config, parse_shape, task_of  # noqa: E402

from mmssm.deploy.export import (DEFAULT_OPSET, MIN_OPSET,  # noqa: E402
                                 check_onnx, compare_outputs, export_onnx,
                                 has_fixed_size_layers, run_onnx)
from mmssm.deploy.wrappers import PARTS, ExportModule  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Export an mmssm model to ONNX (standard ops)')
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', nargs='?', default=None,
                   help='checkpoint (.pth); without it the model keeps its initial weights')
    p.add_argument('--shape', type=int, nargs='+', required=True,
                   help='input H W (one value: square; video: T H W)')
    p.add_argument('--batch', type=int, default=1, help='export batch size')
    p.add_argument('--dynamic', action='store_true',
                   help='dynamic batch, height and width (and time for video) where the model '
                        'allows; a clear error where not')
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET, help='ONNX opset (>= 18)')
    p.add_argument('--part', choices=PARTS, default='model',
                   help="'model' (task outputs), 'backbone', or 'neck' (backbone + neck)")
    p.add_argument('--out', default=None, help='output file (default: <config name>.onnx)')
    p.add_argument('--verify', action='store_true',
                   help='run with onnxruntime (CPU) and compare with PyTorch')
    p.add_argument('--second-shape', type=int, nargs='+', default=None,
                   help='with --dynamic --verify: the second size checked (default: H+S, W+2S '
                        'with S the model\'s total stride, batch + 1)')
    return p.parse_args(argv)


def _stride(model) -> int:
    """A size step every axis of the model accepts: its total stride if it says, else 32
    (a multiple of every patch size / pyramid stride in mmssm)."""
    v = getattr(model.backbone, 'total_stride', None)
    return int(max(v)) if isinstance(v, (tuple, list)) else int(v or 32)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config {args.config!r} does not exist')
    if args.checkpoint is not None and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist')
    if args.opset < MIN_OPSET:
        raise ValueError(f'--opset must be >= {MIN_OPSET} (torch\'s ONNX exporter and the '
                         f'Scan/DFT forms need it), got {args.opset}')
    if args.batch < 1:
        raise ValueError(f'--batch must be >= 1, got {args.batch}')
    cfg = load_config(args.config)
    task = task_of(cfg)  # a config of an unsupported task library fails here, by name
    shape = parse_shape(args.shape)
    if (task == 'video') != (len(shape) == 3):
        raise ValueError(f'--shape: a {task} model needs '
                         f'{"T H W" if task == "video" else "H W"}, got {list(args.shape)}')
    torch.manual_seed(0)  # without a checkpoint: the same initial weights in every tool run
    model = build_model(cfg, args.checkpoint)
    module = ExportModule(model, task, args.part).eval()
    if args.dynamic and has_fixed_size_layers(model):
        dynamic = ['batch']
        print('--dynamic: this model holds S4ND layers whose kernels are computed once at '
              'export for the export size, so only the batch axis is dynamic', flush=True)
    else:
        dynamic = args.dynamic
    x = torch.randn(args.batch, 3, *shape, generator=torch.Generator().manual_seed(0))
    out = args.out or osp.splitext(osp.basename(args.config))[0] + '.onnx'
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    t0 = time.perf_counter()
    export_onnx(module, x, out, dynamic=dynamic, opset=args.opset)
    info = check_onnx(out)
    print(f'exported {out} ({task}, part={args.part}, input {tuple(x.shape)}, dynamic='
          f'{dynamic}) in {time.perf_counter() - t0:.1f}s: {info["nodes"]} nodes '
          f'({info["total_nodes"]} with loop bodies), {info["op_types"].get("Scan", 0)} Scan, '
          f'{info["op_types"].get("DFT", 0)} DFT, opset {info["opset"]}, standard domain only',
          flush=True)
    result = dict(path=out, task=task, info=info, checks=[])
    if args.verify:
        sizes = [x]
        if dynamic is True:
            step = _stride(model)
            if args.second_shape:
                s2 = parse_shape(args.second_shape)
            else:
                s2 = tuple(shape[:-2]) + (shape[-2] + step, shape[-1] + 2 * step)
            sizes.append(torch.randn(args.batch + 1, 3, *s2,
                                     generator=torch.Generator().manual_seed(1)))
        elif dynamic:
            sizes.append(torch.randn(args.batch + 1, 3, *shape,
                                     generator=torch.Generator().manual_seed(1)))
        for xi in sizes:
            with torch.no_grad():
                ref = module(xi)
            err = compare_outputs(ref, run_onnx(out, xi))
            result['checks'].append(dict(shape=tuple(xi.shape), **err))
            print(f'verify input {tuple(xi.shape)}: {err["outputs"]} output(s), max abs err '
                  f'{err["max_abs"]:.3e}, max rel err (to the output scale) '
                  f'{err["max_rel"]:.3e}', flush=True)
    return result


if __name__ == '__main__':
    main()
