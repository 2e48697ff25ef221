// Compiled CPU selective scan (Mamba-1 S6), forward and backward, on ATen.
//
// One source (included by selective_scan_{default,avx2,avx512}.cpp), built three times
// by setup.py (baseline, AVX2+FMA, AVX-512) into
// mmssm/ops/_scan_cpu_{default,avx2,avx512}; mmssm/ops/selective_scan_cpp.py
// loads the best one the CPU supports. Each build registers its kernels as the
// private ops MMSSM_SCAN_NS::fwd / ::bwd; the public op mmssm::selective_scan_fwd
// (Python, torch.library) calls them.
//
// Math (per channel c, state k, scan step s; see selective_scan.py):
//   dt_s = softplus(delta_s + bias)        a_s = exp(dt_s A_k)
//   h_s  = a_s h_{s-1} + dt_s u_s B_{k,s}   y_s = sum_k h_s C_{k,s} + D u_s
//   out_s = y_s * silu(z_s)
//
// Layout of the work: a task is (batch row, block of W channels), W = SIMD width
// of acc_t. SIMD runs ACROSS CHANNELS, so n = 1 (VMamba) vectorises as well as
// n = 16; a block never straddles a B or C group, so an input-dependent B/C value
// is one broadcast scalar for the whole vector. Time is cut into tiles of kChunk
// steps: a tile of u / delta / z is transposed into (step, lane) buffers in L1,
// the state h (n x W) stays in L1/registers across the whole time loop, and the
// output tile is transposed back. Nothing of size (l, d, n) is ever allocated.
// The forward optionally saves the state entering each tile ("chunk states",
// (b, d, n_chunks, n)); the backward walks the tiles in reverse, recomputes the
// tile's states from the saved one (kept in a (kChunk, n, W) buffer) and runs the
// adjoint scan. dB/dC of an input-dependent B/C are summed over the lanes of a
// block, written per block, and reduced over the blocks of a group afterwards in
// a fixed order (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "scan_order.h"

#ifndef MMSSM_SCAN_NS
#error "MMSSM_SCAN_NS must name the op namespace of this build"
#endif
#define MMSSM_STR2(x) #x
#define MMSSM_STR(x) MMSSM_STR2(x)

namespace {

using at::vec::Vectorized;
constexpr int64_t kChunk = 64;  // time steps per tile == distance between saved states

// Strided read-only view of an activation (b, rows, l) or B/C (b, g, n, l).
template <typename T>
struct View {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

template <typename T>
View<T> view_of(const at::Tensor& t) {
  View<T> v;
  if (!t.defined() || t.dim() < 2) return v;
  v.p = t.data_ptr<T>();
  v.s0 = t.stride(0);
  v.s1 = t.stride(1);
  v.s2 = t.stride(2);
  v.s3 = t.dim() == 4 ? t.stride(3) : 0;
  return v;
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& x) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return a + b; }, x);
}

template <typename acc_t>
inline Vectorized<acc_t> softplus(const Vectorized<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  // torch.nn.functional.softplus: x above threshold 20 is returned as is
  return Vec::blendv(x.exp().log1p(), x, x > Vec(acc_t(20)));
}

template <typename acc_t>
inline Vectorized<acc_t> sigmoid(const Vectorized<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  return Vec(acc_t(1)) / (Vec(acc_t(1)) + (Vec(acc_t(0)) - x).exp());
}

// Tasks per thread chunk: small scans run on one thread (an OpenMP region costs
// more than they do, and far more when the cores are shared).
inline int64_t grain(int64_t l, int64_t n, int64_t W) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, l * n * W));
}

// Shape and flags of one call, plus the channel blocks.
struct Geometry {
  int64_t b, d, l, n, W;
  int64_t gB, gC;              // groups (0: constant (d, n))
  int64_t sizeB, sizeC;        // channels per group (d for constant)
  std::vector<int64_t> c0, nl;  // block start channel, lanes used
  int64_t n_chunks() const { return (l + kChunk - 1) / kChunk; }
  int64_t time(int64_t s, bool reverse) const { return reverse ? l - 1 - s : s; }
};

