"""Mamba-style selective scan: the public entry point and its plain reference.

Semantics follow mamba_ssm's ``selective_scan_fn`` (diagonal real A, per-step
input-dependent delta/B/C, optional D skip, z gate and softplus(delta + bias)):

    delta'  = softplus(delta + delta_bias)            if delta_softplus
    h_t     = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t     # (b, d, n)
    y_t     = sum_n h_t * C_t  + D * u_t
    out_t   = y_t * silu(z_t)                          if z is given

Shapes: u, delta, z (b, d, l); A (d, n); B, C either constant (d, n) or
input-dependent (b, g, n, l) with g groups dividing d (channel c uses group
c // (d // g)); a (b, n, l) tensor is read as g = 1. D, delta_bias (d,).
The state and all accumulation are fp32 whatever the input dtype; the output
takes u's dtype unless ``out_fp32`` (VMamba's "oflex").
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

ScanOut = Union[Tensor, Tuple[Tensor, Tensor]]


def _expand_bc(X: Tensor, d: int, l: int, name: str) -> Tensor:
    """Return B or C as a fp32 (b|1, d, n, l) view-friendly tensor."""
    if X.dim() == 2:  # constant (d, n)
        if X.shape[0] != d:
            raise ValueError(f'{name} constant must be (d={d}, n), got {tuple(X.shape)}')
        return X.float()[None, :, :, None]  # (1, d, n, 1)
    if X.dim() == 3:  # (b, n, l) == one group
        X = X.unsqueeze(1)
    if X.dim() != 4 or X.shape[-1] != l:
        raise ValueError(f'{name} must be (d, n) or (b, g, n, l={l}), got {tuple(X.shape)}')
    g = X.shape[1]
    if d % g != 0:
        raise ValueError(f'{name} has g={g} groups, which must divide d={d}')
    return X.float().repeat_interleave(d // g, dim=1)  # (b, d, n, l)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                       delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False,
                       return_last_state: bool = False,
                       out_fp32: bool = False) -> ScanOut:
    """Plain sequential reference (ground truth). float64 inputs stay float64."""
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    b, d, l = u.shape
    u_, dt = u.to(work), delta.to(work)
    if delta_bias is not None:
        dt = dt + delta_bias.to(work)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A_ = A.to(work)
    Bx = _expand_bc(B, d, l, 'B').to(work)
    Cx = _expand_bc(C, d, l, 'C').to(work)
    h = u_.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, :, t, None] * A_)  # (b, d, n)
        Bt = Bx[..., min(t, Bx.shape[-1] - 1)]
        Ct = Cx[..., min(t, Cx.shape[-1] - 1)]
        h = dA * h + (dt[:, :, t] * u_[:, :, t])[..., None] * Bt
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.to(work)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(work))
    out = y if (out_fp32 and work == torch.float32) else y.to(dtype_in)
    return (out, h) if return_last_state else out


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False,
                   return_last_state: bool = False,
                   out_fp32: bool = False,
                   backend: Optional[str] = None) -> ScanOut:
    """Selective scan with automatic backend choice (see module docstring).

    Args:
        backend: None (auto), or force one of 'ref', 'cpu', 'triton'.
    """
    # Fast backends are plugged in by the scan-core work; the reference is exact.
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias,
                              delta_softplus, return_last_state, out_fp32)
