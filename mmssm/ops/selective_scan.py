"""Mamba-style selective scan: the public entry point and its plain reference.

Semantics follow mamba_ssm's ``selective_scan_fn`` (diagonal real A, per-step
input-dependent delta/B/C, optional D skip, z gate and softplus(delta + bias)):

    delta'  = softplus(delta + delta_bias)            if delta_softplus
    h_t     = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t     # (b, d, n)
    y_t     = sum_n h_t * C_t  + D * u_t
    out_t   = y_t * silu(z_t)                          if z is given

Shapes: u, delta, z (b, d, l); A (d, n); B, C either constant (d, n) or
input-dependent (b, g, n, l) with g groups dividing d (channel c uses group
c // (d // g)); a (b, n, l) tensor is read as g = 1. B and C may use different
group counts (e.g. V2M: constant B, input-dependent C). D, delta_bias (d,).
The state and all accumulation are fp32 (fp64 for fp64 u) whatever the input
dtypes (which may differ, e.g. under autocast); the output takes u's dtype
unless ``out_fp32`` (VMamba "oflex").
``reverse=True`` scans from t = l-1 down to 0 (same result as flipping every
time axis, scanning and flipping the output back, without the copies): Vim's
backward direction.
``out=`` writes the result into a given tensor, ``accumulate=True`` adds it to its
values: in eager CPU inference the compiled kernel stores (or adds) straight into it,
so no (b, d, l) result is allocated (Vim: the backward direction accumulates into the
forward direction's output); elsewhere (autograd, compile / export, other backends)
the result is computed and then copied / added, the same values.

Backends (all exact, same signature):
- ``ref``: the sequential loop below (ground truth, slow).
- ``cpp``: the compiled CPU kernel (``mmssm/ops/csrc``, built by the install)
  behind the custom op ``torch.ops.mmssm.selective_scan_fwd``
  (:mod:`mmssm.ops.selective_scan_cpp`).
- ``cpu``: chunked pure-PyTorch scan with a recomputing custom backward
  (:mod:`mmssm.ops.selective_scan_cpu`); runs on any device.
- ``triton``: fused GPU kernels (:mod:`mmssm.ops.selective_scan_triton`).
Auto choice: ``triton`` for CUDA tensors (fp32/fp16/bf16); for CPU tensors the
custom op, whose kernel is ``cpp`` when the extension is built, else the chunked
scan. While ``torch.export`` traces (``torch.compiler.is_exporting()``) the
custom op is always called, whatever the device, so an exported graph holds one
op per scan. Force a backend with ``backend=`` or the environment variable
MMSSM_SCAN_BACKEND.
"""
import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

ScanOut = Union[Tensor, Tuple[Tensor, Tensor]]
BACKENDS = ('ref', 'cpu', 'cpp', 'triton')
_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], z: Optional[Tensor],
                  delta_bias: Optional[Tensor]) -> None:
    """Raise a ValueError/TypeError naming the offending argument."""
    if not isinstance(u, Tensor) or u.dim() != 3:
        raise ValueError(f'u must be a (b, d, l) tensor, got shape '
                         f'{tuple(u.shape) if isinstance(u, Tensor) else type(u)}')
    if u.dtype not in _IO_DTYPES:
        raise TypeError(f'u must be float32/float16/bfloat16/float64, got {u.dtype}')
    b, d, l = u.shape
    for name, x in (('delta', delta), ('z', z)):
        if x is None:
            if name == 'delta':
                raise ValueError('delta is required')
            continue
        if tuple(x.shape) != (b, d, l):
            raise ValueError(f'{name} must have the shape of u {(b, d, l)}, got {tuple(x.shape)}')
        if x.dtype not in _IO_DTYPES:  # mixed float dtypes (autocast) are fine: math is fp32
            raise TypeError(f'{name} must be float32/float16/bfloat16/float64, got {x.dtype}')
    if A.dim() != 2 or A.shape[0] != d or A.shape[1] < 1:
        raise ValueError(f'A must be (d={d}, n>=1), got {tuple(A.shape)}')
    if A.dtype not in _IO_DTYPES:
        raise TypeError(f'A must be a real floating tensor (float32/float16/bfloat16/float64), '
                        f'got {A.dtype}')
    n = A.shape[1]
    for name, X in (('B', B), ('C', C)):
        if X is None:
            raise ValueError(f'{name} is required')
        if X.dtype not in _IO_DTYPES:
            raise TypeError(f'{name} must be float32/float16/bfloat16/float64, got {X.dtype}')
        if X.dim() == 2:
            if tuple(X.shape) != (d, n):
                raise ValueError(f'{name} constant must be (d={d}, n={n}), got {tuple(X.shape)}')
            continue
        if X.dim() not in (3, 4):
            raise ValueError(f'{name} must be (d, n), (b, n, l) or (b, g, n, l), '
                             f'got {X.dim()}-D shape {tuple(X.shape)}')
        g = 1 if X.dim() == 3 else X.shape[1]
        if X.shape[0] != b or X.shape[-2] != n or X.shape[-1] != l:
            raise ValueError(f'{name} must be (b={b}, g, n={n}, l={l}), got {tuple(X.shape)}')
        if g < 1 or d % g != 0:
            raise ValueError(f'{name} has g={g} groups, which must divide d={d}')
    for name, x in (('D', D), ('delta_bias', delta_bias)):
        if x is None:
            continue
        if tuple(x.shape) != (d,):
            raise ValueError(f'{name} must be (d={d},), got {tuple(x.shape)}')
        if x.dtype not in _IO_DTYPES:
            raise TypeError(f'{name} must be float32/float16/bfloat16/float64, got {x.dtype}')
    for name, x in (('delta', delta), ('A', A), ('B', B), ('C', C), ('D', D),
                    ('z', z), ('delta_bias', delta_bias)):
        if x is not None and x.device != u.device:
            raise ValueError(f'{name} is on {x.device} but u is on {u.device}')


