"""Chunked, exact selective scan in plain PyTorch with a recomputing backward.

Why this design (benchmarks and numerics in shared/research/performance.md §6):
- Exact: no cumulative-ratio / cumsum-of-exp trick (that overflows to NaN at
  realistic dt*|A|). Inside a chunk the scan is a short sequential loop; the
  only closed form used is the chunk-local decay prod_s a_s = exp(sum_s dt_s A),
  which never divides, so it cannot overflow for a stable (A < 0) scan.
- Fast on CPU: a two-level scan. Time is cut into ``nc`` chunks of ``T`` steps
  (T ~ sqrt(l)); one loop of T steps scans all chunks at once from a zero
  state, one loop of nc steps carries the true state across chunk ends, and a
  single vectorised multiply-add fixes every step up. Python loops have
  T + nc ~ 2 sqrt(l) iterations instead of l.
- Light autograd: the forward keeps only the chunk-boundary states (nc+1, b, d,
  n); the backward recomputes the (l, b, d, n) states chunk-locally, runs the
  adjoint (reverse) scan with the same two-level machinery and forms every
  gradient (u, delta, A, B, C, D, z, delta_bias and the last state) in closed form.

Internal layout is time-major: (l, b, d, n), so that one time step of all
chunks is a slice of contiguous blocks. Works on any device and in float64
(for gradcheck).
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _tm(x: Tensor, wd: torch.dtype, reverse: bool, lp: int) -> Tensor:
    """(b, d, l) -> time-major (lp, b, d) in the work dtype, zero-padded to lp
    (flipped first if reverse, so padding always comes after the last step)."""
    x = x.permute(2, 0, 1)
    x = x.flip(0) if reverse else x
    out = x.new_empty((lp,) + x.shape[1:], dtype=wd)
    out[:x.shape[0]] = x
    out[x.shape[0]:] = 0
    return out


def _from_tm(x: Tensor, reverse: bool, l: int) -> Tensor:
    """Time-major (lp, b, d) -> (b, d, l)."""
    x = x[:l]
    x = x.flip(0) if reverse else x
    return x.permute(1, 2, 0).contiguous()


def _bc_tm(X: Tensor, wd: torch.dtype, reverse: bool, lp: int) -> Tensor:
    """B/C operand: constant (d, n) kept as is, else (b, g, n, l) -> (lp, b, g, n)."""
    if X.dim() == 2:
        return X.to(wd)
    X = X if X.dim() == 4 else X.unsqueeze(1)
    return _tm(X.flatten(1, 2), wd, reverse, lp).unflatten(2, X.shape[1:3])


def _bc_from_tm(dX: Tensor, like: Tensor, reverse: bool, l: int) -> Tensor:
    """Gradient of a B/C operand back to the user's layout and dtype."""
    if like.dim() == 2:
        return dX.to(like.dtype)
    dX = _from_tm(dX.flatten(2, 3), reverse, l).unflatten(1, dX.shape[2:4])  # (b, g, n, l)
    if like.dim() == 3:
        dX = dX.squeeze(1)
    return dX.to(like.dtype)


def _mul_bc(x: Tensor, X: Tensor) -> Tensor:
    """x (l, b, d) times B/C -> (l, b, d, n) without expanding groups."""
    if X.dim() == 2:
        return x[..., None] * X
    l, b, g, n = X.shape
    return (x.view(l, b, g, -1, 1) * X[:, :, :, None, :]).view(l, b, -1, n)


def _contract_bc(H: Tensor, X: Tensor) -> Tensor:
    """sum_n H (l, b, d, n) * B/C -> (l, b, d) (batched mat-vec, no expansion)."""
    l, b, d, n = H.shape
    if X.dim() == 2:
        return (H.view(l * b, d, 1, n) @ X.view(d, n, 1)).view(l, b, d)
    g = X.shape[2]
    return torch.einsum('lbgkn,lbgn->lbgk', H.view(l, b, g, -1, n), X).reshape(l, b, d)


def _reduce_bc_(G: Tensor, w: Tensor, X: Tensor) -> Tensor:
    """Gradient of B/C from G (l, b, d, n) and weights w (l, b, d): shape of X.

    May overwrite G (constant B/C: in-place product, then a sum).
    """
    l, b, d, n = G.shape
    if X.dim() == 2:
        return G.mul_(w[..., None]).sum((0, 1))
    g = X.shape[2]
    return (w.view(l, b, g, 1, -1) @ G.view(l, b, g, -1, n)).view(l, b, g, n)


