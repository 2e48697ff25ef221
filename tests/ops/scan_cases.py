"""Shared input builders and comparison helpers for the selective-scan tests."""
from typing import Dict, List, Optional

import torch

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def make_inputs(b: int = 2, d: int = 4, l: int = 9, n: int = 4, gB: Optional[int] = 1,
                gC: Optional[int] = 1, D: bool = True, z: bool = True, bias: bool = True,
                dtype=torch.float32, seed: int = 0, dt_scale: float = 0.5,
                squeeze_g: bool = False) -> Dict[str, Optional[torch.Tensor]]:
    """Random scan inputs. gB/gC=None means constant (d, n) B/C.

    A follows the S4D-real init (-1..-n) scaled down, delta is moderate so the
    state carries information across many steps (a weak test otherwise).
    """
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale)

    def bc(g):
        if g is None:
            return r(d, n)
        x = r(b, g, n, l)
        return x[:, 0] if (squeeze_g and g == 1) else x

    inp = dict(
        u=r(b, d, l), delta=r(b, d, l, scale=dt_scale) - 1.0,
        A=-(torch.arange(1, n + 1, dtype=torch.float64) / n).repeat(d, 1) - 0.1 * r(d, n).abs(),
        B=bc(gB), C=bc(gC), D=r(d) if D else None, z=r(b, d, l) if z else None,
        delta_bias=r(d, scale=0.3) if bias else None)
    out = {}
    for k, v in inp.items():
        if v is None:
            out[k] = None
        elif k in ('A', 'D', 'delta_bias'):  # parameters stay fp32 like mamba_ssm
            out[k] = v.to(torch.float64 if dtype == torch.float64 else torch.float32)
        elif k in ('B', 'C') and v.dim() == 2:
            out[k] = v.to(torch.float64 if dtype == torch.float64 else torch.float32)
        else:
            out[k] = v.to(dtype)
    return out


def leaves(inp: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    return {k: (None if v is None else v.detach().clone().requires_grad_(True))
            for k, v in inp.items()}


def run_with_grads(fn, inp, seed: int = 1, **kw):
    """Run fn(**inp, **kw) with a random cotangent on out (and last state).

    Returns (out, last or None, {name: grad}).
    """
    x = leaves(inp)
    res = fn(**x, **kw)
    out, last = (res if isinstance(res, tuple) else (res, None))
    gen = torch.Generator().manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum()
    if last is not None:
        loss = loss + (last.double() * torch.randn(last.shape, generator=gen,
                                                   dtype=torch.float64)).sum()
    params = [k for k in NAMES if x[k] is not None]
    grads = torch.autograd.grad(loss, [x[k] for k in params])
    return out.detach(), (None if last is None else last.detach()), dict(zip(params, grads))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Max error relative to the largest expected magnitude (scale-aware)."""
    assert actual.shape == expected.shape, f'{what}: shape {actual.shape} != {expected.shape}'
    a, e = actual.double(), expected.double()
    scale = e.abs().max().clamp_min(1e-6)
    err = ((a - e).abs().max() / scale).item()
    assert err <= tol, f'{what}: relative error {err:.3g} > {tol}'


def compare(got, ref, tol: float, tag: str = '', grad_tol: Optional[float] = None) -> None:
    out, last, grads = got
    rout, rlast, rgrads = ref
    assert_close(out, rout, tol, f'{tag} out')
    if rlast is not None:
        assert_close(last, rlast, tol, f'{tag} last_state')
    assert set(grads) == set(rgrads)
    for k in rgrads:
        assert_close(grads[k], rgrads[k], grad_tol or tol, f'{tag} grad {k}')


CASES: List[dict] = [
    # (shape/group/flag combinations; all tiny)
    dict(b=2, d=4, l=9, n=4, gB=1, gC=1),
    dict(b=1, d=6, l=1, n=16, gB=3, gC=3),  # L = 1
    dict(b=2, d=4, l=33, n=1, gB=2, gC=2),  # VMamba-like: N = 1, g > 1
    dict(b=2, d=8, l=17, n=16, gB=4, gC=4, D=False, z=False),
    dict(b=2, d=6, l=11, n=4, gB=None, gC=3),  # V2M pass 2: constant B
    dict(b=2, d=6, l=11, n=4, gB=2, gC=None, bias=False),  # V2M pass 1: constant C
    dict(b=1, d=4, l=13, n=4, gB=None, gC=None),
    dict(b=2, d=4, l=7, n=4, gB=1, gC=2, squeeze_g=True),  # (b, n, l) form, mixed groups
]


def simd_namespaces() -> List[tuple]:
    """(level, op namespace) of every built SIMD level of the compiled scan that this CPU
    runs (separate compilations of one source), each library loaded."""
    from mmssm.ops import selective_scan_cpp
    runnable = selective_scan_cpp._cpu_levels()
    found = []
    for level in selective_scan_cpp.built_levels():
        if level in runnable:
            torch.ops.load_library(selective_scan_cpp._path(level))
            found.append((level, getattr(torch.ops, f'mmssm_scan_{level}')))
    return found
