"""Scan-order ops: how a (b, c, h, w) grid becomes 1-D sequences and back.

- VMamba cross-scan / cross-merge: 4 directions (row-major, column-major and
  their reverses), merged back by summing onto the grid.
- V2M corner rotations: the grid seen from each of its four corners; each
  rotation is undone exactly by ``corner_unrotate``.
- LocalMamba windows: windows of w x w read row-major, windows row-major.

Each scan and its merge are adjoint linear maps, so each op is a
``torch.autograd.Function`` whose backward is its partner's forward
(cross_scan <-> cross_merge, corner_rotate_all <-> corner_merge_all,
local_scan <-> local_reverse with zero-filled padding): one gather/scatter
pass per direction instead of autograd replaying stack/flip/transposes.
Round trips (asserted in tests/ops/test_scan_order.py):

    cross_merge(cross_scan(x), h, w)                == 4 * x.flatten(2)
    corner_merge_all(corner_rotate_all(x, cs), cs)  == len(cs) * x
    local_reverse(local_scan(x, k, ...), k, h, w, ...) == x
"""
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _impl(x: Tensor, backend: Optional[str]) -> str:
    """'triton', 'cpp' (fused C++ kernels) or 'torch'; arg > $MMSSM_SCAN_BACKEND > auto.

    Auto: Triton for CUDA tensors, the fused C++ kernels for CPU tensors when the
    extension is built, plain PyTorch otherwise -- and always while torch.compile /
    torch.export / jit tracing, which see the PyTorch ops.
    """
    name = backend or os.environ.get('MMSSM_SCAN_BACKEND') or None
    if name not in (None, 'torch', 'triton', 'cpp', 'ref', 'cpu'):
        raise ValueError("backend must be one of (None, 'torch', 'cpp', 'triton'), "
                         f"got {name!r}")
    if name == 'triton':
        if not (x.is_cuda or os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')):
            raise RuntimeError('backend "triton" needs CUDA tensors (or TRITON_INTERPRET=1 '
                               f'set before importing triton); got a tensor on {x.device}')
        return 'triton'
    if name in ('torch', 'ref', 'cpu'):  # plain PyTorch (also for the scan's ref / cpu)
        return 'torch'
    if x.is_cuda:
        if name is None:
            try:
                import triton  # noqa: F401
                return 'triton'
            except ImportError:
                pass
        return 'torch'
    from . import selective_scan_cpp
    tracing = (torch.compiler.is_compiling() or torch.compiler.is_exporting()
               or torch.jit.is_tracing())
    if x.device.type == 'cpu' and selective_scan_cpp.available() and not tracing:
        return 'cpp'
    return 'torch'


def _ext():
    from . import selective_scan_cpp
    return selective_scan_cpp._EXT


def _cross_scan(x: Tensor, impl: str = 'torch') -> Tensor:
    if impl == 'triton':
        from .scan_order_triton import cross_scan_triton
        return cross_scan_triton(x)
    if impl == 'cpp':
        return _ext().cross_scan(x)
    if torch.compiler.is_exporting():  # functional form: Transpose/Concat, any (h, w)
        rc = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], 1)
        return torch.cat([rc, rc.flip(-1)], 1)
    b, c, h, w = x.shape
    out = x.new_empty(b, 4, c, h * w)
    out[:, 0] = x.flatten(2)
    out[:, 1].view(b, c, w, h).copy_(x.transpose(2, 3))
    out[:, 2:] = out[:, :2].flip(-1)
    return out


def _cross_merge(y: Tensor, h: int, w: int, impl: str = 'torch') -> Tensor:
    if impl == 'triton':
        from .scan_order_triton import cross_merge_triton
        return cross_merge_triton(y, h, w)
    if impl == 'cpp':
        return _ext().cross_merge(y, h, w)
    b, k, c, l = y.shape
    row = y[:, 0] + y[:, 2].flip(-1)
    col = y[:, 1] + y[:, 3].flip(-1)
    return row.add_(col.view(b, c, w, h).transpose(2, 3).reshape(b, c, l))


class _CrossScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, impl):
        ctx.hw, ctx.impl = x.shape[-2:], impl
        return _cross_scan(x, impl)

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.hw
        return _cross_merge(g, h, w, ctx.impl).view(g.shape[0], g.shape[2], h, w), None


class _CrossMerge(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, h, w, impl):
        ctx.hw, ctx.impl = (h, w), impl
        return _cross_merge(y, h, w, impl)

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.hw
        return (_cross_scan(g.reshape(g.shape[0], g.shape[1], h, w), ctx.impl),
                None, None, None)


def _check_grid(x: Tensor, name: str = 'x') -> None:
    if x.dim() != 4:
        raise ValueError(f'{name} must be (b, c, h, w), got shape {tuple(x.shape)}')


