"""S4ND (2-D, ConvNeXt-S4ND block config) vs a 7x7 depthwise conv of the same shape, on CPU.

Times forward and forward+backward at the ConvNeXt-T stage shapes and prints the ratios
S4ND / conv in one run. Not a test. Usage:

    PYTHONPATH=$PWD python benchmarks/bench_s4nd.py [--threads 1] [--batch 1 8] [--repeat 7]
        [--conv-mode auto|toeplitz|axes|outer] [--stem]
    PYTHONPATH=$PWD python benchmarks/bench_s4nd.py --models [--train] [--threads 1 2] [--batch 1 8]
        [--cauchy-ab] [--spectrum-ab]
    PYTHONPATH=$PWD python benchmarks/bench_s4nd.py --memory [--threads 1 2] [--batch 1 8]

``--models``: whole ConvNeXt-S4ND-T against mmpretrain's ConvNeXt-T (224^2, inference),
interleaved in one process, best of ``--repeat``: process CPU time (the honest number on a
loaded machine at 1 thread) and wall time; with ``--train``, training steps (loss, backward,
SGD step) instead; with ``--cauchy-ab``, S4ND-T also with the PyTorch Cauchy product
instead of the compiled one ("torch" row); with ``--spectrum-ab``, S4ND-T also without the
compiled spectrum op (compiled Cauchy products, Woodbury step in PyTorch: "cauchy" row). ``--memory``: peak RSS above the level before
the first forward, in a fresh subprocess per (model, threads, batch): the first forward
of a freshly built model (for S4ND: C -> C~ conversion, kernel generation, caches) and
then 3 steady forwards.
"""
import argparse
import os.path as osp
import subprocess
import sys
import time

import torch
import torch.nn as nn

from mmssm.models.layers.s4nd import S4ND
from mmssm.ops import cauchy_cpu

STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]  # ConvNeXt-T (C, H=W) at 224


def block_layer(C: int, L: int, conv_mode: str = 'auto') -> S4ND:
    """The ConvNeXt-S4ND-T block layer (ImageNet config): DPLR, fourier, global kernel."""
    return S4ND(C, d_state=64, l_max=[L, L], dim=2, bidirectional=True, channels=1,
                activation=None, final_act='none', linear=True, init='fourier', rank=1,
                trank=1, n_ssm=1, dt_min=0.1, dt_max=1.0, lr=0.001, conv_mode=conv_mode)


def stem_layer() -> S4ND:
    """The ConvNeXt-S4ND-T stem S4ND (dense 3 -> 32, 16 taps per side, 'fourier')."""
    return S4ND(3, d_state=64, l_max=[16, 16], dim=2, out_channels=32, bidirectional=True,
                channels=1, activation=None, final_act='none', linear=True, init='fourier',
                rank=1, trank=1, n_ssm=1, dt_min=0.1, dt_max=1.0, lr=0.001)


def bench_stem(batches, size: int, repeat: int) -> None:
    """Stem S4ND + AvgPool(4): ``S4ND.pooled`` (strided per-axis convs), the full-resolution
    forward then pooling (the former path), and ConvNeXt-T's 4x4 stride-4 conv stem."""
    print(f'stem at {size}^2: S4ND(3->32) + AvgPool(4) vs ConvNeXt-T Conv2d(3, 96, 4, stride 4)')
    print(f'{"B":>2} | {"conv":>8} {"pooled":>8} {"ratio":>6} | {"fwd+pool":>8} {"ratio":>6} | '
          f'{"conv f+b":>8} {"pooled f+b":>10} {"ratio":>6}')
    s4, conv = stem_layer(), nn.Conv2d(3, 96, 4, stride=4)
    for B in batches:
        x = torch.randn(B, 3, size, size)
        xg = x.clone().requires_grad_()

        def nograd(f):
            def g():
                with torch.no_grad():
                    f()
            return g
        c, p, o = bench_pair([nograd(lambda: conv(x)), nograd(lambda: s4.pooled(x, (4, 4))),
                              nograd(lambda: nn.functional.avg_pool2d(s4(x), 4))], repeat)
        cb, pb = bench_pair([lambda: conv(xg).sum().backward(),
                             lambda: s4.pooled(xg, (4, 4)).sum().backward()], repeat)
        print(f'{B:>2} | {1e3 * c:8.2f} {1e3 * p:8.2f} {p / c:6.2f} | {1e3 * o:8.2f} {o / c:6.2f} | '
              f'{1e3 * cb:8.2f} {1e3 * pb:10.2f} {pb / cb:6.2f}', flush=True)


def bench_pair(fns, repeat: int):
    """Best-of-``repeat`` seconds of each fn, calls interleaved so load spikes hit both alike."""
    for fn in fns:
        fn()  # warm-up (FFT plans, lazy C~ set-up, kernel cache)
    best = [float('inf')] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODELS = {'convnext-s4nd-t': osp.join(REPO, 'configs', 'convnext_s4nd',
                                      'convnext-s4nd-tiny_8xb128_in1k.py'),
          'convnext-t': 'mmpretrain::convnext/convnext-tiny_32xb128_in1k.py'}


