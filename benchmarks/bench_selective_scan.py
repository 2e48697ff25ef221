"""Selective-scan benchmark: every available backend side by side (NOT a test).

    PYTHONPATH=. python benchmarks/bench_selective_scan.py [--batch N]
        [--shapes vim_t,vim_t_1025,vim_t_4097,vmamba_t_s1,v2m_rows,v2m_cols] [--with-ref]
    PYTHONPATH=. python benchmarks/bench_selective_scan.py --kernel-ab REV [--threads 1]
    PYTHONPATH=. python benchmarks/bench_selective_scan.py --cross-only [--threads 1]

``--kernel-ab REV`` compares the compiled kernel of the working tree with the one of
git revision REV (its mmssm/ops/csrc built here with torch's JIT loader, same flags
as setup.py's best SIMD level for this CPU), the two raw ops interleaved in one
process, best of --reps: fwd (save_states=True, as in training) and bwd time,
ns per state update, Gexp/s and GFLOP/s against the same run's matmul, and the
largest output / gradient difference between the two. With --threads 1 the time
is the thread's CPU time (time.thread_time), which a loaded machine distorts less
than wall time.

For each vision shape it prints forward and forward+backward time and peak
memory of:
- ``materialised``: a mamba_ssm ``selective_scan_ref``-style algorithm written
  here (materialise deltaA and deltaB_u as (b, d, l, n), then a Python loop;
  autograd backward) -- the baseline the ratios are relative to;
- ``ref``: mmssm's sequential reference (only with --with-ref);
- ``cpp``: the compiled CPU kernel (custom op, when built);
- ``cpu``: mmssm's chunked scan with the recomputing custom backward;
- ``triton`` (CUDA only) and ``mamba_ssm`` (CUDA kernel, when importable).
On CPU it also prints the forward's achieved GFLOP/s (9 B L D N + D + z, the
FLOP counter's convention, FMA = 1 flop... here counted as the scan's 9 flops per
state update) and exp/s (B L D N exps), next to the same run's fp32 matmul
GFLOP/s (2 n^3 / t for n = 1024: the machine's practical peak).
On GPU it also prints the achieved bytes/s against the compulsory-traffic
roofline of shared/research/performance.md §3:
    fwd bytes = s (3 + z) E + 2 s_bc M
    bwd bytes = s (5 + 2 z) E + (2 s_bc + 2 (8 + s_bc)) M
(E = b d l, M = b g n l, s / s_bc bytes per element, z = 1 with a z gate; the
un-gated output is recomputed, not stored, hence 3+z rather than mamba_ssm's 5).

Peak memory: CUDA max_memory_allocated on GPU; on CPU each (shape, backend)
runs in a fresh subprocess and reports the growth of the process's max RSS
(MB resolution, includes allocator slack).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmssm.ops import selective_scan  # noqa: E402

# name -> (b per image, d, l, n, gB (None: constant), gC, z gate)
SHAPES = {
    'vim_t': (1, 384, 197, 16, 1, 1, True),  # Vim-T, one direction (d_inner 384), 224^2
    'vim_t_1025': (1, 384, 1025, 16, 1, 1, True),  # Vim-T at 512^2
    'vim_t_4097': (1, 384, 4097, 16, 1, 1, True),  # Vim-T at 1024^2
    'vmamba_t_s1': (1, 384, 3136, 1, 4, 4, False),  # VMamba-T stage 1: 4 dirs x 96, g = 4
    'v2m_rows': (4 * 14, 384, 14, 16, 1, None, True),  # V2M pass 1: input B, constant C
    'v2m_cols': (4 * 14, 384, 14, 16, None, 1, True),  # V2M pass 2: constant B, input C
}
SLOW = ('materialised', 'ref')


def make(shape, batch, device, dtype):
    b, d, l, n, gB, gC, has_z = SHAPES[shape]
    b *= batch
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    inp = dict(u=r(b, d, l), delta=r(b, d, l) * 0.5 - 2.0,
               A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
               B=r(d, n) if gB is None else r(b, gB, n, l),
               C=r(d, n) if gC is None else r(b, gC, n, l),
               D=torch.ones(d), z=r(b, d, l) if has_z else None, delta_bias=r(d) * 0.1)
    out = {}
    for k, v in inp.items():
        if v is None:
            out[k] = None
            continue
        keep32 = k in ('A', 'D', 'delta_bias') or v.dim() == 2
        out[k] = v.to(device=device, dtype=torch.float32 if keep32 else dtype)
    return out


def materialised_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm selective_scan_ref-style baseline: materialise deltaA, deltaB_u."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape

    def expand(X):
        if X.dim() == 2:
            return None
        return X.float().repeat_interleave(d // X.shape[1], dim=1)  # (b, d, n, l)

    Bx, Cx = expand(B), expand(C)
    deltaA = torch.exp(torch.einsum('bdl,dn->bdln', delta, A))
    if Bx is None:
        deltaB_u = torch.einsum('bdl,dn,bdl->bdln', delta, B, u)
    else:
        deltaB_u = torch.einsum('bdl,bdnl,bdl->bdln', delta, Bx, u)
    x = u.new_zeros(b, d, A.shape[1])
    ys = []
    for i in range(l):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum('bdn,dn->bd', x, C) if Cx is None
                  else torch.einsum('bdn,bdn->bd', x, Cx[:, :, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in)


def runner(backend):
    if backend == 'materialised':
        return materialised_scan
    if backend == 'mamba_ssm':
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn
    return lambda *a, **k: selective_scan(*a, backend=backend, **k)


def available(device):
    from mmssm.ops import selective_scan_cpp
    names = ['materialised', 'ref', 'cpu']
    if device == 'cpu' and selective_scan_cpp.available():
        names.append('cpp')
    if device == 'cuda':
        names.append('triton')
        try:
            import mamba_ssm.ops.selective_scan_interface  # noqa: F401
            names.append('mamba_ssm')
        except Exception:
            pass
    return names


def _sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def _rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def measure(shape, backend, batch, device, dtype, reps, modes=('fwd', 'fwdbwd')):
    fn = runner(backend)
    inp = make(shape, batch, device, dtype)
    leaves = {k: (v.requires_grad_() if v is not None else None) for k, v in inp.items()}
    kw = dict(delta_softplus=True)

    def fwd():
        with torch.no_grad():
            return fn(**inp, **kw)

    def fwdbwd():
        out = fn(**leaves, **kw)
        out.backward(torch.ones_like(out))

    # warm-up on a tiny problem: first-call imports / op registration are not the scan's memory
    tiny = {k: (None if v is None else (v[:1, :8, :3] if v.dim() == 3 else
                                         v[:1, :, :, :3] if v.dim() == 4 else v[:8]))
            for k, v in make(shape, 1, device, dtype).items()}
    tiny = {k: (v.detach().clone().requires_grad_() if v is not None else None)
            for k, v in tiny.items()}
    fn(**tiny, **kw).sum().backward()
    res = {}
    for name, f in (('fwd', fwd), ('fwdbwd', fwdbwd)):
        if name not in modes:
            continue
        # memory of the first call, then best-of-reps timing
        if device == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            f()
            _sync(device)
            res[name + '_mb'] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            before = _rss_mb()
            f()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            res[name + '_mb'] = max(peak - before, 0.0)
        best = float('inf')
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            best = min(best, time.perf_counter() - t)
        res[name + '_ms'] = best * 1e3
    return res


def roofline_gbs(shape, batch, dtype, fwd_ms, fwdbwd_ms):
    b, d, l, n, gB, gC, has_z = SHAPES[shape]
    b *= batch
    s = torch.finfo(dtype).bits // 8
    E = b * d * l
    M = sum(b * g * n * l for g in (gB, gC) if g is not None)  # constant B/C: negligible
    zf = 1 if has_z else 0
    fwd = s * (3 + zf) * E + s * M
    bwd = s * (5 + 2 * zf) * E + (2 * s + 2 * (8 + s)) * M / 2
    return fwd / fwd_ms / 1e6, (fwd + bwd) / fwdbwd_ms / 1e6


def scan_counts(shape, batch):
    """(flops, exps) of one forward: 9 B L D N (+ B D L for D, + B D L for z); B L D N."""
    from mmssm.utils.flops import selective_scan_flops
    b, d, l, n, _, _, has_z = SHAPES[shape]
    b *= batch
    return selective_scan_flops(b, d, l, n, True, has_z), b * d * l * n


def matmul_gflops(size=1024, reps=10):
    """fp32 matmul GFLOP/s (2 n^3 flops) on this machine now: the practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float('inf')
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def _build_kernel(rev):
    """The compiled scan of git revision ``rev`` (or 'worktree') as a JIT extension.

    Returns the op namespace (``torch.ops.<name>``)."""
    import tempfile

    from torch.utils.cpp_extension import load

    from mmssm.ops import selective_scan_cpp
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    level = selective_scan_cpp.LEVEL or 'default'
    cap, flags = {'default': ('DEFAULT', []), 'avx2': ('AVX2', ['-mavx2', '-mfma', '-mf16c']),
                  'avx512': ('AVX512', ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq',
                                        '-mavx2', '-mfma', '-mf16c'])}[level]
    tag = 'worktree' if rev == 'worktree' else subprocess.check_output(
        ['git', 'rev-parse', '--short', rev], cwd=root, text=True).strip()
    name = f'mmssm_scan_ab_{tag}_{level}'
    src = tempfile.mkdtemp(prefix=name)
    for f in ('selective_scan.h', 'scan_order.h'):
        rel = f'mmssm/ops/csrc/{f}'
        text = (open(os.path.join(root, rel)).read() if rev == 'worktree' else
                subprocess.check_output(['git', 'show', f'{rev}:{rel}'], cwd=root, text=True))
        with open(os.path.join(src, f), 'w') as fh:
            fh.write(text)
    with open(os.path.join(src, f'{name}.cpp'), 'w') as fh:
        fh.write('#include "selective_scan.h"\n')
    print(f'building {rev} ({level}) ...', flush=True)
    load(name=name, sources=[os.path.join(src, f'{name}.cpp')], is_python_module=False,
         extra_cflags=['-O3', '-fopenmp', f'-DCPU_CAPABILITY={cap}', f'-DMMSSM_SCAN_NS={name}'] +
         ([f'-DCPU_CAPABILITY_{cap}'] if cap != 'DEFAULT' else []) + flags,
         extra_ldflags=['-fopenmp'])
    return getattr(torch.ops, name)


