"""The README's Mask R-CNN demo: one train iteration, an older checkout against this one.

    PYTHONPATH=. python benchmarks/bench_demo_iter.py --base /work/wt/base14 \\
        --data /tmp/tiny --rounds 3 --iters 5

Issue 14's target "the README's Mask R-CNN demo iteration at least 2x faster than today"
compares two trees of this repository (``--base``: the checkout of "today", e.g. f526311;
``--new``: default this one) on the same config and the same real batches. Every config in
``--configs`` that exists in the config's tree runs in both trees (a relative path is
looked up in ``--new``, so a config that only the new tree has also runs with the base
tree's code when that code can build it).

Each measurement is one subprocess with ``PYTHONPATH=<tree>``: it builds the runner from
the config (mmengine ``Runner.from_cfg``, as ``tools/train.py``), draws ``--batches`` real
batches from the config's train dataloader (the tiny sets of
``tools/misc/make_tiny_datasets.py --tasks coco coco_demo``), then times
``model.train_step(batch, optim_wrapper)`` (data preprocessor, forward, losses, backward,
gradient clipping, optimizer step: what ``tools/train.py`` logs as ``time`` minus the data
loading) over ``--warmup`` + ``--iters`` iterations cycling through the batches. Base and
new subprocesses alternate for ``--rounds`` rounds so that both see the same machine load;
the ratio is base ms / new ms of the per-tree medians of the per-round medians
(> 1: the new tree is faster).
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = ('configs/mask_rcnn/v2m_s_1x_tiny.py',  # `make demo` at f526311
           'configs/demo/mask_rcnn_v2m_s.py')     # `make demo` (tools/misc/demo.py) since


def worker(args) -> None:
    """Time train_step in this process (the tree is whatever PYTHONPATH puts first)."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import mmssm  # noqa: F401  (registers mmssm's modules, like tools/train.py's config)
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(args.worker)
    cfg.work_dir = tempfile.mkdtemp(prefix='bench_demo_')
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10**6)
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.log_level = 'WARNING'
    torch.manual_seed(0)
    runner = Runner.from_cfg(cfg)
    loader = iter(runner.build_dataloader(cfg.train_dataloader, seed=0))
    batches = [next(loader) for _ in range(args.batches)]
    model = runner.model
    model.train()
    optim = runner.build_optim_wrapper(cfg.optim_wrapper)
    times, cpu = [], []
    for i in range(args.warmup + args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        model.train_step(batches[i % len(batches)], optim_wrapper=optim)
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    print('RESULT ' + json.dumps(dict(mmssm=mmssm.__file__, ms=times, cpu_ms=cpu)))


def run_tree(tree: str, config: str, args) -> Dict[str, List[float]]:
    env = dict(os.environ, PYTHONPATH=tree, MMSSM_TINY_DATA=args.data)
    cmd = [sys.executable, osp.abspath(__file__), '--worker', config, '--warmup',
           str(args.warmup), '--iters', str(args.iters), '--batches', str(args.batches)]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith('RESULT ')]
    if out.returncode or not lines:
        raise RuntimeError(f'{tree}: {config} failed (rc {out.returncode}):\n'
                           f'{out.stderr[-3000:]}')
    res = json.loads(lines[-1][len('RESULT '):])
    if not osp.abspath(res['mmssm']).startswith(osp.abspath(tree)):
        raise RuntimeError(f'{tree}: the worker imported mmssm from {res["mmssm"]}')
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--base', help='checkout of "today" (required unless --worker)')
    p.add_argument('--new', default=REPO, help='the tree to compare (default: this one)')
    p.add_argument('--configs', nargs='+', default=list(CONFIGS))
    p.add_argument('--data', default=osp.join(REPO, 'data', 'tiny'),
                   help='root of the tiny datasets ($MMSSM_TINY_DATA)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--batches', type=int, default=4, help='real batches cycled through')
    p.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--md', help='also write the table (markdown) to this file')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.base:
        p.error('--base is required')
    for name in ('coco', 'coco_demo'):
        if not osp.isdir(osp.join(args.data, name)):
            p.error(f'--data {args.data}: no {name}/ (write it with tools/misc/'
                    f'make_tiny_datasets.py --out {args.data} --tasks coco coco_demo)')
    trees = dict(base=osp.abspath(args.base), new=osp.abspath(args.new))
    load = 'load average %.1f %.1f %.1f' % os.getloadavg()
    print(f'start: {load}', file=sys.stderr, flush=True)
    rows = []
    for rel in args.configs:
        config = rel if osp.isabs(rel) else osp.join(trees['new'], rel)
        if not osp.isfile(config):
            raise SystemExit(f'{config}: not found')
        in_base = osp.isfile(osp.join(trees['base'], rel)) if not osp.isabs(rel) else False
        per: Dict[str, List[float]] = dict(base=[], new=[])
        cpu: Dict[str, List[float]] = dict(base=[], new=[])
        for r in range(args.rounds):
            for which in ('base', 'new'):
                res = run_tree(trees[which], config, args)
                per[which].append(statistics.median(res['ms']))
                cpu[which].append(statistics.median(res['cpu_ms']))
                print(f'  {rel} round {r + 1} {which}: median {per[which][-1]:.0f} ms/iter '
                      f'(min {min(res["ms"]):.0f}; process CPU {cpu[which][-1]:.0f} ms)',
                      file=sys.stderr, flush=True)
        b, n = statistics.median(per['base']), statistics.median(per['new'])
        bc, nc = statistics.median(cpu['base']), statistics.median(cpu['new'])
        rows.append((rel, 'yes' if in_base else 'no (new config, base code)',
                     f'{b:.0f}', f'{n:.0f}', f'{b / n:.2f}x', f'{bc:.0f}', f'{nc:.0f}',
                     f'{bc / nc:.2f}x'))
    # process CPU time (all threads) is less sensitive to other processes' load than
    # wall time, but counts OpenMP spin-waiting: report both
    cols = ('config', 'in base tree', 'base ms/iter', 'new ms/iter', 'speed-up (base / new)',
            'base CPU ms', 'new CPU ms', 'CPU-time ratio')
    lines = ['| ' + ' | '.join(cols) + ' |', '|---|---|' + '---:|' * 6]
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    text = '\n'.join([f'base {trees["base"]}, new {trees["new"]}; start: {load}; '
                      f'end: load average %.1f %.1f %.1f' % os.getloadavg(),
                      f'{args.rounds} rounds x ({args.warmup} warm-up + {args.iters} timed '
                      'train_step), medians', *lines])
    print(text)
    if args.md:
        with open(args.md, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
