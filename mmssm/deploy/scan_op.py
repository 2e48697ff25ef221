"""The selective-scan custom op that ``torch.export`` sees (stand-in registration).

The scan-op contract (TEAM.md / issue 14) has ``mmssm.ops`` register
``torch.ops.mmssm.selective_scan_fwd`` always. Until that registration exists, this module
registers an op with exactly the same schema on top of the chunked CPU scan, so that
``torch.export`` captures one opaque node per scan (which the ONNX translation in
:mod:`mmssm.deploy.onnx_ops` lowers) instead of tracing the chunk loops. When
``mmssm.ops`` already provides the op, nothing is registered here.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

OP_NAME = 'mmssm::selective_scan_fwd'


def has_scan_op() -> bool:
    """True once ``torch.ops.mmssm.selective_scan_fwd`` is registered (by anyone)."""
    try:
        return hasattr(torch.ops.mmssm, 'selective_scan_fwd')
    except (AttributeError, RuntimeError):
        return False


def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
              out_fp32: bool, reverse: bool, save_states: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from mmssm.ops.selective_scan_cpu import selective_scan_chunked
    with torch.no_grad():
        out, last = selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                           out_fp32, reverse)
    return out, last, u.new_empty(0, dtype=last.dtype)


def _scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_fp32, reverse,
               save_states):
    b, d, _ = u.shape
    state_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    out_dtype = torch.float32 if (out_fp32 and u.dtype != torch.float64) else u.dtype
    return (u.new_empty(u.shape, dtype=out_dtype),
            u.new_empty((b, d, A.shape[1]), dtype=state_dtype),
            u.new_empty(0, dtype=state_dtype))


def register_stand_in() -> bool:
    """Register the stand-in op if no ``selective_scan_fwd`` exists yet; True if registered."""
    if has_scan_op():
        return False
    lib = torch.library.Library('mmssm', 'FRAGMENT')  # noqa: TOR901 (kept alive below)
    lib.define('selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, '
               'Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, '
               'bool out_fp32, bool reverse, bool save_states) -> (Tensor, Tensor, Tensor)')
    lib.impl('selective_scan_fwd', _scan_fwd, 'CompositeExplicitAutograd')
    torch.library.register_fake(OP_NAME, _scan_fake, lib=lib)
    _LIBS.append(lib)
    return True


_LIBS: list = []  # a Library deregisters its ops when garbage-collected