def kernel_ab(rev, shapes, batch, reps, peak):
    """Old (git ``rev``) vs current compiled kernel, interleaved in this process."""
    kernels = {rev: _build_kernel(rev), 'now': _build_kernel('worktree')}
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    print(f'clock: {"thread CPU time" if clock is time.thread_time else "wall"}; '
          f'best of {reps}; ns/upd = time / (b l d n)')
    for shape in shapes:
        inp = make(shape, batch, 'cpu', torch.float32)
        args = [inp[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')]
        flops, exps = scan_counts(shape, batch)
        best = {(k, m): float('inf') for k in kernels for m in ('fwd', 'bwd')}
        res = {}
        for _ in range(reps):
            for key, op in kernels.items():
                t0 = clock()
                out, last, states = op.fwd(*args, True, False, False, True)
                t1 = clock()
                grads = op.bwd(torch.ones_like(out), None, *args, states, True, False)
                t2 = clock()
                best[key, 'fwd'] = min(best[key, 'fwd'], t1 - t0)
                best[key, 'bwd'] = min(best[key, 'bwd'], t2 - t1)
                res[key] = [out, last] + [g for g in grads if g.numel()]
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                   for a, b in zip(res['now'], res[rev]))
        print(f'{shape}:')
        for key in kernels:
            f, b = best[key, 'fwd'], best[key, 'bwd']
            print(f'  {key:>10s}: fwd {f * 1e3:8.2f} ms {f * 1e9 / exps:6.2f} ns/upd '
                  f'{exps / f / 1e9:6.2f} Gexp/s {flops / f / 1e9:6.2f} GFLOP/s '
                  f'({100 * flops / f / 1e9 / peak:4.1f}% of matmul) | bwd {b * 1e3:8.2f} ms '
                  f'{b * 1e9 / exps:6.2f} ns/upd | fwd+bwd {(f + b) * 1e3:8.2f} ms')
        print(f'  speed-up now / {rev}: fwd {best[rev, "fwd"] / best["now", "fwd"]:.2f}x, '
              f'bwd {best[rev, "bwd"] / best["now", "bwd"]:.2f}x, fwd+bwd '
              f'{(best[rev, "fwd"] + best[rev, "bwd"]) / (best["now", "fwd"] + best["now", "bwd"]):.2f}x'
              f'; max rel. difference of outputs / gradients {diff:.1e}', flush=True)


def plain_cross_scan(x):
    """Autograd-through-ops baseline (stack / transpose / flip)."""
    row, col = x.flatten(2), x.transpose(2, 3).flatten(2)
    return torch.stack([row, col, row.flip(-1), col.flip(-1)], dim=1)


def plain_cross_merge(y, h, w):
    b, _, c, l = y.shape
    col = (y[:, 1] + y[:, 3].flip(-1)).view(b, c, w, h).transpose(2, 3).reshape(b, c, l)
    return y[:, 0] + y[:, 2].flip(-1) + col


def bench_scan_order(batch, device, dtype):
    """VMamba-T stage-1 grid (b, 96, 56, 56): cross_scan -> cross_merge, fwd and fwd+bwd."""
    from mmssm.ops import cross_merge, cross_scan
    h = w = 56
    x = torch.randn(batch, 96, h, w, device=device, dtype=dtype)
    impls = {'plain autograd': (plain_cross_scan, plain_cross_merge),
             'torch Function': (lambda t: cross_scan(t, backend='torch'),
                                lambda t, a, b: cross_merge(t, a, b, backend='torch'))}
    from mmssm.ops import selective_scan_cpp
    if device == 'cpu' and selective_scan_cpp.available():
        impls['fused C++'] = (lambda t: cross_scan(t, backend='cpp'),
                              lambda t, a, b: cross_merge(t, a, b, backend='cpp'))
    if device == 'cuda':
        impls['triton'] = (lambda t: cross_scan(t, backend='triton'),
                           lambda t, a, b: cross_merge(t, a, b, backend='triton'))
    print(f'\ncross_scan + cross_merge on {(batch, 96, h, w)} {dtype}:')
    for name, (scan, merge) in impls.items():
        xi = x.clone().requires_grad_()
        times = []
        for grad in (False, True):
            best = float('inf')
            for _ in range(5):
                _sync(device)
                t = time.perf_counter()
                with torch.set_grad_enabled(grad):
                    out = merge(scan(xi if grad else x), h, w)
                    if grad:
                        out.backward(torch.ones_like(out))
                _sync(device)
                best = min(best, time.perf_counter() - t)
            times.append(best * 1e3)
        print(f'  {name:16s} fwd {times[0]:8.2f} ms   fwd+bwd {times[1]:8.2f} ms')


def bench_cross_selective_scan(batch, reps=7):
    """VMamba's 4-direction scan on the grid: composition vs the direction-aware kernel.

    The composition (cross_scan -> selective_scan -> cross_merge, the operands put
    into the scan orders first) against :func:`mmssm.ops.cross_selective_scan` on
    the VMamba-T stage grids (D = C, n = 1; and n = 16 as in v0 models), inference
    (no grad) and fwd+bwd, the two interleaved, median of ``reps`` (with one torch
    thread: the thread's CPU time).
    """
    from mmssm.ops import cross_selective_scan, cross_selective_scan_ref, selective_scan_cpp
    if not selective_scan_cpp.available():
        return
    print(f'\ncross_selective_scan (grid in, merged grid out) vs composition, batch {batch}:')
    for h, d, n in ((56, 96, 1), (28, 192, 1), (14, 384, 1), (7, 768, 1), (56, 96, 16)):
        g = torch.Generator().manual_seed(0)
        u = torch.randn(batch, h, h, d, generator=g)
        delta = torch.randn(4, batch, h, h, d, generator=g) * 0.5
        A = -torch.rand(4 * d, n, generator=g) - 0.2
        xd = torch.randn(batch, h, h, 4, 6 + 2 * n, generator=g)
        ops = (u, delta, A, xd[..., 6:6 + n], xd[..., 6 + n:], torch.randn(4 * d, generator=g),
               torch.randn(4 * d, generator=g) * 0.3)
        times = {}
        # one thread: its CPU time, which a loaded machine distorts less than wall time
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        for _ in range(reps):
            for name, fn in (('composition', cross_selective_scan_ref),
                             ('kernel', cross_selective_scan)):
                for grad in (False, True):
                    args = [x.detach().requires_grad_(grad) for x in ops]
                    t = clock()
                    with torch.set_grad_enabled(grad):
                        y = fn(*args)
                        if grad:
                            y.backward(torch.ones_like(y))
                    times.setdefault((name, grad), []).append(clock() - t)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        upd = 4 * batch * h * h * d * n
        print(f'  (b={batch}, {h}x{h}, D={d}, n={n}): inference {med["composition", False]:7.2f}'
              f' -> {med["kernel", False]:7.2f} ms ({med["composition", False] / med["kernel", False]:.2f}x,'
              f' {med["kernel", False] * 1e6 / upd:.2f} ns/update) | fwd+bwd '
              f'{med["composition", True]:7.2f} -> {med["kernel", True]:7.2f} ms '
              f'({med["composition", True] / med["kernel", True]:.2f}x)', flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--batch', type=int, default=None,
                    help='images per batch (default 1 on CPU, 64 on GPU)')
    ap.add_argument('--shapes', default=','.join(SHAPES), help="comma list, or 'none'")
    ap.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    ap.add_argument('--skip-materialised', action='store_true',
                    help='skip the materialised baseline (ratios are then relative to cpu)')
    ap.add_argument('--with-ref', action='store_true',
                    help="also time mmssm's sequential reference (slow)")
    ap.add_argument('--no-scan-order', action='store_true', help='skip the cross-scan section')
    ap.add_argument('--cross-only', action='store_true',
                    help='only the direction-aware VMamba scan vs its composition (CPU)')
    ap.add_argument('--kernel-ab', metavar='REV',
                    help='compare the compiled kernel with the one of git revision REV')
    ap.add_argument('--threads', type=int, default=None, help='torch threads')
    ap.add_argument('--reps', type=int, default=15, help='repetitions of --kernel-ab')
    ap.add_argument('--worker', nargs=3, metavar=('SHAPE', 'BACKEND', 'MODE'),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = getattr(torch, args.dtype)
    batch = args.batch or (64 if device == 'cuda' else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        shape, backend, mode = args.worker
        # many repetitions: best-of on a loaded machine needs a quiet time slice
        reps = 1 if backend in SLOW else (30 if backend == 'cpp' else 10)
        print('RESULT' + json.dumps(measure(shape, backend, batch, device, dtype, reps, (mode,))))
        return
    print(f'device={device} torch={torch.__version__} threads={torch.get_num_threads()} '
          f'dtype={args.dtype} batch={batch}')
    peak = None
    if device == 'cpu':
        from mmssm.ops import selective_scan_cpp
        peak = matmul_gflops()
        print(f'compiled scan: {selective_scan_cpp.LEVEL or "not built"}; '
              f'fp32 matmul 1024^2: {peak:.1f} GFLOP/s (practical peak)')
    if device == 'cuda':
        print('gpu:', torch.cuda.get_device_name())
    if args.cross_only:
        bench_cross_selective_scan(batch)
        return
    if args.kernel_ab:
        kernel_ab(args.kernel_ab, [s for s in args.shapes.split(',') if s and s != 'none'],
                  batch, args.reps, peak)
        return
    hdr = (f'{"shape (b,d,l,n,gB,gC,z)":34s} {"backend":12s} {"fwd ms":>9s} {"f+b ms":>9s} '
           f'{"fwd MB":>8s} {"f+b MB":>8s} {"x fwd":>7s} {"x f+b":>7s}')
    if device == 'cuda':
        hdr += f' {"xm fwd":>7s} {"xm f+b":>7s}  GB/s fwd  GB/s f+b'
    else:
        hdr += f' {"GFLOP/s":>8s} {"%peak":>6s} {"Gexp/s":>7s}'
    print(hdr)
    for shape in [s for s in args.shapes.split(',') if s and s != 'none']:
        rows = {}
        for backend in available(device):
            if not args.with_ref and backend == 'ref':
                continue
            if args.skip_materialised and backend == 'materialised':
                continue
            if device == 'cuda':
                reps = 1 if backend in SLOW else 10
                try:
                    rows[backend] = measure(shape, backend, batch, device, dtype, reps)
                except Exception as e:  # e.g. mamba_ssm dtype/shape limits, OOM
                    print(f'{shape:34s} {backend:12s} failed: {type(e).__name__}: {e}')
                    torch.cuda.empty_cache()
                continue
            res = {}
            for mode in ('fwd', 'fwdbwd'):  # fresh process each: max RSS is per process
                cmd = [sys.executable, os.path.abspath(__file__), '--worker', shape, backend,
                       mode, '--batch', str(batch), '--dtype', args.dtype]
                p = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in p.stdout.splitlines() if x.startswith('RESULT')]
                if not line:
                    print(f'{shape:34s} {backend:12s} failed:\n{p.stderr[-2000:]}')
                    break
                res.update(json.loads(line[0][6:]))
            else:
                rows[backend] = res
        base = rows.get('materialised') or rows.get('cpu')
        mamba = rows.get('mamba_ssm')
        b, *rest = SHAPES[shape]
        desc = str((b * batch, *rest))
        for backend, r in rows.items():
            line = (f'{desc:34s} {backend:12s} {r["fwd_ms"]:9.2f} {r["fwdbwd_ms"]:9.2f} '
                    f'{r["fwd_mb"]:8.1f} {r["fwdbwd_mb"]:8.1f} '
                    f'{base["fwd_ms"] / r["fwd_ms"]:7.1f} '
                    f'{base["fwdbwd_ms"] / r["fwdbwd_ms"]:7.1f}')
            if device == 'cuda':
                if mamba:
                    line += (f' {mamba["fwd_ms"] / r["fwd_ms"]:7.2f}'
                             f' {mamba["fwdbwd_ms"] / r["fwdbwd_ms"]:7.2f}')
                else:
                    line += f' {"-":>7s} {"-":>7s}'
                gf, gfb = roofline_gbs(shape, batch, dtype, r['fwd_ms'], r['fwdbwd_ms'])
                line += f'  {gf:8.0f}  {gfb:8.0f}'
            else:
                flops, exps = scan_counts(shape, batch)
                gfl = flops / r['fwd_ms'] / 1e6
                line += f' {gfl:8.2f} {100 * gfl / peak:5.1f}% {exps / r["fwd_ms"] / 1e6:7.2f}'
            print(line, flush=True)
    print('x fwd / x f+b: speed-up over the materialised baseline (over cpu if it failed).')
    if device == 'cuda':
        print('xm: speed-up over mamba_ssm\'s CUDA kernel; GB/s: compulsory bytes / time '
              '(H100 copy ~3.0 TB/s, performance.md §3).')
    if not args.no_scan_order:
        bench_scan_order(batch, device, dtype)
        if device == 'cpu':
            bench_cross_selective_scan(batch)


if __name__ == '__main__':
    main()