def _chunk_scan_(a: Tensor, bu: Tensor, T: int, h_chunk: Optional[Tensor] = None,
                 adjoint: bool = False, a_scratch: bool = False) -> Optional[Tensor]:
    """Exact linear recurrence along dim 0 in chunks of T, IN PLACE (bu -> states).

    forward:  h_t = a_t * h_{t-1} + bu_t             (h_{-1} = 0)
    adjoint:  h_t = a_{t+1} * h_{t+1} + bu_t         (h_{len} = 0), the
              reverse scan of the backward pass, without flipping copies.

    In-place because fresh multi-MB tensors are expensive on CPU (page
    faults): the scan overwrites ``bu`` with the states.

    Args:
        a, bu: (nc*T, ...) decays and inputs (len(a) % T == 0).
        T: chunk length.
        h_chunk: forward only: known (nc, ...) state entering each chunk (the
            backward's recompute); if None it is computed by a chunk carry.
        adjoint: run the adjoint recurrence instead.
        a_scratch: ``a`` may be overwritten (it then holds chunk products).

    Returns:
        For a forward scan without ``h_chunk``: hs (nc+1, ...), the state
        entering each chunk (hs[0] = 0, hs[nc] = final state); else None.
    """
    lp, rest = a.shape[0], a.shape[1:]
    nc = lp // T
    a, H = a.view(nc, T, *rest), bu.view(nc, T, *rest)
    # P[c, t]: product of the chunk-local decays between t and the chunk edge
    # the carry enters from; built by multiplication, never by division.
    carry = nc > 1 and h_chunk is None
    if not adjoint:
        P = a if a_scratch else (torch.empty_like(a) if carry else None)
        if carry and P is not a:
            P[:, 0] = a[:, 0]
        if h_chunk is not None:
            H[:, 0].addcmul_(a[:, 0], h_chunk)
        for t in range(1, T):  # all chunks advance together
            H[:, t].addcmul_(a[:, t], H[:, t - 1])
            if carry:
                torch.mul(a[:, t], P[:, t - 1], out=P[:, t])
        if h_chunk is not None:
            return None
        hs = bu.new_zeros(nc + 1, *rest)
        hs[1] = H[0, -1]
        for c in range(1, nc):
            torch.addcmul(H[c, -1], P[c, -1], hs[c], out=hs[c + 1])
        if carry:
            H[1:].addcmul_(P[1:], hs[1:nc, None])
        return hs
    P = torch.empty_like(a) if carry else None
    if carry:
        P[:, -1] = 1
    for t in range(T - 2, -1, -1):
        H[:, t].addcmul_(a[:, t + 1], H[:, t + 1])
        if carry:
            torch.mul(a[:, t + 1], P[:, t + 1], out=P[:, t])
    if carry:
        # K[c] = a_{c+1, 0} * H_{c+1, 0}: what chunk c receives from the next one.
        K = bu.new_zeros(nc, *rest)
        for c in range(nc - 2, -1, -1):
            Hn = torch.addcmul(H[c + 1, 0], P[c + 1, 0], K[c + 1])
            torch.mul(a[c + 1, 0], Hn, out=K[c])
        H[:-1].addcmul_(P[:-1], K[:-1, None])
    return None


