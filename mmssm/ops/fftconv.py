"""N-D linear convolution with separable (per-axis) long kernels, and its reference.

This is the convolution core of S4ND (and of any 1-D/2-D/3-D "global" SSM conv):

* every convolved axis is zero padded to an FFT size ``F >= L_in + reach`` (no
  wrap-around), picked with prime factors 2, 3, 5, 7 only (fast pocketfft/cuFFT radices;
  a linear convolution does not depend on F once it is large enough);
* real FFT on the last axis, complex FFT on the others;
* kernels are separable: one 1-D kernel per axis. :func:`fftconv_nd` combines their
  spectra as an outer product in frequency space (the official S4ND algorithm), so the
  N-D kernel is never built in space; :func:`separable_conv` instead applies one 1-D
  operator per axis: an FFT convolution, or a dense Toeplitz matmul for short axes
  (:func:`axis_operators`), which is much faster on CPU for L up to a few hundred;
* a kernel is causal (taps at offsets 0..L_k-1) or bidirectional: a causal half ``k_fwd``
  plus an anti-causal half ``k_bwd`` whose tap m sits at offset -(m+1) (this is how the
  official S4ND builds ``pad(k0, (0, L)) + pad(k1.flip(-1), (L, 0))``);
* the kernel operators are computed once per call and broadcast over the batch;
* fp16/bf16 inputs are computed in fp32 (torch.fft has no bf16, and fp16 only for powers
  of two on CUDA) and cast back.

Conventions: true convolution, ``y[t] = sum_s k[s] * u[t - s]`` per axis.
:func:`conv_reference_nd` is the plain ``F.conv{1,2,3}d`` reference used by the tests.
"""
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _work(x: Tensor) -> Tensor:
    """fp64 stays fp64 (for gradcheck); everything else is computed in fp32."""
    return x if x.dtype == torch.float64 else x.float()


@lru_cache(maxsize=None)
def fft_size(n: int) -> int:
    """Smallest integer >= ``n`` whose prime factors are all in {2, 3, 5, 7}."""
    if n < 1:
        raise ValueError(f'fft_size needs n >= 1, got {n}')
    m = n
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _place_kernel(k_fwd: Tensor, k_bwd: Optional[Tensor], n: int) -> Tensor:
    """Lay a causal (+ anti-causal) 1-D kernel out on a circular buffer of length ``n``.

    Causal tap s goes to index s, anti-causal tap m (offset -(m+1)) to index n-1-m.
    Shapes: (..., L_k) -> (..., n).
    """
    lk = k_fwd.shape[-1]
    if k_bwd is None:
        return F.pad(k_fwd, (0, n - lk))
    lb = k_bwd.shape[-1]
    if lk + lb > n:
        raise ValueError(f'FFT size {n} too small for kernel halves of length {lk} + {lb}')
    mid = k_fwd.new_zeros(*k_fwd.shape[:-1], n - lk - lb)
    return torch.cat([k_fwd, mid, k_bwd.flip(-1)], dim=-1)


def axis_spectra(kernels: Sequence[Tensor], sizes: Sequence[int],
                 backward_kernels: Optional[Sequence[Tensor]] = None,
                 real: bool = False) -> List[Tensor]:
    """Per-axis kernel spectra: ``fft`` on all axes but the last, ``rfft`` on the last
    (``rfft`` on every axis if ``real``, for axis-by-axis convolution).

    Args:
        kernels: d causal kernels, the i-th shaped (..., L_k_i).
        sizes: d FFT sizes (each >= L_in_i + L_k_i).
        backward_kernels: optional d anti-causal kernels (same shapes) for a
            bidirectional kernel.
    Returns:
        d complex tensors, (..., F_i) for i < d-1 and (..., F_last // 2 + 1) for the last
        (all (..., F_i // 2 + 1) if ``real``).
    """
    d = len(kernels)
    out = []
    for i, (k, n) in enumerate(zip(kernels, sizes)):
        kb = None if backward_kernels is None else backward_kernels[i]
        buf = _place_kernel(_work(k), None if kb is None else _work(kb), n)
        out.append(torch.fft.rfft(buf, n=n) if real or i == d - 1 else torch.fft.fft(buf, n=n))
    return out


def outer_spectrum(spectra: Sequence[Tensor]) -> Tensor:
    """Outer product of per-axis factors: (.., F_0), .., (.., F_{d-1}) -> (.., F_0, .., F_{d-1})."""
    d = len(spectra)
    k_f = spectra[0]
    for i in range(1, d):
        # (..., F_0..F_{i-1}, 1) * (..., 1, .., 1, F_i)
        k_f = k_f.unsqueeze(-1) * spectra[i].reshape(
            *spectra[i].shape[:-1], *([1] * i), spectra[i].shape[-1])
    return k_f


def conv_sizes(l_in: Sequence[int], l_k: Sequence[int], bidirectional: bool = True) -> List[int]:
    """FFT sizes that make the circular convolution equal the linear one on ``[0, L_in)``.

    A kernel with taps at offsets ``[-a, b]`` needs ``F >= L_in + max(a, b)``; taps at
    ``|offset| >= L_in`` never reach an output, so ``a <= L_in - 1`` and ``b <= L_in - 1``.
    (The official code uses ``L_in + L_k``; any F this large gives the same result.)
    """
    out = []
    for l, k in zip(l_in, l_k):
        l, k = int(l), int(k)
        reach = min(k, l - 1) if bidirectional else min(k, l) - 1
        out.append(fft_size(l + max(reach, 0)))
    return out


def _head(k: Tensor, n: int) -> Tensor:
    """``k[..., :n]``, or k itself when that keeps every tap (training: a full slice still
    adds a backward node that allocates and fills a zero gradient)."""
    return k if k.shape[-1] <= n else k[..., :n]