def cross_scan(x: Tensor, backend: Optional[str] = None) -> Tensor:
    """(b, c, h, w) -> (b, 4, c, h*w): row, column, reversed row, reversed column.

    Direction 0 visits token ids 0, 1, 2, ... (row-major), direction 1 visits
    0, w, 2w, ... (column-major), directions 2 and 3 are their reverses.
    ``backend``: None (Triton kernel for CUDA tensors, the fused C++ kernel for
    CPU tensors when built, else PyTorch), 'torch', 'cpp' or 'triton';
    $MMSSM_SCAN_BACKEND=ref|cpu also selects PyTorch.
    """
    _check_grid(x)
    return _CrossScan.apply(x, _impl(x, backend))


def cross_merge(y: Tensor, h: int, w: int, backend: Optional[str] = None) -> Tensor:
    """(b, 4, c, h*w) -> (b, c, h*w): undo each direction and sum onto the grid."""
    if y.dim() != 4 or y.shape[1] != 4 or y.shape[-1] != h * w:
        raise ValueError(f'y must be (b, 4, c, h*w={h * w}), got shape {tuple(y.shape)}')
    # int(): shapes read while jit-tracing are traced ints, which a PythonOp rejects
    if torch.compiler.is_exporting():  # keep h, w symbolic (int() would fix the export size)
        return _cross_merge(y, h, w)
    return _CrossMerge.apply(y, int(h), int(w), _impl(y, backend))


# Corner k views the grid so that a row-major scan starts at that corner.
# Paper Table 4 order: upper-left, lower-right, upper-right, lower-left.
CORNERS = ('ul', 'lr', 'ur', 'll')
_FLIP_DIMS = {'ul': (), 'lr': (-2, -1), 'ur': (-1,), 'll': (-2,)}
_FLIP_BITS = {'ul': 0, 'lr': 3, 'ur': 1, 'll': 2}  # C++ kernels: bit 0 flips w, bit 1 h


def corner_rotate(x: Tensor, corner: str) -> Tensor:
    """(b, c, h, w) -> grid re-oriented so that index (0, 0) is ``corner``.

    Each re-orientation is a flip, hence an involution; autograd's flip
    backward is already the exact adjoint.
    """
    if corner not in _FLIP_DIMS:
        raise ValueError(f'corner must be one of {CORNERS}, got {corner!r}')
    dims = _FLIP_DIMS[corner]
    return x.flip(dims) if dims else x


def corner_unrotate(x: Tensor, corner: str) -> Tensor:
    """Inverse of :func:`corner_rotate` (each re-orientation is an involution)."""
    return corner_rotate(x, corner)


def _rotate_all(x: Tensor, corners: Sequence[str], impl: str = 'torch') -> Tensor:
    if impl == 'cpp':
        return _ext().corner_rotate_all(x, [_FLIP_BITS[c] for c in corners])
    if torch.compiler.is_exporting():  # functional form (no slice writes): any batch size
        return torch.cat([corner_rotate(x, c) for c in corners], 0)
    b = x.shape[0]
    out = x.new_empty((len(corners) * b,) + x.shape[1:])
    for i, c in enumerate(corners):
        out[i * b:(i + 1) * b] = corner_rotate(x, c)
    return out


def _merge_all(y: Tensor, corners: Sequence[str], impl: str = 'torch') -> Tensor:
    if impl == 'cpp':
        return _ext().corner_merge_all(y, [_FLIP_BITS[c] for c in corners])
    parts = (y.unflatten(0, (len(corners), -1)).unbind(0) if torch.compiler.is_exporting()
             else y.chunk(len(corners), dim=0))  # exporting: no split of a symbolic batch
    out = corner_unrotate(parts[0], corners[0]).clone()
    for p, c in zip(parts[1:], corners[1:]):
        out += corner_unrotate(p, c)
    return out


class _RotateAll(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, corners, impl):
        ctx.corners, ctx.impl = corners, impl
        return _rotate_all(x, corners, impl)

    @staticmethod
    def backward(ctx, g):
        return _merge_all(g, ctx.corners, ctx.impl), None, None


class _MergeAll(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, corners, impl):
        ctx.corners, ctx.impl = corners, impl
        return _merge_all(y, corners, impl)

    @staticmethod
    def backward(ctx, g):
        return _rotate_all(g, ctx.corners, ctx.impl), None, None


def _check_corners(corners: Sequence[str]) -> tuple:
    corners = tuple(corners)
    bad = [c for c in corners if c not in _FLIP_DIMS]
    if not corners or bad:
        raise ValueError(f'corners must be a non-empty sequence of {CORNERS}, got {corners!r}')
    return corners


