// Rank-1 S4 (DPLR) kernel spectra straight from the parameters, float64, CPU: forward and
// backward of the whole frequency-domain part of kernel generation in one pass.
//
// For K kernels of one configuration (one shared SSM per kernel, n_ssm = 1; a tied step per
// channel; rank 1; ch = 1 or 2 output channels) and every channel h, node l:
//   w[h, n] = dt[h] A[n],  Cs = [C[0], .., C[ch-1], conj(P)] (Bc = ch + 1 rows),
//   Bs = [B; P] (2 rows),  V[a, b, n] = Bs[a, n] (dt[h] Cs[b, n]),
//   r[a, b] = sum_n V / (z_l - w) + conj(V) / (z_l - conj(w))      (cauchy.cpp's product)
//   k[c] = F_l (r[0, c] - r[0, ch] r[1, c] / (1 + r[1, ch]))       (Woodbury, bilinear F_l)
// (ssm_kernels.SSMKernelDPLR: _stacked_cauchy_args, cauchy_outer, _kernel_from_cauchy.)
// In PyTorch the same needs the float64 casts, stacks and concatenations of the parameters
// into dt [C; Q] operands (complex128, (K H, Bc, N)), the products (H, 2, Bc, Lf), the
// Woodbury ops, and all their backward passes: in a ConvNeXt-S4ND-T training step at batch
// 1 those memory-bound passes cost about as much as the Cauchy sums themselves. Here C is
// read once, as stored (float32 or float64, each kernel's own parameter tensor), its
// gradient written once in its dtype; everything else stays in registers or in per-block
// buffers; Bs, A and dt (a few KB) keep their PyTorch autograd.
//
// Vectorisation: W = 8 channels of one kernel are the lanes of a vector (GCC/Clang vector
// extension), the loops over nodes and poles are scalar, so all sums are per-lane
// accumulators (no horizontal reductions) and every lane's arithmetic is the scalar
// formula. Compiled for AVX-512, AVX2, FMA and baseline x86-64 (clones.h).
//
// Backward (PyTorch's conjugate-Wirtinger convention): with s = 1 / (1 + r11),
// t = r01 s and g_c the gradient of k[c]:
//   g r00_c = conj(F) g_c,  g r10_c = -conj(F t) g_c,  g t = -sum_c conj(F r10_c) g_c,
//   g r01 = conj(s) g t,  g r11 = -conj(s^2) conj(r01) g t;
// then cauchy.cpp's gV, U (gw = sum conj(V) U), and the chain to the parameters:
//   gBs[a] = sum_h sum_b gV conj(dt Cs[b]),  gC[b] = dt sum_a gV conj(Bs[a]),
//   gP += conj(sum_h dt gCs[ch]),  gA = sum_h dt gw,
//   gdt = sum_n Re(gw conj(A)) + sum_{b,n} Re(gCs[b] conj(Cs[b])).
// The sums over h are per-block partials added in block order afterwards: deterministic,
// whatever the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "clones.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers

