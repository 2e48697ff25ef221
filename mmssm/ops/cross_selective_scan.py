"""VMamba's four-direction selective scan on the token grid, as one op.

SS2D (VMamba) scans the (h, w) token grid in four orders (k = 0 row-major,
1 column-major, 2 / 3 their reverses: :func:`mmssm.ops.cross_scan`), runs one
selective scan per direction with its own delta / B / C / A / D, and sums the
four outputs back at their grid positions (:func:`mmssm.ops.cross_merge`). The
composition copies the input into the four orders (b, 4, D, L), the delta / B / C
projections too, and the (b, 4, D, L) output back. :func:`cross_selective_scan`
does it in one compiled kernel that reads the grid in each direction's order and
merges in the kernel (no copies; see ``mmssm/ops/csrc/cross_selective_scan.h``)::

    u       (b, h, w, D)        tokens, channels-last
    delta   (4, b, h, w, D)     pre-softplus delta of direction k at each grid position
    B, C    (b, h, w, 4, N)     direction k's B / C at each grid position (views of the
                                grid-order x_proj output (b, h, w, 4, R + 2N) are fine)
    A       (4 D, N)            channel k D + c is channel c of direction k
    D, delta_bias (4 D,)
    -> y    (b, h, w, D)        sum over directions, fp32 (fp64 for fp64 u)

Ops (registered on import, like :mod:`mmssm.ops.selective_scan_cpp`)::

    cross_selective_scan_fwd(u, delta, A, B, C, D?, delta_bias?, delta_softplus,
                             save_states) -> (y, states)
    cross_selective_scan_bwd(dy, u, delta, A, B, C, D?, delta_bias?, states,
                             delta_softplus) -> [du, ddelta, dA, dB, dC, dD, ddelta_bias]

``states`` (b, 4 D, n_chunks, N) is what the backward needs (empty unless
``save_states``). Without the compiled kernel (or off the CPU) both ops run the
composition :func:`cross_selective_scan_ref` (the backward by recomputing it).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import selective_scan_cpp
from .selective_scan_cpp import _work_dtype
from .scan_order import cross_merge, cross_scan
from .selective_scan import selective_scan

K = 4  # directions


def directions_to_scan_order(g: Tensor) -> Tensor:
    """(b, K, X, h, w) grids, one per direction -> (b, K, X, L), each in its direction's
    order (k = 0 row-major, 1 column-major, 2 / 3 their reverses, as :func:`cross_scan`)."""
    rows = g[:, 0::2].flatten(3)                                        # directions 0, 2
    cols = g[:, 1::2].transpose(3, 4).flatten(3)                        # directions 1, 3
    return torch.stack([rows[:, 0], cols[:, 0], rows[:, 1].flip(-1), cols[:, 1].flip(-1)], 1)


def _to_scan_order(t: Tensor) -> Tensor:
    """(b, h, w, K, X) per-direction grid values -> (b, K, X, L) in each direction's order."""
    return directions_to_scan_order(t.permute(0, 3, 4, 1, 2))


def check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Optional[Tensor], delta_bias: Optional[Tensor]) -> None:
    """Raise a ValueError naming the argument whose shape does not fit."""
    if not isinstance(u, Tensor) or u.dim() != 4:
        raise ValueError(f'u must be a (b, h, w, D) tensor, got '
                         f'{tuple(u.shape) if isinstance(u, Tensor) else type(u)}')
    b, h, w, d = u.shape
    if tuple(delta.shape) != (K, b, h, w, d):
        raise ValueError(f'delta must be (4, b, h, w, D) = {(K, b, h, w, d)}, '
                         f'got {tuple(delta.shape)}')
    if A.dim() != 2 or A.shape[0] != K * d or A.shape[1] < 1:
        raise ValueError(f'A must be (4 D = {K * d}, N >= 1), got {tuple(A.shape)}')
    n = A.shape[1]
    for name, X in (('B', B), ('C', C)):
        if tuple(X.shape) != (b, h, w, K, n):
            raise ValueError(f'{name} must be (b, h, w, 4, N) = {(b, h, w, K, n)}, '
                             f'got {tuple(X.shape)}')
    for name, x in (('D', D), ('delta_bias', delta_bias)):
        if x is not None and tuple(x.shape) != (K * d,):
            raise ValueError(f'{name} must be (4 D,) = ({K * d},), got {tuple(x.shape)}')
    for name, x in (('delta', delta), ('A', A), ('B', B), ('C', C), ('D', D),
                    ('delta_bias', delta_bias)):
        if x is not None and x.device != u.device:
            raise ValueError(f'{name} is on {x.device} but u is on {u.device}')