def default_chunk(l: int, rows: int) -> int:
    """Chunk length T for a scan of length l over ``rows`` = b*d*n lanes.

    Each Python step touches nc * rows elements: enough chunks to amortise the
    per-op overhead (~32K elements a step), but never more than ~sqrt(l) so the
    chunk-carry loop stays short; with many lanes one chunk (no carry) is best.
    """
    nc = min(-(-32768 // max(rows, 1)), math.isqrt(max(l - 1, 0)) + 1)
    return -(-l // max(nc, 1))


def chunked_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                    softplus: bool, out_fp32: bool, reverse: bool,
                    chunk: Optional[int] = None) -> Tuple[Tensor, Tensor, int]:
    """Forward of the chunked scan without autograd.

    Returns (out, hs, T): hs (nc+1, b, d, n) are the states entering each chunk
    of T steps (hs[-1] is the last state), which :func:`chunked_backward` needs.
    """
    wd = torch.float64 if u.dtype == torch.float64 else torch.float32
    l = u.shape[-1]
    T = min(chunk or default_chunk(l, u.shape[0] * u.shape[1] * A.shape[1]), l)
    lp = -(-l // T) * T
    # autocast would run the contractions (bmm) in bf16/fp16: the state is fp32
    with torch.no_grad(), torch.autocast(u.device.type, enabled=False):
        dt, uu, A_, Bt, Ct, dtu, _ = _prep(u, delta, A, B, C, delta_bias, softplus,
                                           reverse, wd, lp)
        a = torch.mul(dt[..., None], A_).exp_()  # (lp, b, d, n); padding: a = 1, bu = 0
        H = _mul_bc(dtu, Bt)
        hs = _chunk_scan_(a, H, T, a_scratch=True)  # H: bu -> states
        del a
        y = _contract_bc(H, Ct)
        del H
        if D is not None:
            y.addcmul_(uu, D.to(wd))
        if z is not None:
            y.mul_(F.silu(_tm(z, wd, reverse, lp)))
        out = _from_tm(y, reverse, l)
        out = out if (out_fp32 and wd == torch.float32) else out.to(u.dtype)
    return out, hs, T


def chunked_backward(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor,
                     A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                     delta_bias: Optional[Tensor], hs: Tensor, softplus: bool, reverse: bool,
                     T: int, need: Sequence[bool] = (True,) * 8) -> tuple:
    """Every gradient of :func:`chunked_forward` (None where not ``need``-ed).

    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype.
    """
    with torch.no_grad(), torch.autocast(dout.device.type, enabled=False):
        return _backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, hs, softplus,
                         reverse, T, need)


def _backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, hs, softplus, reverse, T, need):
    wd = hs.dtype
    l = u.shape[-1]
    nc = hs.shape[0] - 1
    lp = nc * T
    dt, uu, A_, Bt, Ct, dtu, raw = _prep(u, delta, A, B, C, delta_bias, softplus, reverse,
                                         wd, lp)
    a = torch.mul(dt[..., None], A_).exp_()  # (lp, b, d, n)
    H = _mul_bc(dtu, Bt)
    _chunk_scan_(a, H, T, h_chunk=hs[:nc])  # recompute the states in place
    dy = _tm(dout, wd, reverse, lp)
    dz = None
    if z is not None:
        zt = _tm(z, wd, reverse, lp)
        sz = torch.sigmoid(zt)
        y = _contract_bc(H, Ct)
        if D is not None:
            y.addcmul_(uu, D.to(wd))
        dz = dy * y * sz * (1 + zt * (1 - sz))  # d silu(z) = s (1 + z (1 - s))
        dy = dy * zt * sz
    # Adjoint: G_t = dL/dh_t = a_{t+1} G_{t+1} + C_t dy_t (+ dlast at the end;
    # padded steps have a = 1 and dy = 0, so dlast reaches step l-1 intact).
    G = _mul_bc(dy, Ct)
    if dlast is not None:
        G[-1] += dlast.to(wd)
    _chunk_scan_(a, G, T, adjoint=True)  # G: C dy -> dL/dh
    # dL/d(dt*A)_t = G_t * a_t * h_{t-1}
    X = a.mul_(G)
    X[1:] *= H[:-1]
    X[0] = 0
    ddt = _contract_bc(X, A_)
    dA = X.mul_(dt[..., None]).sum((0, 1)).to(A.dtype) if need[2] else None
    del X, a
    ddtu = _contract_bc(G, Bt)
    # G and H are dead after these reductions: they may be used as scratch
    dB = _bc_from_tm(_reduce_bc_(G, dtu, Bt), B, reverse, l) if need[3] else None
    dC = _bc_from_tm(_reduce_bc_(H, dy, Ct), C, reverse, l) if need[4] else None
    du = ddtu * dt
    if D is not None:
        du.addcmul_(dy, D.to(wd))
    dD = (dy * uu).sum((0, 1)).to(D.dtype) if D is not None and need[5] else None
    ddt.addcmul_(ddtu, uu)
    if softplus:
        ddt.mul_(torch.sigmoid(raw))
    ddb = (ddt[:l].sum((0, 1)).to(delta_bias.dtype)
           if delta_bias is not None and need[7] else None)
    return (_from_tm(du, reverse, l).to(u.dtype), _from_tm(ddt, reverse, l).to(delta.dtype),
            dA, dB, dC, dD, _from_tm(dz, reverse, l).to(z.dtype) if dz is not None else None,
            ddb)


class _ChunkedScanFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32, reverse, chunk):
        out, hs, T = chunked_forward(u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32,
                                     reverse, chunk)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hs)
        ctx.cfg = (softplus, reverse, T)
        return out, hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, hs = ctx.saved_tensors
        softplus, reverse, T = ctx.cfg
        return chunked_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, hs, softplus,
                                reverse, T, ctx.needs_input_grad) + (None,) * 4


def _prep(u, delta, A, B, C, delta_bias, softplus, reverse, wd, lp):
    """Time-major padded operands: dt, u (lp, b, d), A, B, C, dt*u and the
    pre-softplus delta + bias (for the softplus derivative).

    Padded steps get dt = 0 (after softplus), hence a = 1 and dt*u = 0.
    """
    l = u.shape[-1]
    raw = _tm(delta, wd, reverse, lp)
    if delta_bias is not None:
        raw[:l] += delta_bias.to(wd)
    dt = raw
    if softplus:
        dt = raw.clone()
        dt[:l] = F.softplus(raw[:l])
    uu = _tm(u, wd, reverse, lp)
    return (dt, uu, A.to(wd), _bc_tm(B, wd, reverse, lp), _bc_tm(C, wd, reverse, lp),
            dt * uu, raw)


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           delta_bias: Optional[Tensor] = None,
                           delta_softplus: bool = False, out_fp32: bool = False,
                           reverse: bool = False,
                           chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Exact chunked scan (validated inputs, l > 0). Returns (out, last_state).

    ``chunk`` overrides the chunk length T (default ~sqrt(l)).
    """
    return _ChunkedScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                out_fp32, reverse, chunk)
