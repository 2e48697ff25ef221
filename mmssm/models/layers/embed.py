"""Patch embedding and position-embedding resizing for plain (non-hierarchical) backbones."""
import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IntPair = Union[int, Sequence[int]]


def to_2tuple(v: IntPair, name: str = 'value') -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f'{name} must be an int or a pair of ints, got {v!r}')
    return v


class PatchEmbed(nn.Module):
    """Conv patch embedding (kernel ``patch_size``, stride ``stride``) for any input size.

    The grid is ``(H - patch) // stride + 1`` per side, as Vim's. Inputs whose
    size does not fit (smaller than a patch, or ``H - patch`` not a multiple of
    ``stride``) are zero-padded right/bottom to the next size that does, so no
    pixel is dropped. Key names: ``proj.weight``, ``proj.bias``.

    Returns:
        (B, h, w, C) channels-last patch tokens.
    """

    def __init__(self, in_channels: int = 3, embed_dims: int = 192, patch_size: IntPair = 16,
                 stride: IntPair = 16) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size, 'patch_size')
        self.stride = to_2tuple(stride, 'stride')
        if min(self.patch_size) < 1 or min(self.stride) < 1:
            raise ValueError(f'patch_size and stride must be >= 1, got {patch_size}, {stride}')
        self.proj = nn.Conv2d(in_channels, embed_dims, self.patch_size, self.stride)

    def grid_size(self, hw: Sequence[int]) -> Tuple[int, int]:
        """Token grid for an (H, W) input, after padding."""
        return tuple(max(0, -(-(n - p) // s)) + 1
                     for n, p, s in zip(hw, self.patch_size, self.stride))

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        gh, gw = self.grid_size((H, W))
        need_h = (gh - 1) * self.stride[0] + self.patch_size[0]
        need_w = (gw - 1) * self.stride[1] + self.patch_size[1]
        if (need_h, need_w) != (H, W):
            x = F.pad(x, (0, need_w - W, 0, need_h - H))
        return self.proj(x).permute(0, 2, 3, 1)


def resize_grid_embed(pos: Tensor, src_hw: Sequence[int], dst_hw: Sequence[int],
                      mode: str = 'bicubic') -> Tensor:
    """(1, h0*w0, C) grid embedding -> (1, h*w, C), interpolated in fp32."""
    src_hw, dst_hw = tuple(src_hw), tuple(dst_hw)
    # while exporting, sizes may be symbolic: comparing them would fix the export size
    # (an interpolation onto the same grid is the identity, so always resizing is exact)
    if not torch.compiler.is_exporting() and src_hw == dst_hw:
        return pos
    _, n, c = pos.shape
    if n != src_hw[0] * src_hw[1]:
        raise ValueError(f'position embedding has {n} grid tokens, expected '
                         f'{src_hw[0]}x{src_hw[1]}')
    grid = pos.reshape(1, *src_hw, c).permute(0, 3, 1, 2).float()
    kw = {} if mode in ('nearest', 'area', 'nearest-exact') else dict(align_corners=False)
    grid = F.interpolate(grid, size=dst_hw, mode=mode, **kw)
    return grid.flatten(2).transpose(1, 2).to(pos.dtype)


def resize_line_embed(pos: Tensor, n: int) -> Tensor:
    """(1, n0, C) embedding of a row or column of tokens -> (1, n, C) (linear)."""
    if not torch.compiler.is_exporting() and pos.shape[1] == n:
        return pos
    out = F.interpolate(pos.transpose(1, 2).float(), size=n, mode='linear', align_corners=False)
    return out.transpose(1, 2).to(pos.dtype)


def split_middle_cls(pos: Tensor) -> Tuple[Tensor, Tensor]:
    """Vim's middle class token: (1, M+1, C) -> grid (1, M, C), cls (1, 1, C).

    The class token sits at index M // 2 (it was inserted after the first
    M // 2 patch tokens), not at 0.
    """
    m = pos.shape[1] - 1
    i = m // 2
    return torch.cat([pos[:, :i], pos[:, i + 1:]], dim=1), pos[:, i:i + 1]


def join_middle_cls(grid: Tensor, cls: Tensor) -> Tensor:
    """Inverse of :func:`split_middle_cls`: insert ``cls`` at index M // 2."""
    i = grid.shape[1] // 2
    return torch.cat([grid[:, :i], cls, grid[:, i:]], dim=1)


def resize_middle_cls_pos_embed(pos: Tensor, dst_hw: Sequence[int],
                                src_hw: Union[Sequence[int], None] = None,
                                mode: str = 'bicubic') -> Tensor:
    """Resize a Vim position embedding (middle class token) to another grid.

    The class token's entry (index M // 2) is taken out, the h0 x w0 grid is
    interpolated, and the class entry is put back at the new middle. (The
    official Vim fine-tuning code treats index 0 as the class token instead.)

    Args:
        pos: (1, h0*w0 + 1, C).
        dst_hw: target grid (h, w).
        src_hw: source grid; default a square sqrt(M) x sqrt(M).
    """
    grid, cls = split_middle_cls(pos)
    if src_hw is None:
        s = math.isqrt(grid.shape[1])
        if s * s != grid.shape[1]:
            raise ValueError(f'cannot infer the source grid of a {grid.shape[1]}-token position '
                             'embedding; pass src_hw')
        src_hw = (s, s)
    return join_middle_cls(resize_grid_embed(grid, src_hw, dst_hw, mode), cls)
