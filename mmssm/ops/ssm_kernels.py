"""Convolution kernels of linear time-invariant SSMs: S4D (diagonal) and S4 (DPLR).

A kernel module holds continuous-time parameters (dt, A, B, C) of ``H`` independent SSMs
and returns the discretised convolution kernel ``K[l] = C dA^l dB``, shaped
(channels, H, L). Everything here follows the semantics of state-spaces/s4
(``src/models/sequence/kernels/ssm.py``) so official S4ND checkpoints load unchanged:

* parameter names/shapes: ``inv_dt (H, 1)``, ``C (channels, H, N/2, 2)``,
  ``B (1, S, N/2, 2)``, ``A_real (S, N/2)``, ``A_imag (S, N/2)`` and, for DPLR,
  ``P (rank, S, N/2, 2)`` plus the int64 buffer ``l_kernel``. Complex tensors are stored as
  real views; only one of each conjugate pair of modes is stored (N/2).
* ``A = -exp(A_real) - 1j * A_imag``, ``dt = exp(inv_dt) * rate``.
* DPLR: state matrix ``diag(A) - P P^*``, bilinear discretisation, kernel evaluated at the
  roots of unity with a Cauchy product + Woodbury correction and an inverse FFT. Its ``C``
  is stored as ``C~ = C (I - dA^L)`` "attuned" to ``l_kernel = L``; the first forward
  converts a raw C (``l_kernel == 0``) in place, as the official code does.
* ``rate`` (relative sampling rate, 2 = half resolution) scales dt; ``bandlimit`` zeroes
  the modes whose frequency ``dt * |Im A| / 2 pi`` is above ``bandlimit / 2`` cycles/sample.

On CPU, kernel generation runs in float64 with compiled code where it is built
(:mod:`mmssm.ops.cauchy_cpu`): the Cauchy products in general, and for rank-1 kernels with
one shared SSM and a tied dt (S4ND's) the whole spectrum - Cauchy sums, Woodbury step,
bilinear factor - and its backward as one op from the parameters as stored
(:class:`_DPLRSpectrum`). The PyTorch code paths compute the same and remain the reference.
"""
import math
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import cauchy_cpu

# ----------------------------------------------------------------------------- HiPPO


def hippo_legs(N: int) -> Tuple[Tensor, Tensor]:
    """HiPPO-LegS transition ``(A (N, N), B (N,))`` in float64.

    Built the way it is derived (scaled-Legendre ODE ``c' = -(1/t) M c + (1/t) b u`` in the
    orthogonal basis, then normalised by ``T = diag(sqrt(2n+1))``): ``A = T M T^{-1}`` with
    ``M_nk = -(2k+1)`` for n >= k plus ``n`` on the diagonal.
    """
    q = torch.arange(N, dtype=torch.float64)
    M = -torch.tril((2 * q + 1)[None, :].expand(N, N)) + torch.diag(q)
    T = torch.diag(torch.sqrt(2 * q + 1))
    A = T @ M @ torch.linalg.inv(T)
    return A, torch.sqrt(2 * q + 1)


