"""Kernels shared by every backbone; each fused op sits beside its reference."""
from .fftconv import (conv_reference_nd, fft_size, fftconv_nd, fftconv_separable,
                      separable_conv, toeplitz_conv_separable)
from .scan_order import (CORNERS, corner_merge_all, corner_rotate,
                         corner_rotate_all, corner_unrotate, cross_merge,
                         cross_scan, local_reverse, local_scan)
from .selective_scan import selective_scan, selective_scan_ref
from . import selective_scan_cpp  # noqa: F401,E402  registers torch.ops.mmssm.selective_scan_fwd/_bwd
from .cross_selective_scan import cross_selective_scan, cross_selective_scan_ref  # noqa: E402
from .bidir_selective_scan import (bidir_selective_scan, bidir_selective_scan_ref,  # noqa: E402
                                   bidir_selective_scan_sum_into)
from .ssm_kernels import SSMKernelDiag, SSMKernelDPLR, hippo_legs, nplr

__all__ = [
    'selective_scan', 'selective_scan_ref', 'cross_selective_scan', 'cross_selective_scan_ref',
    'bidir_selective_scan', 'bidir_selective_scan_ref', 'bidir_selective_scan_sum_into',
    'cross_scan', 'cross_merge',
    'CORNERS', 'corner_rotate', 'corner_unrotate', 'corner_rotate_all',
    'corner_merge_all', 'local_scan', 'local_reverse', 'fft_size', 'fftconv_nd',
    'fftconv_separable', 'toeplitz_conv_separable', 'separable_conv', 'conv_reference_nd',
    'SSMKernelDiag', 'SSMKernelDPLR', 'hippo_legs', 'nplr'
]
