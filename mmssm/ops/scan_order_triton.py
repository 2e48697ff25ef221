"""Triton cross-scan / cross-merge (VMamba's 4 directions) for CUDA tensors.

One program per (plane b*c, BH x BW spatial tile): it reads the tile once,
coalesced along w, and writes the row-major direction and its reverse
directly; the column-major directions are written from the transposed tile
(``tl.trans``), so the compiler stages the transpose through shared memory
and those stores stay coalesced along h. cross_merge is the exact adjoint:
it gathers the four directions of a tile, sums in fp32 and writes the grid.
Semantics are those of :mod:`mmssm.ops.scan_order` (the torch versions are
the reference in tests/ops/test_scan_order.py).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

BH = 32
BW = 32


@triton.jit
def _tile(pid_t, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    n_tw = tl.cdiv(W, BLOCK_W)
    i = (pid_t // n_tw) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = (pid_t % n_tw) * BLOCK_W + tl.arange(0, BLOCK_W)
    m = (i[:, None] < H) & (j[None, :] < W)
    row = i[:, None] * W + j[None, :]  # (BH, BW): row-major token index
    col = j[:, None] * H + i[None, :]  # (BW, BH): column-major token index
    return m, row, col


@triton.jit
def _cross_scan_kernel(x_ptr, y_ptr, C, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_bc = tl.program_id(0)
    m, row, col = _tile(tl.program_id(1), H, W, BLOCK_H, BLOCK_W)
    L = H * W
    b = pid_bc // C
    base = (b * 3 * C + pid_bc).to(tl.int64) * L  # y[b, 0, c, 0] = ((b*4 + 0)*C + c)*L
    x = tl.load(x_ptr + pid_bc.to(tl.int64) * L + row, mask=m)
    tl.store(y_ptr + base + row, x, mask=m)
    tl.store(y_ptr + base + 2 * C * L + (L - 1 - row), x, mask=m)
    xt = tl.trans(x)
    mt = tl.trans(m)
    tl.store(y_ptr + base + C * L + col, xt, mask=mt)
    tl.store(y_ptr + base + 3 * C * L + (L - 1 - col), xt, mask=mt)


@triton.jit
def _cross_merge_kernel(y_ptr, x_ptr, C, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_bc = tl.program_id(0)
    m, row, col = _tile(tl.program_id(1), H, W, BLOCK_H, BLOCK_W)
    L = H * W
    b = pid_bc // C
    base = (b * 3 * C + pid_bc).to(tl.int64) * L
    mt = tl.trans(m)
    acc = tl.load(y_ptr + base + row, mask=m, other=0.0).to(tl.float32)
    acc += tl.load(y_ptr + base + 2 * C * L + (L - 1 - row), mask=m, other=0.0).to(tl.float32)
    colsum = tl.load(y_ptr + base + C * L + col, mask=mt, other=0.0).to(tl.float32)
    colsum += tl.load(y_ptr + base + 3 * C * L + (L - 1 - col), mask=mt,
                      other=0.0).to(tl.float32)
    acc += tl.trans(colsum)
    tl.store(x_ptr + pid_bc.to(tl.int64) * L + row, acc.to(x_ptr.dtype.element_ty), mask=m)


def _grid(b: int, c: int, h: int, w: int):
    return (b * c, triton.cdiv(h, BH) * triton.cdiv(w, BW))


def cross_scan_triton(x: Tensor) -> Tensor:
    """(b, c, h, w) -> (b, 4, c, h*w); no autograd (wrapped in scan_order)."""
    b, c, h, w = x.shape
    x = x.contiguous()
    y = torch.empty(b, 4, c, h * w, device=x.device, dtype=x.dtype)
    _cross_scan_kernel[_grid(b, c, h, w)](x, y, c, h, w, BLOCK_H=BH, BLOCK_W=BW)
    return y


def cross_merge_triton(y: Tensor, h: int, w: int) -> Tensor:
    """(b, 4, c, h*w) -> (b, c, h*w); no autograd (wrapped in scan_order)."""
    b, _, c, _ = y.shape
    y = y.contiguous()
    x = torch.empty(b, c, h * w, device=y.device, dtype=y.dtype)
    _cross_merge_kernel[_grid(b, c, h, w)](y, x, c, h, w, BLOCK_H=BH, BLOCK_W=BW)
    return x