Geometry make_geometry(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, int64_t W) {
  Geometry g;
  g.b = u.size(0);
  g.d = u.size(1);
  g.l = u.size(2);
  g.n = A.size(1);
  g.W = W;
  g.gB = B.dim() == 2 ? 0 : B.size(1);
  g.gC = C.dim() == 2 ? 0 : C.size(1);
  g.sizeB = g.gB ? g.d / g.gB : g.d;
  g.sizeC = g.gC ? g.d / g.gC : g.d;
  const int64_t seg = std::gcd(g.sizeB, g.sizeC);  // blocks never straddle a group
  for (int64_t s = 0; s < g.d; s += seg)
    for (int64_t c = s; c < s + seg; c += W) {
      g.c0.push_back(c);
      g.nl.push_back(std::min(W, s + seg - c));
    }
  return g;
}

// Per-call operands in the work dtype.
template <typename scalar_t, typename acc_t>
struct Operands {
  View<scalar_t> u, delta, z, B, C;  // activations (B/C only when input-dependent)
  const acc_t *A = nullptr, *Bc = nullptr, *Cc = nullptr, *D = nullptr, *bias = nullptr;
  // input-dependent B / C, z gate given (explicit: an empty tensor's data pointer is null)
  bool Bv = false, Cv = false, zv = false;
  bool softplus = false, reverse = false;
};

// Per-thread scratch: per-lane parameters and one tile of every operand.
template <typename acc_t>
struct Scratch {
  int64_t n, W;
  std::vector<acc_t> A, Bc, Cc, D, bias;  // (n, W) / (W) per lane
  std::vector<acc_t> u, raw, dt, z, y, g;  // (kChunk, W) tiles
  std::vector<acc_t> Bt, Ct;              // (kChunk, n) group-shared B/C values
  std::vector<acc_t> h, h0;               // (n, W) state
  Scratch(int64_t n_, int64_t W_) : n(n_), W(W_) {
    for (auto* v : {&A, &Bc, &Cc, &h, &h0}) v->assign(n * W, 0);
    for (auto* v : {&D, &bias}) v->assign(W, 0);
    for (auto* v : {&u, &raw, &dt, &z, &y, &g}) v->assign(kChunk * W, 0);
    for (auto* v : {&Bt, &Ct}) v->assign(kChunk * n, 0);
  }
};

// Lane-wise parameters of block [c0, c0 + nl); unused lanes get 0 (A = 0 -> a = 1,
// u = 0 -> no input: dead lanes stay finite and contribute nothing).
template <typename scalar_t, typename acc_t>
void load_params(const Operands<scalar_t, acc_t>& op, const Geometry& g, int64_t c0, int64_t nl,
                 Scratch<acc_t>& s) {
  const int64_t W = g.W, n = g.n;
  std::fill(s.A.begin(), s.A.end(), acc_t(0));
  std::fill(s.Bc.begin(), s.Bc.end(), acc_t(0));
  std::fill(s.Cc.begin(), s.Cc.end(), acc_t(0));
  std::fill(s.D.begin(), s.D.end(), acc_t(0));
  std::fill(s.bias.begin(), s.bias.end(), acc_t(0));
  for (int64_t i = 0; i < nl; ++i) {
    const int64_t c = c0 + i;
    for (int64_t k = 0; k < n; ++k) {
      s.A[k * W + i] = op.A[c * n + k];
      if (op.Bc) s.Bc[k * W + i] = op.Bc[c * n + k];
      if (op.Cc) s.Cc[k * W + i] = op.Cc[c * n + k];
    }
    if (op.D) s.D[i] = op.D[c];
    if (op.bias) s.bias[i] = op.bias[c];
  }
}

