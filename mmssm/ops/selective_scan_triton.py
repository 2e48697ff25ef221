"""Fused selective-scan kernels in Triton (forward and backward).

Design (shared/research/performance.md §1, §8):
- One program per (batch, block of BLOCK_D channels); it streams time in
  chunks of BLOCK_L and keeps the (BLOCK_D, N) state on chip. Several channels
  per program keep the GPU busy at short vision lengths (L = 14 ... 3136);
  BLOCK_D divides the channels of a B/C group, so a program reads one B/C tile
  shared by all its channels.
- Inside a chunk the recurrence h_t = a_t h_{t-1} + b_t is a tuple
  ``tl.associative_scan`` along time on a (BLOCK_D, BLOCK_L, N) tile; the state
  is carried across chunks. softplus(delta + bias), the D skip and the silu(z)
  gate are fused; all math is fp32, I/O in the tensors' dtypes.
- Forward saves only the state at each chunk end, (b, d, n_chunks, N) fp32.
- Backward walks the chunks in reverse: it recomputes h_{t-1} from the saved
  chunk-start state (scan of the one-step-shifted inputs, so no division by
  a_t), runs the adjoint scan G_t = a_{t+1} G_{t+1} + C_t dy_t as a reverse
  associative scan carried across chunks, and forms du, ddelta, dz in place.
  dA, dD, ddelta_bias and constant-B/C grads are written per (batch, channel)
  and summed over batch by torch; input-dependent dB/dC are summed over the
  channels of the program and added into fp32 buffers with atomics (several
  programs share a group).
- Autotuning covers num_warps only (tile sizes come from a heuristic); under
  TRITON_INTERPRET=1 it collapses to one config (more needs a GPU driver).

Importing this module imports triton; launching needs CUDA tensors or
TRITON_INTERPRET=1 set before triton is first imported.
"""
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

_INTERPRET = os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')
# fp32 elements per (BLOCK_D, BLOCK_L, BLOCK_N) tile; the backward keeps ~8 such
# tiles live, so it uses half the channels (ptxas: no spills at 8 warps on sm_90)
TILE_BUDGET = 2048
TILE_BUDGET_BWD = 1024
MAX_BLOCK_L = 256  # tests lower it to force several chunks on tiny inputs