def prepare_kernels(l_in: Sequence[int], kernels: Sequence[Tensor],
                    backward_kernels: Optional[Sequence[Tensor]] = None):
    """Drop taps that cannot reach an output and pick the FFT sizes.

    Returns ``(kernels, backward_kernels, sizes)``.
    """
    if backward_kernels is not None and len(backward_kernels) != len(kernels):
        raise ValueError('backward_kernels must have one kernel per axis')
    l_k = [k.shape[-1] for k in kernels]
    kernels = [_head(k, l) for k, l in zip(kernels, l_in)]
    if backward_kernels is not None:
        l_k = [max(a, b.shape[-1]) for a, b in zip(l_k, backward_kernels)]
        backward_kernels = [_head(k, max(l - 1, 0)) for k, l in zip(backward_kernels, l_in)]
    return kernels, backward_kernels, conv_sizes(l_in, l_k, backward_kernels is not None)


def _check(u: Tensor, d: int) -> None:
    if u.dim() != d + 2:
        raise ValueError(f'u must be (B, H, *L) with {d} spatial axes for {d} kernels, '
                         f'got shape {tuple(u.shape)}')


def _skip(y: Tensor, x: Tensor, D: Optional[Tensor], heads: bool, d: int) -> Tensor:
    if D is None:
        return y
    Dx = D.to(y.dtype).reshape(*D.shape, *([1] * d))
    return y + (x.unsqueeze(1) if heads else x) * Dx


def fftconv_nd(u: Tensor, kernels: Sequence[Tensor],
               backward_kernels: Optional[Sequence[Tensor]] = None,
               D: Optional[Tensor] = None) -> Tensor:
    """Depthwise N-D linear convolution with a separable kernel: one N-D FFT, kernel spectrum
    = outer product of the per-axis spectra.

    Args:
        u: (B, H, L_0, ..., L_{d-1}) input; fp16/bf16 are computed in fp32 and cast back.
        kernels: d causal kernels; the i-th is (H, L_k_i) or (C, H, L_k_i) (C kernel
            "heads" per input channel, shared across axes). Taps that cannot reach an
            output position are dropped.
        backward_kernels: optional d anti-causal kernels of the same shapes, giving the
            bidirectional kernel k_fwd (offsets 0..L_k-1) + k_bwd (offsets -1..-L_k).
        D: optional skip, (H,) or (C, H): adds ``D * u``.

    Returns:
        (B, H, *L) if the kernels are (H, L_k), else (B, C, H, *L).
    """
    d = len(kernels)
    _check(u, d)
    dtype = u.dtype
    x = _work(u)
    l_in = list(x.shape[2:])
    kernels, backward_kernels, sizes = prepare_kernels(l_in, kernels, backward_kernels)
    k_f = outer_spectrum(axis_spectra(kernels, sizes, backward_kernels))  # ([C,] H, *F')
    k_f = k_f.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
    heads = k_f.dim() == d + 2
    u_f = torch.fft.rfftn(x, s=sizes, dim=tuple(range(2, 2 + d)))  # (B, H, *F')
    if heads:  # (C, H, *F') -> (B, C, H, *F')
        u_f = u_f.unsqueeze(1)
    y = torch.fft.irfftn(u_f * k_f, s=sizes, dim=tuple(range(-d, 0)))
    y = y[(Ellipsis, *[slice(0, n) for n in l_in])]
    return _skip(y, x, D, heads, d).to(dtype)


def fftconv_separable(u: Tensor, kernels: Sequence[Tensor],
                      backward_kernels: Optional[Sequence[Tensor]] = None,
                      D: Optional[Tensor] = None) -> Tensor:
    """Same contract and result as :func:`fftconv_nd`, computed axis by axis with 1-D FFTs.

    A separable kernel is a product of per-axis factors in frequency space, so the N-D
    convolution factorises into d 1-D FFT convolutions (last axis first). Each 1-D pass
    pads only its own axis, which roughly halves the FFT work in 2-D and avoids the padded
    N-D spectrum.
    """
    _check(u, len(kernels))
    ops = axis_operators(list(u.shape[2:]), kernels, backward_kernels, toeplitz_max=0)
    return separable_conv(u, ops, D)


def toeplitz_conv_separable(u: Tensor, kernels: Sequence[Tensor],
                            backward_kernels: Optional[Sequence[Tensor]] = None,
                            D: Optional[Tensor] = None) -> Tensor:
    """Same contract and result as :func:`fftconv_nd`, axis by axis with dense Toeplitz
    matrices (one batched matmul per axis; fastest on CPU for axes up to a few hundred)."""
    _check(u, len(kernels))
    ops = axis_operators(list(u.shape[2:]), kernels, backward_kernels, toeplitz_max=1 << 30)
    return separable_conv(u, ops, D)


def toeplitz_matrix(k_fwd: Tensor, k_bwd: Optional[Tensor], length: int) -> Tensor:
    """Dense convolution matrix T (..., L, L) with ``(T u)_i = sum_j k(i - j) u_j``.

    k_fwd: causal taps (offset s >= 0); k_bwd: anti-causal taps (offset -(m+1)); taps
    beyond offset +-(L-1) are dropped. Row i is the two-sided kernel read backwards from
    offset i, so T is a sliding window (``unfold``) of the reversed kernel. With autograd
    (not tracing) T is built straight from the two halves, by a GEMM with a 0/1 matrix for
    short axes, else by :class:`_ToeplitzMatrix`; both take the kernel gradient as sums of
    the gradient's diagonals, without flipping (.., L, L) tensors. Same values.
    """
    k_fwd = _head(k_fwd, length)
    k_bwd = None if k_bwd is None else _head(k_bwd, length - 1)
    if _tracing() or not torch.is_grad_enabled() or not (
            k_fwd.requires_grad or (k_bwd is not None and k_bwd.requires_grad)):
        return _window_matrix(two_sided_kernel(k_fwd, k_bwd, length - 1))
    if length <= _TOEPLITZ_GEMM_MAX:
        # T = taps @ S^T with a 0/1 matrix S (L*L, lf + lb): exact (one nonzero product
        # per entry), and its backward is the GEMM that sums the diagonals of the gradient
        taps = k_fwd if k_bwd is None else torch.cat([k_fwd, k_bwd], -1)
        sel = _tap_selector(length, k_fwd.shape[-1], taps.shape[-1] - k_fwd.shape[-1],
                            taps.dtype, taps.device)
        with torch.autocast(device_type=taps.device.type, enabled=False):  # exact copies
            T = torch.mm(taps.reshape(-1, taps.shape[-1]), sel.t())
        return T.view(*taps.shape[:-1], length, length)
    return _ToeplitzMatrix.apply(k_fwd, k_bwd, length)


