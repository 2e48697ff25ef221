"""The forward and the reverse selective scan of the same operands, as one op.

V2M's 2-D scan runs every pass in two directions over shared operands: both row
directions over one set of row operands, both column directions over one row
latent's. The two scans share the decay exp(dt A) and the input term dt u B of every
(token, channel, state); :func:`bidir_selective_scan` computes them once and runs
both recurrences (``mmssm/ops/csrc/bidir_selective_scan.h``), giving

- ``out[0]`` = ``selective_scan(..., reverse=False)``, ``out[1]`` = ``reverse=True``
  (a (2, b, d, l) tensor), or
- with ``sum_directions``, their sum (b, d, l) (V2M's column passes, whose corners
  are summed anyway).

Ops (registered on import, like :mod:`mmssm.ops.selective_scan_cpp`)::

    bidir_selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus,
                             out_fp32, sum_directions, save_states) -> (out, states)
    bidir_selective_scan_bwd(dout, u, delta, A, B, C, D?, z?, delta_bias?, states,
                             delta_softplus, sum_directions)
        -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]

:func:`bidir_selective_scan_sum_into` (eager inference) adds both directions' sum into an
existing output and gates it, in the compiled kernel (V2M's column passes).

B / C are (d, n) or (b, g, n, l) as for the plain op. ``states`` (2, b, d, n_chunks, n)
holds each direction's chunk states (empty unless ``save_states``); the backward gives each
direction's gradients, summed (the compiled kernel recomputes V2M's n = 1 lines whole and
runs both adjoint scans in one pass over the line, reading ``dout`` in its own layout;
other shapes run the plain backward of each direction). Each slice of ``out``, and du /
d(delta) / dz, have u's layout when u is dense (``torch.empty_like(u)``), as the plain
scan's output: token-major activations get token-major gradients, which autograd adds
and the projections' GEMMs read without layout copies. Without the compiled kernel (or
off the CPU) both ops run the plain scan op twice.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import selective_scan_cpp
from .selective_scan import _check_inputs, resolve_backend, selective_scan
from .selective_scan_cpp import _use_ext, _work_dtype


def _out_like(u: Tensor, dtype: torch.dtype, sum_directions: bool) -> Tensor:
    """Empty (b, d, l) (summed) or (2, b, d, l) output, each slice in u's layout."""
    one = torch.empty_like(u, dtype=dtype)
    if sum_directions:
        return one
    return one.new_empty_strided((2, ) + tuple(one.shape), (one.numel(), ) + one.stride())


def _out_dtype(u: Tensor, out_fp32: bool) -> torch.dtype:
    wd = _work_dtype(u)
    return wd if (out_fp32 or wd == torch.float64) else u.dtype


@torch.library.custom_op('mmssm::bidir_selective_scan_fwd', mutates_args=())
def bidir_selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor], z: Optional[Tensor],
                             delta_bias: Optional[Tensor], delta_softplus: bool,
                             out_fp32: bool, sum_directions: bool,
                             save_states: bool) -> Tuple[Tensor, Tensor]:
    """Both directions' scans (validated inputs; see the module docstring)."""
    if _use_ext(u):
        return selective_scan_cpp._EXT.bidir_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                 delta_softplus, out_fp32, sum_directions,
                                                 save_states)
    # no compiled kernel (or l = 0): the plain scan op once per direction
    fwd = torch.ops.mmssm.selective_scan_fwd
    f = fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32, False, save_states)
    r = fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32, True, save_states)
    out = _out_like(u, f[0].dtype, sum_directions)
    if sum_directions:
        out.copy_(f[0]).add_(r[0])
    else:
        out[0].copy_(f[0])
        out[1].copy_(r[0])
    states = torch.stack([f[2], r[2]]) if save_states else f[2]
    return out, states


def _states_shape(u: Tensor, A: Tensor) -> Tuple[int, ...]:
    return (2, ) + selective_scan_cpp._states_shape(u, A)


@bidir_selective_scan_fwd.register_fake
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32, sum_directions,
              save_states):
    wd = _work_dtype(u)
    states = (u.new_empty(_states_shape(u, A), dtype=wd) if save_states
              else u.new_empty(0, dtype=wd))
    return _out_like(u, _out_dtype(u, out_fp32), sum_directions), states