namespace mmssm_dplr {

constexpr int W = 8;  // channels per block: the lanes of one vector
typedef double vd __attribute__((vector_size(W * sizeof(double))));

struct cv {  // W complex numbers
  vd r, i;
};
MMSSM_INLINE cv cmul(cv a, cv b) { return {a.r * b.r - a.i * b.i, a.r * b.i + a.i * b.r}; }
MMSSM_INLINE cv cmulc(cv a, cv b) { return {a.r * b.r + a.i * b.i, a.i * b.r - a.r * b.i}; }  // a conj(b)
MMSSM_INLINE cv cconj(cv a) { return {a.r, -a.i}; }
MMSSM_INLINE vd splat(double x) { return (vd){x, x, x, x, x, x, x, x}; }

// Lanes <-> strided scalars through a stack copy: indexing a vector variable by a run-time
// lane number would make GCC keep that variable (e.g. an accumulator) in memory throughout.
template <typename T>
MMSSM_INLINE void store_lanes(vd v, T* dst, int64_t stride, int nl) {
  alignas(sizeof(vd)) double t[W];
  *reinterpret_cast<vd*>(t) = v;
  for (int j = 0; j < nl; ++j) dst[j * stride] = static_cast<T>(t[j]);
}
MMSSM_INLINE vd load_lanes(const double* src, int64_t stride, int nl) {
  alignas(sizeof(vd)) double t[W];
  for (int j = 0; j < W; ++j) t[j] = src[std::min(j, nl - 1) * stride];
  return *reinterpret_cast<const vd*>(t);
}

struct Dims {
  int64_t K, H, N, Lf, ch;
  int64_t blocks_per_kernel() const { return (H + W - 1) / W; }
};

// Per-block working set, in vectors (Bc = ch + 1 rows of Cs, KK = 2 Bc pairs).
struct Block {
  vd *wr, *wi;    // poles dt A (N)
  vd *cr, *ci;    // Cs unscaled (Bc, N)
  vd *Vr, *Vi;    // pair products (KK, N)
  vd *gr, *gi;    // gradients of r (Lf, KK) (backward)
  cv *gB, *gQ, *gA;  // lane partials of gBs (2, N), g conj(P) row (N), gA (N) (backward)
  vd dt{};
  int64_t k, h0;
  int nl;  // live lanes (the last block of a kernel may be partial)
  static int64_t size(const Dims& d) {
    const int64_t Bc = d.ch + 1, KK = 2 * Bc;
    return d.N * (2 + 2 * Bc + 2 * KK) + 2 * d.Lf * KK + 2 * d.N * (2 + 1 + 1);
  }
  void carve(const Dims& d, vd* p) {
    const int64_t Bc = d.ch + 1, KK = 2 * Bc, N = d.N;
    wr = p; wi = wr + N; cr = wi + N; ci = cr + Bc * N; Vr = ci + Bc * N; Vi = Vr + KK * N;
    gr = Vi + KK * N; gi = gr + d.Lf * KK;
    gB = reinterpret_cast<cv*>(gi + d.Lf * KK); gQ = gB + 2 * N; gA = gQ + N;
  }
};

// Lane j of a block reads channel h0 + min(j, nl - 1): dead lanes repeat the last live
// channel (finite values), and are left out of every store and sum.
MMSSM_INLINE int64_t lane_h(const Block& b, int j) { return b.h0 + std::min(j, b.nl - 1); }

// Poles, unscaled Cs and pair products of block (k, h0): the same roundings as PyTorch's
// dt * A, dt * [C; conj(P)] and Bs[a] * (dt Cs[b]).
template <int Bc, typename CT>
MMSSM_INLINE void load(const Dims& d, Block& b, const double* Bs, const double* A,
                       const double* dt, const CT* C) {
  const int64_t N = d.N, H = d.H;
  for (int j = 0; j < W; ++j) b.dt[j] = dt[b.k * H + lane_h(b, j)];
  const double* a = A + b.k * N * 2;
  const double* bs = Bs + b.k * 2 * N * 2;  // (2, N, 2): B, P
  for (int64_t n = 0; n < N; ++n) {
    b.wr[n] = b.dt * a[2 * n];
    b.wi[n] = b.dt * a[2 * n + 1];
  }
  for (int64_t c = 0; c < Bc - 1; ++c) {
    for (int j = 0; j < W; ++j) {
      const CT* row = C + ((c * H) + lane_h(b, j)) * N * 2;
      for (int64_t n = 0; n < N; ++n) {
        b.cr[c * N + n][j] = static_cast<double>(row[2 * n]);
        b.ci[c * N + n][j] = static_cast<double>(row[2 * n + 1]);
      }
    }
  }
  for (int64_t n = 0; n < N; ++n) {  // Q = conj(P), the same for every channel
    b.cr[(Bc - 1) * N + n] = splat(bs[(N + n) * 2]);
    b.ci[(Bc - 1) * N + n] = splat(-bs[(N + n) * 2 + 1]);
  }
  for (int a2 = 0; a2 < 2; ++a2) {
    for (int c = 0; c < Bc; ++c) {
      vd* vr = b.Vr + (a2 * Bc + c) * N;
      vd* vi = b.Vi + (a2 * Bc + c) * N;
      for (int64_t n = 0; n < N; ++n) {
        const double br = bs[(a2 * N + n) * 2], bi = bs[(a2 * N + n) * 2 + 1];
        const vd sr = b.dt * b.cr[c * N + n], si = b.dt * b.ci[c * N + n];
        vr[n] = br * sr - bi * si;
        vi[n] = br * si + bi * sr;
      }
    }
  }
}

// Cauchy entries of node (zr, zi) and pole n: sp = p1 + p2, sq = q1 + q2, dq = q2 - q1,
// dp = p1 - p2 with 1 / (z - w) = p1 + i q1, 1 / (z - conj w) = p2 + i q2 (cauchy.cpp's
// terms), and with kSquare the same of the squares (E).
template <bool kSquare>
MMSSM_INLINE void terms(double zr, double zi, vd wr, vd wi, vd& sp, vd& sq, vd& dq, vd& dp,
                        vd& Sp, vd& Sq, vd& Dq, vd& Dp) {
  const vd a = zr - wr, b1 = zi - wi, b2 = zi + wi;
  const vd a2 = a * a;
  // 1 / |z - w|^2 and 1 / |z - conj w|^2 by one division (the divider is the bottleneck;
  // the product stays far inside float64's range for S4 poles and unit-circle nodes)
  const vd e1 = b1 * b1 + a2, e2 = b2 * b2 + a2, inv = 1.0 / (e1 * e2);
  const vd d1 = e2 * inv, d2 = e1 * inv;
  const vd p1 = a * d1, p2 = a * d2, q1 = -(b1 * d1), q2 = -(b2 * d2);
  sp = p1 + p2;
  sq = q1 + q2;
  dq = q2 - q1;
  dp = p1 - p2;
  if (kSquare) {
    const vd f1 = d1 * d1, f2 = d2 * d2;
    const vd P1 = (a2 - b1 * b1) * f1, P2 = (a2 - b2 * b2) * f2;
    const vd Q1 = (a * b1) * f1 * -2.0, Q2 = (a * b2) * f2 * -2.0;
    Sp = P1 + P2;
    Sq = Q1 + Q2;
    Dq = Q2 - Q1;
    Dp = P1 - P2;
  }
}

// r (K H, Lf, KK, 2) entry of lane j
MMSSM_INLINE int64_t r_index(const Dims& d, const Block& b, int j, int64_t l, int64_t kk,
                             int64_t KK) {
  return (((b.k * d.H + b.h0 + j) * d.Lf + l) * KK + kk) * 2;
}

// kf (ch, K H, Lf, 2) entry of lane j
MMSSM_INLINE int64_t k_index(const Dims& d, const Block& b, int j, int64_t c, int64_t l) {
  return ((c * d.K * d.H + b.k * d.H + b.h0 + j) * d.Lf + l) * 2;
}

template <int Bc, typename CT>
MMSSM_INLINE void fwd_block(const Dims& d, Block& b, const double* Bs, const double* A,
                            const double* dt, const double* z, const double* F, const CT* C,
                            double* kf, double* r) {
  constexpr int KK = 2 * Bc, ch = Bc - 1;
  const int64_t N = d.N;
  load<Bc>(d, b, Bs, A, dt, C);
  for (int64_t l = 0; l < d.Lf; ++l) {
    const double zr = z[2 * l], zi = z[2 * l + 1];
    vd ar[KK], ai[KK];
    for (int kk = 0; kk < KK; ++kk) ar[kk] = ai[kk] = splat(0.0);
    for (int64_t n = 0; n < N; ++n) {
      vd sp, sq, dq, dp, u;
      terms<false>(zr, zi, b.wr[n], b.wi[n], sp, sq, dq, dp, u, u, u, u);
      for (int kk = 0; kk < KK; ++kk) {
        const vd vr = b.Vr[kk * N + n], vi = b.Vi[kk * N + n];
        // one FMA per term (acc + (x + y) would need a separate add: no reassociation)
        ar[kk] = ar[kk] + vr * sp;
        ar[kk] = ar[kk] + vi * dq;
        ai[kk] = ai[kk] + vr * sq;
        ai[kk] = ai[kk] + vi * dp;
      }
    }
    const cv r01{ar[ch], ai[ch]}, r11{ar[Bc + ch], ai[Bc + ch]};
    const vd er = 1.0 + r11.r, den = 1.0 / (er * er + r11.i * r11.i);
    const cv t = cmul(r01, cv{er * den, -r11.i * den});  // r01 / (1 + r11)
    const cv f{splat(F[2 * l]), splat(F[2 * l + 1])};
    for (int c = 0; c < ch; ++c) {
      const cv tr = cmul(t, cv{ar[Bc + c], ai[Bc + c]});
      const cv kc = cmul(f, cv{ar[c] - tr.r, ai[c] - tr.i});
      store_lanes(kc.r, kf + k_index(d, b, 0, c, l), d.Lf * 2, b.nl);
      store_lanes(kc.i, kf + k_index(d, b, 0, c, l) + 1, d.Lf * 2, b.nl);
    }
    for (int kk = 0; kk < KK; ++kk) {
      store_lanes(ar[kk], r + r_index(d, b, 0, l, kk, KK), d.Lf * KK * 2, b.nl);
      store_lanes(ai[kk], r + r_index(d, b, 0, l, kk, KK) + 1, d.Lf * KK * 2, b.nl);
    }
  }
}

// Gradients of the Cauchy products r from the gradient G (ch, K H, Lf, 2) of the spectra.
template <int Bc>
MMSSM_INLINE void woodbury_bwd(const Dims& d, Block& b, const double* F, const double* r,
                               const double* G) {
  constexpr int KK = 2 * Bc, ch = Bc - 1;
  for (int64_t l = 0; l < d.Lf; ++l) {
    cv rr[KK], g[ch];
    for (int kk = 0; kk < KK; ++kk) {
      const double* p = r + r_index(d, b, 0, l, kk, KK);
      rr[kk] = cv{load_lanes(p, d.Lf * KK * 2, b.nl), load_lanes(p + 1, d.Lf * KK * 2, b.nl)};
    }
    for (int c = 0; c < ch; ++c) {
      const double* p = G + k_index(d, b, 0, c, l);
      g[c] = cv{load_lanes(p, d.Lf * 2, b.nl), load_lanes(p + 1, d.Lf * 2, b.nl)};
    }
    const cv r01 = rr[ch], r11 = rr[Bc + ch];
    const vd er = 1.0 + r11.r, den = 1.0 / (er * er + r11.i * r11.i);
    const cv s{er * den, -r11.i * den};
    const cv t = cmul(r01, s);
    const cv f{splat(F[2 * l]), splat(F[2 * l + 1])};
    const cv ft = cmul(f, t);
    cv gt{splat(0.0), splat(0.0)};
    vd* gr = b.gr + l * KK;
    vd* gi = b.gi + l * KK;
    for (int c = 0; c < ch; ++c) {
      const cv g00 = cmulc(g[c], f);  // conj(F) g
      const cv g10 = cmulc(g[c], ft);  // conj(F t) g, negated below
      const cv fr = cmulc(g[c], cmul(f, rr[Bc + c]));
      gr[c] = g00.r;
      gi[c] = g00.i;
      gr[Bc + c] = -g10.r;
      gi[Bc + c] = -g10.i;
      gt.r -= fr.r;
      gt.i -= fr.i;
    }
    const cv g01 = cmulc(gt, s);
    const cv g11 = cmulc(cmulc(gt, r01), cmul(s, s));  // conj(s^2) conj(r01) g t, negated
    gr[ch] = g01.r;
    gi[ch] = g01.i;
    gr[Bc + ch] = -g11.r;
    gi[Bc + ch] = -g11.i;
  }
}

template <int Bc, typename CT>
MMSSM_INLINE void bwd_block(const Dims& d, Block& b, const double* Bs, const double* A,
                            const double* dt, const double* z, const double* F, const CT* C,
                            const double* r, const double* G, CT* gC, double* gdt,
                            double* part) {
  constexpr int KK = 2 * Bc, ch = Bc - 1;
  const int64_t N = d.N, H = d.H;
  load<Bc>(d, b, Bs, A, dt, C);
  woodbury_bwd<Bc>(d, b, F, r, G);
  const double* a = A + b.k * N * 2;
  const double* bs = Bs + b.k * 2 * N * 2;
  vd gdt_acc = splat(0.0);
  for (int64_t n = 0; n < N; ++n) {
    cv X[KK], U[KK];  // gV and U of pole n
    for (int kk = 0; kk < KK; ++kk) X[kk] = U[kk] = cv{splat(0.0), splat(0.0)};
    for (int64_t l = 0; l < d.Lf; ++l) {
      vd sp, sq, dq, dp, Sp, Sq, Dq, Dp;
      terms<true>(z[2 * l], z[2 * l + 1], b.wr[n], b.wi[n], sp, sq, dq, dp, Sp, Sq, Dq, Dp);
      const vd* gr = b.gr + l * KK;
      const vd* gi = b.gi + l * KK;
      for (int kk = 0; kk < KK; ++kk) {
        X[kk].r = X[kk].r + gr[kk] * sp;
        X[kk].r = X[kk].r + gi[kk] * sq;
        X[kk].i = X[kk].i + gr[kk] * dq;
        X[kk].i = X[kk].i + gi[kk] * dp;
        U[kk].r = U[kk].r + gr[kk] * Sp;
        U[kk].r = U[kk].r + gi[kk] * Sq;
        U[kk].i = U[kk].i + gr[kk] * Dq;
        U[kk].i = U[kk].i + gi[kk] * Dp;
      }
    }
    cv gw{splat(0.0), splat(0.0)};  // sum_k conj(V_k) U_k
    for (int kk = 0; kk < KK; ++kk) {
      const cv v{b.Vr[kk * N + n], b.Vi[kk * N + n]};
      const cv t = cmulc(U[kk], v);
      gw.r += t.r;
      gw.i += t.i;
    }
    b.gA[n].r += b.dt * gw.r;
    b.gA[n].i += b.dt * gw.i;
    gdt_acc += gw.r * a[2 * n] + gw.i * a[2 * n + 1];
    for (int a2 = 0; a2 < 2; ++a2) {  // gBs[a] = sum_b gV conj(dt Cs[b])
      cv acc = b.gB[a2 * N + n];
      for (int c = 0; c < Bc; ++c) {
        const cv t = cmulc(X[a2 * Bc + c],
                           cv{b.dt * b.cr[c * N + n], b.dt * b.ci[c * N + n]});
        acc.r += t.r;
        acc.i += t.i;
      }
      b.gB[a2 * N + n] = acc;
    }
    for (int c = 0; c < Bc; ++c) {  // gradient of the scaled row dt Cs[c]
      cv gs{splat(0.0), splat(0.0)};
      for (int a2 = 0; a2 < 2; ++a2) {
        const double br = bs[(a2 * N + n) * 2], bi = bs[(a2 * N + n) * 2 + 1];
        const cv x = X[a2 * Bc + c];
        gs.r += x.r * br + x.i * bi;
        gs.i += x.i * br - x.r * bi;
      }
      gdt_acc += gs.r * b.cr[c * N + n] + gs.i * b.ci[c * N + n];
      const cv g{b.dt * gs.r, b.dt * gs.i};
      if (c < ch) {
        CT* out = gC + ((c * H) + b.h0) * N * 2 + 2 * n;
        store_lanes(g.r, out, N * 2, b.nl);
        store_lanes(g.i, out + 1, N * 2, b.nl);
      } else {
        b.gQ[n].r += g.r;
        b.gQ[n].i += g.i;
      }
    }
  }
  store_lanes(gdt_acc, gdt + b.k * H + b.h0, 1, b.nl);
  // this block's sums over its live lanes: gB, gP (Bs row + conj of the Q row), gA (N, 2)
  for (int64_t n = 0; n < N; ++n) {
    double s[6] = {0, 0, 0, 0, 0, 0};
    for (int j = 0; j < b.nl; ++j) {
      s[0] += b.gB[n].r[j];
      s[1] += b.gB[n].i[j];
      s[2] += b.gB[N + n].r[j] + b.gQ[n].r[j];
      s[3] += b.gB[N + n].i[j] - b.gQ[n].i[j];
      s[4] += b.gA[n].r[j];
      s[5] += b.gA[n].i[j];
    }
    for (int q = 0; q < 3; ++q) {
      part[(q * N + n) * 2] = s[2 * q];
      part[(q * N + n) * 2 + 1] = s[2 * q + 1];
    }
  }
}

// Blocks [i0, i1) of the K * blocks_per_kernel blocks, kernel-major.
template <typename CT>
MMSSM_INLINE void block_range(const Dims& d, int64_t i0, int64_t i1, bool backward,
                              const double* Bs, const double* A, const double* dt,
                              const double* z, const double* F, const void* const* C,
                              const double* r, const double* G, void* const* gC,
                              double* gdt, double* part, double* kf, double* rout) {
  // (not std::vector<vd>: its allocation is not guaranteed 64-byte aligned under every
  // -std / -faligned-new setting, and the vectors are accessed with aligned moves)
  std::vector<double> raw((Block::size(d) + 1) * W);
  const auto addr = reinterpret_cast<std::uintptr_t>(raw.data());
  Block b;
  b.carve(d, reinterpret_cast<vd*>((addr + sizeof(vd) - 1) / sizeof(vd) * sizeof(vd)));
  const int64_t nb = d.blocks_per_kernel();
  for (int64_t i = i0; i < i1; ++i) {
    b.k = i / nb;
    b.h0 = (i % nb) * W;
    b.nl = static_cast<int>(std::min<int64_t>(W, d.H - b.h0));
    const CT* c = static_cast<const CT*>(C[b.k]);
    if (!backward) {
      if (d.ch == 1) fwd_block<2, CT>(d, b, Bs, A, dt, z, F, c, kf, rout);
      else fwd_block<3, CT>(d, b, Bs, A, dt, z, F, c, kf, rout);
      continue;
    }
    std::fill(reinterpret_cast<double*>(b.gB), reinterpret_cast<double*>(b.gA + d.N), 0.0);
    CT* g = static_cast<CT*>(gC[b.k]);
    double* p = part + i * 3 * d.N * 2;
    if (d.ch == 1) bwd_block<2, CT>(d, b, Bs, A, dt, z, F, c, r, G, g, gdt, p);
    else bwd_block<3, CT>(d, b, Bs, A, dt, z, F, c, r, G, g, gdt, p);
  }
}

MMSSM_CLONES void run_blocks(const Dims& d, int64_t i0, int64_t i1, bool backward,
                             bool c_double, const double* Bs, const double* A,
                             const double* dt, const double* z, const double* F,
                             const void* const* C, const double* r, const double* G,
                             void* const* gC, double* gdt, double* part, double* kf,
                             double* rout) {
  if (c_double)
    block_range<double>(d, i0, i1, backward, Bs, A, dt, z, F, C, r, G, gC, gdt, part, kf,
                        rout);
  else
    block_range<float>(d, i0, i1, backward, Bs, A, dt, z, F, C, r, G, gC, gdt, part, kf,
                       rout);
}

static void check(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous(),
              "dplr_spectrum: ", name, " must be a contiguous float64 CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == shape, "dplr_spectrum: ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

static Dims dims(const at::Tensor& Bs, const at::Tensor& A, const at::Tensor& dt,
                 const at::Tensor& z, const at::Tensor& F, at::TensorList C) {
  TORCH_CHECK(Bs.dim() == 4 && dt.dim() == 2 && z.dim() == 2,
              "dplr_spectrum: Bs (K, 2, N, 2), dt (K, H) and z (Lf, 2) expected, got ",
              Bs.sizes(), ", ", dt.sizes(), ", ", z.sizes());
  TORCH_CHECK(!C.empty() && C[0].dim() == 4, "dplr_spectrum: C must be K (ch, H, N, 2) tensors");
  Dims d{Bs.size(0), dt.size(1), Bs.size(2), z.size(0), C[0].size(0)};
  TORCH_CHECK(d.ch == 1 || d.ch == 2, "dplr_spectrum: ch must be 1 or 2, got ", d.ch);
  check(Bs, "Bs", {d.K, 2, d.N, 2});
  check(A, "A", {d.K, d.N, 2});
  check(dt, "dt", {d.K, d.H});
  check(z, "z", {d.Lf, 2});
  check(F, "F", {d.Lf, 2});
  TORCH_CHECK(static_cast<int64_t>(C.size()) == d.K, "dplr_spectrum: ", d.K,
              " C tensors expected, got ", C.size());
  for (const at::Tensor& c : C) {
    TORCH_CHECK(c.device().is_cpu() && c.is_contiguous() &&
                    (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble) &&
                    c.scalar_type() == C[0].scalar_type(),
                "dplr_spectrum: C must be contiguous CPU tensors of one dtype, float32 or "
                "float64, got ", c.scalar_type());
    TORCH_CHECK(c.sizes() == at::IntArrayRef({d.ch, d.H, d.N, 2}),
                "dplr_spectrum: each C must have shape (", d.ch, ", ", d.H, ", ", d.N,
                ", 2), got ", c.sizes());
  }
  return d;
}

// Blocks per parallel task: ~64k Cauchy terms, so that a small kernel runs on one thread.
static int64_t grain(const Dims& d) {
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, W * d.N * d.Lf * (d.ch + 1)));
}

