"""The selective scan as torch custom ops (``torch.ops.mmssm.selective_scan_fwd`` / ``_bwd``).

Registered on import of :mod:`mmssm.ops`, whether or not the C++ extension was
built, so that ``torch.compile``, ``torch.export`` / ONNX and the FLOP counter
see exactly one op per scan:

    selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, out_fp32,
                       reverse, save_states) -> (out, last_state, chunk_states)
    selective_scan_bwd(dout, dlast?, u, delta, A, B, C, D?, z?, delta_bias?, chunk_states,
                       delta_softplus, reverse) -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]

B/C are (d, n) constant or (b, g, n, l) (the public wrapper unsqueezes (b, n, l)).
``chunk_states`` is the data the backward needs, (b, d, n_chunks, n) in the work
dtype, or an empty tensor when ``save_states`` is False. The backward returns
dD / ddelta_bias of shape (d,) whether or not D / delta_bias were given, dz an
empty tensor without z; du / ddelta / dz come in the kernel's I/O dtype and
everything else in the work dtype (the autograd formula casts each gradient to
its input's dtype).

Implementation of both ops: the compiled kernel (``mmssm/ops/csrc``, the best of
the ``_scan_cpu_{avx512,avx2,default}`` builds the CPU supports; force one with
MMSSM_SCAN_SIMD) for CPU tensors when it is built, else the chunked PyTorch scan
(:mod:`mmssm.ops.selective_scan_cpu`, any device).
"""
import glob
import importlib.machinery
import os
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .selective_scan_cpu import chunked_backward, chunked_forward, default_chunk

LEVELS = ('avx512', 'avx2', 'default')
_HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_HINT = ('build it with `python setup.py build_ext --inplace` in the mmssm checkout (or '
              'reinstall with `pip install --no-build-isolation -e .`; needs a C++ compiler and '
              'MMSSM_BUILD_EXT unset or 1)')


def built_levels() -> List[str]:
    """SIMD levels whose extension file is present next to this module."""
    found = []
    for level in LEVELS:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if glob.glob(os.path.join(_HERE, f'_scan_cpu_{level}{suffix}')):
                found.append(level)
                break
    return found


def _path(level: str) -> Optional[str]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = os.path.join(_HERE, f'_scan_cpu_{level}{suffix}')
        if os.path.exists(p):
            return p
    return None


