"""Scan-order ops: how a (b, c, h, w) grid becomes 1-D sequences and back.

- VMamba cross-scan / cross-merge: 4 directions (row-major, column-major and
  their reverses), merged back by summing onto the grid.
- V2M corner rotations: the grid seen from each of its four corners; each
  rotation is undone exactly by ``corner_unrotate``.
- LocalMamba windows: windows of w x w read row-major, windows row-major.
"""
from typing import Sequence

import torch
from torch import Tensor


def cross_scan(x: Tensor) -> Tensor:
    """(b, c, h, w) -> (b, 4, c, h*w): row, column, reversed row, reversed column."""
    b, c, h, w = x.shape
    row = x.flatten(2)
    col = x.transpose(2, 3).flatten(2)
    return torch.stack([row, col, row.flip(-1), col.flip(-1)], dim=1)


def cross_merge(y: Tensor, h: int, w: int) -> Tensor:
    """(b, 4, c, h*w) -> (b, c, h*w): undo each direction and sum onto the grid."""
    b, k, c, l = y.shape
    row = y[:, 0] + y[:, 2].flip(-1)
    col = y[:, 1] + y[:, 3].flip(-1)
    col = col.view(b, c, w, h).transpose(2, 3).reshape(b, c, l)
    return row + col


# Corner k views the grid so that a row-major scan starts at that corner.
# Paper Table 4 order: upper-left, lower-right, upper-right, lower-left.
CORNERS = ('ul', 'lr', 'ur', 'll')


def corner_rotate(x: Tensor, corner: str) -> Tensor:
    """(b, c, h, w) -> grid re-oriented so that index (0, 0) is ``corner``."""
    if corner == 'ul':
        return x
    if corner == 'lr':
        return x.flip(-2, -1)
    if corner == 'ur':
        return x.flip(-1)
    if corner == 'll':
        return x.flip(-2)
    raise ValueError(f'corner must be one of {CORNERS}, got {corner!r}')


def corner_unrotate(x: Tensor, corner: str) -> Tensor:
    """Inverse of :func:`corner_rotate` (each re-orientation is an involution)."""
    return corner_rotate(x, corner)


def corner_rotate_all(x: Tensor, corners: Sequence[str]) -> Tensor:
    """(b, c, h, w) -> (k*b, c, h, w): all requested corners batched."""
    return torch.cat([corner_rotate(x, c) for c in corners], dim=0)


def corner_merge_all(y: Tensor, corners: Sequence[str]) -> Tensor:
    """(k*b, c, h, w) -> (b, c, h, w): rotate each back exactly and sum."""
    parts = y.chunk(len(corners), dim=0)
    return sum(corner_unrotate(p, c) for p, c in zip(parts, corners))


def local_scan(x: Tensor, window: int, flip: bool = False,
               column_first: bool = False) -> Tensor:
    """(b, c, h, w) -> (b, c, L): w x w windows, zero-padded right/bottom.

    L = ceil(h/window)*window * ceil(w/window)*window. Windows are read in
    row-major order, tokens inside a window too (column-major for both when
    ``column_first``); ``flip`` reverses the whole sequence.
    """
    b, c, h, w = x.shape
    k = window
    hp, wp = -(-h // k) * k, -(-w // k) * k
    if (hp, wp) != (h, w):
        x = torch.nn.functional.pad(x, (0, wp - w, 0, hp - h))
    x = x.view(b, c, hp // k, k, wp // k, k)
    if column_first:
        x = x.permute(0, 1, 4, 2, 5, 3)  # (b, c, Wg, Hg, kw, kh)
    else:
        x = x.permute(0, 1, 2, 4, 3, 5)  # (b, c, Hg, Wg, kh, kw)
    x = x.reshape(b, c, -1)
    return x.flip(-1) if flip else x


def local_reverse(y: Tensor, window: int, h: int, w: int, flip: bool = False,
                  column_first: bool = False) -> Tensor:
    """Inverse of :func:`local_scan`: (b, c, L) -> (b, c, h, w), cropped back."""
    b, c, _ = y.shape
    k = window
    hg, wg = -(-h // k), -(-w // k)
    if flip:
        y = y.flip(-1)
    if column_first:
        y = y.view(b, c, wg, hg, k, k).permute(0, 1, 3, 5, 2, 4)
    else:
        y = y.view(b, c, hg, wg, k, k).permute(0, 1, 2, 4, 3, 5)
    y = y.reshape(b, c, hg * k, wg * k)
    return y[:, :, :h, :w]