def hippo_fout(N: int) -> Tuple[Tensor, Tensor]:
    """HiPPO-FouT ('fourier') transition ``(A (N, N), B (N,))`` in float64 (N even)."""
    if N % 2:
        raise ValueError(f"the 'fourier' init needs an even d_state, got {N}")
    freqs = torch.arange(N // 2, dtype=torch.float64)
    d = torch.stack([torch.zeros(N // 2, dtype=torch.float64), freqs], -1).reshape(-1)[1:]
    A = math.pi * (-torch.diag(d, 1) + torch.diag(d, -1))
    B = torch.zeros(N, dtype=torch.float64)
    B[0::2] = 2 ** 0.5
    B[0] = 1
    # the low-rank term accounts for the other endpoint u(t-1) of the translated window
    return A - B[:, None] * B[None, :], B


def rank_correction(measure: str, N: int, rank: int = 1) -> Tensor:
    """Low-rank ``P (rank, N)`` such that ``A + P^T P`` is normal (skew + constant diagonal)."""
    if measure == 'legs':
        P = torch.sqrt(0.5 + torch.arange(N, dtype=torch.float64))[None]
    elif measure in ('fourier', 'fout'):
        P = torch.zeros(1, N, dtype=torch.float64)
        P[0, 0::2] = 2 ** 0.5
        P[0, 0] = 1
    else:
        raise ValueError(f"rank_correction: measure must be 'legs' or 'fourier', got {measure!r}")
    if rank > 1:
        P = torch.cat([P, P.new_zeros(rank - 1, N)], 0)
    return P


def nplr(measure: str, N: int, rank: int = 1,
         B_clip: Optional[float] = 2.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normal-plus-low-rank form of a HiPPO matrix.

    Returns ``W (N/2,)``, ``P (rank, N/2)``, ``B (N/2,)``, ``V (N, N/2)`` (complex128) with
    ``A = V (diag(W) - P P^*) V^*`` over conjugate pairs (only the half with Im W <= 0 kept).
    """
    A, B = {'legs': hippo_legs, 'fourier': hippo_fout, 'fout': hippo_fout}[measure](N)
    P = rank_correction(measure, N, rank)
    AP = A + (P[:, :, None] * P[:, None, :]).sum(0)  # normal: c*I + skew
    w_re = torch.diagonal(AP).mean()
    skew = AP - torch.diag(torch.diagonal(AP))
    w_im, V = torch.linalg.eigh(skew * -1j)  # -i * skew is Hermitian; eigenvalues real
    W = w_re + 1j * w_im
    idx = torch.argsort(W.imag)
    W, V = W[idx][:N // 2], V[:, idx][:, :N // 2]
    if W[-1].abs() < 1e-4:  # FouT: one zero eigenvalue pair; pick the conjugate pair basis
        V[:, -1] = 0
        V[0, -1] = 2 ** -0.5
        V[1, -1] = 2 ** -0.5 * 1j
    Vh = V.conj().T
    B = Vh @ B.to(V.dtype)
    P = P.to(V.dtype) @ Vh.T
    if B_clip is not None:
        B = B.real + 1j * B.imag.clamp(-B_clip, B_clip)
    return W, P, B, V


def diag_init(init: str, N: int) -> Tuple[Tensor, Tensor]:
    """Diagonal (S4D) inits: ``A (N/2,)``, ``B (N/2,)`` complex128 for N/2 conjugate pairs.

    'legs' (S4D-LegS: diagonal of the normal part of HiPPO-LegS), 'lin' (S4D-Lin:
    -1/2 + i pi n), 'inv' (S4D-Inv: -1/2 + i N/pi (N/(2n+1) - 1)), 'real' (S4D-Real: -(n+1)).
    """
    n = torch.arange(N // 2, dtype=torch.float64)
    B = torch.ones(N // 2, dtype=torch.complex128)
    if init == 'legs':
        W, _, B, _ = nplr('legs', N)
        return -0.5 + 1j * W.imag, B
    if init == 'lin':
        imag = math.pi * n
    elif init == 'inv':
        imag = N / math.pi * (N / (1 + 2 * n) - 1)
    elif init == 'real':
        return (-(n + 1)).to(torch.complex128), B
    else:
        raise ValueError(f"diagonal init must be one of 'legs', 'lin', 'inv', 'real'; got {init!r}")
    return -0.5 - 1j * imag, B


_COMBINATIONS = {'hippo': ['legs', 'fourier'], 'diag': ['diag-inv', 'diag-lin'],
                 'all': ['legs', 'fourier', 'diag-inv', 'diag-lin']}
_ALIASES = {'diag-legs': 'legs', 'diag-lin': 'lin', 'diag-inv': 'inv', 'diag-real': 'real',
            'dplr-legs': 'legs', 'dplr-lin': 'lin', 'dplr-inv': 'inv', 'dplr-real': 'real'}
VALID_INITS = ('legs', 'fourier', 'fout', *_ALIASES, *_COMBINATIONS)


def init_ssm(init: str, N: int, rank: int, n_ssm: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``A (S, N/2)``, ``P (rank, S, N/2)``, ``B (S, N/2)`` (complex128) for ``S = n_ssm`` copies.

    'legs'/'fourier' give the NPLR HiPPO matrices; 'diag-*' the S4D inits with P = 0;
    'dplr-*' the S4D diagonals with a random low-rank P; 'hippo'/'diag'/'all' split the
    copies evenly between several inits.
    """
    if init not in VALID_INITS:
        raise ValueError(f'init must be one of {VALID_INITS}, got {init!r}')
    names = _COMBINATIONS.get(init, [init])
    if n_ssm % len(names):
        raise ValueError(f'n_ssm={n_ssm} must be a multiple of the {len(names)} inits of {init!r}')
    s = n_ssm // len(names)
    As, Ps, Bs = [], [], []
    for name in names:
        if name in ('legs', 'fourier', 'fout'):
            W, P, B, _ = nplr(name, N, rank)
        else:
            W, B = diag_init(_ALIASES[name], N)
            P = torch.randn(rank, N // 2, dtype=torch.complex128)
            if name.startswith('diag'):
                P = P * 0
        As.append(W.expand(s, -1))
        Ps.append(P[:, None].expand(-1, s, -1))
        Bs.append(B.expand(s, -1))
    return torch.cat(As, 0), torch.cat(Ps, 1), torch.cat(Bs, 0)


# ----------------------------------------------------------------------------- helpers

_TRANSFORMS = ('none', 'exp', 'relu', 'sigmoid', 'softplus')


def _param_transform(x: Tensor, transform: str) -> Tensor:
    if transform == 'none':
        return x
    if transform == 'exp':
        return x.exp()
    if transform == 'relu':
        return F.relu(x) + 1e-4
    if transform == 'sigmoid':
        return torch.sigmoid(x)
    if transform == 'softplus':
        return F.softplus(x)
    raise ValueError(f'transform must be one of {_TRANSFORMS}, got {transform!r}')


def _inv_transform(x: Tensor, transform: str) -> Tensor:
    x = x.clamp(min=1e-4)
    if transform in ('none', 'relu'):
        return x
    if transform == 'exp':
        return x.log()
    if transform == 'sigmoid':
        return torch.logit(x)
    if transform == 'softplus':
        return torch.log(torch.expm1(x))
    raise ValueError(f'transform must be one of {_TRANSFORMS}, got {transform!r}')


def _conj(x: Tensor) -> Tensor:
    """Append the conjugate modes: (..., N/2) -> (..., N)."""
    return torch.cat([x, x.conj()], -1)


def vandermonde(v: Tensor, log_x: Tensor, L: int) -> Tensor:
    """``2 Re sum_n v_n x_n^l`` for l < L. v (..., H, N), log_x (H, N) -> (..., H, L)."""
    V = torch.exp(log_x.unsqueeze(-1) * torch.arange(L, device=log_x.device))  # (H, N, L)
    return 2 * torch.einsum('...hn,hnl->...hl', v, V).real


def _cauchy_matrices(z: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """``1 / (z - w)`` and ``1 / (z - conj(w))``, (H, N, Lf), by real arithmetic (complex
    reciprocal is slow on CPU)."""
    a = z.real - w.real[..., None]
    b1 = z.imag - w.imag[..., None]
    b2 = z.imag + w.imag[..., None]
    a2 = a * a
    d1, d2 = 1.0 / (a2 + b1 * b1), 1.0 / (a2 + b2 * b2)
    return torch.complex(a * d1, -b1 * d1), torch.complex(a * d2, -b2 * d2)


def _cauchy_fwd(v: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
    return (torch.einsum('...hn,hnl->...hl', v, r1)
            + torch.einsum('...hn,hnl->...hl', v.conj(), r2))


class _Cauchy(torch.autograd.Function):
    """Cauchy product with a hand-written backward (a few einsums instead of the ~40-node
    autograd graph of the elementwise ops; this dominates S4 kernel generation on CPU).

    Gradients follow PyTorch's convention for complex tensors (conjugate Wirtinger):
    ``r = sum_n v R1 + conj(v) R2`` with R1 = 1/(z-w), R2 = 1/(z-conj w), so
    ``gv = g R1^* + g^* R2`` and ``gw = sum_batch v^* (g R1^{*2} + g^* R2^2)``.
    """

    @staticmethod
    def forward(ctx, v: Tensor, z: Tensor, w: Tensor) -> Tensor:
        r1, r2 = _cauchy_matrices(z, w)
        ctx.save_for_backward(v, r1, r2)
        return _cauchy_fwd(v, r1, r2)

    @staticmethod
    def backward(ctx, g: Tensor):
        v, r1, r2 = ctx.saved_tensors
        gv = gw = None
        gc = g.conj()
        if ctx.needs_input_grad[0]:
            gv = (torch.einsum('...hl,hnl->...hn', g, r1.conj())
                  + torch.einsum('...hl,hnl->...hn', gc, r2))
        if ctx.needs_input_grad[2]:
            H, N = v.shape[-2:]
            vc = v.conj().reshape(-1, H, N)
            g1 = torch.einsum('bhn,bhl->hnl', vc, g.reshape(-1, H, g.shape[-1]))
            g2 = torch.einsum('bhn,bhl->hnl', vc, gc.reshape(-1, H, g.shape[-1]))
            gw = (g1 * (r1 * r1).conj() + g2 * (r2 * r2)).sum(-1)
        return gv, None, gw


def cauchy(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """``sum_n v_n / (z_l - w_n) + conj(v_n) / (z_l - conj(w_n))``.

    v (..., H, N), z (Lf,) (constant), w (H, N) -> (..., H, Lf).
    """
    if torch.is_grad_enabled() and (v.requires_grad or w.requires_grad):
        return _Cauchy.apply(v, z, w)
    return _cauchy_fwd(v, *_cauchy_matrices(z, w))


def _cauchy_real(z: Tensor, w: Tensor, square: bool = False) -> Tensor:
    """Real (H, 2N, 2Lf) matrix M with ``[Re v, Im v] @ M = [Re r, Im r]`` for
    ``r = v r1 + conj(v) r2``, r1 = 1 / (z - w), r2 = 1 / (z - conj(w)) (z (Lf,), w (H, N)).

    With ``r1 = p1 + i q1``, ``r2 = p2 + i q2``:
    ``M = [[p1 + p2, q1 + q2], [q2 - q1, p1 - p2]]``. One real matmul replaces two complex
    ones and no complex elementwise op is needed (slow on CPU, above all in complex128).
    ``square=True`` builds the same matrix for ``r1^2, r2^2`` instead (the backward's).
    """
    H, N = w.shape
    Lf = z.shape[-1]
    a = z.real - w.real[..., None]  # (H, N, Lf): z - w = a + i b1, z - conj(w) = a + i b2
    b1 = z.imag - w.imag[..., None]
    b2 = z.imag + w.imag[..., None]
    a2 = a * a
    d1 = (b1 * b1).add_(a2).reciprocal_()  # 1 / |z - w|^2
    d2 = (b2 * b2).add_(a2).reciprocal_()
    if square:  # r^2 = (a - i b)^2 d^2 = (a^2 - b^2) d^2 - 2i a b d^2
        d1.square_()
        d2.square_()
        p1, p2 = (a2 - b1 * b1).mul_(d1), (a2 - b2 * b2).mul_(d2)
        q1, q2 = (a * b1).mul_(d1).mul_(-2), (a * b2).mul_(d2).mul_(-2)
    else:  # r = (a - i b) d
        p1, p2 = a * d1, a * d2
        q1, q2 = b1.mul_(d1).neg_(), b2.mul_(d2).neg_()
    M = a.new_empty(H, 2 * N, 2 * Lf)
    torch.add(p1, p2, out=M[:, :N, :Lf])
    torch.add(q1, q2, out=M[:, :N, Lf:])
    torch.sub(q2, q1, out=M[:, N:, :Lf])
    torch.sub(p1, p2, out=M[:, N:, Lf:])
    return M


def _pairs(Bs: Tensor, Cs: Tensor) -> Tensor:
    """Real pair products ``[Re V, Im V]`` (H, A*Bc, 2N) of ``V = Bs[a] Cs[b]``."""
    V = Bs.unsqueeze(-2) * Cs.unsqueeze(-3)  # (H, A, Bc, N)
    H, A, Bc, N = V.shape
    return torch.view_as_real(V).transpose(-1, -2).reshape(H, A * Bc, 2 * N)


def _from_real(x: Tensor, shape: Sequence[int]) -> Tensor:
    """(.., 2M) real ``[re, im]`` -> complex (*shape) with M = shape[-1]."""
    m = x.shape[-1] // 2
    return torch.complex(x[..., :m], x[..., m:]).reshape(*shape)


class _CauchyOuter(torch.autograd.Function):
    """:func:`cauchy_outer` in real arithmetic with a hand-written backward (batched real
    matmuls; PyTorch's complex convention: conjugate Wirtinger gradients).

    Forward: ``[Re r, Im r] = [Re V, Im V] @ M`` (:func:`_cauchy_real`). Backward:
    ``gX = g M^T`` gives ``gV``, hence ``gBs = sum gV Cs^*`` and ``gCs = sum gV Bs^*``;
    ``gM = X^T g`` gives the gradients of r1 = 1/(z-w) (holomorphic in w: ``dr1/dw =
    r1^2``) and r2 = 1/(z-conj w) (anti-holomorphic), so
    ``gw = sum_l g_r1 conj(r1)^2 + conj(g_r2) r2^2``.

    complex128 CPU operands use the compiled kernel (:mod:`mmssm.ops.cauchy_cpu`) for both
    passes instead: same formulas, one pass over the (H, N, Lf) entries, M and E never
    stored (a ConvNeXt-S4ND-T training step at batch 1 spends most of its kernel generation
    here otherwise). Only there a per-channel real step ``dt`` (H,) may scale Cs inside the
    kernel (:func:`cauchy_outer` scales Cs itself for the PyTorch path).
    """

    @staticmethod
    def forward(ctx, Bs: Tensor, Cs: Tensor, z: Tensor, w: Tensor,
                dt: Optional[Tensor] = None) -> Tensor:
        # compiled (cauchy.cpp): M and E are never stored, the backward recomputes them
        ctx.fused = _fused(Bs, Cs, z, w)
        if ctx.fused:
            ctx.save_for_backward(Bs, Cs, z, w, dt)
            return cauchy_cpu.cauchy_fwd(Bs, Cs, z, w, dt)
        if dt is not None:
            raise ValueError('_CauchyOuter: dt is only taken by the compiled kernel')
        M = _cauchy_real(z, w)  # (H, 2N, 2Lf)
        X = _pairs(Bs, Cs)  # (H, A*Bc, 2N)
        ctx.save_for_backward(Bs, Cs, z, w, X, M)
        H, Bc = Cs.shape[0], Cs.shape[1]
        return _from_real(torch.bmm(X, M), (H, Bs.shape[-2], Bc, z.shape[-1]))

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.fused:
            Bs, Cs, z, w, dt = ctx.saved_tensors
            gB, gC, gw, gdt = cauchy_cpu.cauchy_bwd(Bs, Cs, z, w, g, dt)
            if Bs.dim() == 2:  # shared across H
                gB = gB.sum(0)
            need = ctx.needs_input_grad
            return (gB if need[0] else None, gC if need[1] else None, None,
                    gw if need[3] else None, gdt if need[4] else None)
        Bs, Cs, z, w, X, M = ctx.saved_tensors
        H, Bc, N = Cs.shape
        A, Lf = Bs.shape[-2], g.shape[-1]
        # (H, A*Bc, 2Lf) real: [Re g, Im g]
        gout = torch.view_as_real(g.reshape(H, A * Bc, Lf)).transpose(-1, -2).reshape(
            H, A * Bc, 2 * Lf)
        gB = gC = gw = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gV = _from_real(torch.bmm(gout, M.transpose(1, 2)), (H, A, Bc, N))
            if ctx.needs_input_grad[0]:
                gB = (gV * Cs.conj().unsqueeze(1)).sum(2)  # (H, A, N)
                if Bs.dim() == 2:  # shared across H
                    gB = gB.sum(0)
            if ctx.needs_input_grad[1]:
                gC = (gV * Bs.conj().unsqueeze(-2)).sum(1)  # (H, Bc, N)
        if ctx.needs_input_grad[3]:
            # gw = sum_l G1 conj(r1)^2 + conj(G2) r2^2 with G1 = sum_k conj(V_k) g_k and
            # G2 = sum_k V_k g_k (k = pair (a, b)), i.e. gw = sum_k conj(V_k) U_k with
            # U = g conj(r1^2) + conj(g) r2^2: gV's formula with E (M built from r^2, same
            # block layout) in place of M. One (H, K, 2Lf) @ (H, 2Lf, 2N) GEMM and small
            # (H, K, 2N) products instead of the (H, 2N, 2Lf) matrix X^T g and three
            # elementwise passes over it
            E = _cauchy_real(z, w, square=True)
            U = torch.bmm(gout, E.transpose(1, 2))  # (H, K, 2N): [Re U, Im U]
            re = (X * U).sum(1)  # Re conj(V) U = Re V Re U + Im V Im U
            im = (X[..., :N] * U[..., N:]).sum(1) - (X[..., N:] * U[..., :N]).sum(1)
            gw = torch.complex(re[:, :N] + re[:, N:], im)
        return gB, gC, None, gw, None


def cauchy_outer(Bs: Tensor, Cs: Tensor, z: Tensor, w: Tensor,
                 dt: Optional[Tensor] = None) -> Tensor:
    """Cauchy products of all pairs ``v = Bs[a] * Cs[b]`` (the S4 DPLR batch):
    ``r[h, a, b, l] = sum_n v / (z_l - w_hn) + conj(v) / (z_l - conj(w_hn))``.

    Bs (A, N) (shared over H) or (H, A, N); Cs (H, Bc, N); z (Lf,) constant; w (H, N).
    ``dt`` (H,) real, optional: Cs stands for ``dt[:, None, None] * Cs`` (S4's dt [C; Q]);
    the compiled kernel applies it in registers, so that operand and its backward never
    exist in memory (and a transposed contiguous Cs is read in place). Returns (H, A, Bc, Lf).
    """
    fused = _fused(Bs, Cs, z, w)
    if dt is not None and not (fused and dt.dtype == torch.float64):
        Cs, dt = Cs * dt[:, None, None], None  # the PyTorch path's operand
    Bs, w = Bs.contiguous(), w.contiguous()
    if not (fused and Cs.transpose(0, 1).is_contiguous()):
        Cs = Cs.contiguous()
    grads = [t.requires_grad for t in (Bs, Cs, w)] + [dt is not None and dt.requires_grad]
    if torch.is_grad_enabled() and any(grads):
        return _CauchyOuter.apply(Bs, Cs, z, w, dt)
    if fused:  # one pass, no (H, 2N, 2Lf) matrix M
        return cauchy_cpu.cauchy_fwd(Bs, Cs, z, w, dt)
    return _from_real(torch.bmm(_pairs(Bs, Cs), _cauchy_real(z, w)),
                      (Cs.shape[0], Bs.shape[-2], Cs.shape[1], z.shape[-1]))


class _DPLRSpectrum(torch.autograd.Function):
    """Spectra (ch, K*H, Lf) of K rank-1 DPLR kernels from ``Bs = [B; P]`` (K, 2, N),
    poles A (K, N), steps dt (K, H), nodes z and bilinear factors F (Lf,), and the K C
    parameters as stored (:func:`mmssm.ops.cauchy_cpu.dplr_fwd`): the Cauchy products,
    Woodbury step and bilinear factor of :meth:`SSMKernelDPLR.batched` in one compiled pass,
    and the gradients of all of them in one more. Only the products r (K*H, Lf, 2(ch+1))
    are kept for the backward."""

    @staticmethod
    def forward(ctx, Bs: Tensor, A: Tensor, dt: Tensor, z: Tensor, F: Tensor,
                *Cs: Tensor) -> Tensor:
        k_f, r = cauchy_cpu.dplr_fwd(Bs, A, dt, z, F, Cs)
        ctx.save_for_backward(Bs, A, dt, z, F, r, *Cs)
        return k_f

    @staticmethod
    def backward(ctx, g: Tensor):
        Bs, A, dt, z, F, r, *Cs = ctx.saved_tensors
        gBs, gA, gdt, gCs = cauchy_cpu.dplr_bwd(Bs, A, dt, z, F, Cs, r, g)
        return (gBs, gA, gdt, None, None, *gCs)


def _fused(Bs: Tensor, Cs: Tensor, z: Tensor, w: Tensor) -> bool:
    """Whether :func:`cauchy_outer` runs the compiled kernel (complex128 CPU operands)."""
    return (all(t.dtype == torch.complex128 for t in (Bs, Cs, z, w))
            and cauchy_cpu.usable(Bs, Cs, z, w))


# ----------------------------------------------------------------------------- kernels

# CUDA devices (major, minor) whose fp64 runs at 1/2 (or 1/3) of the fp32 rate: the
# data-centre parts (P100, V100, A100, H100/H200, B200). Elsewhere fp64 is 1/32-1/64 rate.
_FAST_FP64_CUDA = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def kernel_work_dtype(param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Real dtype in which SSM kernels are generated from ``param_dtype`` parameters.

    Kernel generation is batch independent and small (H x N x L), but ill-conditioned
    (near-zero Re(A) of the 'fourier' init, Woodbury correction, bilinear factor): in fp32
    it loses up to ~1e-4 relative. So it runs in float64 on CPU always and on CUDA devices
    with fast fp64, and the kernel is cast back to ``param_dtype`` once.
    """
    if param_dtype == torch.float64 or device.type == 'cpu':
        return torch.float64
    if device.type == 'cuda' and torch.cuda.get_device_capability(device) in _FAST_FP64_CUDA:
        return torch.float64
    return torch.float32


@lru_cache(maxsize=64)
def _bilinear_nodes(n: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Roots of unity omega^k (k <= n/2) and their bilinear pre-images z = 2(1-w)/(1+w).

    omega^k is the k-th power of a complex base in the kernel's complex dtype (the
    official arithmetic; keeps checkpoints' outputs within ~1e-6 relative of the official
    ones). Constants, so cached per (n, dtype, device).
    """
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    base = torch.tensor(np.exp(-2j * np.pi / n), dtype=cdtype, device=device)
    omega = base ** torch.arange(n // 2 + 1, device=device).to(cdtype)
    return 2 * (1 - omega) / (1 + omega), omega


class SSMKernelDiag(nn.Module):
    """S4D kernel: diagonal A, kernel by a Vandermonde product.

    Args:
        d_model: H, number of independent SSMs (one per feature).
        d_state: N, state size (N/2 conjugate pairs are stored).
        l_max: default kernel length (used when ``forward`` gets no L).
        channels: output "heads" per SSM: C is (channels, H, N/2).
        dt_min, dt_max: log-uniform init range of the step size.
        dt_tie: one dt per feature (H, 1) instead of (H, N/2).
        dt_transform: parameterisation of dt ('exp': ``inv_dt = log dt``).
        rank: rank of P (DPLR only; ignored here but used by init).
        n_ssm: number of trainable (A, B) copies shared across H (None = H). Must divide H.
        init: see :func:`init_ssm`.
        disc: 'zoh' or 'bilinear'.
        real_transform, imag_transform: parameterisation of -Re(A) and -Im(A).
        bandlimit: None, or the fraction of Nyquist above which modes are masked.
        lr, wd: optimizer hints attached to the SSM parameters as ``param._optim``
            (``lr=0.0`` stores them as buffers, as the official code does).
    """

    def __init__(self, d_model: int, d_state: int = 64, l_max: Optional[int] = None,
                 channels: int = 1, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_tie: bool = True, dt_transform: str = 'exp', rank: int = 1,
                 n_ssm: Optional[int] = None, init: str = 'legs', disc: str = 'zoh',
                 real_transform: str = 'exp', imag_transform: str = 'none',
                 bandlimit: Optional[float] = None,
                 lr: Union[None, float, Dict[str, float]] = None,
                 wd: Union[None, float, Dict[str, float]] = 0.0):
        super().__init__()
        if disc not in ('zoh', 'bilinear'):
            raise ValueError(f"disc must be 'zoh' or 'bilinear', got {disc!r}")
        for name, t in (('dt_transform', dt_transform), ('real_transform', real_transform),
                        ('imag_transform', imag_transform)):
            if t not in _TRANSFORMS:
                raise ValueError(f'{name} must be one of {_TRANSFORMS}, got {t!r}')
        if d_state % 2:
            raise ValueError(f'd_state must be even (conjugate pairs), got {d_state}')
        self.H, self.N, self.l_max, self.channels = d_model, d_state // 2, l_max, channels
        self.n_ssm = d_model if n_ssm is None else n_ssm
        if d_model % self.n_ssm:
            raise ValueError(f'n_ssm={self.n_ssm} must divide d_model={d_model}')
        self.rank, self.disc, self.bandlimit = rank, disc, bandlimit
        self.dt_transform, self.real_transform = dt_transform, real_transform
        self.imag_transform = imag_transform
        self._lr = lr if isinstance(lr, dict) else {k: lr for k in ('dt', 'A', 'B', 'C')}
        self._wd = wd if isinstance(wd, dict) else {k: wd for k in ('dt', 'A', 'B', 'C')}
        self._lr = {k: self._lr.get(k) for k in ('dt', 'A', 'B', 'C')}
        self._wd = {k: self._wd.get(k) for k in ('dt', 'A', 'B', 'C')}

        shape = (self.H, 1) if dt_tie else (self.H, self.N)
        log_dt = torch.rand(*shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        inv_dt = _inv_transform(log_dt.exp(), dt_transform)
        A, P, B = init_ssm(init, d_state, rank, self.n_ssm)
        C = torch.randn(channels, self.H, self.N, dtype=torch.cfloat)
        self._register('inv_dt', inv_dt, 'dt')
        self._register('C', torch.view_as_real(C).contiguous(), 'C', wd=None)
        self._register('B', torch.view_as_real(B.to(torch.cfloat))[None].contiguous(), 'B')
        self._register('A_real', _inv_transform(-A.real.float(), real_transform), 'A')
        self._register('A_imag', _inv_transform(-A.imag.float(), imag_transform), 'A')
        self._init_extra(P)

    def _init_extra(self, P: Tensor) -> None:
        """Hook for DPLR (P is ignored by the diagonal kernel)."""

    def _register(self, name: str, t: Tensor, group: str, wd: Optional[float] = -1.0) -> None:
        """Parameter with the official ``_optim`` hints, or a buffer when its lr is 0."""
        lr = self._lr[group]
        wd = self._wd[group] if wd == -1.0 else wd
        if lr == 0.0:
            self.register_buffer(name, t)
            return
        p = nn.Parameter(t)
        optim = {}
        if lr is not None:
            optim['lr'] = lr
        if wd is not None:
            optim['weight_decay'] = wd
        p._optim = optim
        self.register_parameter(name, p)

    # -- parameters -------------------------------------------------------------------
    def _repeat(self, x: Tensor, dim: int, expand: bool = True) -> Tensor:
        """Tile n_ssm copies up to H along ``dim`` ('(v t)' order, as official).

        With ``expand=False`` a single copy (n_ssm == 1) is left to broadcast.
        """
        if (not expand and x.shape[dim] == 1) or x.shape[dim] == self.H:
            return x  # one copy per channel already (n_ssm = H): no repeat copy
        reps = [1] * x.dim()
        reps[dim] = self.H // x.shape[dim]
        return x.repeat(*reps)

    def _cast(self, t: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
        return t if dtype is None else t.to(dtype)

    def get_params(self, rate: float = 1.0, expand: bool = True,
                   dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Continuous parameters: dt (H, 1|N), A (H, N), B (1, H, N), C (channels, H, N).

        ``expand=False`` keeps A/B (and P) with a size-1 SSM axis when n_ssm == 1.
        ``dtype``: real dtype the stored parameters are cast to first (None: as stored).
        """
        A = (-_param_transform(self._cast(self.A_real, dtype), self.real_transform)
             - 1j * _param_transform(self._cast(self.A_imag, dtype), self.imag_transform))
        B = torch.view_as_complex(self._cast(self.B, dtype))
        C = torch.view_as_complex(self._cast(self.C, dtype))
        dt = _param_transform(self._cast(self.inv_dt, dtype), self.dt_transform) * rate
        if self.bandlimit is not None:
            freqs = dt / rate * A.imag.abs() / (2 * math.pi)  # cycles/sample at rate 1
            C = C * (freqs < self.bandlimit * 0.5).to(C.real.dtype)
        return dt, self._repeat(A, 0, expand), self._repeat(B, 1, expand), C

    # -- convolution view --------------------------------------------------------------
    def forward(self, L: Optional[int] = None, rate: float = 1.0) -> Tensor:
        """Kernel (channels, H, L) at sampling ``rate``."""
        if L is None:
            if self.l_max is None:
                raise ValueError('L must be given when the kernel was built with l_max=None')
            L = round(self.l_max / rate)
        out_dtype = self.C.dtype
        dt, A, B, C = self.get_params(rate, expand=False,
                                      dtype=kernel_work_dtype(out_dtype, self.C.device))
        dtA = dt * A  # (H, N)
        BC = B * C  # (channels, H, N)
        if self.disc == 'zoh':
            return vandermonde(BC * torch.expm1(dtA) / A, dtA, L).to(out_dtype)
        dA = (1 + dtA / 2) / (1 - dtA / 2)
        return vandermonde(BC * dt / (1 - dtA / 2), dA.log(), L).to(out_dtype)

    # -- recurrent view ----------------------------------------------------------------
    @torch.no_grad()
    def setup_step(self) -> None:
        """Cache the discrete diagonal system (rate 1) for :meth:`step`."""
        dt, A, B, C = self.get_params()
        dtA = dt * A
        if self.disc == 'zoh':
            self.dA, self.dB = dtA.exp(), (B * torch.expm1(dtA) / A)[0]
        else:
            self.dA = (1 + dtA / 2) / (1 - dtA / 2)
            self.dB = (B * dt / (1 - dtA / 2))[0]
        self.dC = C

    def default_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.H, self.N, dtype=torch.cfloat, device=self.C.device)

    def step(self, u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One step: u (B, H) -> y (B, channels, H), new state (B, H, N/2)."""
        state = self.dA * state + self.dB * u.unsqueeze(-1)
        y = 2 * torch.einsum('chn,bhn->bch', self.dC, state).real
        return y, state


class SSMKernelDPLR(SSMKernelDiag):
    """S4 kernel: diagonal-plus-low-rank A = diag(A) - P P^*, bilinear discretisation.

    The kernel is evaluated in frequency space at ``discrete_L`` roots of unity by a Cauchy
    product with a Woodbury correction for P, then inverse-FFT'd. ``C`` holds
    ``C~ = C (I - dA^l_kernel)``; see the module docstring. Same arguments as
    :class:`SSMKernelDiag` (``disc`` is always bilinear here). Default init 'legs'.
    """

    # complex elements per block of channels in the C -> C~ conversion (0.5 MB of
    # complex64 per (block, 2N, 2N) matrix power). The conversion runs inside a fresh
    # model's first forward, where its temporaries add to the peak memory; smaller blocks
    # give identical values (per-channel arithmetic); 1 << 16 was as fast as 1 << 18 at
    # H = 768 and cut ConvNeXt-S4ND-T's first-forward peak by ~9 MB (1 << 14: 2x slower)
    attune_block = 1 << 16
    # largest H * N * (n/2 + 1) of one batched Cauchy product (see :meth:`batched`)
    batch_elements = 1 << 16
    # without autograd (the inference cache, built in a model's first forward) the Cauchy
    # products run in blocks of channels of at most this many H * N * (n/2 + 1) entries:
    # their float64 temporaries (~3 MB a layer at ConvNeXt-S4ND-T's widest) were most of
    # that forward's extra peak; per-channel arithmetic, so the values are the same
    infer_block = 1 << 13

    def _init_extra(self, P: Tensor) -> None:
        self._register('P', torch.view_as_real(P.to(torch.cfloat)).contiguous(), 'A')
        self.register_buffer('l_kernel', torch.tensor(0))

    def get_params(self, rate: float = 1.0, expand: bool = True,
                   dtype: Optional[torch.dtype] = None):
        dt, A, B, C = super().get_params(rate, expand, dtype)
        P = self._repeat(torch.view_as_complex(self._cast(self.P, dtype)), 1, expand)  # (R, H, N)
        return dt, A, B, C, P

    @torch.no_grad()
    def dense_system(self, dtype=torch.complex128) -> Tuple[Tensor, Tensor]:
        """Bilinear dA (H, 2N, 2N), dB (H, 2N) of the full (conjugate-expanded) state at rate 1."""
        dt, A, B, _, P = self.get_params()
        dt, A, B, P = dt.to(dtype), A.to(dtype), B.to(dtype), P.to(dtype)
        Pc = _conj(P)  # (R, H, 2N)
        Af = torch.diag_embed(_conj(A)) - torch.einsum('rhn,rhm->hnm', Pc, Pc.conj())
        eye = torch.eye(2 * self.N, dtype=dtype, device=A.device)
        if dt.shape[-1] != 1:
            raise ValueError('the dense DPLR recurrence needs dt_tie=True')
        h = dt  # (H, 1)
        back = eye - h[:, :, None] / 2 * Af
        dA = torch.linalg.solve(back, eye + h[:, :, None] / 2 * Af)
        dB = torch.linalg.solve(back, h * _conj(B[0]))
        return dA, dB

    @torch.no_grad()
    def _linear_step_dA(self, hs: slice = slice(None)) -> Tensor:
        """Bilinear dA (H, 2N, 2N) in complex64 (channels ``hs`` only), evaluated column by
        column with the O(N) Woodbury step (the official ``_setup_state`` arithmetic).

        Used for the C -> C~ conversion so that lazily converted weights agree with the
        official ones to float32 round-off: with near-zero Re(A) (the 'fourier' init) the
        kernel is very sensitive to C~, and a different (even more exact) evaluation order
        shifts outputs by ~1e-4 relative.
        """
        dt, A, _, _, P = self.get_params()
        dt, A, P = dt.detach()[hs], A.detach()[hs], P.detach()[:, hs]
        Q = P.conj()
        D = 1.0 / (2.0 / dt - A)  # (H, N)
        R = (torch.eye(self.rank, device=A.device)
             + 2 * torch.einsum('rhn,hn,shn->hrs', Q, D, P).real).to(Q.dtype)
        QD = (Q * D).permute(1, 0, 2)  # (H, R, N)
        Rs = torch.linalg.solve(R, QD).permute(1, 0, 2)  # (R, H, N)
        D, E, Rs, P, Q = (_conj(t) for t in (D, 2.0 / dt + A, Rs, P, Q))
        state = torch.eye(2 * self.N, dtype=Q.dtype, device=Q.device).unsqueeze(1)  # (2N, 1, 2N)
        low_rank = lambda p, q, x: torch.einsum('rhn,rhm,...hm->...hn', p, q, x)  # noqa: E731
        x = E * state - low_rank(P, Q, state)
        x = D * (x - low_rank(P, Rs, x))
        return x.permute(1, 2, 0)  # column n of dA = image of e_n

    @staticmethod
    def _binary_power(M: Tensor, L: int) -> Tensor:
        """M^L by repeated squaring, multiplying from the left (official order)."""
        out = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)
        while True:
            if L % 2:
                out = M @ out
            L //= 2
            if L == 0:
                return out
            M = M @ M

    @torch.no_grad()
    def _setup_C(self, L: int) -> None:
        """Attune C~ to length L (from raw C when l_kernel == 0, else double l_kernel)."""
        lk = int(self.l_kernel.item())
        if lk == 0:
            double = False
        elif L > lk:
            double, L = True, lk
        else:
            return
        C = _conj(torch.view_as_complex(self.C))  # (ch, H, 2N)
        # blocks of channels: the dense (H, 2N, 2N) powers of a wide layer would otherwise
        # be the largest allocation of a model's first forward (same values per channel)
        step = max(1, self.attune_block // (4 * self.N * self.N))  # (step, 2N, 2N) matrices
        prod = torch.cat([
            torch.einsum('chn,hnm->chm', C[:, h:h + step],
                         self._binary_power(self._linear_step_dA(slice(h, h + step)), L))
            for h in range(0, self.H, step)], 1)  # C dA^L
        C = C + prod if double else C - prod  # (I + dA^L) doubles the attuned length
        self.C.copy_(torch.view_as_real(C[..., :self.N]))
        self.l_kernel.fill_(2 * lk if double else lk + L)

    def _attune(self, L: Optional[int], rate: float) -> Tuple[int, int]:
        """Attune C~ (lazily) to cover ``L`` at ``rate``; returns (L, n FFT nodes)."""
        if int(self.l_kernel.item()) == 0 and self.l_max is not None and self.l_max > 0:
            self._setup_C(self.l_max)
        if L is None:
            L = round(int(self.l_kernel.item()) / rate)
        while round(rate * L) > int(self.l_kernel.item()):  # grow the attuned length
            self._setup_C(round(rate * L))
        return L, round(int(self.l_kernel.item()) / rate)

    def _cauchy_args(self, rate: float, dtype: Optional[torch.dtype] = None,
                     defer_dt: bool = False) -> Union[Tuple[Tensor, Tensor, Tensor],
                                                      Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Operands of :func:`cauchy_outer`: Bs = [B; P] ((1+R, N) if shared, else
        (H, 1+R, N)), Cs = dt [C; P^*] (H, ch+R, N) and the poles w = dt A (H, N), from the
        parameters cast to the real ``dtype``.

        ``defer_dt=True`` with a tied dt (one step per channel) returns ``(Bs, Cs, w, dt)``
        with Cs = [C; P^*] unscaled and dt (H,), for :func:`cauchy_outer`'s ``dt``.
        """
        # A/B/P broadcast if n_ssm == 1
        dt, A, B, C, P = self.get_params(rate, expand=False, dtype=dtype)
        Bs = torch.cat([B, P], 0)  # (1+R, S, N), S = 1 (shared) or H
        Cs = torch.cat([C, P.conj().expand(-1, C.shape[1], -1)], 0)  # (ch+R, H, N)
        Bs = Bs[:, 0] if Bs.shape[1] == 1 else self._repeat(Bs, 1).transpose(0, 1)
        w = (A * dt).expand(self.H, -1)
        if defer_dt and dt.shape[-1] == 1:
            return Bs, Cs.transpose(0, 1), w, dt.reshape(self.H)
        return Bs, (Cs * dt).transpose(0, 1), w

    @staticmethod
    def _stackable(ks: Sequence['SSMKernelDPLR']) -> bool:
        """Whether kernels share one configuration, so that :meth:`_stacked_cauchy_args`
        can transform their stacked parameters at once: same H, N, rank, channels,
        transforms and parameter shapes, ``n_ssm`` 1 or H, no bandlimit."""
        k0 = ks[0]
        names = ('inv_dt', 'A_real', 'A_imag', 'B', 'C', 'P')

        def conf(k: 'SSMKernelDPLR') -> tuple:
            return (type(k), k.H, k.N, k.rank, k.channels, k.n_ssm, k.dt_transform,
                    k.real_transform, k.imag_transform, k.bandlimit,
                    tuple((getattr(k, n).shape, getattr(k, n).dtype) for n in names))
        return (k0.bandlimit is None and k0.n_ssm in (1, k0.H)
                and all(conf(k) == conf(k0) for k in ks[1:]))

    @staticmethod
    def _stacked_cauchy_args(ks: Sequence['SSMKernelDPLR'], rate: float,
                             dtype: Optional[torch.dtype] = None, defer_dt: bool = False
                             ) -> Union[Tuple[Tensor, Tensor, Tensor],
                                        Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:meth:`_cauchy_args` of K :meth:`_stackable` kernels, concatenated along H:
        Bs (K, 1+R, N) (one shared Bs per kernel, n_ssm = 1) or (K*H, 1+R, N) (n_ssm = H),
        Cs (K*H, ch+R, N), w (K*H, N).

        ``defer_dt=True`` with a tied dt (one step per channel) returns
        ``(Bs, Cs, w, dt)`` instead: Cs = [C; P^*] not yet scaled by dt, as a (K, H, ch+R,
        N) transposed view of a contiguous (K, ch+R, H, N) tensor (no transposing copy),
        and dt (K, H), for :func:`cauchy_outer`'s ``dt`` (the compiled kernel scales in
        registers: neither the product nor its backward is made in memory).

        The same arithmetic on the parameters stacked along a new K axis: one cast,
        transform and product per parameter instead of K (a training step regenerates
        the kernels of every layer, and these ~20 tiny ops + their backward cost
        ~10-20 us each per call on CPU).
        """
        k0, K = ks[0], len(ks)
        H, N = k0.H, k0.N
        A, B, P, dt = SSMKernelDPLR._stacked_params(ks, rate, dtype)
        C = torch.view_as_complex(k0._cast(torch.stack([k.C for k in ks]), dtype))
        # A (K, S, N), B (K, 1, S, N), C (K, ch, H, N), P (K, R, S, N), dt (K, H, 1|N)
        Bs = torch.cat([B, P], 1)  # (K, 1+R, S, N), S = 1 (shared) or H
        Bs = Bs[:, :, 0] if Bs.shape[2] == 1 else Bs.transpose(1, 2).reshape(K * H, -1, N)
        Cs = torch.cat([C, P.conj().expand(-1, -1, H, -1)], 1)  # (K, ch+R, H, N)
        w = (A * dt).reshape(K * H, N)
        if defer_dt and dt.shape[-1] == 1:
            return Bs, Cs.transpose(1, 2), w, dt.reshape(K, H)
        Cs = (Cs * dt.unsqueeze(1)).transpose(1, 2).reshape(K * H, -1, N)
        return Bs, Cs, w

    @staticmethod
    def _stacked_params(ks: Sequence['SSMKernelDPLR'], rate: float,
                        dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """A (K, S, N), B (K, 1, S, N), P (K, R, S, N) complex and dt (K, H, 1|N) real of K
        :meth:`_stackable` kernels: their parameters stacked along a new K axis, then one
        cast and transform each (as :meth:`get_params`, without its H expansion)."""
        k0 = ks[0]

        def stacked(name: str) -> Tensor:
            return k0._cast(torch.stack([getattr(k, name) for k in ks]), dtype)

        A = (-_param_transform(stacked('A_real'), k0.real_transform)
             - 1j * _param_transform(stacked('A_imag'), k0.imag_transform))
        dt = _param_transform(stacked('inv_dt'), k0.dt_transform) * rate
        return (A, torch.view_as_complex(stacked('B')), torch.view_as_complex(stacked('P')),
                dt)

    @staticmethod
    def _spectrum_op_takes(k: 'SSMKernelDPLR', work: torch.dtype) -> bool:
        """Whether the compiled rank-1 spectrum op (:class:`_DPLRSpectrum`) can compute
        kernel ``k``: float64 work on CPU, one shared SSM (n_ssm = 1), a tied dt, rank 1,
        1 or 2 channels, no bandlimit, and no tracing, compiling or dispatch mode (FLOP
        counting) that must see PyTorch ops. A group of such kernels takes it if they are
        also :meth:`_stackable`."""
        return (work == torch.float64 and k.rank == 1 and k.n_ssm == 1
                and k.bandlimit is None and k.inv_dt.shape[-1] == 1
                and k.C.shape[0] in (1, 2) and k.C.dtype in (torch.float32, torch.float64)
                and cauchy_cpu.dplr_available() and cauchy_cpu.usable()
                and all(type(t) in (Tensor, nn.Parameter) and t.device.type == 'cpu'
                        for t in k.parameters()))

    @staticmethod
    def _fused_spectrum(ks: Sequence['SSMKernelDPLR'], rate: float, z: Tensor,
                        omega: Tensor) -> Tensor:
        """Spectra (ch, K*H, Lf) complex128 of :meth:`_spectrum_op_takes` kernels: the
        Cauchy products, Woodbury step and bilinear factor in one compiled pass each way
        (:class:`_DPLRSpectrum`), C read as stored."""
        A, B, P, dt = SSMKernelDPLR._stacked_params(ks, rate, torch.float64)
        Bs = torch.cat([B, P], 1)[:, :, 0]  # (K, 2, N): [B; P] of each kernel
        A, dt, F = A[:, 0], dt[..., 0], 2 / (1 + omega)  # (K, N), (K, H), (Lf,)
        Cs = [k.C for k in ks]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (Bs, A, dt, *Cs)):
            return _DPLRSpectrum.apply(Bs, A, dt, z, F, *Cs)
        return cauchy_cpu.dplr_fwd(Bs, A, dt, z, F, Cs)[0]

    @staticmethod
    def _to_time(k_f: Tensor, n: int, L: int) -> Tensor:
        """Kernel (ch, H, L) from its spectrum (ch, H, n/2+1) at the n roots of unity."""
        K = torch.fft.irfft(k_f, n=n)
        if K.shape[-1] > L:
            K = K[..., :L]
        elif K.shape[-1] < L:  # rounding corner case: pad the tail with zeros
            K = F.pad(K, (0, L - K.shape[-1]))
        return K

    def _kernel_from_cauchy(self, r: Tensor, omega: Tensor, n: int, L: int) -> Tensor:
        """Woodbury correction, bilinear factor and inverse FFT of the Cauchy products
        r (H, 1+R, ch+R, Lf) -> kernel (ch, H, L)."""
        R = self.rank
        if R == 1:  # Woodbury: k = r00 - r01 r10 / (1 + r11)
            # unbind/split views: one backward node each, where every slice of r would
            # allocate and fill a zero gradient of r's size in the backward
            r0, r1 = r.unbind(1)  # (H, ch+1, Lf)
            (r00, r01), (r10, r11) = (t.split([t.shape[1] - 1, 1], 1) for t in (r0, r1))
            # r01 / (1 + r11) first: the complex division (slow in ATen; its backward has
            # two more) on (H, 1, Lf) instead of (H, ch, Lf)
            k_f = (r00 - r01 / (1 + r11) * r10).transpose(0, 1)  # (ch, H, Lf)
        else:
            r11 = r[:, -R:, -R:].permute(0, 3, 1, 2)  # (H, Lf, R, R)
            eye = torch.eye(R, dtype=r.dtype, device=r.device)
            inv = torch.linalg.inv(eye + r11).permute(0, 2, 3, 1)  # (H, R, R, Lf)
            k_f = r[:, :-R, :-R] - torch.einsum('hijl,hjkl,hkml->himl', r[:, :-R, -R:], inv,
                                                r[:, -R:, :-R])
            k_f = k_f[:, 0].transpose(0, 1)  # (ch, H, Lf)
        k_f = k_f * 2 / (1 + omega)  # bilinear-transform correction
        return self._to_time(k_f, n, L)

    def forward(self, L: Optional[int] = None, rate: float = 1.0) -> Tensor:
        return self.batched([self], [L], rate)[0]

    @staticmethod
    def _cauchy_group(ks: Sequence['SSMKernelDPLR'], L: int, n: int, rate: float,
                      work: torch.dtype, z: Tensor, omega: Tensor) -> List[Tensor]:
        """Kernels (ch, sum H, L) of one :meth:`batched` group through Cauchy products
        (:func:`cauchy_outer`) and :meth:`_kernel_from_cauchy`, as blocks of channels."""
        shared = None  # one (1+R, N) Bs per kernel of a stacked group
        dts = None  # dt left to the Cauchy calls: (H,), or a (H,) per shared Bs
        if len(ks) == 1:  # dt (tied) applied by the Cauchy call
            Bs, Cs, w, *dt = ks[0]._cauchy_args(rate, work, defer_dt=True)
            dts = dt[0] if dt else None
        elif SSMKernelDPLR._stackable(ks):
            Bs, Cs, w, *dt = SSMKernelDPLR._stacked_cauchy_args(ks, rate, work,
                                                                defer_dt=True)
            if Bs.shape[0] == len(ks) < w.shape[0]:  # n_ssm = 1: a shared Bs per kernel
                shared = Bs.unbind(0)
                # tied dt: each Cauchy call scales its Cs (K, H, ch+R, N) by dt itself
                # (in registers when compiled: no dt [C; Q] operand, nor its backward)
                dts = dt[0].unbind(0) if dt else None
            elif dt:  # per-channel Bs: scaled here, as without defer_dt
                Cs = (Cs * dt[0][..., None, None]).reshape(w.shape[0], -1, Cs.shape[-1])
        else:  # a shared (1+R, N) Bs is expanded to its kernel's H rows
            args = [k._cauchy_args(rate, work) for k in ks]
            Bs = torch.cat([a[0].expand(k.H, *a[0].shape[-2:]) for a, k in zip(args, ks)])
            Cs, w = (torch.cat([a[j] for a in args]) for j in (1, 2))
        # all (B|P) x (C|Q) Cauchy products, H-major: (sum H, 1+R, ch+R, Lf), then the
        # kernels (ch, sum H, L); blocks of channels when nothing needs a gradient
        # and the PyTorch Cauchy product builds its (H, 2N, 2Lf) matrices (the compiled
        # one keeps no temporaries larger than its (H, 1+R, ch+R, Lf) output)
        H = w.shape[0]  # (Cs may be (K, H, ch+R, N) here)
        step = H if torch.is_grad_enabled() or _fused(Bs, Cs, z, w) else max(
            1, SSMKernelDPLR.infer_block // (Cs.shape[-1] * z.shape[-1]))
        # (no slicing of a single block: a full slice still costs a SliceBackward)
        block = lambda t, h: t if step >= H else t[h:h + step]  # noqa: E731
        if shared is not None:
            # one Cauchy call per kernel with its shared Bs: Bs expanded to every
            # channel would be saved for the backward (~15 MB for ConvNeXt-S4ND-T's
            # training step). split, not slices: each slice's backward would fill a
            # zero gradient of the whole operand
            hs = [k.H for k in ks]
            # with dts, Cs is (K, H, ch+R, N): unbind, no slices (see above)
            cs = Cs.split(hs) if dts is None else Cs.unbind(0)
            r = torch.cat([cauchy_outer(b, c, z, w_k, dt_k) for b, c, w_k, dt_k in zip(
                shared, cs, w.split(hs), [None] * len(ks) if dts is None else dts)])
            parts = [ks[0]._kernel_from_cauchy(r, omega, n, L)]
        else:
            parts = [
                ks[0]._kernel_from_cauchy(
                    cauchy_outer(Bs if Bs.dim() == 2 else block(Bs, h), block(Cs, h), z,
                                 block(w, h), None if dts is None else block(dts, h)),
                    omega, n, L)
                for h in range(0, H, step)]
        return parts

    @staticmethod
    def batched(kernels: Sequence['SSMKernelDPLR'], lengths: Sequence[Optional[int]],
                rate: float = 1.0, max_elements: Optional[int] = None) -> List[Tensor]:
        """``[k(L=l, rate=rate) for k, l in zip(kernels, lengths)]``, with one Cauchy
        product per group of kernels that share (n, rank, channels, N).

        S4ND uses it to compute the per-axis kernels of a layer stacked along H: on CPU
        a small layer's kernel generation is largely per-op overhead (H=8 costs ~1/3 of
        H=768 at L=7), while large ones run faster separately; groups are capped at
        ``max_elements`` (default ``batch_elements``) Cauchy entries. Kernels of one
        configuration (:meth:`_stackable`) also share their parameter transforms
        (:meth:`_stacked_cauchy_args`). Groups the compiled spectrum op can compute
        (:meth:`_spectrum_op_takes`) are one call of it, uncapped; the others go through
        :meth:`_cauchy_group`. Same values as separate calls (to float64 round-off).
        """
        cap = SSMKernelDPLR.batch_elements if max_elements is None else max_elements
        out: List[Optional[Tensor]] = [None] * len(kernels)
        groups: Dict[tuple, list] = {}
        size: Dict[tuple, int] = {}
        for i, (k, l) in enumerate(zip(kernels, lengths)):
            L, n = k._attune(l, rate)
            key = (n, k.rank, k.channels, k.N, k.C.dtype, k.C.device)
            # the compiled spectrum op keeps no temporaries that grow with a group: its
            # kernels group without a cap (one call per configuration and length)
            fused = SSMKernelDPLR._spectrum_op_takes(
                k, kernel_work_dtype(k.C.dtype, k.C.device))
            if fused:
                key = key + ('spectrum', k.H)
            # otherwise a group grows while its Cauchy matrices stay small: past that,
            # separate calls are faster (measured 1.15-1.8x per axis at the ConvNeXt-S4ND-T
            # layer shapes, float64), as the working set of the elementwise passes leaves
            # the cache
            elems = k.H * k.N * (n // 2 + 1)
            if key in groups and size[key] + elems > cap and not fused:
                key = key + (i,)  # start a new group
            groups.setdefault(key, []).append((i, k, L))
            size[key] = size.get(key, 0) + elems
        for (n, _, _, _, dtype, device, *rest), members in groups.items():
            idx, ks, Ls = zip(*members)
            work = kernel_work_dtype(dtype, device)  # float64 on CPU: cast once at the end
            z, omega = _bilinear_nodes(n, work, device)
            if 'spectrum' in rest and (len(ks) == 1 or SSMKernelDPLR._stackable(ks)):
                # compiled, from the parameters
                parts = [SSMKernelDPLR._to_time(
                    SSMKernelDPLR._fused_spectrum(ks, rate, z, omega), n, max(Ls))]
            else:
                parts = SSMKernelDPLR._cauchy_group(ks, max(Ls), n, rate, work, z, omega)
            # one block (always with autograd): no concatenation copy
            K = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).to(dtype)
            for i, K_i, L in zip(idx, K.split([k.H for k in ks], dim=1), Ls):
                out[i] = K_i if K_i.shape[-1] == L else K_i[..., :L]
        return out

    @torch.no_grad()
    def setup_step(self) -> None:
        """Dense recurrence x' = dA x + dB u, y = Re(C x) at rate 1, with the raw C recovered."""
        dA, dB = self.dense_system()
        C = _conj(torch.view_as_complex(self.C).to(dA.dtype))
        lk = int(self.l_kernel.item())
        if lk > 0:  # C = C~ (I - dA^L)^{-1}
            eye = torch.eye(dA.shape[-1], dtype=dA.dtype, device=dA.device)
            M = eye - torch.linalg.matrix_power(dA, lk)
            C = torch.linalg.solve(M.transpose(-1, -2)[None], C.unsqueeze(-1)).squeeze(-1)
        self.dA, self.dB, self.dC = dA, dB, C

    def default_state(self, batch: int) -> Tensor:
        return torch.zeros(batch, self.H, 2 * self.N, dtype=torch.complex128,
                           device=self.C.device)

    def step(self, u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One step: u (B, H) -> y (B, channels, H), state (B, H, N) (full, complex128)."""
        state = torch.einsum('hnm,bhm->bhn', self.dA, state) + self.dB * u.unsqueeze(-1)
        y = torch.einsum('chn,bhn->bch', self.dC, state).real
        return y.to(u.dtype), state



@torch.no_grad()
def attune_kernels(module: nn.Module) -> None:
    """Run the lazy C -> C~ conversion of every fresh DPLR kernel in ``module`` now.

    It otherwise happens inside the first forward (as in the official code), where a FLOP
    counter or profiler would charge its one-time dense matrix powers to the model.
    """
    for m in module.modules():
        if isinstance(m, SSMKernelDPLR):
            m._attune(None, 1.0)  # no-op once attuned (or without l_max)

KERNELS = {'diag': SSMKernelDiag, 's4d': SSMKernelDiag, 'dplr': SSMKernelDPLR, 's4': SSMKernelDPLR}