def _build(name: str, batch: int):
    """(model in eval mode, its ``mode='tensor'`` forward) as ``bench_models.py`` builds it."""
    sys.path.insert(0, osp.join(REPO, 'tools', 'analysis_tools'))
    from _model_utils import build_model, load_config, task_of, tensor_forward
    cfg = load_config(MODELS[name])
    model = build_model(cfg, device='cpu').eval()
    return model, tensor_forward(model, task_of(cfg), batch, 224, 224)


def _train_step(name: str):
    """A training step as ``tools/analysis_tools/benchmark.py`` times it: loss on random
    labels, backward and an SGD step (lr 0: the weights keep their values)."""
    sys.path.insert(0, osp.join(REPO, 'tools', 'analysis_tools'))
    from _model_utils import build_model, load_config, loss_forward, num_classes_of, task_of
    cfg = load_config(MODELS[name])
    model = build_model(cfg, device='cpu').train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    task, n_cls = task_of(cfg), num_classes_of(cfg)

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss_forward(model, task, x, n_cls).backward()
        opt.step()
    return step


def _with_switch(f, name: str, value: bool):
    """``f`` run with the switch ``mmssm.ops.cauchy_cpu.<name>`` set to ``value``."""
    def g(x):
        saved = getattr(cauchy_cpu, name)
        setattr(cauchy_cpu, name, value)
        try:
            f(x)
        finally:
            setattr(cauchy_cpu, name, saved)
    return g


def bench_models(batches, threads, repeat: int, train: bool = False,
                 cauchy_ab: bool = False, spectrum_ab: bool = False) -> None:
    """Whole-model inference (or training steps), the models interleaved, best of ``repeat``.

    ``cauchy_ab``: ConvNeXt-S4ND-T also with the PyTorch Cauchy product instead of the
    compiled one (same model instance, in the same rotation): an old/new A/B of the kernel.
    ``spectrum_ab``: likewise without the compiled spectrum op (the compiled Cauchy products
    with the Woodbury step in PyTorch).
    """
    what = 'training step (loss, backward, SGD step)' if train else 'inference (no_grad)'
    print('whole models, 224^2 %s, best of %d, interleaved; ratio = '
          'ConvNeXt-T time / ConvNeXt-S4ND-T time (speed of S4ND-T relative to ConvNeXt-T)'
          % (what, repeat))
    if cauchy_ab:
        print('"torch": S4ND-T with the PyTorch Cauchy product (mmssm.ops.cauchy_cpu.enabled = '
              'False); compiled kernel %s' % ('loaded' if cauchy_cpu.available() else
                                             'NOT built: both rows use PyTorch'))
    if spectrum_ab:
        print('"cauchy": S4ND-T without the compiled spectrum op (mmssm.ops.cauchy_cpu.'
              'spectrum_enabled = False); spectrum op %s' % (
                  'loaded' if cauchy_cpu.dplr_available() else 'NOT built: same rows'))
    print(f'{"thr":>3} {"B":>2} | {"s4nd cpu":>9} {"cnx cpu":>8} {"ratio":>6} | '
          f'{"s4nd wall":>9} {"cnx wall":>8} {"ratio":>6}')
    for B in batches:
        fwds = [_train_step(n) if train else _build(n, B)[1] for n in MODELS]
        extra = [('torch', 'enabled')] if cauchy_ab else []
        extra += [('cauchy', 'spectrum_enabled')] if spectrum_ab else []
        fwds += [_with_switch(fwds[0], name, False) for _, name in extra]
        x = torch.randn(B, 3, 224, 224)
        for th in threads:
            torch.set_num_threads(th)
            cpu, wall = [float('inf')] * len(fwds), [float('inf')] * len(fwds)
            with torch.set_grad_enabled(train):
                for f in fwds:
                    f(x)
                for _ in range(repeat):
                    for i, f in enumerate(fwds):
                        c, w = time.process_time(), time.perf_counter()
                        f(x)
                        cpu[i] = min(cpu[i], time.process_time() - c)
                        wall[i] = min(wall[i], time.perf_counter() - w)
            rows = [('', 0)] + [(tag, 2 + i) for i, (tag, _) in enumerate(extra)]
            for tag, i in rows:
                print(f'{th:>3} {B:>2} | {1e3 * cpu[i]:9.1f} {1e3 * cpu[1]:8.1f} '
                      f'{cpu[1] / cpu[i]:6.3f} | {1e3 * wall[i]:9.1f} {1e3 * wall[1]:8.1f} '
                      f'{wall[1] / wall[i]:6.3f} {tag}', flush=True)