def _expand_bc(X: Tensor, d: int, l: int, name: str) -> Tensor:
    """Return B or C as a (b|1, d, n, l|1) tensor (the reference's simple layout)."""
    if X.dim() == 2:  # constant (d, n)
        return X[None, :, :, None]  # (1, d, n, 1)
    if X.dim() == 3:  # (b, n, l) == one group
        X = X.unsqueeze(1)
    return X.repeat_interleave(d // X.shape[1], dim=1)  # (b, d, n, l)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                       delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False,
                       return_last_state: bool = False,
                       out_fp32: bool = False,
                       reverse: bool = False) -> ScanOut:
    """Plain sequential reference (ground truth). float64 inputs stay float64."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
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
    ys = [None] * l
    steps = range(l - 1, -1, -1) if reverse else range(l)
    for t in steps:
        dA = torch.exp(dt[:, :, t, None] * A_)  # (b, d, n)
        Bt = Bx[..., min(t, Bx.shape[-1] - 1)]
        Ct = Cx[..., min(t, Cx.shape[-1] - 1)]
        h = dA * h + (dt[:, :, t] * u_[:, :, t])[..., None] * Bt
        ys[t] = (h * Ct).sum(-1)
    y = torch.stack(ys, dim=-1) if l else u_.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.to(work)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(work))
    out = y if (out_fp32 and work == torch.float32) else y.to(dtype_in)
    return (out, h) if return_last_state else out


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def resolve_backend(u: Tensor, backend: Optional[str] = None) -> str:
    """Pick the backend: ``backend`` arg > $MMSSM_SCAN_BACKEND > auto."""
    name = backend or os.environ.get('MMSSM_SCAN_BACKEND') or None
    if name is not None:
        if name not in BACKENDS:
            src = 'backend' if backend else 'MMSSM_SCAN_BACKEND'
            raise ValueError(f'{src} must be one of {BACKENDS}, got {name!r}')
        if name == 'cpp':
            from . import selective_scan_cpp
            if not selective_scan_cpp.available():
                raise RuntimeError('backend "cpp" needs the compiled CPU scan, which is not '
                                   f'built: {selective_scan_cpp.BUILD_HINT}')
            if u.device.type != 'cpu':
                raise RuntimeError(f'backend "cpp" needs CPU tensors; u is on {u.device}')
        if name == 'triton':
            if u.dtype == torch.float64:
                raise TypeError('backend "triton" supports float32/float16/bfloat16 inputs, '
                                'not float64; use backend "cpu" or "ref"')
            if not (u.is_cuda or _interpreting()):
                raise RuntimeError('backend "triton" needs CUDA tensors (or TRITON_INTERPRET=1 '
                                   f'set before importing triton); u is on {u.device}')
        return name
    if u.is_cuda and u.dtype != torch.float64:
        try:
            import triton  # noqa: F401
            return 'triton'
        except ImportError:
            pass
    if u.device.type == 'cpu':
        from . import selective_scan_cpp
        if selective_scan_cpp.available():
            return 'cpp'
    return 'cpu'


def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
             out_fp32: bool, reverse: bool, out: Optional[Tensor] = None,
             accumulate: bool = False) -> Tuple[Tensor, Tensor]:
    """Call the custom op ``mmssm::selective_scan_fwd`` (one graph node).

    With ``out`` (validated by :func:`_check_out`), plain eager inference stores / adds
    the scan into it inside the compiled kernel; everything else goes through the
    custom op and :func:`_into`.
    """
    from . import selective_scan_cpp  # noqa: F401  (registers the op)
    B = B.unsqueeze(1) if B.dim() == 3 else B  # (b, n, l) -> (b, 1, n, l)
    C = C.unsqueeze(1) if C.dim() == 3 else C
    save = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (u, delta, A, B, C, D, z, delta_bias))
    # an out that autograd tracks takes the result through out.add_ / copy_ (_into)
    tracked = save or (out is not None and torch.is_grad_enabled() and out.requires_grad)
    ext = selective_scan_cpp.direct_kernel(u) if not tracked else None
    if ext is not None and type(out) is Tensor:  # the kernel writes into out: no temporary
        last = ext.fwd_out(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                           accumulate, out)
        return out, last
    if ext is not None:  # plain eager inference: the compiled op itself (~11 us less a call)
        res, last, _ = ext.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32,
                               reverse, False)
        return _into(res, out, accumulate), last
    res, last, _ = torch.ops.mmssm.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                      delta_softplus, out_fp32, reverse, save)
    return _into(res, out, accumulate), last


def _check_out(u: Tensor, out: Optional[Tensor], accumulate: bool, out_fp32: bool) -> None:
    """``out`` must be a (b, d, l) tensor of the result's dtype on u's device."""
    if out is None:
        if accumulate:
            raise ValueError('accumulate=True adds the scan into out: pass out= as well')
        return
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(u.shape):
        raise ValueError(f'out must be a tensor of u\'s shape {tuple(u.shape)}, got '
                         f'{tuple(out.shape) if isinstance(out, Tensor) else type(out)}')
    want = (torch.float32 if out_fp32 and u.dtype != torch.float64 else u.dtype)
    if out.dtype != want:
        raise TypeError(f'out must have the result\'s dtype {want} (u\'s dtype, float32 with '
                        f'out_fp32), got {out.dtype}')
    if out.device != u.device:
        raise ValueError(f'out is on {out.device} but u is on {u.device}')


def _into(res: Tensor, out: Optional[Tensor], accumulate: bool) -> Tensor:
    """res itself (no out), or out after ``out += res`` / ``out[:] = res``."""
    if out is None:
        return res
    return out.add_(res) if accumulate else out.copy_(res)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False,
                   return_last_state: bool = False,
                   out_fp32: bool = False,
                   backend: Optional[str] = None,
                   reverse: bool = False,
                   out: Optional[Tensor] = None,
                   accumulate: bool = False) -> ScanOut:
    """Selective scan with automatic backend choice (see module docstring).

    Args:
        u, delta, z: (b, d, l) inputs, gate.
        A: (d, n) real decay rates (negative for a stable scan).
        B, C: (d, n) constant or (b, g, n, l) / (b, n, l) input-dependent.
        D, delta_bias: optional (d,) skip weight and delta bias.
        delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return the final state (b, d, n), fp32.
        out_fp32: return the output in fp32 whatever the input dtype.
        backend: None (auto), or force one of 'ref', 'cpu', 'cpp', 'triton'.
        reverse: scan from the last time step to the first.
        out: optional (b, d, l) tensor (any strides, the result's dtype: u's, or fp32
            with ``out_fp32``) that receives the result and is returned. In eager CPU
            inference the compiled kernel writes into it directly, and it may then be u,
            delta or z itself (each step's inputs are read before its output is
            written; no partial overlap), e.g. a private conv output that the scan
            overwrites. With autograd it must not be an input the scan saves.
        accumulate: add the result to ``out``'s values instead (needs ``out``); the
            same values as ``out += selective_scan(...)`` (fp32 output: bit-identical).

    Returns:
        out (b, d, l), or (out, last_state) if ``return_last_state``. On the CPU
        (compiled kernel) out has u's memory layout when u is dense, as
        ``torch.empty_like(u)``: a (b, d, l) view of token-major (b, l, d) tensors gives
        a token-major output (``out.transpose(1, 2)`` is then contiguous); other
        backends return it contiguous.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    _check_out(u, out, accumulate, out_fp32)
    if torch.compiler.is_exporting():  # one op per scan in the exported graph
        res, last = _scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32,
                             reverse, out, accumulate)
        return (res, last) if return_last_state else res
    name = resolve_backend(u, backend)
    forced = bool(backend or os.environ.get('MMSSM_SCAN_BACKEND'))
    b, d, l = u.shape
    if name == 'cpp' or (name == 'cpu' and not forced and u.device.type == 'cpu'):
        # the custom op: compiled kernel if built, else the chunked scan inside the op
        res, last = _scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32,
                             reverse, out, accumulate)
        return (res, last) if return_last_state else res
    if l == 0:  # nothing to scan; keep the graph connected for autograd
        res = u.float() * 0 if out_fp32 and u.dtype != torch.float64 else u * 0
        last = u.new_zeros(b, d, A.shape[1], dtype=torch.float64 if u.dtype == torch.float64
                           else torch.float32)
    elif name == 'ref':
        res, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                       True, out_fp32, reverse)
    else:
        if name == 'cpu':
            from .selective_scan_cpu import selective_scan_chunked as fn
        else:
            from .selective_scan_triton import selective_scan_triton as fn
        res, last = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32, reverse)
    res = _into(res, out, accumulate)
    return (res, last) if return_last_state else res