std::tuple<at::Tensor, at::Tensor> dplr_fwd(const at::Tensor& Bs, const at::Tensor& A,
                                            const at::Tensor& dt, const at::Tensor& z,
                                            const at::Tensor& F, at::TensorList C) {
  const Dims d = dims(Bs, A, dt, z, F, C);
  at::Tensor kf = at::empty({d.ch, d.K * d.H, d.Lf, 2}, Bs.options());
  at::Tensor r = at::empty({d.K * d.H, d.Lf, 2 * (d.ch + 1), 2}, Bs.options());
  std::vector<const void*> pc;
  for (const at::Tensor& c : C) pc.push_back(c.data_ptr());
  const bool dbl = C[0].scalar_type() == at::kDouble;
  at::parallel_for(0, d.K * d.blocks_per_kernel(), grain(d), [&](int64_t i0, int64_t i1) {
    run_blocks(d, i0, i1, false, dbl, Bs.data_ptr<double>(), A.data_ptr<double>(),
               dt.data_ptr<double>(), z.data_ptr<double>(), F.data_ptr<double>(), pc.data(),
               nullptr, nullptr, nullptr, nullptr, nullptr, kf.data_ptr<double>(),
               r.data_ptr<double>());
  });
  return {kf, r};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> dplr_bwd(
    const at::Tensor& Bs, const at::Tensor& A, const at::Tensor& dt, const at::Tensor& z,
    const at::Tensor& F, at::TensorList C, const at::Tensor& r, const at::Tensor& G) {
  const Dims d = dims(Bs, A, dt, z, F, C);
  check(r, "r", {d.K * d.H, d.Lf, 2 * (d.ch + 1), 2});
  check(G, "G", {d.ch, d.K * d.H, d.Lf, 2});
  const int64_t nb = d.blocks_per_kernel();
  std::vector<at::Tensor> gC;
  std::vector<const void*> pc;
  std::vector<void*> pg;
  for (const at::Tensor& c : C) {
    gC.push_back(at::empty_like(c));
    pc.push_back(c.data_ptr());
    pg.push_back(gC.back().data_ptr());
  }
  at::Tensor gdt = at::empty_like(dt);
  at::Tensor part = at::empty({d.K, nb, 3, d.N, 2}, Bs.options());
  const bool dbl = C[0].scalar_type() == at::kDouble;
  at::parallel_for(0, d.K * nb, std::max<int64_t>(1, grain(d) / 2), [&](int64_t i0, int64_t i1) {
    run_blocks(d, i0, i1, true, dbl, Bs.data_ptr<double>(), A.data_ptr<double>(),
               dt.data_ptr<double>(), z.data_ptr<double>(), F.data_ptr<double>(), pc.data(),
               r.data_ptr<double>(), G.data_ptr<double>(), pg.data(), gdt.data_ptr<double>(),
               part.data_ptr<double>(), nullptr, nullptr);
  });
  // (K, nb, 3 N 2) -> sums over the blocks, in block order: gBs (K, 2, N, 2), gA (K, N, 2)
  at::Tensor gBs = at::zeros({d.K, 2, d.N, 2}, Bs.options());
  at::Tensor gA = at::zeros({d.K, d.N, 2}, Bs.options());
  const double* pp = part.data_ptr<double>();
  double *pb = gBs.data_ptr<double>(), *pa = gA.data_ptr<double>();
  const int64_t M = 2 * d.N * 2;  // gB and gP of one kernel: (2, N, 2)
  for (int64_t k = 0; k < d.K; ++k) {
    for (int64_t i = 0; i < nb; ++i) {
      const double* p = pp + (k * nb + i) * 3 * d.N * 2;
      for (int64_t e = 0; e < M; ++e) pb[k * M + e] += p[e];
      for (int64_t e = 0; e < 2 * d.N; ++e) pa[k * 2 * d.N + e] += p[M + e];
    }
  }
  return {gBs, gA, gdt, gC};
}

}  // namespace mmssm_dplr

TORCH_LIBRARY_FRAGMENT(mmssm_cauchy, m) {
  m.def("dplr_fwd(Tensor Bs, Tensor A, Tensor dt, Tensor z, Tensor F, Tensor[] C)"
        " -> (Tensor, Tensor)");
  m.def("dplr_bwd(Tensor Bs, Tensor A, Tensor dt, Tensor z, Tensor F, Tensor[] C, Tensor r,"
        " Tensor G) -> (Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(mmssm_cauchy, CPU, m) {
  m.impl("dplr_fwd", &mmssm_dplr::dplr_fwd);
  m.impl("dplr_bwd", &mmssm_dplr::dplr_bwd);
}
#endif  // __GNUC__