@torch.library.custom_op('mmssm::bidir_selective_scan_bwd', mutates_args=())
def bidir_selective_scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                             C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                             delta_bias: Optional[Tensor], states: Tensor,
                             delta_softplus: bool, sum_directions: bool) -> List[Tensor]:
    """All gradients of :func:`bidir_selective_scan_fwd`: each direction's, summed."""
    if _use_ext(u):
        return list(selective_scan_cpp._EXT.bidir_bwd(dout, u, delta, A, B, C, D, z,
                                                      delta_bias, states, delta_softplus,
                                                      sum_directions))
    bwd = torch.ops.mmssm.selective_scan_bwd
    grads = [bwd(dout if sum_directions else dout[k], None, u, delta, A, B, C, D, z,
                 delta_bias, states[k], delta_softplus, k == 1) for k in (0, 1)]
    res = []
    for i, (f, r) in enumerate(zip(*grads)):
        if i in _U_LAYOUT and f.numel():  # du, d(delta), dz in u's layout, as the kernel's
            f = torch.add(f, r, out=torch.empty_like(u, dtype=f.dtype))
        elif f.numel():
            f.add_(r)
        res.append(f)
    return res


# outputs of the backward in u's layout (torch.empty_like(u)): du, d(delta), dz
_U_LAYOUT = (0, 1, 6)


@bidir_selective_scan_bwd.register_fake
def _bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus,
              sum_directions):
    meta = selective_scan_cpp._bwd_meta(u, delta, A, B, C, z)
    return [torch.empty_like(u, dtype=dt) if i in _U_LAYOUT and s == tuple(u.shape)
            else u.new_empty(s, dtype=dt) for i, (s, dt) in enumerate(meta)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32, sum_dirs, save = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.cfg = (softplus, sum_dirs, save)


def _backward(ctx, dout, dstates):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    softplus, sum_dirs, save = ctx.cfg
    if not save:
        raise RuntimeError('mmssm.bidir_selective_scan_fwd ran with save_states=False, so it '
                           'has no backward; call it with save_states=True (the public '
                           'mmssm.ops.bidir_selective_scan does this when a gradient is needed)')
    if dout is None:  # only the states were used: a zero cotangent of out's shape
        shape = tuple(u.shape) if sum_dirs else (2, ) + tuple(u.shape)
        dout = u.new_zeros(shape, dtype=_work_dtype(u))
    grads = torch.ops.mmssm.bidir_selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias,
                                                     states, softplus, sum_dirs)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    res = [g.to(x.dtype) if (x is not None and need) else None
           for g, x, need in zip(grads, inputs, ctx.needs_input_grad)]
    return tuple(res) + (None, ) * 4


torch.library.register_autograd('mmssm::bidir_selective_scan_fwd', _backward,
                                setup_context=_setup_context)


class _EagerBidir(torch.autograd.Function):
    """Eager CPU autograd of the two-direction scan: the compiled forward / backward ops
    called directly, the same kernels and values as the registered op's autograd.

    The registered custom op costs ~80 us of dispatch per forward with saved states and
    ~150 us per backward (1 thread, a tiny scan), against ~8 / ~21 us for the compiled
    calls themselves: ~5 ms of a V2M-S* train step (28 calls). Used only where
    :func:`mmssm.ops.selective_scan_cpp.direct_kernel` allows a direct call (no tracing,
    compile, export, dispatch mode or subclass; no functorch transform), so everything
    that must see the public op (FLOP counting, ONNX, ``torch.compile``) still does.
    """

    @staticmethod
    def forward(ctx, ext, u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32, sum_dirs):
        # (the ctx-style forward: ~12 us a call against ~45 us with setup_context)
        out, states = ext.bidir_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32,
                                    sum_dirs, True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.cfg = (ext, softplus, sum_dirs)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        ext, softplus, sum_dirs = ctx.cfg
        grads = ext.bidir_bwd(dout, u, delta, A, B, C, D, z, delta_bias, states, softplus,
                              sum_dirs)
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        res = [g.to(x.dtype) if (x is not None and need) else None
               for g, x, need in zip(grads, inputs, ctx.needs_input_grad[1:9])]
        return (None, *res, None, None, None)


