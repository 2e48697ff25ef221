"""Inference / training throughput and peak memory of one or several models.

    python tools/analysis_tools/benchmark.py configs/vmamba/vmamba-tiny_8xb128_in1k.py \\
        --batch 64 --shape 224 224 --mode both --device cuda \\
        --compare configs/v2m/v2m-s-star_8xb128_in1k.py \\
                  mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py

Every model gets random (B, 3, H, W) inputs that stand for the data
preprocessor's output (no data loading, no preprocessing) and:

* ``inference``: ``model(x, mode='tensor')`` under ``torch.no_grad`` (the
  classifier's scores, the detector's ``_forward`` incl. RPN + RoI heads, the
  segmentor's decode-head logits);
* ``train``: ``model(x, samples, mode='loss')`` on random ground truth, the
  summed loss' backward and an SGD step (lr 0, so weights do not move).

``--warmup`` untimed iterations precede ``--iters`` timed ones; on CUDA the
device is synchronised around the timed loop. Throughput = B * iters / time.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed loop
(after ``reset_peak_memory_stats``; includes the weights); on CPU the peak
resident-set size of the process above its level just before the warm-up,
sampled every 2 ms by a background thread (psutil) -- activations and
temporaries, not the weights already loaded. Freed heap is returned to the OS
(glibc ``malloc_trim``) before each measurement; the CPU figure is still a
sampled, allocator-dependent estimate, comparable between rows of one run.
"""
import argparse
import csv
import os.path as osp
import sys
import threading
import time
from typing import Dict, List

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _model_utils import (build_model, dummy_input, load_config, loss_forward,  # noqa: E402
                          num_classes_of, parse_shape, task_of, tensor_forward)

COLUMNS = ('config', 'task', 'mode', 'batch', 'shape', 'params_M', 'img_per_s', 'ms_per_iter',
           'peak_mem_MB')


class RSSPeak:
    """Background sampler of the process RSS; ``peak_delta_mb`` above the start."""

    def __init__(self, interval: float = 0.002):
        import psutil
        self.proc, self.interval = psutil.Process(), interval
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def peak_delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that memory an earlier
    model freed is not silently reused under the next model's baseline."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def bench_one(config: str, mode: str, batch: int, shape, warmup: int, iters: int,
              device: str, cfg_options=None) -> Dict:
    cfg = load_config(config, cfg_options)
    task = task_of(cfg)
    x = dummy_input(task, shape, batch, device)  # (b, 3, H, W); video (b, 1, 3, T, H, W)
    h, w = shape[-2:]
    model = build_model(cfg, device=device)
    params = sum(p.numel() for p in model.parameters())
    if mode == 'inference':
        fwd = tensor_forward(model, task, batch, h, w)

        def step():
            with torch.no_grad():
                fwd(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        n_cls = num_classes_of(cfg)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_forward(model, task, x, n_cls).backward()
            opt.step()

    cuda = device.startswith('cuda')
    if cuda:
        torch.cuda.empty_cache()
    else:
        _malloc_trim()
    mem = None if cuda else RSSPeak()
    if mem is not None:
        mem.__enter__()
    try:
        for _ in range(warmup):
            step()
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        dt = time.perf_counter() - t0
    finally:
        if mem is not None:
            mem.__exit__(None, None, None)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else mem.peak_delta_mb
    del model, x
    return dict(config=config, task=task, mode=mode, batch=batch, shape='x'.join(map(str, shape)),
                params_M=round(params / 1e6, 3), img_per_s=round(batch * iters / dt, 2),
                ms_per_iter=round(1000 * dt / iters, 2), peak_mem_MB=round(peak, 1))


def format_table(rows: List[Dict]) -> str:
    cells = [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    fmt = lambda vals: '| ' + ' | '.join(v.ljust(n) for v, n in zip(vals, widths)) + ' |'  # noqa
    lines = [fmt(COLUMNS), '|' + '|'.join('-' * (n + 2) for n in widths) + '|']
    return '\n'.join(lines + [fmt(row) for row in cells])


def parse_args():
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Throughput and peak memory (mmssm)')
    parser.add_argument('config', help='config file (or mmpretrain::path style)')
    parser.add_argument('--compare', nargs='+', default=[], metavar='CONFIG',
                        help='more configs benchmarked in the same run, side by side')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--shape', type=int, nargs='+', default=[224, 224],
                        help='H W, one size, or T H W (video clips)')
    parser.add_argument('--mode', choices=['inference', 'train', 'both'], default='inference')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--device', choices=['cpu', 'cuda'],
                        default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides applied to every config')
    parser.add_argument('--csv', help='also write the table to this CSV file')
    return parser.parse_args()


def main():
    args = parse_args()
    shape = parse_shape(args.shape)
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise ValueError('--batch and --iters must be >= 1, --warmup >= 0')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('--device cuda but torch.cuda.is_available() is False')
    modes = ['inference', 'train'] if args.mode == 'both' else [args.mode]
    rows = []
    for config in [args.config, *args.compare]:
        for mode in modes:
            rows.append(bench_one(config, mode, args.batch, shape, args.warmup, args.iters,
                                  args.device, args.cfg_options))
            print(f'done: {config} {mode}', file=sys.stderr, flush=True)
    mem = ('CUDA max_memory_allocated' if args.device == 'cuda'
           else 'CPU peak RSS above the pre-warm-up level')
    print(f'device={args.device} threads={torch.get_num_threads()} warmup={args.warmup} '
          f'iters={args.iters}; peak_mem_MB = {mem}')
    print(format_table(rows))
    if args.csv:
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == '__main__':
    main()