// Transpose one tile of steps [s0, s0 + T) into (step, lane) buffers (work dtype):
// u, raw = delta + bias, dt = softplus(raw) (or raw), z; group-shared B/C values.
template <typename scalar_t, typename acc_t>
void load_tile(const Operands<scalar_t, acc_t>& op, const Geometry& g, int64_t bi, int64_t c0,
               int64_t nl, int64_t s0, int64_t T, Scratch<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, n = g.n;
  if (nl < W) {
    std::fill(s.u.begin(), s.u.end(), acc_t(0));
    std::fill(s.raw.begin(), s.raw.end(), acc_t(0));
    std::fill(s.z.begin(), s.z.end(), acc_t(0));
  }
  for (int64_t i = 0; i < nl; ++i) {
    const int64_t c = c0 + i;
    const scalar_t* up = op.u.p + bi * op.u.s0 + c * op.u.s1;
    const scalar_t* dp = op.delta.p + bi * op.delta.s0 + c * op.delta.s1;
    const acc_t bias = s.bias[i];
    for (int64_t j = 0; j < T; ++j) {
      const int64_t t = g.time(s0 + j, op.reverse);
      s.u[j * W + i] = static_cast<acc_t>(up[t * op.u.s2]);
      s.raw[j * W + i] = static_cast<acc_t>(dp[t * op.delta.s2]) + bias;
    }
    if (op.zv) {
      const scalar_t* zp = op.z.p + bi * op.z.s0 + c * op.z.s1;
      for (int64_t j = 0; j < T; ++j)
        s.z[j * W + i] = static_cast<acc_t>(zp[g.time(s0 + j, op.reverse) * op.z.s2]);
    }
  }
  for (int64_t j = 0; j < T; ++j) {
    Vec r = Vec::loadu(s.raw.data() + j * W);
    (op.softplus ? softplus<acc_t>(r) : r).store(s.dt.data() + j * W);
  }
  const View<scalar_t>* bc[2] = {&op.B, &op.C};
  const bool varying[2] = {op.Bv, op.Cv};
  std::vector<acc_t>* dst[2] = {&s.Bt, &s.Ct};
  const int64_t size[2] = {g.sizeB, g.sizeC};
  for (int m = 0; m < 2; ++m) {
    const View<scalar_t>& X = *bc[m];
    if (!varying[m]) continue;
    const scalar_t* xp = X.p + bi * X.s0 + (c0 / size[m]) * X.s1;
    acc_t* out = dst[m]->data();
    for (int64_t k = 0; k < n; ++k)
      for (int64_t j = 0; j < T; ++j)
        out[j * n + k] = static_cast<acc_t>(xp[k * X.s2 + g.time(s0 + j, op.reverse) * X.s3]);
  }
}

// Transpose a (step, lane) tile back into a contiguous (b, d, l) tensor.
template <typename acc_t, typename out_t>
void store_tile(out_t* out, const Geometry& g, bool reverse, int64_t bi, int64_t c0, int64_t nl,
                int64_t s0, int64_t T, const acc_t* tile) {
  for (int64_t i = 0; i < nl; ++i) {
    out_t* row = out + (bi * g.d + c0 + i) * g.l;
    for (int64_t j = 0; j < T; ++j)
      row[g.time(s0 + j, reverse)] = static_cast<out_t>(tile[j * g.W + i]);
  }
}