def _cpu_levels() -> List[str]:
    """Levels this CPU runs, best first (torch's own detection, which also honours
    ATEN_CPU_CAPABILITY)."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith('AVX512'):
        return ['avx512', 'avx2', 'default']
    if cap.startswith('AVX2'):
        return ['avx2', 'default']
    return ['default']


def _load():
    """Load the best usable build; returns (op namespace, level) or (None, None)."""
    want = os.environ.get('MMSSM_SCAN_SIMD')
    if want is not None and want not in LEVELS:
        raise ValueError(f'MMSSM_SCAN_SIMD must be one of {LEVELS}, got {want!r}')
    for level in ([want] if want else _cpu_levels()):
        path = _path(level)
        if path is None:
            continue
        try:
            torch.ops.load_library(path)
            return getattr(torch.ops, f'mmssm_scan_{level}'), level
        except Exception as e:  # e.g. built against another torch
            warnings.warn(f'mmssm: could not load the compiled scan {path}: {e}; using the '
                          f'chunked PyTorch scan. Rebuild: {BUILD_HINT}')
    return None, None


_EXT, LEVEL = _load()


def available() -> bool:
    """True when the compiled kernel is loaded (CPU tensors then use it)."""
    return _EXT is not None


def _use_ext(u: Tensor) -> bool:
    # l = 0 has nothing to scan: the plain path below handles it
    return _EXT is not None and u.device.type == 'cpu' and u.shape[-1] > 0


# eager autograd code may run the two-direction scan's compiled forward / backward under a
# plain autograd.Function (mmssm.ops.bidir_selective_scan; False: the registered op's
# autograd, for tests / A/B)
EAGER_AUTOGRAD: bool = True


def direct_kernel(u: Tensor):
    """The compiled op namespace when eager code may call it directly, else None.

    The Python custom op (``torch.library``) costs ~11 us a call in dispatch and
    argument handling (measured on a tiny scan; ~40 us under torch.profiler), ~1 ms
    of a V2M-S* forward (84 scans). Inference that nothing
    observes can skip it and call the compiled private op (same kernel, same
    result). Everything that must see the public op keeps it: ``torch.compile``
    / ``torch.export`` (graph nodes, fake kernels), ``torch.jit`` tracing (the
    FLOP counter's ``mmssm::selective_scan_fwd`` handle), any
    ``TorchDispatchMode`` (e.g. ``torch.utils.flop_counter.FlopCounterMode``) and
    tensor subclasses. Callers decide about autograd (only without a gradient).
    """
    # tracing first: under torch.jit.trace a shape compare would be recorded (TracerWarning)
    if (_EXT is None or torch.jit.is_tracing() or type(u) is not Tensor
            or u.device.type != 'cpu' or u.shape[-1] == 0
            or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch._C._len_torch_dispatch_stack() > 0):
        return None
    return _EXT


# time steps per tile of the compiled kernel = distance between its saved chunk states
# (kChunk in csrc/selective_scan.h)
KERNEL_CHUNK = 64


def _work_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _io_dtype(u: Tensor, *xs: Optional[Tensor]) -> torch.dtype:
    """The kernel's activation dtype: u's, or the work dtype if activations are mixed."""
    mixed = any(x is not None and x.dim() >= 3 and x.dtype != u.dtype for x in xs)
    return _work_dtype(u) if mixed else u.dtype


def _chunk_len(u: Tensor, A: Tensor) -> int:
    """Chunk length of the chunked fallback (deterministic, so fwd and bwd agree)."""
    b, d, l = u.shape
    return max(min(default_chunk(l, b * d * A.shape[1]), l), 1)


def _states_shape(u: Tensor, A: Tensor) -> Tuple[int, ...]:
    b, d, l = u.shape
    n = A.shape[1]
    if _use_ext(u):
        return (b, d, -(-l // KERNEL_CHUNK), n)
    return (b, d, -(-l // _chunk_len(u, A)) + 1, n)


@torch.library.custom_op('mmssm::selective_scan_fwd', mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool, out_fp32: bool, reverse: bool,
                       save_states: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """One selective scan (validated inputs; see the module docstring)."""
    if _use_ext(u):
        return _EXT.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32,
                        reverse, save_states)
    b, d, l = u.shape
    wd = _work_dtype(u)
    if l == 0:
        out_dtype = wd if (out_fp32 or wd == torch.float64) else u.dtype
        return (u.new_zeros(b, d, 0, dtype=out_dtype), u.new_zeros(b, d, A.shape[1], dtype=wd),
                u.new_zeros(b, d, 1, A.shape[1], dtype=wd) if save_states
                else u.new_zeros(0, dtype=wd))
    out, hs, _ = chunked_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32,
                                 reverse, _chunk_len(u, A))
    if not u.is_contiguous():  # the compiled kernel's (and the fake's) layout: u's
        out = torch.empty_like(u, dtype=out.dtype).copy_(out)
    states = (hs.permute(1, 2, 0, 3).contiguous() if save_states
              else u.new_zeros(0, dtype=wd))
    return out, hs[-1].clone(), states


@selective_scan_fwd.register_fake
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32, reverse,
              save_states):
    b, d, l = u.shape
    wd = _work_dtype(u)
    out_dtype = wd if (out_fp32 or wd == torch.float64) else u.dtype
    states = (u.new_empty(_states_shape(u, A), dtype=wd) if save_states
              else u.new_empty(0, dtype=wd))
    # out has u's layout when u is dense (torch.empty_like), as the compiled kernel's
    return (torch.empty_like(u, dtype=out_dtype), u.new_empty(b, d, A.shape[1], dtype=wd),
            states)


@torch.library.custom_op('mmssm::selective_scan_bwd', mutates_args=())
def selective_scan_bwd(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor,
                       A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                       delta_bias: Optional[Tensor], chunk_states: Tensor, delta_softplus: bool,
                       reverse: bool) -> List[Tensor]:
    """All gradients of :func:`selective_scan_fwd` (see the module docstring)."""
    if _use_ext(u):
        return list(_EXT.bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                             delta_softplus, reverse))
    if u.shape[-1] == 0:
        grads = (None,) * 8
    else:
        hs = chunk_states.permute(2, 0, 1, 3)  # (nc+1, b, d, n)
        grads = chunked_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, hs,
                                 delta_softplus, reverse, _chunk_len(u, A))
    like = (u, u, A, B, C, A, u, A)
    return [x.new_zeros(shape, dtype=dtype) if g is None else g.to(dtype).contiguous()
            for g, (shape, dtype), x in zip(grads, _bwd_meta(u, delta, A, B, C, z), like)]


def _bwd_meta(u, delta, A, B, C, z):
    """(shape, dtype) of each output of selective_scan_bwd."""
    b, d, l = u.shape
    wd, io = _work_dtype(u), _io_dtype(u, delta, B, C, z)
    return [((b, d, l), io), ((b, d, l), io), (tuple(A.shape), wd), (tuple(B.shape), wd),
            (tuple(C.shape), wd), ((d,), wd),
            ((b, d, l), io) if z is not None else ((0,), wd), ((d,), wd)]


@selective_scan_bwd.register_fake
def _bwd_fake(dout, dlast, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus,
              reverse):
    return [u.new_empty(s, dtype=dt) for s, dt in _bwd_meta(u, delta, A, B, C, z)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32, reverse, save = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.cfg = (softplus, reverse, save)


def _backward(ctx, dout, dlast, dstates):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    softplus, reverse, save = ctx.cfg
    if not save and u.shape[-1] > 0:
        raise RuntimeError('mmssm.selective_scan_fwd ran with save_states=False, so it has no '
                           'backward; call it with save_states=True (the public '
                           'mmssm.ops.selective_scan does this when a gradient is needed)')
    if dout is None:
        dout = torch.zeros_like(u, dtype=_work_dtype(u))
    grads = torch.ops.mmssm.selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias,
                                               states, softplus, reverse)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    res = []
    for g, x, need in zip(grads, inputs, ctx.needs_input_grad):
        res.append(g.to(x.dtype) if (x is not None and need) else None)
    return tuple(res) + (None,) * 4


torch.library.register_autograd('mmssm::selective_scan_fwd', _backward,
                                setup_context=_setup_context)