def cross_selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                             delta_softplus: bool = True) -> Tensor:
    """The composition cross_scan -> selective_scan -> cross_merge (differentiable).

    Same arguments and result as :func:`cross_selective_scan`.
    """
    b, h, w, d = u.shape
    L = h * w
    xs = cross_scan(u.permute(0, 3, 1, 2))                             # (b, K, D, L)
    dts = _to_scan_order(delta.permute(1, 2, 3, 0, 4))                  # (b, K, D, L)
    ys = selective_scan(xs.reshape(b, K * d, L), dts.reshape(b, K * d, L), A,
                        _to_scan_order(B), _to_scan_order(C), D=D, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, out_fp32=True)   # (b, K*D, L)
    y = cross_merge(ys.view(b, K, d, L), h, w)                          # (b, D, L)
    return y.view(b, d, h, w).permute(0, 2, 3, 1)


def _from_scan_order(t: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`_to_scan_order`: (b, K, X, L) -> (b, h, w, K, X)."""
    b, _, x, _ = t.shape
    g = torch.stack([t[:, 0].view(b, x, h, w), t[:, 1].reshape(b, x, w, h).transpose(2, 3),
                     t[:, 2].flip(-1).view(b, x, h, w),
                     t[:, 3].flip(-1).reshape(b, x, w, h).transpose(2, 3)], 1)
    return g.permute(0, 3, 4, 1, 2)


def _scan_order_operands(u: Tensor, delta: Tensor, B: Tensor, C: Tensor):
    """The plain scan's operands: u / delta (b, K D, L), B / C (b, K, N, L)."""
    b, h, w, d = u.shape
    xs = _to_scan_order(u.unsqueeze(3).expand(b, h, w, K, d)).reshape(b, K * d, h * w)
    dts = _to_scan_order(delta.permute(1, 2, 3, 0, 4)).reshape(b, K * d, h * w)
    return xs, dts, _to_scan_order(B), _to_scan_order(C)


def _use_ext(u: Tensor) -> bool:
    return selective_scan_cpp._EXT is not None and u.device.type == 'cpu'


def _n_chunks(u: Tensor) -> int:
    return -(-u.shape[1] * u.shape[2] // selective_scan_cpp.KERNEL_CHUNK)


@torch.library.custom_op('mmssm::cross_selective_scan_fwd', mutates_args=())
def cross_selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor], delta_bias: Optional[Tensor],
                             delta_softplus: bool, save_states: bool) -> Tuple[Tensor, Tensor]:
    """The merged four-direction scan (see the module docstring)."""
    if _use_ext(u):
        return selective_scan_cpp._EXT.cross_fwd(u, delta, A, B, C, D, delta_bias,
                                                 delta_softplus, save_states)
    # no compiled kernel: the plain scan op on the operands put into the scan orders
    b, h, w, d = u.shape
    xs, dts, Bs, Cs = _scan_order_operands(u, delta, B, C)
    ys, _, _ = torch.ops.mmssm.selective_scan_fwd(xs, dts, A, Bs, Cs, D, None, delta_bias,
                                                  delta_softplus, True, False, False)
    y = _from_scan_order(ys.view(b, K, d, h * w), h, w).sum(3)
    return y.contiguous(), u.new_empty(0, dtype=_work_dtype(u))


@cross_selective_scan_fwd.register_fake
def _fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, save_states):
    b, h, w, d = u.shape
    wd = _work_dtype(u)
    states = (u.new_empty(b, K * d, _n_chunks(u), A.shape[1], dtype=wd)
              if save_states and _use_ext(u) else u.new_empty(0, dtype=wd))
    return u.new_empty(b, h, w, d, dtype=wd), states