template <typename acc_t>
inline Vectorized<acc_t> bc_value(bool constant, const acc_t* per_lane, const acc_t* shared,
                                  int64_t k, int64_t j, int64_t n, int64_t W) {
  return constant ? Vectorized<acc_t>::loadu(per_lane + k * W)
                  : Vectorized<acc_t>(shared[j * n + k]);
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const Operands<scalar_t, acc_t>& op, const Geometry& g, at::Tensor& out,
                    at::Tensor& last, at::Tensor& states, bool save) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, n = g.n, nblk = g.c0.size(), nch = g.n_chunks();
  const bool out_acc = out.scalar_type() != c10::CppTypeToScalarType<scalar_t>::value;
  acc_t* last_p = last.data_ptr<acc_t>();
  acc_t* st_p = save ? states.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, g.b * nblk, grain(g.l, n, W), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(n, W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / nblk, blk = task % nblk, c0 = g.c0[blk], nl = g.nl[blk];
      load_params(op, g, c0, nl, s);
      std::fill(s.h.begin(), s.h.end(), acc_t(0));
      acc_t* h = s.h.data();
      const Vec D = Vec::loadu(s.D.data());
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t s0 = ch * kChunk, T = std::min(kChunk, g.l - s0);
        if (save)  // state entering this chunk: (b, d, nch, n)
          for (int64_t i = 0; i < nl; ++i)
            for (int64_t k = 0; k < n; ++k)
              st_p[((bi * g.d + c0 + i) * nch + ch) * n + k] = h[k * W + i];
        load_tile(op, g, bi, c0, nl, s0, T, s);
        for (int64_t j = 0; j < T; ++j) {
          const Vec u = Vec::loadu(s.u.data() + j * W), dt = Vec::loadu(s.dt.data() + j * W);
          const Vec dtu = dt * u;
          Vec y(acc_t(0));
          for (int64_t k = 0; k < n; ++k) {
            const Vec a = (dt * Vec::loadu(s.A.data() + k * W)).exp();
            const Vec bk = bc_value(!op.Bv, s.Bc.data(), s.Bt.data(), k, j, n, W);
            const Vec ck = bc_value(!op.Cv, s.Cc.data(), s.Ct.data(), k, j, n, W);
            const Vec hk = at::vec::fmadd(a, Vec::loadu(h + k * W), dtu * bk);
            hk.store(h + k * W);
            y = at::vec::fmadd(hk, ck, y);
          }
          y = at::vec::fmadd(D, u, y);
          if (op.zv) {
            const Vec z = Vec::loadu(s.z.data() + j * W);
            y = y * z * sigmoid<acc_t>(z);
          }
          y.store(s.y.data() + j * W);
        }
        if (out_acc)
          store_tile(out.data_ptr<acc_t>(), g, op.reverse, bi, c0, nl, s0, T, s.y.data());
        else
          store_tile(out.data_ptr<scalar_t>(), g, op.reverse, bi, c0, nl, s0, T, s.y.data());
      }
      for (int64_t i = 0; i < nl; ++i)
        for (int64_t k = 0; k < n; ++k) last_p[(bi * g.d + c0 + i) * n + k] = h[k * W + i];
    }
  });
}

// Backward outputs; partial sums are reduced by the caller (fixed order).
template <typename scalar_t, typename acc_t>
struct Grads {
  scalar_t *du, *ddelta, *dz;       // (b, d, l) contiguous
  acc_t *dA, *dD, *dbias;           // per batch row: (b, d, n), (b, d), (b, d)
  acc_t *dBc, *dCc;                 // constant B/C: (b, d, n)
  acc_t *dBp, *dCp;                 // input-dependent B/C: per block (b, nblk, n, l)
};