def _corner_impl(x: Tensor, backend: Optional[str]) -> str:
    impl = _impl(x, backend)
    return 'torch' if impl == 'triton' else impl  # no Triton kernel: flips are one copy


def corner_rotate_all(x: Tensor, corners: Sequence[str], backend: Optional[str] = None) -> Tensor:
    """(b, c, h, w) -> (k*b, c, h, w): all requested corners batched (corner-major).

    ``backend``: None (fused C++ kernel for CPU tensors when built, else PyTorch),
    'torch' or 'cpp'.
    """
    _check_grid(x)
    return _RotateAll.apply(x, _check_corners(corners), _corner_impl(x, backend))


def corner_merge_all(y: Tensor, corners: Sequence[str], backend: Optional[str] = None) -> Tensor:
    """(k*b, c, h, w) -> (b, c, h, w): rotate each back exactly and sum (``backend``
    as for :func:`corner_rotate_all`)."""
    corners = _check_corners(corners)
    _check_grid(y, 'y')
    if y.shape[0] % len(corners):
        raise ValueError(f'y batch {y.shape[0]} is not a multiple of len(corners)={len(corners)}')
    return _MergeAll.apply(y, corners, _corner_impl(y, backend))


def _local_scan(x: Tensor, k: int, flip: bool, column_first: bool) -> Tensor:
    b, c, h, w = x.shape
    hp, wp = (h + k - 1) // k * k, (w + k - 1) // k * k  # ceil; exports as integer Div
    if (hp, wp) != (h, w):  # zero-pad right/bottom (as LocalMamba)
        x = F.pad(x, (0, wp - w, 0, hp - h))
    x = x.view(b, c, hp // k, k, wp // k, k)
    if column_first:
        x = x.permute(0, 1, 4, 2, 5, 3)  # (b, c, Wg, Hg, kw, kh)
    else:
        x = x.permute(0, 1, 2, 4, 3, 5)  # (b, c, Hg, Wg, kh, kw)
    x = x.reshape(b, c, -1)
    return x.flip(-1) if flip else x


def _local_reverse(y: Tensor, k: int, h: int, w: int, flip: bool,
                   column_first: bool) -> Tensor:
    b, c, _ = y.shape
    hg, wg = (h + k - 1) // k, (w + k - 1) // k
    if flip:
        y = y.flip(-1)
    if column_first:
        y = y.view(b, c, wg, hg, k, k).permute(0, 1, 3, 5, 2, 4)
    else:
        y = y.view(b, c, hg, wg, k, k).permute(0, 1, 2, 4, 3, 5)
    y = y.reshape(b, c, hg * k, wg * k)
    return y[:, :, :h, :w].contiguous()


class _LocalScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, k, flip, column_first):
        ctx.cfg = (k, x.shape[-2], x.shape[-1], flip, column_first)
        return _local_scan(x, k, flip, column_first)

    @staticmethod
    def backward(ctx, g):
        return _local_reverse(g, *ctx.cfg), None, None, None


class _LocalReverse(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, k, h, w, flip, column_first):
        ctx.cfg = (k, flip, column_first)
        return _local_reverse(y, k, h, w, flip, column_first)

    @staticmethod
    def backward(ctx, g):
        # padded positions were cropped away: their gradient is zero
        return _local_scan(g, *ctx.cfg), None, None, None, None, None


def _check_window(window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f'window must be a positive int, got {window!r}')


def local_scan(x: Tensor, window: int, flip: bool = False,
               column_first: bool = False) -> Tensor:
    """(b, c, h, w) -> (b, c, L): w x w windows, zero-padded right/bottom.

    L = ceil(h/window)*window * ceil(w/window)*window. Windows are read in
    row-major order, tokens inside a window too (column-major for both when
    ``column_first``); ``flip`` reverses the whole sequence.
    """
    _check_grid(x)
    _check_window(window)
    return _LocalScan.apply(x, window, flip, column_first)


def local_reverse(y: Tensor, window: int, h: int, w: int, flip: bool = False,
                  column_first: bool = False) -> Tensor:
    """Inverse of :func:`local_scan`: (b, c, L) -> (b, c, h, w), cropped back."""
    _check_window(window)
    L = (h + window - 1) // window * window * ((w + window - 1) // window * window)
    if y.dim() != 3 or y.shape[-1] != L:
        raise ValueError(f'y must be (b, c, L={L}) for window={window}, h={h}, w={w}, '
                         f'got shape {tuple(y.shape)}')
    if torch.compiler.is_exporting():  # keep h, w symbolic (int() would fix the export size)
        return _local_reverse(y, window, h, w, flip, column_first)
    return _LocalReverse.apply(y, window, int(h), int(w), flip, column_first)  # int(): jit trace
