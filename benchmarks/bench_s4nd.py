"""S4ND (2-D, ConvNeXt-S4ND block config) vs a 7x7 depthwise conv of the same shape, on CPU.

Times forward and forward+backward at the ConvNeXt-T stage shapes and prints the ratios
S4ND / conv in one run. Not a test. Usage:

    PYTHONPATH=$PWD python benchmarks/bench_s4nd.py [--threads 1] [--batch 1 8] [--repeat 7]
        [--conv-mode auto|toeplitz|axes|outer] [--stem]
"""
import argparse
import time

import torch
import torch.nn as nn

from mmssm.models.layers.s4nd import S4ND

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


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    p.add_argument('--repeat', type=int, default=7)
    p.add_argument('--conv-mode', default='auto', choices=['auto', 'toeplitz', 'axes', 'outer'],
                   help="S4ND evaluation: 'outer' is the official N-D FFT algorithm")
    p.add_argument('--stem', action='store_true',
                   help='also time the ConvNeXt-S4ND-T stem against ConvNeXt-T\'s (224^2)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