template <typename scalar_t, typename acc_t>
void backward_kernel(const Operands<scalar_t, acc_t>& op, const Geometry& g, const acc_t* dout,
                     const acc_t* dlast, const acc_t* states, Grads<scalar_t, acc_t>& gr) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, n = g.n, nblk = g.c0.size(), nch = g.n_chunks(), l = g.l;
  at::parallel_for(0, g.b * nblk, grain(g.l, n, W), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(n, W);
    // recomputed states and decays of one chunk: (kChunk, n, W) each
    std::vector<acc_t> hbuf(kChunk * n * W), abuf(kChunk * n * W), ypre(kChunk * W);
    std::vector<acc_t> G(n * W), dA(n * W), dBc(n * W), dCc(n * W), dBt(kChunk * n),
        dCt(kChunk * n), du(kChunk * W), dd(kChunk * W), dz(kChunk * W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / nblk, blk = task % nblk, c0 = g.c0[blk], nl = g.nl[blk];
      load_params(op, g, c0, nl, s);
      std::fill(G.begin(), G.end(), acc_t(0));
      if (dlast)
        for (int64_t i = 0; i < nl; ++i)
          for (int64_t k = 0; k < n; ++k) G[k * W + i] = dlast[(bi * g.d + c0 + i) * n + k];
      for (auto* v : {&dA, &dBc, &dCc}) std::fill(v->begin(), v->end(), acc_t(0));
      Vec dD(acc_t(0)), dbias(acc_t(0));
      const Vec D = Vec::loadu(s.D.data());
      for (int64_t ch = nch - 1; ch >= 0; --ch) {
        const int64_t s0 = ch * kChunk, T = std::min(kChunk, l - s0);
        load_tile(op, g, bi, c0, nl, s0, T, s);
        // dout tile (g buffer), zero in dead lanes
        if (nl < W) std::fill(s.g.begin(), s.g.end(), acc_t(0));
        for (int64_t i = 0; i < nl; ++i) {
          const acc_t* row = dout + (bi * g.d + c0 + i) * l;
          for (int64_t j = 0; j < T; ++j) s.g[j * W + i] = row[g.time(s0 + j, op.reverse)];
        }
        // 1) recompute the chunk's states from the saved one
        std::fill(s.h0.begin(), s.h0.end(), acc_t(0));
        for (int64_t i = 0; i < nl; ++i)
          for (int64_t k = 0; k < n; ++k)
            s.h0[k * W + i] = states[((bi * g.d + c0 + i) * nch + ch) * n + k];
        for (int64_t j = 0; j < T; ++j) {
          const Vec u = Vec::loadu(s.u.data() + j * W), dt = Vec::loadu(s.dt.data() + j * W);
          const Vec dtu = dt * u;
          const acc_t* hp = j ? hbuf.data() + (j - 1) * n * W : s.h0.data();
          Vec y(acc_t(0));
          for (int64_t k = 0; k < n; ++k) {
            const Vec a = (dt * Vec::loadu(s.A.data() + k * W)).exp();
            const Vec bk = bc_value(!op.Bv, s.Bc.data(), s.Bt.data(), k, j, n, W);
            const Vec ck = bc_value(!op.Cv, s.Cc.data(), s.Ct.data(), k, j, n, W);
            const Vec hk = at::vec::fmadd(a, Vec::loadu(hp + k * W), dtu * bk);
            a.store(abuf.data() + (j * n + k) * W);
            hk.store(hbuf.data() + (j * n + k) * W);
            y = at::vec::fmadd(hk, ck, y);
          }
          at::vec::fmadd(D, u, y).store(ypre.data() + j * W);
        }
        // 2) adjoint scan: G_s = dL/dh_s = C_s dy_s + a_{s+1} G_{s+1}
        for (int64_t j = T - 1; j >= 0; --j) {
          const Vec u = Vec::loadu(s.u.data() + j * W), dt = Vec::loadu(s.dt.data() + j * W);
          const Vec dtu = dt * u;
          Vec dy = Vec::loadu(s.g.data() + j * W);
          if (op.zv) {
            const Vec z = Vec::loadu(s.z.data() + j * W), sg = sigmoid<acc_t>(z);
            const Vec one(acc_t(1));
            const Vec y = Vec::loadu(ypre.data() + j * W);
            (dy * y * sg * (one + z * (one - sg))).store(dz.data() + j * W);
            dy = dy * z * sg;
          }
          Vec ddt(acc_t(0)), duv = D * dy;
          const acc_t* hp = j ? hbuf.data() + (j - 1) * n * W : s.h0.data();
          for (int64_t k = 0; k < n; ++k) {
            const Vec bk = bc_value(!op.Bv, s.Bc.data(), s.Bt.data(), k, j, n, W);
            const Vec ck = bc_value(!op.Cv, s.Cc.data(), s.Ct.data(), k, j, n, W);
            const Vec a = Vec::loadu(abuf.data() + (j * n + k) * W);
            const Vec hk = Vec::loadu(hbuf.data() + (j * n + k) * W);
            const Vec Gk = at::vec::fmadd(ck, dy, Vec::loadu(G.data() + k * W));
            const Vec hdy = hk * dy, gdtu = Gk * dtu, gb = Gk * bk;
            if (op.Cv) dCt[j * n + k] = hsum<acc_t>(hdy);
            else (Vec::loadu(dCc.data() + k * W) + hdy).store(dCc.data() + k * W);
            if (op.Bv) dBt[j * n + k] = hsum<acc_t>(gdtu);
            else (Vec::loadu(dBc.data() + k * W) + gdtu).store(dBc.data() + k * W);
            ddt = at::vec::fmadd(gb, u, ddt);
            duv = at::vec::fmadd(gb, dt, duv);
            const Vec x = Gk * a * Vec::loadu(hp + k * W);  // dL/d(dt A_k)
            const Vec Ak = Vec::loadu(s.A.data() + k * W);
            ddt = at::vec::fmadd(x, Ak, ddt);
            at::vec::fmadd(x, dt, Vec::loadu(dA.data() + k * W)).store(dA.data() + k * W);
            (a * Gk).store(G.data() + k * W);
          }
          dD = at::vec::fmadd(dy, u, dD);
          if (op.softplus) ddt = ddt * sigmoid<acc_t>(Vec::loadu(s.raw.data() + j * W));
          dbias = dbias + ddt;
          duv.store(du.data() + j * W);
          ddt.store(dd.data() + j * W);
        }
        store_tile(gr.du, g, op.reverse, bi, c0, nl, s0, T, du.data());
        store_tile(gr.ddelta, g, op.reverse, bi, c0, nl, s0, T, dd.data());
        if (op.zv) store_tile(gr.dz, g, op.reverse, bi, c0, nl, s0, T, dz.data());
        acc_t* part[2] = {op.Bv ? gr.dBp : nullptr, op.Cv ? gr.dCp : nullptr};
        const acc_t* tile[2] = {dBt.data(), dCt.data()};
        for (int m = 0; m < 2; ++m) {
          if (!part[m]) continue;
          acc_t* base = part[m] + (bi * nblk + blk) * n * l;
          for (int64_t k = 0; k < n; ++k)
            for (int64_t j = 0; j < T; ++j)
              base[k * l + g.time(s0 + j, op.reverse)] = tile[m][j * n + k];
        }
      }
      acc_t dDa[64], dba[64];
      dD.store(dDa);
      dbias.store(dba);
      for (int64_t i = 0; i < nl; ++i) {
        const int64_t c = c0 + i, row = bi * g.d + c;
        gr.dD[row] = dDa[i];
        gr.dbias[row] = dba[i];
        for (int64_t k = 0; k < n; ++k) {
          gr.dA[row * n + k] = dA[k * W + i];
          if (!op.Bv) gr.dBc[row * n + k] = dBc[k * W + i];
          if (!op.Cv) gr.dCc[row * n + k] = dCc[k * W + i];
        }
      }
    }
  });
}