# up to this length :func:`toeplitz_matrix` (with autograd) is a GEMM with a 0/1 matrix,
# forward and backward (1 thread, 768 x 7^2 / 384 x 14^2: 13 / 34 us per GEMM, where
# flip + ``unfold_backward`` took 77 / 83 us and every small op or Python autograd node
# costs 5-20 us); beyond it the O(L^3) GEMMs lose (445 us at 96 x 56^2) to
# :class:`_ToeplitzMatrix`'s strided copies
_TOEPLITZ_GEMM_MAX = 20


@lru_cache(maxsize=64)
def _tap_selector(length: int, lf: int, lb: int, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """0/1 matrix (L*L, lf + lb): entry ((i, j), c) is 1 iff ``i - j`` is the offset of tap c
    (c < lf: causal tap c, offset c; else anti-causal tap m = c - lf, offset -(m+1))."""
    i = torch.arange(length, device=device)
    offset = (i[:, None] - i[None, :]).reshape(-1, 1)  # (L*L, 1)
    taps = torch.cat([torch.arange(lf, device=device), -1 - torch.arange(lb, device=device)])
    return (offset == taps).to(dtype)


def _reversed_kernel(k_fwd: Tensor, k_bwd: Optional[Tensor], length: int) -> Tensor:
    """Two-sided kernel read backwards, (..., lf), (..., lb) -> r (..., 2L-1) with
    ``r[m] = k(L-1-m)``: k_fwd reversed at m = L-lf..L-1, k_bwd at m = L..L+lb-1, zeros
    elsewhere (lf <= L, lb <= L-1)."""
    lb = 0 if k_bwd is None else k_bwd.shape[-1]
    r = k_fwd.flip(-1) if not lb else torch.cat([k_fwd.flip(-1), k_bwd], -1)
    left, right = length - k_fwd.shape[-1], length - 1 - lb
    return F.pad(r, (left, right)) if left or right else r


# elements of the zero-padded scratch of :func:`_diagonal_sums` (1 MB in fp32): one
# (H, L+1, 2L-1) buffer per call (2.4 MB at 96@56^2) cost more in fresh-page faults than
# its sum; 256 KB blocks were as fast at 1 thread but too small for 2 (96@56^2: 277 vs
# 125 us per call)
_DIAG_SCRATCH = 1 << 18


def _diagonal_sums(g: Tensor) -> Tensor:
    """Sums of the diagonals of square matrices: (..., L, L) -> (..., 2L-1),
    ``out[m] = sum_{j - i = m - (L-1)} g[i, j]`` (the gradient of :func:`_reversed_kernel`'s
    r for ``T[i, j] = r[L-1-i+j]``).

    Blocks of matrices are copied into a zero-padded (L+1, 2L-1) scratch (g at columns
    L-1.., an extra zero row; the padding is never written, so it stays zero from block to
    block) and reduced over a strided view: element (i, c) of the (L, 2L-1) view with row
    stride 2L is ``P[i, i + c]`` = g[i, c + i - (L-1)], or past the end of row i a zero of
    row i+1's left padding. (ATen's flip + ``unfold_backward`` took ~2x longer.)
    """
    *lead, L, _ = g.shape
    n = 2 * L - 1
    g = g.reshape(-1, L, L)
    N = g.shape[0]
    block = max(1, min(N, _DIAG_SCRATCH // ((L + 1) * n)))
    P = g.new_zeros(block, L + 1, n)
    view = P.as_strided((block, L, n), (P.stride(0), n + 1, 1))
    out = g.new_empty(N, n)
    for s in range(0, N, block):
        e = min(s + block, N)
        P[:e - s, :L, L - 1:] = g[s:e]
        torch.sum(view[:e - s], -2, out=out[s:e])
    return out.view(*lead, n)


class _ToeplitzMatrix(torch.autograd.Function):
    """(k_fwd (..., lf), k_bwd (..., lb) or None, L) -> T (..., L, L), ``T[i, j] = k(i - j)``.

    Forward: the reversed two-sided kernel r and one strided copy of its sliding windows
    (the same values as ``_window_matrix(two_sided_kernel(..))``, bit for bit). Backward:
    the kernel gradient is gr[m] = sum of gT's diagonal j - i = m - (L-1)
    (:func:`_diagonal_sums`), then split into the two halves; the autograd version of the
    forward instead flipped the (.., L, L) gradient, ran ``unfold_backward`` and went
    through flip / cat / pad nodes for the halves.
    """

    @staticmethod
    def forward(ctx, k_fwd: Tensor, k_bwd: Optional[Tensor], length: int) -> Tensor:
        ctx.lens = (k_fwd.shape[-1], None if k_bwd is None else k_bwd.shape[-1])
        r = _reversed_kernel(k_fwd, k_bwd, length)
        return r.unfold(-1, length, 1).flip(-2)  # window L-1-i of r is row i

    @staticmethod
    def backward(ctx, gT: Tensor):
        lf, lb = ctx.lens
        length = gT.shape[-1]
        gr = _diagonal_sums(gT)  # (..., 2L-1), gr[m]: gradient of r[m] = k(L-1-m)
        g_fwd = gr[..., length - lf:length].flip(-1) if ctx.needs_input_grad[0] else None
        g_bwd = gr[..., length:length + lb] if lb is not None and ctx.needs_input_grad[1] \
            else None
        return g_fwd, g_bwd, None


def _window_matrix(k2: Tensor) -> Tensor:
    """Toeplitz matrix (..., L, L) of a two-sided kernel (..., 2L-1), index = offset + L-1."""
    length = (k2.shape[-1] + 1) // 2
    # window s of the reversed kernel holds offsets L-1-s .. -s; row i = window L-1-i
    return k2.flip(-1).unfold(-1, length, 1).flip(-2)


def axis_operators(l_in: Sequence[int], kernels: Sequence[Tensor],
                   backward_kernels: Optional[Sequence[Tensor]] = None,
                   toeplitz_max: int = 256, compact: bool = False) -> list:
    """Per-axis linear operators of a separable convolution.

    Axis i becomes ``('toeplitz', T_i)`` (a dense (.., L_i, L_i) matrix) if
    ``L_i <= toeplitz_max``, else ``('fft', spectrum_i, F_i)`` (an ``rfft`` kernel
    spectrum). Kernels are (H, L_k) or (C, H, L_k); the operators are batch independent.
    ``compact=True`` returns ``('window', k2_i)`` instead of a Toeplitz matrix: the
    two-sided kernel (.., 2 L_i - 1) that :func:`separable_conv` expands into T_i when it
    applies it (L_i times less memory to keep, e.g. in an inference cache).
    """
    kernels, backward_kernels, sizes = prepare_kernels(l_in, kernels, backward_kernels)
    ops = []
    for i, (k, n, length) in enumerate(zip(kernels, sizes, l_in)):
        kb = None if backward_kernels is None else backward_kernels[i]
        k, kb = _work(k), None if kb is None else _work(kb)
        if length <= toeplitz_max and compact:
            ops.append(('window', two_sided_kernel(k, kb, length - 1)))
        elif length <= toeplitz_max:
            ops.append(('toeplitz', toeplitz_matrix(k, kb, length)))
        else:
            ops.append(('fft', torch.fft.rfft(_place_kernel(k, kb, n), n=n), n))
    return ops


_AXES = 'xyz'


def separable_conv(u: Tensor, ops: Sequence[tuple], D: Optional[Tensor] = None) -> Tensor:
    """Apply per-axis operators from :func:`axis_operators` (last axis first), plus ``D * u``.

    Args:
        u: (B, H, *L).
        ops: d operators; kernels with a head axis C give a (B, C, H, *L) output.
        D: optional skip (H,) or (C, H).
    """
    d = len(ops)
    _check(u, d)
    dtype = u.dtype
    x = _work(u)
    l_in = list(x.shape[2:])
    heads = ops[0][1].dim() == (4 if ops[0][0] == 'toeplitz' else 3)
    ops = [('toeplitz', _window_matrix(op[1])) if op[0] == 'window' else op for op in ops]
    if (d == 2 and all(op[0] == 'toeplitz' for op in ops) and (not heads or all(
            op[1].shape[0] == 1 for op in ops)) and not _tracing()):
        # one kernel per channel (S4ND's channels=1): batched GEMMs without permute copies
        # squeeze, not [0]: a select's backward fills a zero (1, H, L, L) gradient and
        # copies into it; a squeeze's is a view
        Ty, Tx = [op[1].squeeze(0) if heads else op[1] for op in ops]
        if x.dtype == torch.float64:
            Ty, Tx = Ty.to(torch.float64), Tx.to(torch.float64)
        y = _toeplitz_conv2d(x, Ty, Tx, None if D is None else D.reshape(-1))
        return (y.unsqueeze(1) if heads else y).to(dtype)
    y = x.unsqueeze(1)  # (B, 1, H, *L); becomes (B, C, H, *L) with kernel heads
    axes = _AXES[:d]
    for i in reversed(range(d)):  # last (contiguous) axis first
        kind, op = ops[i][0], ops[i][1]
        if x.dtype == torch.float64:
            op = op.to(torch.complex128 if op.is_complex() else torch.float64)
        if kind == 'toeplitz':
            # one batched matmul over (C, H): T (C|1, H, L_i, L_i) applied along axis i
            T = op if heads else op.unsqueeze(0)
            if y.shape[1] != T.shape[0]:  # first pass with heads: broadcast u over C
                y = y.expand(-1, T.shape[0], *y.shape[2:])
            out_axes = axes[:i] + 'I' + axes[i + 1:]
            y = torch.einsum(f'chI{axes[i]},bch{axes}->bch{out_axes}', T, y)
        else:
            n = ops[i][2]
            # (.., H, F_i') -> (.., H, 1.., F_i', 1..) aligned with axis i
            k_i = op.reshape(*op.shape[:-1], *([1] * i), op.shape[-1], *([1] * (d - 1 - i)))
            if not heads:
                k_i = k_i.unsqueeze(0)
            dim = i - d
            y = torch.fft.irfft(torch.fft.rfft(y, n=n, dim=dim) * k_i, n=n, dim=dim)
            y = y.narrow(dim, 0, l_in[i])
    if not heads:
        y = y.squeeze(1)
    return _skip(y, x, D, heads, d).to(dtype)


def _tracing() -> bool:
    """Under ``torch.jit`` tracing / ONNX export the generic einsum path is kept (no Python
    loop over the batch, whose size an exported graph may leave dynamic)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


# at 1 thread, maps with at least this many positions run one GEMM pair per image (no
# permute copy of x); smaller ones (and every map at > 1 thread) fold the batch into the
# GEMMs' M and N (one copy of x, B x fewer GEMM calls)
_PER_IMAGE_MIN = 576


def _toeplitz_conv2d(x: Tensor, Ty: Tensor, Tx: Tensor, D: Optional[Tensor]) -> Tensor:
    """``y[b, h] = Ty[h] @ x[b, h] @ Tx[h]^T + D[h] * x[b, h]``: a depthwise 2-D separable
    convolution as two batched GEMMs (batch = channels).

    Args:
        x: (B, H, Y, X).
        Ty, Tx: (H, Y, Y), (H, X, X) Toeplitz matrices (any strides).
        D: optional skip (H,).

    Returns:
        (B, H, Y, X). A channels-last x gives a channels-last output (memory (B, Y, X, H)),
        except on the per-image path with autograd (contiguous (B, H, Y, X)); a
        channels-first x at B > 1 on the batched path gives a permuted view of an
        (H, Y, X, B) tensor.

    Why this layout: the einsum form batches the GEMMs over (C, H) and puts B into M,
    which needs a permute copy of x (and of its output) per axis at B > 1, and then an
    elementwise skip on a permuted tensor. Here, for maps of >= ``_PER_IMAGE_MIN``
    positions at 1 thread (with or without autograd), x is taken image by image: the X
    axis is ``x[b] @ Tx^T``, the Y axis ``Ty @ z``. Small maps (14^2, 7^2: many tiny GEMMs)
    take all images in one GEMM pair, each written as ``T @ (wide matrix)`` through
    transposed views, after one copy of x. A ConvNeXt block's input and its consumer (a
    LayerNorm over channels) are channels-last: for such an x the per-channel GEMM layout
    is reached and left by 2-D transposes, which ATen copies block by block (a 4-D permute
    copy goes element by element, 3-5x slower), and the skip is added to the channels-last
    output from the channels-last x (contiguous operands).
    """
    B, H, Y, X = x.shape
    TxT = Tx.transpose(-1, -2)  # (H, X, X) view: the GEMM reads it transposed
    grad = torch.is_grad_enabled() and (x.requires_grad or Ty.requires_grad
                                        or Tx.requires_grad
                                        or (D is not None and D.requires_grad))
    Dv = None if D is None else D.to(x.dtype).reshape(H, 1, 1)
    xcl = x.permute(0, 2, 3, 1)  # (B, Y, X, H) view
    cl = xcl.is_contiguous() and H > 1  # H = 1: channels-last is also (B, H, Y, X)
    per_image = B > 1 and Y * X >= _PER_IMAGE_MIN and torch.get_num_threads() == 1
    if per_image and cl and not grad:
        # image by image, channels-last in and out: per image one 2-D transpose to (H, Y, X),
        # two GEMMs, one 2-D transpose back into the (B, Y, X, H) output; then the skip
        out = x.new_empty(B, Y, X, H)
        for b in range(B):
            xb = xcl[b].reshape(Y * X, H).t().contiguous().view(H, Y, X)
            zb = torch.bmm(Ty, torch.bmm(xb, TxT))  # (H, Y, X)
            out[b].view(Y * X, H).copy_(zb.view(H, Y * X).t())
        if Dv is not None:
            out.addcmul_(xcl, Dv.view(H))
        return out.permute(0, 3, 1, 2)
    if per_image:
        # large maps: image by image on x[b] (H, Y, X), output in x's (B, H, Y, X) layout.
        # Single thread only: with several threads each GEMM is a parallel region, and 2B
        # of them measured 2.4x slower than one batched pair on a loaded 2-core machine.
        # A channels-last x (a ConvNeXt block's residual sum) is copied once: bmm would
        # copy its (Y, X) matrices (no unit stride) one by one. (B, H, Y, X) <->
        # channels-last copies cost ~2 ms at 96@56^2, B=8, where the batched path's
        # (H, Y, X, B) layout needs ~9-12 ms per transposing copy (input, output, gradient)
        x = x.contiguous()
        if not grad:  # in place into the output
            out = x * Dv if Dv is not None else torch.zeros_like(x)
            for b in range(B):
                out[b].baddbmm_(Ty, torch.bmm(x[b], TxT))
            return out
        outs = []
        for b in range(B):
            z = torch.bmm(x[b], TxT)
            outs.append(torch.bmm(Ty, z) if Dv is None else torch.baddbmm(x[b] * Dv, Ty, z))
        return _ContiguousGrad.apply(torch.stack(outs))
    # all images at once, both GEMMs as T @ (wide matrix): MKL is slow for outputs only
    # X = 7 wide (768 x (56, 7) @ (7, 7) takes 4x longer than (7, 7) @ (7, 56))
    if grad:
        out = _BatchedToeplitzConv2d.apply(x, Ty, Tx, Dv)
    else:
        out = _batched_gemms(x, Ty, Tx, Dv)[0]
    if cl:  # (B, Y, X, H)
        return out.permute(0, 3, 1, 2)
    return out.view(H, Y, X, B).permute(3, 0, 1, 2)  # (H, Y, X*B)


# ATen multiplies batches of small matrices (M*K*N < 400) in a scalar loop instead of BLAS:
# 240 us for 768 (7, 7) @ (7, 7) products at 1 thread (a 7^2 map at B = 1), 70 us through
# MKL with the contraction zero-padded to 9 (the extra terms are 0 * 0: same sums)
_BMM_BLAS_MIN = 400


def _bmm(a: Tensor, b: Tensor, acc: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` for (H, M, K) @ (H, K, N), or ``acc += a @ b`` in place (``acc``
    (H, M, N)); below ATen's BLAS size the contraction is zero-padded."""
    H, M, K = a.shape
    N = b.shape[-1]
    if M * K * N < _BMM_BLAS_MIN:
        k = -(-_BMM_BLAS_MIN // (M * N))
        ap, bp = a.new_zeros(H, M, k), b.new_zeros(H, k, N)
        ap[..., :K], bp[:, :K] = a, b
        a, b = ap, bp
    return torch.bmm(a, b) if acc is None else acc.baddbmm_(a, b)


def _batched_gemms(x: Tensor, Ty: Tensor, Tx: Tensor,
                   Dv: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """All images of :func:`_toeplitz_conv2d` in one GEMM pair (no autograd).

    Returns ``(out, xp, zT)``: for a channels-last x (H > 1) ``out`` is the contiguous
    channels-last (B, Y, X, H) result, else an (H, Y, X*B) tensor (an (H, Y, X, B)
    layout); xp (H, B, Y, X) and the X-axis product zT (H, X, B*Y) are what the backward
    needs.
    """
    B, H, Y, X = x.shape
    xcl = x.permute(0, 2, 3, 1)  # (B, Y, X, H) view
    # (H, B, Y, X): a view for a contiguous x at B = 1, else one copy (also of a
    # channels-last x at B = 1, for which bmm would copy each (Y, X) matrix separately)
    xp = _channels_first(x)
    # X axis: zT[h] = Tx[h] @ x[h]^T, (X, B*Y), i.e. an (H, X, B, Y) layout
    zT = _bmm(Tx, xp.reshape(H, B * Y, X).transpose(1, 2))
    z = zT.view(H, X * B, Y).transpose(1, 2)  # (H, Y, X*B) view, columns (x, b)
    if xcl.is_contiguous() and H > 1:
        # Y axis: (H, Y, X*B), i.e. an (H, Y, X, B) layout, to channels-last (B, Y, X, H)
        # by a 2-D transpose (ATen's blocked transpose copy; + a reorder of whole H rows
        # at B > 1, fused with the skip); skip added there, from the channels-last x
        # (results are base tensors: autograd forbids in-place ops on a view made inside
        # a custom Function's forward)
        out = _bmm(Ty, z)
        if B == 1:
            res = x.new_empty(1, Y, X, H)
            res.view(Y * X, H).copy_(out.view(H, Y * X).t())
            return (res if Dv is None else res.addcmul_(xcl, Dv.view(H))), xp, zT
        t = x.new_empty(Y * X * B, H).copy_(out.view(H, Y * X * B).t())  # (Y, X, B, H)
        t = t.view(Y, X, B, H).permute(2, 0, 1, 3)
        if Dv is None:
            return t.contiguous(), xp, zT
        return torch.addcmul(t, xcl, Dv.view(H), out=x.new_empty(B, Y, X, H)), xp, zT
    if Dv is None:  # Y axis: out[h] = Ty[h] @ z[h], (Y, X*B), i.e. an (H, Y, X, B) layout
        return _bmm(Ty, z), xp, zT
    # skip as the accumulator, laid out like the output
    skip = x.new_empty(H, Y, X * B)
    torch.mul(x.permute(1, 2, 3, 0), Dv.unsqueeze(-1), out=skip.view(H, Y, X, B))
    return _bmm(Ty, z, skip), xp, zT


class _BatchedToeplitzConv2d(torch.autograd.Function):
    """:func:`_batched_gemms` with a hand-written backward: (x (B, H, Y, X), Ty (H, Y, Y),
    Tx (H, X, X), Dv (H, 1, 1) or None) -> channels-last (B, Y, X, H) for a channels-last
    x, else (H, Y, X*B).

    The backward gets the output gradient into the GEMM layout (H, Y, X*B) with one copy
    (a 2-D transpose for channels-last), runs the four GEMMs, and writes the x gradient
    straight into x's layout with the skip's share added in place (channels-last: one 2-D
    transpose + ``addcmul_``; (H, Y, X) at B = 1: one ``baddbmm``). Autograd through the
    forward's ops instead copied the x gradient out of the transposed GEMM layout
    element by element (``reshape`` of a non-viewable (H, B, Y, X) gradient) and then
    added the skip's gradient in a second layout, ~1.5 ms per 96@56^2 layer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, Ty: Tensor, Tx: Tensor, Dv: Optional[Tensor]) -> Tensor:
        out, xp, zT = _batched_gemms(x, Ty, Tx, Dv)
        ctx.cl = out.dim() == 4
        ctx.save_for_backward(x, xp, zT, Ty, Tx, Dv)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, xp, zT, Ty, Tx, Dv = ctx.saved_tensors
        need_x, need_ty, need_tx, need_d = ctx.needs_input_grad
        B, H, Y, X = x.shape
        if ctx.cl:  # g (B, Y, X, H) -> (H, Y, X*B) by a 2-D transpose (+ a row reorder)
            t = g.permute(1, 2, 0, 3).contiguous()  # (Y, X, B, H); no copy at B = 1
            gout = t.view(Y * X * B, H).t().contiguous().view(H, Y, X * B)
        else:
            gout = g.contiguous()  # (H, Y, X*B)
        gx = g_ty = g_tx = g_d = None
        if need_d:  # sum over positions of g * x, both in the output's layout
            if ctx.cl:
                g_d = (g * x.permute(0, 2, 3, 1)).sum((0, 1, 2)).view(H, 1, 1)
            else:
                g_d = (gout.view(H, Y, X, B) * x.permute(1, 2, 3, 0)).sum((1, 2, 3))
                g_d = g_d.view(H, 1, 1)
        if need_ty:  # out = Ty @ z: gTy = gout @ z^T, z^T = zT as (H, X*B, Y)
            g_ty = _bmm(gout, zT.view(H, X * B, Y))
        if not (need_x or need_tx):
            return gx, g_ty, g_tx, g_d
        gz = _bmm(Ty.transpose(1, 2), gout)  # (H, Y, X*B), columns (x, b)
        # as (H, X, B*Y), columns (b, y) like zT: a transposed view at B = 1, else a copy
        gzT = gz.transpose(1, 2) if B == 1 else gz.view(H, Y, X, B).permute(
            0, 2, 3, 1).reshape(H, X, B * Y)
        if need_tx:  # zT = Tx @ xp^T: gTx = gzT @ xp
            g_tx = _bmm(gzT, xp.reshape(H, B * Y, X))
        if not need_x:
            return gx, g_ty, g_tx, g_d
        if not ctx.cl and B == 1 and Dv is not None:  # (H, Y, X) = x's layout: skip fused
            return _bmm(gz, Tx, gout * Dv).unsqueeze(0), g_ty, g_tx, g_d
        gxp = _bmm(gzT.transpose(1, 2), Tx)  # xp's gradient (H, B*Y, X)
        if ctx.cl:  # to channels-last (B, Y, X, H) by a 2-D transpose, skip added in place
            gx = gxp.view(H, B * Y * X).t().contiguous().view(B, Y, X, H)
            if Dv is not None:
                gx.addcmul_(g, Dv.view(H))
            return gx.permute(0, 3, 1, 2), g_ty, g_tx, g_d
        gx = gxp.view(H, B, Y, X).transpose(0, 1)
        if Dv is not None:
            gx = torch.addcmul(gx, gout.view(H, Y, X, B).permute(3, 0, 1, 2), Dv)
        return gx, g_ty, g_tx, g_d


def _channels_first(x: Tensor) -> Tensor:
    """``x.transpose(0, 1).contiguous()``: (B, H, Y, X) -> contiguous (H, B, Y, X).

    A channels-last x is one 2-D transpose ((B*Y*X, H) -> (H, B*Y*X)), written as such:
    ATen copies a 2-D transposed matrix block by block (2 ms at 96@56^2, B=8), but the 4-D
    permute element by element (15.6 ms, 1 thread).
    """
    B, H, Y, X = x.shape
    if B * Y * X > 1 and H > 1 and x.permute(0, 2, 3, 1).is_contiguous():
        return x.permute(0, 2, 3, 1).reshape(B * Y * X, H).t().contiguous().view(H, B, Y, X)
    return x.transpose(0, 1).contiguous()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The gradient of :func:`_toeplitz_conv2d`'s per-image (B, H, Y, X) output arrives in its
    consumer's layout: a ConvNeXt block's channels-last LayerNorm gives (H, Y, X) matrices
    with no unit stride, and the backward GEMMs (``bmm`` with such operands) would copy them
    one by one (H small copies each, ~2-25x slower at 56^2-14^2). One copy here instead.
    (The all-images path does the same inside :class:`_BatchedToeplitzConv2d`.)
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.contiguous()


def pooled_axis_taps(k_fwd: Tensor, k_bwd: Optional[Tensor], stride: int) -> Tensor:
    """Taps of "1-D convolution, then average pooling (kernel = stride = ``stride``)" as one
    strided correlation.

    With ``k`` the two-sided kernel (``k_fwd`` at offsets 0..lf-1, ``k_bwd`` at -1..-lb),
    ``y[p] = (1/s) sum_{r<s} sum_o k(o) x[s p + r - o] = sum_m w[m] x[s p + m - (lf - 1)]``
    (x zero outside), where ``w`` is the box-filtered kernel read backwards:
    ``w[m] = g(lf - 1 - m)``, ``g(o) = (1/s) sum_{r<s} k(o + r)``. Exact: the pooled output
    of the full-resolution convolution, without computing it.

    Shapes: (..., lf), (..., lb) -> (..., lf + lb + s - 1).
    """
    k2 = k_fwd if k_bwd is None else torch.cat([k_bwd.flip(-1), k_fwd], -1)  # offsets -lb..
    if stride > 1:  # g: sliding sums of s taps (zero beyond both ends)
        k2 = F.pad(k2, (stride - 1, stride - 1)).unfold(-1, stride, 1).sum(-1) / stride
    return k2.flip(-1)


def pooled_separable_conv(u: Tensor, taps: Sequence[Tensor], lefts: Sequence[int],
                          strides: Sequence[int]) -> Tensor:
    """Dense separable convolution followed by average pooling (kernel = stride, floor), as
    one strided depthwise conv per axis: ``avg_pool(sum_h k_0[:, h] (x) .. (x) k_{d-1}[:, h]
    * u[:, h], strides)``.

    For short kernels (the ConvNeXt-S4ND stem: 16 taps per side at 224^2 or more) this costs
    O(taps) per pooled output and never builds the full-resolution (B, C, *L) output or a
    padded spectrum. Input channels are processed one at a time (the dense layers this
    serves have few: 3 for an image stem), so the largest temporary is one channel's
    (B, C, L_0, .., L_{d-1} // s_{d-1}) after the first pass.

    Args:
        u: (B, H, *L) fp32/fp64.
        taps: d correlation weights (C, H, K_i) from :func:`pooled_axis_taps`.
        lefts: d left offsets ``lf_i - 1`` (the causal length of axis i's kernel minus 1).
        strides: d pooling sizes.

    Returns:
        (B, C, L_0 // s_0, .., L_{d-1} // s_{d-1}): channels-last for d = 2, a permuted
        view for d = 3.
    """
    d = len(taps)
    _check(u, d)
    B, H = u.shape[:2]
    C = taps[0].shape[0]
    l_in = list(u.shape[2:])
    for i, (n, s) in enumerate(zip(l_in, strides)):
        if n // s == 0:
            raise ValueError(f'axis {i} of length {n} is shorter than its pooling size {s}')
    if d == 2:
        return _pooled_conv2d(u, taps, lefts, strides)
    out = None
    for h in range(H):
        y = u[:, h:h + 1]  # (B, 1, *L)
        order = list(range(d))  # order[j]: the axis held at position j of y's spatial dims
        for i in reversed(range(d)):  # last (contiguous) axis first: one pass per axis
            s, left = strides[i], lefts[i]
            w = taps[i][:, h].to(y.dtype)  # (C, K)
            K, L, Lo = w.shape[-1], l_in[i], l_in[i] // s
            if order[-1] != i:  # axis i to the end: one copy of the (B, C, ..) intermediate
                j = order.index(i)
                y = y.movedim(2 + j, -1).contiguous()
                order.append(order.pop(j))
            shape = y.shape
            y = y.reshape(shape[0], shape[1], -1, L)  # (B, 1|C, rest, L); 1-D: rest = 1
            right = max(s * (Lo - 1) + K - 1 - left - (L - 1), 0)
            # first pass: 1 -> C heads; later passes: depthwise over the C heads
            y = F.conv2d(F.pad(y, (left, right)), w.reshape(C, 1, 1, K), stride=(1, s),
                         groups=y.shape[1])
            y = y[..., :Lo].reshape(B, C, *shape[2:-1], Lo)
        out = y if out is None else out.add_(y)  # (B, C, *Lo) in the axis order ``order``
    return out.permute(0, 1, *[2 + order.index(i) for i in range(d)])


def _pad_right(n: int, s: int, k: int, left: int) -> int:
    """Right zero padding for ``n // s`` windows of ``k`` taps at stride ``s`` that start
    ``left`` before the input."""
    return max(s * (n // s - 1) + k - 1 - left - (n - 1), 0)


def _pooled_conv2d(u: Tensor, taps: Sequence[Tensor], lefts: Sequence[int],
                   strides: Sequence[int]) -> Tensor:
    """2-D :func:`pooled_separable_conv`: (B, H, Y, X) -> channels-last (B, C, Yo, Xo).

    Per input channel: the X axis as a GEMM of the strided windows of the padded rows
    ((B, Y, Xo, Kx) -> (B, Y, Xo, C): a channels-last map, no transposing copy), then the
    Y axis as a (Ky, 1) depthwise conv of stride (sy, 1) on that channels-last map: oneDNN's
    channels-last depthwise kernel, ~3x faster than a (1, K) conv on a transposed NCHW copy
    (ConvNeXt-S4ND-T stem, 1 thread: 4.7 vs 13.6 ms per input channel at B=8); the GEMM is
    0.9 vs 1.5 ms for a (1, K) strided conv with 1 -> C channels at B=1, as fast at B=8.
    The stem's whole S4ND + AvgPool: 6.2 -> 4.1 ms (B=1), 58 -> 32 ms (B=8).
    """
    B, H, Ly, Lx = u.shape
    C = taps[0].shape[0]
    (sy, sx), (ly, lx) = strides, lefts
    Ky, Kx = taps[0].shape[-1], taps[1].shape[-1]
    Yo, Xo = Ly // sy, Lx // sx
    ry, rx = _pad_right(Ly, sy, Ky, ly), _pad_right(Lx, sx, Kx, lx)
    # the Y axis pads through the conv (symmetric, no padded copy of the (B, C, Y, Xo) map):
    # p = max(left, right) zeros each side, and p - left zero taps in front keep the windows
    py = max(ly, ry)
    wys = F.pad(taps[0].to(u.dtype), (py - ly, 0))  # (C, H, Ky + py - ly)
    out = None
    for h in range(H):
        wy, wx = wys[:, h], taps[1][:, h].to(u.dtype)  # (C, K)
        win = F.pad(u[:, h], (lx, rx)).unfold(-1, Kx, sx)[:, :, :Xo]  # (B, Y, Xo, Kx) view
        # one copy of the overlapping windows into a (B*Y*Xo, Kx) matrix and one GEMM
        # (matmul on the view would run B*Y small GEMMs, each copying its operand)
        z = win.reshape(B * Ly * Xo, Kx).mm(wx.t())  # (B*Y*Xo, C)
        z = z.view(B, Ly, Xo, C).permute(0, 3, 1, 2)  # (B, C, Y, Xo) channels-last
        y = F.conv2d(z, wy.reshape(C, 1, -1, 1), stride=(sy, 1), padding=(py, 0),
                     groups=C)[:, :, :Yo]
        out = y if out is None else out.add_(y)
    return out


def two_sided_kernel(k_fwd: Tensor, k_bwd: Optional[Tensor], length: int) -> Tensor:
    """Explicit 1-D kernel over offsets -length..length (index j <-> offset j - length)."""
    k_fwd = _head(k_fwd, length + 1)
    parts = [k_fwd]
    if k_bwd is not None:
        parts.insert(0, _head(k_bwd, length).flip(-1))
    k2 = torch.cat(parts, -1) if len(parts) > 1 else k_fwd
    # zero taps beyond the given ones on either side
    left = length - (0 if k_bwd is None else min(k_bwd.shape[-1], length))
    right = length + 1 - k_fwd.shape[-1]
    return F.pad(k2, (left, right)) if left or right else k2


def conv_reference_nd(u: Tensor, kernels: Sequence[Tensor],
                      backward_kernels: Optional[Sequence[Tensor]] = None,
                      D: Optional[Tensor] = None) -> Tensor:
    """Same contract as :func:`fftconv_nd`, by ``F.conv{1,2,3}d`` with the explicit N-D kernel.

    The separable kernel is materialised in space (outer product of the two-sided per-axis
    kernels over offsets -(L_i-1)..(L_i-1)), flipped (torch convs are correlations) and
    applied depthwise with "same" padding. Slow; for tests only.
    """
    d = len(kernels)
    if d not in (1, 2, 3):
        raise ValueError(f'conv_reference_nd supports 1, 2 or 3 axes, got {d}')
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    l_in = list(u.shape[2:])
    axes = [two_sided_kernel(k, None if backward_kernels is None else backward_kernels[i],
                             l_in[i] - 1) for i, k in enumerate(kernels)]
    full = outer_spectrum(axes)  # outer product works for real tensors too: (.., H, *(2L-1))
    heads = full.dim() == d + 2
    if not heads:
        full = full.unsqueeze(0)
    B, H = u.shape[:2]
    ys = []
    for c in range(full.shape[0]):
        w = full[c].flip(list(range(1, d + 1))).unsqueeze(1).to(u.dtype)  # (H, 1, *K)
        ys.append(conv(u, w, padding=[n - 1 for n in l_in], groups=H))
    y = torch.stack(ys, 1)  # (B, C, H, *L)
    if D is not None:
        Dx = D.reshape(-1, H, *([1] * d)) if D.dim() == 2 else D.reshape(1, H, *([1] * d))
        y = y + u.unsqueeze(1) * Dx.to(u.dtype)
    return y if heads else y[:, 0]
