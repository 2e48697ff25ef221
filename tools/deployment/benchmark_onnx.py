"""Throughput and peak memory: onnxruntime (CPU) vs PyTorch, side by side, one run.

    python tools/deployment/benchmark_onnx.py configs/vim/vim_in1k_tiny.py \\
        --shape 64 64 --batch 8 --iters 20 [--part backbone] [--onnx model.onnx]

The model is exported first (or ``--onnx`` names a file exported with the same config,
part and input size), then every backend runs the same random (B, 3, H, W) input (the
data preprocessor's output) with the same number of threads: ``--warmup`` untimed then
``--iters`` timed iterations each. PyTorch runs twice, in eager mode: with the pure-PyTorch
chunked scan (``pytorch-eager``, scan backend ``cpu``) and with the compiled CPU scan
(``pytorch-cpp``, the default when the extension is built; left out when it is not).
Peak memory is the process' peak RSS above its level just before each backend's warm-up
(sampled every 2 ms; the PyTorch weights and the ONNX session are loaded before that level
is taken; the session has not run yet, so its memory arena is counted). Outputs are
compared once, with a separate session.
"""
import argparse
import contextlib
import os
import os.path as osp
import sys
import tempfile
import time

import torch

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.join(osp.dirname(HERE), 'analysis_tools'))
from _model_utils import build_model, load_config, parse_shape, task_of  # noqa: E402
from benchmark import RSSPeak, _malloc_trim  # noqa: E402

from mmssm.deploy.export import (compare_outputs, export_onnx, make_session,  # noqa: E402
                                 run_onnx)
from mmssm.deploy.wrappers import PARTS, ExportModule  # noqa: E402

COLUMNS = ('backend', 'batch', 'shape', 'threads', 'img_per_s', 'ms_per_iter', 'peak_mem_MB')


def _time(step, warmup: int, iters: int):
    _malloc_trim()
    with RSSPeak() as mem:
        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        dt = time.perf_counter() - t0
    return dt, mem.peak_delta_mb


def run(argv=None) -> list:
    p = argparse.ArgumentParser(description='onnxruntime vs PyTorch (CPU)')
    p.add_argument('config')
    p.add_argument('checkpoint', nargs='?', default=None)
    p.add_argument('--shape', type=int, nargs='+', default=[224, 224])
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--part', choices=PARTS, default='model')
    p.add_argument('--onnx', default=None,
                   help='a file exported by pytorch2onnx.py from the same config, checkpoint '
                        'and part (skips the export; dynamic files run at any --shape)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--threads', type=int, default=0,
                   help='threads for both backends (default: torch.get_num_threads())')
    args = p.parse_args(argv)
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise ValueError('--batch and --iters must be >= 1, --warmup >= 0')
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = load_config(args.config)
    task = task_of(cfg)
    shape = parse_shape(args.shape)
    torch.manual_seed(0)  # without a checkpoint: the same initial weights in every tool run
    model = ExportModule(build_model(cfg, args.checkpoint), task, args.part).eval()
    x = torch.randn(args.batch, 3, *shape, generator=torch.Generator().manual_seed(0))
    path = args.onnx
    if path is None:
        path = osp.join(tempfile.mkdtemp(prefix='mmssm_onnx_'), 'model.onnx')
        export_onnx(model, x, path)
    err = compare_outputs(_no_grad(model, x), run_onnx(path, x, threads=threads))
    # a fresh session that has not run yet: its memory arena grows during the warm-up, and
    # is counted like PyTorch's activations
    sess = make_session(path, threads)

    def torch_step(scan_backend):
        def step():
            with _scan_backend(scan_backend), torch.no_grad():
                model(x)
        return step

    feed = {sess.get_inputs()[0].name: x.numpy()}
    backends = [('pytorch-eager', torch_step('cpu'))]
    from mmssm.ops import selective_scan_cpp
    if selective_scan_cpp.available():
        backends.append(('pytorch-cpp', torch_step('cpp')))
    backends.append(('onnxruntime-cpu', lambda: sess.run(None, feed)))
    rows = []
    for name, step in backends:
        dt, mem = _time(step, args.warmup, args.iters)
        rows.append(dict(backend=name, batch=args.batch, shape='x'.join(map(str, shape)),
                         threads=threads, img_per_s=round(args.batch * args.iters / dt, 2),
                         ms_per_iter=round(1000 * dt / args.iters, 2),
                         peak_mem_MB=round(mem, 1)))
    print(f'{args.config} ({task}, part={args.part}), warmup={args.warmup} iters={args.iters}; '
          f'peak_mem_MB = CPU peak RSS above the pre-warm-up level; onnx vs torch: max abs '
          f'err {err["max_abs"]:.2e}, max rel err {err["max_rel"]:.2e}')
    print(format_table(rows))
    return rows


@contextlib.contextmanager
def _scan_backend(name: str):
    """Force mmssm's selective-scan backend (``cpu``: chunked PyTorch, ``cpp``: compiled)."""
    old = os.environ.get('MMSSM_SCAN_BACKEND')
    os.environ['MMSSM_SCAN_BACKEND'] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ['MMSSM_SCAN_BACKEND']
        else:
            os.environ['MMSSM_SCAN_BACKEND'] = old


def format_table(rows: list) -> str:
    cells = [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]

    def fmt(vals):
        return '| ' + ' | '.join(v.ljust(n) for v, n in zip(vals, widths)) + ' |'
    lines = [fmt(COLUMNS), '|' + '|'.join('-' * (n + 2) for n in widths) + '|']
    return '\n'.join(lines + [fmt(row) for row in cells])


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


if __name__ == '__main__':
    run()