def _memory_child(name: str, batch: int, threads: int) -> None:
    """Prints 'first steady' peak RSS deltas (MB) of one freshly built model."""
    sys.path.insert(0, osp.join(REPO, 'tools', 'analysis_tools'))
    from benchmark import RSSPeak, _malloc_trim
    torch.set_num_threads(threads)
    _, fwd = _build(name, batch)
    x = torch.randn(batch, 3, 224, 224)
    out = []
    with torch.no_grad():
        for n in (1, 3):
            _malloc_trim()
            with RSSPeak() as mem:
                for _ in range(n):
                    fwd(x)
            out.append(mem.peak_delta_mb)
    print('MEM %.1f %.1f' % tuple(out))


def bench_memory(batches, threads) -> None:
    print('peak RSS above the pre-forward level (MB), fresh process each: first forward of a '
          'new model, then 3 steady forwards')
    print(f'{"thr":>3} {"B":>2} | {"s4nd 1st":>8} {"cnx 1st":>8} {"ratio":>6} | '
          f'{"s4nd st":>8} {"cnx st":>8} {"ratio":>6}')
    for th in threads:
        for B in batches:
            res = []
            for name in MODELS:
                r = subprocess.run([sys.executable, osp.abspath(__file__), '--memory-child', name,
                                    str(B), str(th)], capture_output=True, text=True, check=True)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith('MEM ')][-1]
                res.append([float(v) for v in line.split()[1:]])
            (a1, a2), (b1, b2) = res
            print(f'{th:>3} {B:>2} | {a1:8.1f} {b1:8.1f} {a1 / b1:6.2f} | {a2:8.1f} {b2:8.1f} '
                  f'{a2 / b2:6.2f}', flush=True)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == '--memory-child':
        return _memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--threads', type=int, nargs='+', default=[1])
    p.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    p.add_argument('--repeat', type=int, default=7)
    p.add_argument('--conv-mode', default='auto', choices=['auto', 'toeplitz', 'axes', 'outer'],
                   help="S4ND evaluation: 'outer' is the official N-D FFT algorithm")
    p.add_argument('--stem', action='store_true',
                   help='also time the ConvNeXt-S4ND-T stem against ConvNeXt-T\'s (224^2)')
    p.add_argument('--models', action='store_true',
                   help='whole ConvNeXt-S4ND-T vs ConvNeXt-T inference (224^2), interleaved')
    p.add_argument('--train', action='store_true',
                   help='with --models: time training steps instead of inference')
    p.add_argument('--cauchy-ab', action='store_true',
                   help='with --models: also S4ND-T with the PyTorch Cauchy product (A/B of '
                        'the compiled kernel, same process)')
    p.add_argument('--spectrum-ab', action='store_true',
                   help='with --models: also S4ND-T without the compiled spectrum op (A/B of '
                        'the op, same process)')
    p.add_argument('--memory', action='store_true',
                   help='first-forward / steady peak RSS of both models, fresh process each')
    args = p.parse_args()
    if args.models or args.memory:
        if args.models:
            bench_models(args.batch, args.threads, args.repeat, args.train, args.cauchy_ab,
                         args.spectrum_ab)
        if args.memory:
            bench_memory(args.batch, args.threads)
        return
    torch.set_num_threads(args.threads[0])
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, CPU threads {torch.get_num_threads()}, '
          f'best of {args.repeat}, S4ND conv_mode={args.conv_mode!r}, times in ms.')
    print('fwd: inference (no_grad; S4ND reuses its cached kernel spectrum); '
          'fwd+kgen: forward with autograd on, kernel regenerated as in training; '
          'f+b: forward + backward (training step).')
    if args.stem:
        bench_stem(args.batch, 224, args.repeat)
    print(f'{"B":>2} {"C":>4} {"HxW":>6} | {"conv fwd":>8} {"s4nd fwd":>8} {"ratio":>6} | '
          f'{"s4nd fwd+kgen":>13} {"ratio":>6} | {"conv f+b":>8} {"s4nd f+b":>8} {"ratio":>6}')
    for B in args.batch:
        for C, L in STAGES:
            s4 = block_layer(C, L, args.conv_mode)
            conv = nn.Conv2d(C, C, 7, padding=3, groups=C)
            x = torch.randn(B, C, L, L)
            xg = x.clone().requires_grad_()

            def fwd(m):
                def f():
                    with torch.no_grad():
                        m(x)
                return f

            def fwd_graph(m):
                return lambda: m(x)

            def fwd_bwd(m):
                def f():
                    m(xg).sum().backward()
                return f
            cf, sf = bench_pair([fwd(conv), fwd(s4)], args.repeat)
            cg, sg = bench_pair([fwd_graph(conv), fwd_graph(s4)], args.repeat)
            cb, sb = bench_pair([fwd_bwd(conv), fwd_bwd(s4)], args.repeat)
            print(f'{B:>2} {C:>4} {L:>3}x{L:<3}| {1e3 * cf:8.2f} {1e3 * sf:8.2f} {sf / cf:6.2f} | '
                  f'{1e3 * sg:13.2f} {sg / cg:6.2f} | '
                  f'{1e3 * cb:8.2f} {1e3 * sb:8.2f} {sb / cb:6.2f}', flush=True)


if __name__ == '__main__':
    main()