// ---------------------------------------------------------------- glue
at::ScalarType acc_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// Activations share one dtype in the kernel: u's, unless they are mixed (autocast),
// then all are read as the work dtype.
at::ScalarType io_type(const at::Tensor& u, std::initializer_list<at::Tensor> xs) {
  for (const auto& x : xs)
    if (x.defined() && x.dim() >= 3 && x.scalar_type() != u.scalar_type())
      return acc_type(u.scalar_type());
  return u.scalar_type();
}

at::Tensor as_io(const at::Tensor& x, at::ScalarType st) {
  if (!x.defined() || x.dim() == 2) return x;
  return x.scalar_type() == st ? x : x.to(st);
}

at::Tensor param(const c10::optional<at::Tensor>& x, at::ScalarType acc) {
  return x.has_value() && x->defined() ? x->to(acc).contiguous() : at::Tensor();
}

template <typename scalar_t, typename acc_t>
Operands<scalar_t, acc_t> make_operands(const at::Tensor& u, const at::Tensor& delta,
                                        const at::Tensor& A, const at::Tensor& B,
                                        const at::Tensor& C, const at::Tensor& D,
                                        const at::Tensor& z, const at::Tensor& bias,
                                        bool softplus, bool reverse) {
  Operands<scalar_t, acc_t> op;
  op.u = view_of<scalar_t>(u);
  op.delta = view_of<scalar_t>(delta);
  op.zv = z.defined();
  op.Bv = B.dim() == 4;
  op.Cv = C.dim() == 4;
  if (op.zv) op.z = view_of<scalar_t>(z);
  if (op.Bv) op.B = view_of<scalar_t>(B); else op.Bc = B.data_ptr<acc_t>();
  if (op.Cv) op.C = view_of<scalar_t>(C); else op.Cc = C.data_ptr<acc_t>();
  op.A = A.data_ptr<acc_t>();
  op.D = D.defined() ? D.data_ptr<acc_t>() : nullptr;
  op.bias = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  op.softplus = softplus;
  op.reverse = reverse;
  return op;
}