def bidir_selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                             delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                             out_fp32: bool = False, sum_directions: bool = False,
                             backend: Optional[str] = None) -> Tensor:
    """The composition: :func:`selective_scan` forward and reverse (differentiable).

    Same arguments and result as :func:`bidir_selective_scan`; ``backend`` is passed to
    both scans.
    """
    ys = [selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32=out_fp32,
                         backend=backend, reverse=rev) for rev in (False, True)]
    return ys[0] + ys[1] if sum_directions else torch.stack(ys)


def bidir_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         out_fp32: bool = False, sum_directions: bool = False,
                         backend: Optional[str] = None) -> Tensor:
    """The forward and the reverse selective scan of the same operands.

    Args:
        u, delta, z, A, B, C, D, delta_bias, delta_softplus, out_fp32, backend: as for
            :func:`mmssm.ops.selective_scan` (B / C (d, n), (b, n, l) or (b, g, n, l)).
        sum_directions: return the sum of the two scans instead of both.

    Returns:
        (2, b, d, l): ``[selective_scan(...), selective_scan(..., reverse=True)]``, or
        their sum (b, d, l) with ``sum_directions``. With the compiled CPU kernel each
        (b, d, l) slice has u's memory layout when u is dense (as the plain scan's
        output); the composition used elsewhere (other backends, CUDA) returns a
        contiguous tensor.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if (not torch.compiler.is_exporting() and
            (resolve_backend(u, backend) != 'cpp' or u.shape[-1] == 0)):
        return bidir_selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        out_fp32, sum_directions, backend)
    B = B.unsqueeze(1) if B.dim() == 3 else B  # (b, n, l) -> (b, 1, n, l)
    C = C.unsqueeze(1) if C.dim() == 3 else C
    save = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (u, delta, A, B, C, D, z, delta_bias))
    ext = selective_scan_cpp.direct_kernel(u)
    if ext is not None and not save:  # plain eager inference: the compiled op itself
        return ext.bidir_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32,
                             sum_directions, False)[0]
    if (ext is not None and selective_scan_cpp.EAGER_AUTOGRAD and
            not torch._C._are_functorch_transforms_active()):
        # eager autograd: the compiled ops under a plain autograd.Function (see _EagerBidir)
        return _EagerBidir.apply(ext, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 out_fp32, sum_directions)
    return torch.ops.mmssm.bidir_selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                    delta_softplus, out_fp32, sum_directions,
                                                    save)[0]


def bidir_selective_scan_sum_into(out: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                                  C: Tensor, D: Optional[Tensor] = None,
                                  delta_bias: Optional[Tensor] = None,
                                  delta_softplus: bool = False,
                                  gate: Optional[Tensor] = None) -> bool:
    """``out += forward + reverse scan`` (then ``out *= silu(gate)``) in place, if it can.

    Eager inference helper for V2M's column passes: the second row latent's two column
    directions are added to the first latent's sum (and the corner sum gated) inside the
    compiled two-direction kernel, instead of an add, a silu and a multiply over the
    whole map afterwards. Each direction's scan is the plain one; the sums and the gate
    are fp32 rounding apart from the separate ops (the kernel's own sigmoid).

    Args:
        out: (b, d, l) of the work dtype, with u's strides (the output of a summed
            :func:`bidir_selective_scan` of the same shape); updated in place.
        u, delta, A, B, C, D, delta_bias, delta_softplus: as for
            :func:`bidir_selective_scan` (no z).
        gate: None or (b, d, l) with u's strides.

    Returns:
        True when done; False (``out`` untouched) when the compiled kernel's fast path does
        not apply (no gradient may be needed, n = 1, fp32 / fp64 token-major views of one
        layout, full channel blocks, l <= 1024), or under tracing / compile / export: the
        caller then runs :func:`bidir_selective_scan` and adds.
    """
    ext = selective_scan_cpp.direct_kernel(u)
    if (ext is None or not hasattr(ext, 'bidir_sum_into') or torch.is_grad_enabled()
            and any(x is not None and x.requires_grad
                    for x in (out, u, delta, A, B, C, D, delta_bias, gate))):
        return False
    B = B.unsqueeze(1) if B.dim() == 3 else B  # (b, n, l) -> (b, 1, n, l)
    C = C.unsqueeze(1) if C.dim() == 3 else C
    return bool(ext.bidir_sum_into(u, delta, A, B, C, D, delta_bias, delta_softplus, out, gate))
