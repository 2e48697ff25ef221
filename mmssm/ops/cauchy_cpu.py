"""The fused float64 Cauchy products of S4 (DPLR) kernel generation, compiled for CPU.

``mmssm/ops/csrc/cauchy.cpp`` (built by ``setup.py`` as ``mmssm.ops._cauchy_cpu``) computes
:func:`mmssm.ops.ssm_kernels.cauchy_outer`'s products and their backward in one pass over
the (H, N, Lf) Cauchy entries, where the PyTorch code makes ~30 elementwise float64 passes
each way. :mod:`mmssm.ops.ssm_kernels` uses it for CPU float64 tensors when it is built
and falls back to PyTorch otherwise (or when :data:`enabled` is False).
"""
import glob
import importlib.machinery
import os
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

_HERE = os.path.dirname(os.path.abspath(__file__))

# set to False to force the PyTorch path (A/B comparisons, debugging)
enabled = True


def _path() -> Optional[str]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        found = glob.glob(os.path.join(_HERE, f'_cauchy_cpu{suffix}'))
        if found:
            return found[0]
    return None


def _load():
    path = _path()
    if path is None:
        return None
    try:
        torch.ops.load_library(path)
        return torch.ops.mmssm_cauchy
    except Exception as e:  # e.g. built against another torch
        warnings.warn(f'mmssm: could not load the compiled Cauchy kernel {path}: {e}; S4 '
                      'kernels are generated with PyTorch ops (slower). Rebuild it with '
                      '`python setup.py build_ext --inplace`.')
        return None


_EXT = _load()


def available() -> bool:
    """True when the compiled kernel is loaded."""
    return _EXT is not None


def usable(*tensors: Tensor) -> bool:
    """Whether eager code may call the compiled kernel on these tensors: built and enabled,
    CPU float64 (the real operands), and nothing that must see PyTorch ops instead
    (``torch.jit`` tracing / ONNX export, ``torch.compile``, dispatch modes such as the
    FLOP counter, tensor subclasses)."""
    if _EXT is None or not enabled or torch.jit.is_tracing():
        return False
    if (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch._C._len_torch_dispatch_stack() > 0):
        return False
    return all(type(t) is Tensor and t.device.type == 'cpu' for t in tensors)


def cauchy_fwd(Bs: Tensor, Cs: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """``r[h, a, b, l] = sum_n V / (z_l - w_hn) + conj(V) / (z_l - conj(w_hn))``,
    ``V = Bs[a] Cs[b]``: :func:`mmssm.ops.ssm_kernels.cauchy_outer` (complex128 in and out).

    Bs (A, N) or (H, A, N); Cs (H, Bc, N); z (Lf,); w (H, N) -> (H, A, Bc, Lf).
    """
    return torch.view_as_complex(_EXT.cauchy_fwd(*_real(Bs if Bs.dim() == 3 else Bs[None],
                                                          Cs, z, w)))


def cauchy_bwd(Bs: Tensor, Cs: Tensor, z: Tensor, w: Tensor,
               g: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(gBs, gCs, gw)`` of :func:`cauchy_fwd` for the output gradient g
    (H, A, Bc, Lf), PyTorch's conjugate-Wirtinger convention; gBs is per channel
    (H, A, N) (sum it over H for a shared Bs)."""
    args = _real(Bs if Bs.dim() == 3 else Bs[None], Cs, z, w, g)
    return tuple(torch.view_as_complex(t) for t in _EXT.cauchy_bwd(*args))


def _real(*cs: Tensor) -> Tuple[Tensor, ...]:
    """Contiguous (..., 2) float64 views of complex128 tensors."""
    return tuple(torch.view_as_real(c.contiguous()) for c in cs)