void check(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C) {
  TORCH_CHECK(u.device().is_cpu(), "mmssm CPU scan: tensors must be on the CPU");
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2, "mmssm CPU scan: u (b, d, l) and A (d, n) expected");
  for (const auto* X : {&B, &C})
    TORCH_CHECK(X->dim() == 2 || X->dim() == 4,
                "mmssm CPU scan: B/C must be (d, n) or (b, g, n, l) (the Python wrapper "
                "unsqueezes (b, n, l))");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const c10::optional<at::Tensor>& D_in,
    const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& bias_in,
    bool softplus, bool out_fp32, bool reverse, bool save_states) {
  check(u_in, A_in, B_in, C_in);
  const auto acc = acc_type(u_in.scalar_type());
  const at::Tensor z_opt = z_in.has_value() ? *z_in : at::Tensor();
  const auto io = io_type(u_in, {delta_in, B_in, C_in, z_opt});
  const at::Tensor u = as_io(u_in, io), delta = as_io(delta_in, io), z = as_io(z_opt, io);
  const at::Tensor B = B_in.dim() == 2 ? B_in.to(acc).contiguous() : as_io(B_in, io);
  const at::Tensor C = C_in.dim() == 2 ? C_in.to(acc).contiguous() : as_io(C_in, io);
  const at::Tensor A = A_in.to(acc).contiguous(), D = param(D_in, acc), bias = param(bias_in, acc);
  const auto out_t = acc == at::kDouble ? acc : (out_fp32 ? at::kFloat : u_in.scalar_type());
  // the kernel writes either the io dtype or the work dtype; anything else is cast after
  const auto write_t = (out_t == io || out_t == acc) ? out_t : acc;
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2), n = A.size(1);
  at::Tensor out = at::empty({b, d, l}, u.options().dtype(write_t));
  at::Tensor last = at::empty({b, d, n}, u.options().dtype(acc));
  at::Tensor states = save_states ? at::empty({b, d, (l + kChunk - 1) / kChunk, n},
                                              u.options().dtype(acc))
                                  : at::empty({0}, u.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, io, "mmssm_scan_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = make_geometry(u, A, B, C, Vectorized<acc_t>::size());
    auto op = make_operands<scalar_t, acc_t>(u, delta, A, B, C, D, z, bias, softplus, reverse);
    forward_kernel<scalar_t, acc_t>(op, g, out, last, states, save_states);
  });
  if (out.scalar_type() != out_t) out = out.to(out_t);
  return {out, last, states};
}

