"""S4ND (2-D, ConvNeXt-S4ND block config) vs a 7x7 depthwise conv of the same shape, on CPU.

Times forward and forward+backward at the ConvNeXt-T stage shapes and prints the ratios
S4ND / conv in one run. Not a test. Usage:

    PYTHONPATH=$PWD python benchmarks/bench_s4nd.py [--threads 1] [--batch 1 8] [--repeat 5]
"""
import argparse
import time

import torch
import torch.nn as nn

from mmssm.models.layers.s4nd import S4ND

STAGES = [(96, 56), (192, 28), (384, 14), (768, 7)]  # ConvNeXt-T (C, H=W) at 224


def block_layer(C: int, L: int) -> S4ND:
    """The ConvNeXt-S4ND-T block layer (ImageNet config): DPLR, fourier, global kernel."""
    return S4ND(C, d_state=64, l_max=[L, L], dim=2, bidirectional=True, channels=1,
                activation=None, final_act='none', linear=True, init='fourier', rank=1,
                trank=1, n_ssm=1, dt_min=0.1, dt_max=1.0, lr=0.001)


def bench(fn, repeat: int) -> float:
    fn()  # warm-up (plans, lazy C~ setup)
    best = float('inf')
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    p.add_argument('--repeat', type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, CPU threads {torch.get_num_threads()}, '
          f'best of {args.repeat}; times in ms')
    print(f'{"B":>2} {"C":>4} {"HxW":>6} | {"conv fwd":>8} {"s4nd fwd":>8} {"ratio":>6} | '
          f'{"conv f+b":>8} {"s4nd f+b":>8} {"ratio":>6}')
    for B in args.batch:
        for C, L in STAGES:
            s4 = block_layer(C, L)
            conv = nn.Conv2d(C, C, 7, padding=3, groups=C)
            x = torch.randn(B, C, L, L)
            xg = x.clone().requires_grad_()
            res = []
            for m in (conv, s4):
                def fwd():
                    with torch.no_grad():
                        m(x)

                def fwd_bwd():
                    m(xg).sum().backward()
                res.append((bench(fwd, args.repeat), bench(fwd_bwd, args.repeat)))
            (cf, cb), (sf, sb) = res
            print(f'{B:>2} {C:>4} {L:>3}x{L:<3}| {1e3 * cf:8.2f} {1e3 * sf:8.2f} {sf / cf:6.2f} | '
                  f'{1e3 * cb:8.2f} {1e3 * sb:8.2f} {sb / cb:6.2f}')


if __name__ == '__main__':
    main()