def _configs(warps=(2, 4, 8)):
    return [triton.Config({}, num_warps=w) for w in ([4] if _INTERPRET else warps)]


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    # matches torch.nn.functional.softplus (threshold 20) without overflow
    return tl.where(x > 20.0, x, tl.where(x < -20.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _load_dt(dt_ptr, base, p, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta' = softplus(delta + bias) on a (BLOCK_D, BLOCK_L) tile, 0 where masked.

    Returns (delta', raw) with raw = delta + bias (for the softplus derivative).
    """
    raw = tl.load(dt_ptr + base + p[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _load_bc(ptr, pid_b, grp, G, d_offs, p, mask_l, offs_n, mask_n, L, N,
             CONST: tl.constexpr):
    """B or C as a tile broadcastable to (BLOCK_D, BLOCK_L, BLOCK_N)."""
    # (one return: the code generator checks every return statement's type)
    if CONST:  # (d, N)
        x = tl.load(ptr + d_offs[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        x = x.to(tl.float32)[:, None, :]
    else:
        row = (pid_b * G + grp).to(tl.int64) * N
        x = tl.load(ptr + (row + offs_n[None, :]) * L + p[:, None],
                    mask=mask_l[:, None] & mask_n[None, :], other=0.0)
        x = x.to(tl.float32)[None, :, :]
    return x


@triton.autotune(configs=_configs(), key=['L', 'N', 'BLOCK_D', 'BLOCK_L'])
@triton.jit
def _fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, x_ptr,
                d, L, N, dgB, dgC, GB, GC, n_chunks,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, B_CONST: tl.constexpr, C_CONST: tl.constexpr,
                REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_n[None, :],
                other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)
    rows = (pid_b * d + offs_d).to(tl.int64)
    base = rows[:, None] * L
    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for c in range(n_chunks):
        t = c * BLOCK_L + offs_l
        mask_l = t < L
        p = L - 1 - t if REVERSE else t
        m2 = (offs_d[:, None] >= 0) & mask_l[None, :]
        u = tl.load(u_ptr + base + p[None, :], mask=m2, other=0.0).to(tl.float32)
        dt, raw = _load_dt(dt_ptr, base, p, m2, bias, HAS_BIAS, SOFTPLUS)
        Bt = _load_bc(B_ptr, pid_b, d0 // dgB, GB, offs_d, p, mask_l, offs_n, mask_n, L, N,
                      B_CONST)
        Ct = _load_bc(C_ptr, pid_b, d0 // dgC, GC, offs_d, p, mask_l, offs_n, mask_n, L, N,
                      C_CONST)
        a = tl.exp(dt[:, :, None] * A[:, None, :])
        bu = (dt * u)[:, :, None] * Bt
        aS, bS = tl.associative_scan((a, bu), axis=1, combine_fn=_combine)
        hs = bS + aS * h[:, None, :]
        y = tl.sum(hs * Ct, axis=2)
        if HAS_D:
            y += tl.load(D_ptr + offs_d).to(tl.float32)[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + base + p[None, :], mask=m2, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + base + p[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
        # padded steps are identities (dt = 0, bu = 0): the last column is the chunk-end state
        h = tl.sum(tl.where(offs_l[None, :, None] == BLOCK_L - 1, hs, 0.0), axis=1)
        tl.store(x_ptr + (rows[:, None] * n_chunks + c) * N + offs_n[None, :], h,
                 mask=mask_n[None, :])


@triton.autotune(configs=_configs((4, 8)), key=['L', 'N', 'BLOCK_D', 'BLOCK_L'],
                 reset_to_zero=['dB_ptr', 'dC_ptr'])
@triton.jit
def _bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, x_ptr, dout_ptr,
                dlast_ptr, du_ptr, ddt_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
                d, L, N, dgB, dgC, GB, GC, n_chunks,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, B_CONST: tl.constexpr, C_CONST: tl.constexpr,
                REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    d0 = pid_d * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    dn_off = offs_d[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + dn_off, mask=mask_n[None, :], other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(tl.float32)
    rows = (pid_b * d + offs_d).to(tl.int64)
    base = rows[:, None] * L
    rn_off = rows[:, None] * N + offs_n[None, :]
    gB = d0 // dgB
    gC = d0 // dgC
    # G_{t+1} entering each chunk from the right; after the last step it is dL/dh_last.
    g_carry = tl.load(dlast_ptr + rn_off, mask=mask_n[None, :], other=0.0)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dBc_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dCc_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dD_acc = tl.zeros([BLOCK_D], tl.float32)
    db_acc = tl.zeros([BLOCK_D], tl.float32)
    for ci in range(n_chunks):
        c = n_chunks - 1 - ci
        t = c * BLOCK_L + offs_l
        mask_l = t < L
        p = L - 1 - t if REVERSE else t
        m2 = (offs_d[:, None] >= 0) & mask_l[None, :]
        u = tl.load(u_ptr + base + p[None, :], mask=m2, other=0.0).to(tl.float32)
        dt, raw = _load_dt(dt_ptr, base, p, m2, bias, HAS_BIAS, SOFTPLUS)
        Bt = _load_bc(B_ptr, pid_b, gB, GB, offs_d, p, mask_l, offs_n, mask_n, L, N, B_CONST)
        Ct = _load_bc(C_ptr, pid_b, gC, GC, offs_d, p, mask_l, offs_n, mask_n, L, N, C_CONST)
        # inputs of step t-1 (identity at the chunk start) -> h_{t-1} exactly
        mask_pl = (offs_l > 0) & mask_l
        mp = (offs_d[:, None] >= 0) & mask_pl[None, :]
        pp = p + 1 if REVERSE else p - 1
        u_p = tl.load(u_ptr + base + pp[None, :], mask=mp, other=0.0).to(tl.float32)
        dt_p, _r = _load_dt(dt_ptr, base, pp, mp, bias, HAS_BIAS, SOFTPLUS)
        B_p = _load_bc(B_ptr, pid_b, gB, GB, offs_d, pp, mask_pl, offs_n, mask_n, L, N, B_CONST)
        h0 = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        if c > 0:
            h0 = tl.load(x_ptr + (rows[:, None] * n_chunks + c - 1) * N + offs_n[None, :],
                         mask=mask_n[None, :], other=0.0)
        a_p = tl.exp(dt_p[:, :, None] * A[:, None, :])
        aS, bS = tl.associative_scan((a_p, (dt_p * u_p)[:, :, None] * B_p), axis=1,
                                     combine_fn=_combine)
        h_prev = bS + aS * h0[:, None, :]
        a = tl.exp(dt[:, :, None] * A[:, None, :])
        h = a * h_prev + (dt * u)[:, :, None] * Bt
        dout = tl.load(dout_ptr + base + p[None, :], mask=m2, other=0.0).to(tl.float32)
        dy = dout
        if HAS_Z:
            z = tl.load(z_ptr + base + p[None, :], mask=m2, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            y = tl.sum(h * Ct, axis=2) + Dv[:, None] * u
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + base + p[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dout * z * sz
        # decays of step t+1 for the adjoint scan (t+1 may sit in the next chunk)
        t_n = t + 1
        mn = (offs_d[:, None] >= 0) & (t_n < L)[None, :]
        p_n = L - 1 - t_n if REVERSE else t_n
        dt_n, _r2 = _load_dt(dt_ptr, base, p_n, mn, bias, HAS_BIAS, SOFTPLUS)
        a_n = tl.exp(dt_n[:, :, None] * A[:, None, :])
        gA, gS = tl.associative_scan((a_n, Ct * dy[:, :, None]), axis=1, combine_fn=_combine,
                                     reverse=True)
        G = gS + gA * g_carry[:, None, :]
        g_carry = tl.sum(tl.where(offs_l[None, :, None] == 0, G, 0.0), axis=1)
        X = G * a * h_prev  # dL/d(dt*A)
        ddt = tl.sum(X * A[:, None, :], axis=2)
        dA_acc += tl.sum(X * dt[:, :, None], axis=1)
        ddtu = tl.sum(G * Bt, axis=2)
        gb = G * (dt * u)[:, :, None]
        hc = h * dy[:, :, None]
        if B_CONST:
            dBc_acc += tl.sum(gb, axis=1)
        else:
            off = ((pid_b * GB + gB).to(tl.int64) * N + offs_n[None, :]) * L + p[:, None]
            tl.atomic_add(dB_ptr + off, tl.sum(gb, axis=0),
                          mask=mask_l[:, None] & mask_n[None, :])
        if C_CONST:
            dCc_acc += tl.sum(hc, axis=1)
        else:
            off = ((pid_b * GC + gC).to(tl.int64) * N + offs_n[None, :]) * L + p[:, None]
            tl.atomic_add(dC_ptr + off, tl.sum(hc, axis=0),
                          mask=mask_l[:, None] & mask_n[None, :])
        du = ddtu * dt + Dv[:, None] * dy
        dD_acc += tl.sum(dy * u, axis=1)
        ddt = ddt + ddtu * u
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m2, ddt, 0.0)
        db_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + base + p[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + base + p[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=m2)
    tl.store(dA_ptr + rn_off, dA_acc, mask=mask_n[None, :])
    if B_CONST:
        tl.store(dB_ptr + rn_off, dBc_acc, mask=mask_n[None, :])
    if C_CONST:
        tl.store(dC_ptr + rn_off, dCc_acc, mask=mask_n[None, :])
    if HAS_D:
        tl.store(dD_ptr + rows, dD_acc)
    if HAS_BIAS:
        tl.store(dbias_ptr + rows, db_acc)


def _pow2_divisor(x: int) -> int:
    return x & -x


def tile_sizes(d: int, l: int, n: int, dgB: int, dgC: int,
               budget: int = TILE_BUDGET) -> Tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, BLOCK_N) for a ~``budget``-element tile; BLOCK_D
    divides the channels of every B/C group, so one program reads one group.
    BLOCK_L (the chunk of the saved states) does not depend on ``budget``."""
    bn = triton.next_power_of_2(n)
    bl = min(triton.next_power_of_2(max(l, 1)), max(16, TILE_BUDGET // bn), MAX_BLOCK_L)
    bd = min(_pow2_divisor(math.gcd(dgB, dgC)), max(1, budget // (bl * bn)), 64)
    return bd, bl, bn


def _bc_arg(X: Tensor, d: int) -> Tuple[Tensor, bool, int, int]:
    """(contiguous tensor, is_const, groups, channels per group)."""
    if X.dim() == 2:
        return X.contiguous(), True, 1, d
    X = X if X.dim() == 4 else X.unsqueeze(1)
    return X.contiguous(), False, X.shape[1], d // X.shape[1]


class _TritonScanFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32, reverse):
        b, d, l = u.shape
        n = A.shape[1]
        u, delta = u.contiguous(), delta.contiguous()
        z = z.contiguous() if z is not None else None
        A32 = A.float().contiguous()
        D32 = D.float().contiguous() if D is not None else None
        bias32 = delta_bias.float().contiguous() if delta_bias is not None else None
        Bc, b_const, gB, dgB = _bc_arg(B, d)
        Cc, c_const, gC, dgC = _bc_arg(C, d)
        bd, bl, bn = tile_sizes(d, l, n, dgB, dgC)
        n_chunks = triton.cdiv(l, bl)
        out = torch.empty_like(u, dtype=torch.float32 if out_fp32 else u.dtype)
        x = torch.empty(b, d, n_chunks, n, device=u.device, dtype=torch.float32)
        grid = (d // bd, b)
        dummy = A32
        _fwd_kernel[grid](u, delta, A32, Bc, Cc, D32 if D32 is not None else dummy,
                          z if z is not None else u, bias32 if bias32 is not None else dummy,
                          out, x, d, l, n, dgB, dgC, gB, gC, n_chunks,
                          HAS_D=D is not None, HAS_Z=z is not None,
                          HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
                          B_CONST=b_const, C_CONST=c_const, REVERSE=bool(reverse),
                          BLOCK_D=bd, BLOCK_L=bl, BLOCK_N=bn)
        ctx.save_for_backward(u, delta, A32, Bc, Cc, D32, z, bias32, x)
        ctx.cfg = (softplus, reverse, (bd, bl, bn), (b_const, gB, dgB), (c_const, gC, dgC),
                   B.dim(), C.dim(), B.dtype, C.dtype, A.dtype,
                   None if D is None else D.dtype,
                   None if delta_bias is None else delta_bias.dtype)
        return out, x[:, :, -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A32, Bc, Cc, D32, z, bias32, x = ctx.saved_tensors
        (softplus, reverse, (bd, bl, bn), (b_const, gB, dgB), (c_const, gC, dgC),
         B_dim, C_dim, B_dtype, C_dtype, A_dtype, D_dtype, bias_dtype) = ctx.cfg
        b, d, l = u.shape
        n = A32.shape[1]
        n_chunks = x.shape[2]
        dout = dout.contiguous()
        dlast = (dlast if dlast is not None else torch.zeros_like(x[:, :, 0])).float().contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        f32 = dict(device=u.device, dtype=torch.float32)
        dA = torch.empty(b, d, n, **f32)
        dD = torch.empty(b, d, **f32)
        dbias = torch.empty(b, d, **f32)
        dB = torch.empty(b, d, n, **f32) if b_const else torch.zeros(Bc.shape, **f32)
        dC = torch.empty(b, d, n, **f32) if c_const else torch.zeros(Cc.shape, **f32)
        bd = tile_sizes(d, l, n, dgB, dgC, TILE_BUDGET_BWD)[0]
        grid = (d // bd, b)
        _bwd_kernel[grid](u, delta, A32, Bc, Cc, D32 if D32 is not None else A32,
                          z if z is not None else u, bias32 if bias32 is not None else A32,
                          x, dout, dlast, du, ddelta, dz if dz is not None else du,
                          dA, dD, dbias, dB, dC, d, l, n, dgB, dgC, gB, gC, n_chunks,
                          HAS_D=D32 is not None, HAS_Z=z is not None,
                          HAS_BIAS=bias32 is not None, SOFTPLUS=bool(softplus),
                          B_CONST=b_const, C_CONST=c_const, REVERSE=bool(reverse),
                          BLOCK_D=bd, BLOCK_L=bl, BLOCK_N=bn)

        def bc_grad(g, const, dim, dtype):
            g = g.sum(0) if const else (g.squeeze(1) if dim == 3 else g)
            return g.to(dtype)

        return (du, ddelta, dA.sum(0).to(A_dtype), bc_grad(dB, b_const, B_dim, B_dtype),
                bc_grad(dC, c_const, C_dim, C_dtype),
                dD.sum(0).to(D_dtype) if D32 is not None else None, dz,
                dbias.sum(0).to(bias_dtype) if bias32 is not None else None,
                None, None, None)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                          out_fp32: bool = False, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """Fused scan (validated inputs, l > 0). Returns (out, last_state fp32)."""
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f'triton scan supports float32/float16/bfloat16 u, got {u.dtype}')
    return _TritonScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                               out_fp32, reverse)