std::vector<at::Tensor> scan_bwd(
    const at::Tensor& dout_in, const c10::optional<at::Tensor>& dlast_in, const at::Tensor& u_in,
    const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const c10::optional<at::Tensor>& D_in,
    const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& states_in, bool softplus, bool reverse) {
  check(u_in, A_in, B_in, C_in);
  const auto acc = acc_type(u_in.scalar_type());
  const at::Tensor z_opt = z_in.has_value() ? *z_in : at::Tensor();
  const auto io = io_type(u_in, {delta_in, B_in, C_in, z_opt});
  const at::Tensor u = as_io(u_in, io), delta = as_io(delta_in, io), z = as_io(z_opt, io);
  const at::Tensor B = B_in.dim() == 2 ? B_in.to(acc).contiguous() : as_io(B_in, io);
  const at::Tensor C = C_in.dim() == 2 ? C_in.to(acc).contiguous() : as_io(C_in, io);
  const at::Tensor A = A_in.to(acc).contiguous(), D = param(D_in, acc), bias = param(bias_in, acc);
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2), n = A.size(1);
  const int64_t nch = (l + kChunk - 1) / kChunk;
  TORCH_CHECK(states_in.numel() == b * d * nch * n,
              "mmssm CPU scan backward: chunk_states do not come from this kernel's forward "
              "(run the forward with save_states=True)");
  const at::Tensor states = states_in.to(acc).contiguous();
  const at::Tensor dout = dout_in.to(acc).contiguous();
  at::Tensor dlast;
  if (dlast_in.has_value() && dlast_in->defined()) dlast = dlast_in->to(acc).contiguous();
  auto fo = u.options().dtype(acc);
  at::Tensor du = at::empty({b, d, l}, u.options().dtype(io));
  at::Tensor ddelta = at::empty({b, d, l}, u.options().dtype(io));
  at::Tensor dz = z.defined() ? at::empty({b, d, l}, u.options().dtype(io)) : at::empty({0}, fo);
  at::Tensor dA = at::empty({b, d, n}, fo), dD = at::empty({b, d}, fo);
  at::Tensor dbias = at::empty({b, d}, fo);
  at::Tensor dB, dC;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, io, "mmssm_scan_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = make_geometry(u, A, B, C, Vectorized<acc_t>::size());
    const int64_t nblk = g.c0.size();
    auto op = make_operands<scalar_t, acc_t>(u, delta, A, B, C, D, z, bias, softplus, reverse);
    at::Tensor dBx = B.dim() == 2 ? at::empty({b, d, n}, fo) : at::empty({b, nblk, n, l}, fo);
    at::Tensor dCx = C.dim() == 2 ? at::empty({b, d, n}, fo) : at::empty({b, nblk, n, l}, fo);
    Grads<scalar_t, acc_t> gr;
    gr.du = du.data_ptr<scalar_t>();
    gr.ddelta = ddelta.data_ptr<scalar_t>();
    gr.dz = z.defined() ? dz.data_ptr<scalar_t>() : nullptr;
    gr.dA = dA.data_ptr<acc_t>();
    gr.dD = dD.data_ptr<acc_t>();
    gr.dbias = dbias.data_ptr<acc_t>();
    gr.dBc = B.dim() == 2 ? dBx.data_ptr<acc_t>() : nullptr;
    gr.dCc = C.dim() == 2 ? dCx.data_ptr<acc_t>() : nullptr;
    gr.dBp = B.dim() == 4 ? dBx.data_ptr<acc_t>() : nullptr;
    gr.dCp = C.dim() == 4 ? dCx.data_ptr<acc_t>() : nullptr;
    backward_kernel<scalar_t, acc_t>(op, g, dout.data_ptr<acc_t>(),
                                     dlast.defined() ? dlast.data_ptr<acc_t>() : nullptr,
                                     states.data_ptr<acc_t>(), gr);
    // per-block dB/dC partials -> per group, summed over the group's blocks in order
    auto reduce = [&](const at::Tensor& part, const at::Tensor& X) {
      if (X.dim() == 2) return part.sum(0);
      const int64_t groups = X.size(1);
      return part.view({b, groups, nblk / groups, n, l}).sum(2);
    };
    dB = reduce(dBx, B);
    dC = reduce(dCx, C);
  });
  return {du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0)};
}

std::string capability() { return MMSSM_STR(CPU_CAPABILITY); }

}  // namespace

TORCH_LIBRARY(MMSSM_SCAN_NS, m) {
  m.def("fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, bool out_fp32, bool reverse, "
        "bool save_states) -> (Tensor, Tensor, Tensor)");
  m.def("bwd(Tensor dout, Tensor? dlast, Tensor u, Tensor delta, Tensor A, Tensor B, "
        "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor chunk_states, "
        "bool delta_softplus, bool reverse) -> Tensor[]");
  m.def("cross_scan(Tensor x) -> Tensor");
  m.def("cross_merge(Tensor y, int h, int w) -> Tensor");
  m.def("corner_rotate_all(Tensor x, int[] flips) -> Tensor");
  m.def("corner_merge_all(Tensor y, int[] flips) -> Tensor");
  m.def("capability() -> str", []() { return capability(); });
  m.def("chunk() -> int", []() { return kChunk; });
}

TORCH_LIBRARY_IMPL(MMSSM_SCAN_NS, CPU, m) {
  m.impl("fwd", &scan_fwd);
  m.impl("bwd", &scan_bwd);
  m.impl("cross_scan", &cross_scan_cpu);
  m.impl("cross_merge", &cross_merge_cpu);
  m.impl("corner_rotate_all", &corner_rotate_all_cpu);
  m.impl("corner_merge_all", &corner_merge_all_cpu);
}
