"""The fused float64 Cauchy products of S4 (DPLR) kernel generation, compiled for CPU.

``mmssm/ops/csrc/cauchy.cpp`` (built by ``setup.py`` as ``mmssm.ops._cauchy_cpu``) computes
:func:`mmssm.ops.ssm_kernels.cauchy_outer`'s products and their backward in one pass over
the (H, N, Lf) Cauchy entries, where the PyTorch code makes ~30 elementwise float64 passes
each way. ``mmssm/ops/csrc/dplr_spectrum.cpp`` (same library) goes further for rank-1
kernels with one shared SSM: from the parameters as stored to the Woodbury-corrected
spectra, forward and backward (:func:`dplr_fwd`, :func:`dplr_bwd`).
:mod:`mmssm.ops.ssm_kernels` uses them for CPU float64 work when they are built and falls
back to PyTorch otherwise (or when :data:`enabled` is False).
"""
import glob
import importlib.machinery
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_HERE = os.path.dirname(os.path.abspath(__file__))

# set to False to force the PyTorch path (A/B comparisons, debugging)
enabled = True
# set to False to keep the compiled Cauchy products but not the spectrum op (A/B comparisons)
spectrum_enabled = True


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


def cauchy_fwd(Bs: Tensor, Cs: Tensor, z: Tensor, w: Tensor,
               dt: Optional[Tensor] = None) -> Tensor:
    """``r[h, a, b, l] = sum_n V / (z_l - w_hn) + conj(V) / (z_l - conj(w_hn))``,
    ``V = Bs[a] Cs[b]`` (``Bs[a] (dt[h] Cs[b])`` with ``dt``):
    :func:`mmssm.ops.ssm_kernels.cauchy_outer` (complex128 in and out).

    Bs (A, N) or (H, A, N); Cs (H, Bc, N), contiguous or a transposed contiguous
    (Bc, H, N) (read in place); z (Lf,); w (H, N); dt (H,) float64 or None -> (H, A, Bc, Lf).
    """
    out = _EXT.cauchy_fwd(*_real(Bs if Bs.dim() == 3 else Bs[None]), _real_cs(Cs),
                          *_real(z, w), _dt(dt))
    return torch.view_as_complex(out)


def cauchy_bwd(Bs: Tensor, Cs: Tensor, z: Tensor, w: Tensor, g: Tensor,
               dt: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients ``(gBs, gCs, gw, gdt)`` of :func:`cauchy_fwd` for the output gradient g
    (H, A, Bc, Lf), PyTorch's conjugate-Wirtinger convention; gBs is per channel
    (H, A, N) (sum it over H for a shared Bs); gCs has Cs's strides; gdt (H,) real, None
    without ``dt``."""
    gB, gC, gw, gdt = _EXT.cauchy_bwd(*_real(Bs if Bs.dim() == 3 else Bs[None]),
                                      _real_cs(Cs), *_real(z, w, g), _dt(dt))
    return (torch.view_as_complex(gB), torch.view_as_complex(gC), torch.view_as_complex(gw),
            gdt if dt is not None else None)


def dplr_available() -> bool:
    """True when the loaded library has the rank-1 DPLR spectrum op (dplr_spectrum.cpp,
    compiled by GCC or Clang) and :data:`spectrum_enabled` is set."""
    return _EXT is not None and spectrum_enabled and hasattr(_EXT, 'dplr_fwd')


def dplr_fwd(Bs: Tensor, A: Tensor, dt: Tensor, z: Tensor, F: Tensor,
             Cs: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Spectra of K rank-1 DPLR kernels with one shared SSM each (see dplr_spectrum.cpp):
    ``k[c] = F (r[0, c] - r[0, ch] r[1, c] / (1 + r[1, ch]))`` with r the Cauchy products of
    ``[B; P]`` and ``dt [C; conj(P)]`` at the poles ``dt A``.

    Args:
        Bs: (K, 2, N) complex128, rows B and P of each kernel.
        A: (K, N) complex128 continuous poles.
        dt: (K, H) float64 steps (rate included).
        z, F: (Lf,) complex128 nodes and bilinear factors ``2 / (1 + omega)``.
        Cs: the K kernels' C (ch, H, N, 2) as stored (float32 or float64; ch 1 or 2).

    Returns:
        ``k_f`` (ch, K H, Lf) complex128 and the products r (K H, Lf, 2 (ch + 1), 2) float64
        that :func:`dplr_bwd` needs.
    """
    kf, r = _EXT.dplr_fwd(*_real(Bs, A), dt.contiguous(), *_real(z, F),
                          [c.contiguous() for c in Cs])
    return torch.view_as_complex(kf), r


def dplr_bwd(Bs: Tensor, A: Tensor, dt: Tensor, z: Tensor, F: Tensor, Cs: Sequence[Tensor],
             r: Tensor, g: Tensor) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """Gradients ``(gBs, gA, gdt, gCs)`` of :func:`dplr_fwd`'s spectra for their gradient g
    (ch, K H, Lf) (PyTorch's conjugate-Wirtinger convention); gCs in the Cs' dtypes."""
    gBs, gA, gdt, gC = _EXT.dplr_bwd(*_real(Bs, A), dt.contiguous(), *_real(z, F),
                                     [c.contiguous() for c in Cs], r, *_real(g))
    return torch.view_as_complex(gBs), torch.view_as_complex(gA), gdt, list(gC)


def _real(*cs: Tensor) -> Tuple[Tensor, ...]:
    """Contiguous (..., 2) float64 views of complex128 tensors."""
    return tuple(torch.view_as_real(c.resolve_conj().contiguous()) for c in cs)


def _real_cs(Cs: Tensor) -> Tensor:
    """Cs (H, Bc, N) as a (..., 2) float64 view: contiguous, or (Bc, H, N) contiguous and
    transposed (the kernel reads any dense (H, Bc) strides), else copied."""
    if not (Cs.is_contiguous() or Cs.transpose(0, 1).is_contiguous()):
        Cs = Cs.contiguous()
    return torch.view_as_real(Cs)


def _dt(dt: Optional[Tensor]) -> Optional[Tensor]:
    if dt is None:
        return None
    if dt.dtype != torch.float64 or dt.dim() != 1:
        raise ValueError(f'dt must be a float64 (H,) tensor, got {dt.dtype} {tuple(dt.shape)}')
    return dt.contiguous()
