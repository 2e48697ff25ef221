"""Whole models against what users would pick instead: speed and peak memory, side by side.

    PYTHONPATH=. python benchmarks/bench_models.py --quick          # subset, a few minutes
    PYTHONPATH=. python benchmarks/bench_models.py                  # every pair, size, batch
    PYTHONPATH=. python benchmarks/bench_models.py --pairs vim-deit --sizes 1024 --batch 1
    PYTHONPATH=. python benchmarks/bench_models.py --pairs v2m-vmamba --sizes 224 --batch 1 \\
        --modes inference --iters 10 --rounds 5   # median ratio of 5 (ours, theirs) rounds

Pairs (issue 14; the alternatives are mmpretrain's own configs, built through its registry):

* Vim-T vs DeiT-T at 224^2, 512^2, 1024^2, 1248^2;
* VMamba-T vs Swin-T and vs ConvNeXt-T at 224^2 and 1024^2;
* V2M-S* vs VMamba-T at 224^2;
* ConvNeXt-S4ND-T vs ConvNeXt-T at 224^2.

Each (model, size, batch, mode) is measured once with ``tools/analysis_tools/benchmark.py``'s
``bench_one`` (random preprocessed input; ``inference`` = ``mode='tensor'`` under no_grad,
``train`` = loss, backward and an SGD step; CPU peak memory = sampled RSS above the level
before the warm-up), the two models of a pair right after each other so that they see the
same machine load. Printed per pair: speed ratio ``ours / theirs`` in images/s (> 1: ours is
faster), peak-memory ratio, and the issue-14 target where there is one.
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools', 'analysis_tools'))
from benchmark import bench_one  # noqa: E402  (also puts this checkout's mmssm first)

MODELS = {
    'vim-t': osp.join(REPO, 'configs/vim/vim-tiny_8xb128_in1k.py'),
    'vmamba-t': osp.join(REPO, 'configs/vmamba/vmamba-tiny_8xb128_in1k.py'),
    'v2m-s*': osp.join(REPO, 'configs/v2m/v2m-s-star_8xb128_in1k.py'),
    'convnext-s4nd-t': osp.join(REPO, 'configs/convnext_s4nd/convnext-s4nd-tiny_8xb128_in1k.py'),
    'deit-t': 'mmpretrain::deit/deit-tiny_4xb256_in1k.py',
    'swin-t': 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
    'convnext-t': 'mmpretrain::convnext/convnext-tiny_32xb128_in1k.py',
}

# name: (ours, theirs, sizes)
PAIRS = {
    'vim-deit': ('vim-t', 'deit-t', (224, 512, 1024, 1248)),
    'vmamba-swin': ('vmamba-t', 'swin-t', (224, 1024)),
    'vmamba-convnext': ('vmamba-t', 'convnext-t', (224, 1024)),
    'v2m-vmamba': ('v2m-s*', 'vmamba-t', (224,)),
    's4nd-convnext': ('convnext-s4nd-t', 'convnext-t', (224,)),
}

# issue 14 targets: (pair, size, mode) -> (min speed ratio, max memory ratio); None = no bound
TARGETS = {
    ('vmamba-swin', 224, 'inference'): (1.0, None),
    ('v2m-vmamba', 224, 'inference'): (0.9, None),
    ('s4nd-convnext', 224, 'inference'): (0.8, 2.0),
    ('s4nd-convnext', 224, 'train'): (0.8, 2.0),
    ('vim-deit', 1024, 'inference'): (1.0, 1.0),
    ('vim-deit', 1248, 'inference'): (1.5, None),
}

# --quick: batch 1, (pair, size, modes)
QUICK = [
    ('vmamba-swin', 224, ('inference', 'train')),
    ('vmamba-convnext', 224, ('inference',)),
    ('v2m-vmamba', 224, ('inference', 'train')),
    ('s4nd-convnext', 224, ('inference', 'train')),
    ('vim-deit', 224, ('inference', 'train')),
    ('vim-deit', 1024, ('inference',)),
]


def plan(args) -> List[Tuple[str, int, int, str]]:
    """(pair, size, batch, mode) in run order."""
    if args.quick:
        return [(p, s, 1, m) for p, s, modes in QUICK for m in modes]
    runs = []
    for batch in args.batch:
        for pair in args.pairs:
            for size in PAIRS[pair][2]:
                if args.sizes and size not in args.sizes:
                    continue
                for mode in args.modes:
                    runs.append((pair, size, batch, mode))
    return runs


def iters_for(size: int, args) -> Tuple[int, int]:
    """(warmup, iters): fewer timed iterations for the big inputs (seconds per step on CPU)."""
    if args.iters is not None:
        return args.warmup, args.iters
    if size >= 1024:
        return 1, 1 if args.quick else 2
    return 1, 3 if args.quick else 5


def measure(model: str, size: int, batch: int, mode: str, args,
            cache: Dict[tuple, dict]) -> dict:
    key = (model, size, batch, mode)
    if key not in cache:
        warmup, iters = iters_for(size, args)
        t0 = time.perf_counter()
        cache[key] = bench_one(MODELS[model], mode, batch, (size, size), warmup, iters,
                               args.device)
        print(f'  {model:16s} {size:4d}^2 b{batch} {mode:9s} '
              f'{cache[key]["ms_per_iter"]:9.1f} ms/iter {cache[key]["peak_mem_MB"]:8.1f} MB '
              f'({time.perf_counter() - t0:.0f} s)', file=sys.stderr, flush=True)
    return cache[key]


def verdict(pair: str, size: int, mode: str, speed: float, mem: Optional[float]) -> str:
    target = TARGETS.get((pair, size, mode))
    if target is None:
        return ''
    lo, mem_hi = target
    parts = [f'speed >= {lo}x: ' + ('met' if speed >= lo else f'missed by {lo / speed:.2f}x')]
    if mem_hi is not None and mem is not None:
        parts.append(f'mem <= {mem_hi}x: ' + ('met' if mem <= mem_hi
                                               else f'missed by {mem / mem_hi:.2f}x'))
    return '; '.join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true',
                   help='batch 1 subset: every pair at 224^2 (+ Vim/DeiT inference at 1024^2)')
    p.add_argument('--pairs', nargs='+', choices=sorted(PAIRS), default=list(PAIRS))
    p.add_argument('--sizes', nargs='+', type=int, help='only these of each pair\'s sizes')
    p.add_argument('--batch', nargs='+', type=int, default=[1, 8])
    p.add_argument('--modes', nargs='+', choices=['inference', 'train'],
                   default=['inference', 'train'])
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--iters', type=int, help='timed iterations (default: by size)')
    p.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--rounds', type=int, default=1,
                   help='(ours, theirs) rounds per row; the speed ratio is their median')
    p.add_argument('--device', choices=['cpu', 'cuda'],
                   default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--md', help='also write the ratio table (markdown) to this file')
    p.add_argument('--dry-run', action='store_true', help='list the planned runs and exit')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = plan(args)
    if not runs:
        raise SystemExit('nothing to run: check --pairs / --sizes')
    if args.dry_run:
        for pair, size, batch, mode in runs:
            ours, theirs = PAIRS[pair][:2]
            print(f'{ours} / {theirs} {size}^2 batch {batch} {mode} '
                  f'(warmup, iters) = {iters_for(size, args)}')
        return
    try:
        load = ' load average %.1f %.1f %.1f' % __import__('os').getloadavg()
    except OSError:
        load = ''
    header = (f'torch {torch.__version__}, device {args.device}, threads '
              f'{torch.get_num_threads()},{load}')
    print(header, file=sys.stderr, flush=True)
    cache: Dict[tuple, dict] = {}
    rows = []
    for pair, size, batch, mode in runs:
        ours, theirs = PAIRS[pair][:2]
        a = measure(ours, size, batch, mode, args, cache)  # adjacent runs: same load
        b = measure(theirs, size, batch, mode, args, cache)
        speed = a['img_per_s'] / b['img_per_s']
        if args.rounds > 1:
            # more (ours, theirs) rounds, freshly built: on a VM whose speed drifts between
            # runs, the median of per-round ratios is steadier than one pair of means (the
            # memory columns stay the first round's: later rounds reuse the heap)
            ratios = [speed]
            for _ in range(args.rounds - 1):
                a_r = measure(ours, size, batch, mode, args, {})
                b_r = measure(theirs, size, batch, mode, args, {})
                ratios.append(a_r['img_per_s'] / b_r['img_per_s'])
            speed = statistics.median(ratios)
            print(f'  {pair} {size}^2 b{batch} {mode}: ratios per round '
                  + ' '.join(f'{r:.2f}' for r in ratios), file=sys.stderr, flush=True)
        mem = a['peak_mem_MB'] / b['peak_mem_MB'] if b['peak_mem_MB'] > 0 else None
        rows.append((f'{ours} / {theirs}', f'{size}^2', str(batch), mode,
                     f'{a["ms_per_iter"]:.1f}', f'{b["ms_per_iter"]:.1f}', f'{speed:.2f}x',
                     f'{a["peak_mem_MB"]:.0f}', f'{b["peak_mem_MB"]:.0f}',
                     '-' if mem is None else f'{mem:.2f}x',
                     verdict(pair, size, mode, speed, mem)))
    cols = ('pair (ours / theirs)', 'size', 'batch', 'mode', 'ours ms', 'theirs ms',
            'speed ratio', 'ours MB', 'theirs MB', 'mem ratio', 'issue-14 target')
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * 4 + '---:|' * 6 + '---|']
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    try:
        load_end = ' load average %.1f %.1f %.1f' % __import__('os').getloadavg()
    except OSError:
        load_end = ''
    mem_kind = ('CUDA max_memory_allocated' if args.device == 'cuda'
                else 'CPU peak RSS above the pre-warm-up level')
    text = '\n'.join([header, f'end of run:{load_end}',
                      f'speed ratio = ours img/s / theirs img/s (> 1: ours faster)'
                      + (f', median of {args.rounds} rounds (ms, MB: the first round)'
                         if args.rounds > 1 else '') + '; '
                      f'MB = {mem_kind}', *lines])
    print(text)
    if args.md:
        with open(args.md, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