@torch.library.custom_op('mmssm::cross_selective_scan_bwd', mutates_args=())
def cross_selective_scan_bwd(dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                             C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
                             states: Tensor, delta_softplus: bool) -> List[Tensor]:
    """All gradients of :func:`cross_selective_scan_fwd`; dD / ddelta_bias always (4 D,)."""
    if _use_ext(u):
        return list(selective_scan_cpp._EXT.cross_bwd(dy, u, delta, A, B, C, D, delta_bias,
                                                      states, delta_softplus))
    # no compiled kernel: the plain scan's forward (for its saved states) and backward
    # on the operands in the scan orders, the gradients put back into the grid
    b, h, w, d = u.shape
    wd = _work_dtype(u)
    xs, dts, Bs, Cs = _scan_order_operands(u, delta, B, C)
    _, _, st = torch.ops.mmssm.selective_scan_fwd(xs, dts, A, Bs, Cs, D, None, delta_bias,
                                                  delta_softplus, True, False, True)
    dys = _to_scan_order(dy.unsqueeze(3).expand(b, h, w, K, d)).reshape(b, K * d, h * w)
    du, dd, dA, dB, dC, dD, _, dbias = torch.ops.mmssm.selective_scan_bwd(
        dys, None, xs, dts, A, Bs, Cs, D, None, delta_bias, st, delta_softplus, False)
    du = _from_scan_order(du.view(b, K, d, h * w), h, w)                # (b, h, w, K, D)
    dd = _from_scan_order(dd.view(b, K, d, h * w), h, w).permute(3, 0, 1, 2, 4)
    grads = [du.sum(3), dd, dA, _from_scan_order(dB, h, w), _from_scan_order(dC, h, w), dD,
             dbias]
    io = wd if delta.dtype != u.dtype else u.dtype
    return [g.to(io if i < 2 else wd).contiguous() for i, g in enumerate(grads)]


def _bwd_meta(u: Tensor, delta: Tensor, A: Tensor, B: Tensor):
    wd = _work_dtype(u)
    io = wd if delta.dtype != u.dtype else u.dtype
    return [(u.shape, io), (delta.shape, io), (A.shape, wd), (B.shape, wd), (B.shape, wd),
            ((A.shape[0],), wd), ((A.shape[0],), wd)]


@cross_selective_scan_bwd.register_fake
def _bwd_fake(dy, u, delta, A, B, C, D, delta_bias, states, delta_softplus):
    return [u.new_empty(tuple(s), dtype=dt) for s, dt in _bwd_meta(u, delta, A, B)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, softplus, save = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.cfg = (softplus, save)


def _backward(ctx, dy, dstates):
    u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
    softplus, save = ctx.cfg
    if not save and _use_ext(u):
        raise RuntimeError('mmssm.cross_selective_scan_fwd ran with save_states=False, so it '
                           'has no backward; call it with save_states=True (the public '
                           'mmssm.ops.cross_selective_scan does this when a gradient is needed)')
    grads = torch.ops.mmssm.cross_selective_scan_bwd(dy, u, delta, A, B, C, D, delta_bias,
                                                     states, softplus)
    inputs = (u, delta, A, B, C, D, delta_bias)
    res = [g.to(x.dtype) if (x is not None and need) else None
           for g, x, need in zip(grads, inputs, ctx.needs_input_grad)]
    return tuple(res) + (None, None)


torch.library.register_autograd('mmssm::cross_selective_scan_fwd', _backward,
                                setup_context=_setup_context)


def cross_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                         delta_softplus: bool = True) -> Tensor:
    """VMamba's 4-direction selective scan, merged, on the token grid.

    Args:
        u: (b, h, w, D) tokens (channels-last).
        delta: (4, b, h, w, D) delta of each direction at each grid position.
        A: (4 D, N) decay rates (negative for a stable scan).
        B, C: (b, h, w, 4, N) each direction's B / C at each grid position.
        D, delta_bias: optional (4 D,) skip weight and delta bias.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        (b, h, w, D) fp32 (fp64 for fp64 u): the sum over the four directions of each
        direction's scan output at its grid position (``cross_merge`` of the scans).
    """
    check_inputs(u, delta, A, B, C, D, delta_bias)
    if not _use_ext(u):  # no compiled kernel here: the differentiable composition
        return cross_selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    save = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (u, delta, A, B, C, D, delta_bias))
    ext = selective_scan_cpp.direct_kernel(u) if not save else None
    if ext is not None:  # plain eager inference: skip the custom op's dispatch
        return ext.cross_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, False)[0]
    return torch.ops.mmssm.cross_selective_scan_fwd(u, delta, A, B, C, D, delta_bias,
                                                    delta_softplus, save)[0]
