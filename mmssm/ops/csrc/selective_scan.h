// Compiled CPU selective scan (Mamba-1 S6), forward and backward, on ATen.
//
// One source (included by selective_scan_{default,avx2,avx512}.cpp), built three times
// by setup.py (baseline, AVX2+FMA, AVX-512) into
// mmssm/ops/_scan_cpu_{default,avx2,avx512}; mmssm/ops/selective_scan_cpp.py
// loads the best one the CPU supports. Each build registers its kernels as the
// private ops MMSSM_SCAN_NS::fwd / ::bwd (::fwd_out: eager inference into a given output,
// or added to it; ::cross_fwd / ::cross_bwd, VMamba's direction-aware entry:
// cross_selective_scan.h); the public ops
// mmssm::selective_scan_fwd / mmssm::cross_selective_scan_fwd (Python, torch.library)
// call them.
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
// The output takes u's layout when u is dense (token-major views: stored one vector
// per step); at n = 1 full blocks of lane-contiguous u / delta / z skip the tiles
// (forward_n1: one pass per step, bit-identical).
// The forward optionally saves the state entering each tile ("chunk states",
// (b, d, n_chunks, n)); the backward walks the tiles in reverse, recomputes the
// tile's states from the saved one (kept in a (kChunk, n, W) buffer) and runs the
// adjoint scan. dB/dC of an input-dependent B/C are summed over the lanes of a
// block, written per block, and reduced over the blocks of a group afterwards in
// a fixed order (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <type_traits>
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

// exp(x) of the state decay dt * A_k: one per (channel, state, step), the forward's
// inner-loop cost. ATen's Vectorized::exp is an out-of-line SLEEF call (u10), and a
// call clobbers every vector register (SysV ABI), so the states kept in registers
// across the time loop would be spilled around each exp. fp32 on AVX2 / AVX-512
// gets inline versions instead; float64 (gradcheck) and the baseline build keep
// ATen's exp.
//
// decay(dt, A2): the kernels keep A2 = A log2(e) per lane (rounded once from double:
// the same relative error as the rounding of dt * A it replaces), so the decay is
// 2^t, t = dt A2: n = round(t) by the 1.5 * 2^23 shifter (no round / convert
// instructions), r = t - n in [-1/2, 1/2] exactly, 2^r by a degree-6 minimax polynomial
// (1.6e-8 relative with its fp32 coefficients, under the fp32 rounding of t), and 2^n
// added to the result's exponent bits (an integer add instead of a multiply). 10
// FMA-port operations per update instead of 15 (v2: Cody-Waite reduction, degree-7
// Taylor, scaling multiply), for ~1 ulp more at large |dt A| (measured over dt in
// [0.0025, 7], A in [-55, -0.37]: 1.9 ulp mean against 1.4 for v2; below the 2 ulp of
// the softplus dt feeds it). t is clamped to [-126, 127]: decays below 2^-126 return
// ~1.2e-38 (v2: 0), above 2^127 ~1.7e38 (v2: ~3.4e38); NaN propagates.
template <typename acc_t>
constexpr bool kLog2Decay = false;  // A2 == A log2(e) (fast path) or A2 == A (ATen exp)

template <typename acc_t>
inline Vectorized<acc_t> decay(const Vectorized<acc_t>& dt, const Vectorized<acc_t>& A2) {
  return (dt * A2).exp();
}

// exp(x) of the softplus and sigmoid (general x).
template <typename acc_t>
inline Vectorized<acc_t> exp_fast(const Vectorized<acc_t>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#if defined(CPU_CAPABILITY_AVX512)
#define MMSSM_PS(op) _mm512_##op##_ps
using mmssm_vf = __m512;
// p * 2^n with n the integer in the low mantissa bits of the shifter sum s (n in
// [-126, 127], p in [0.7, 1.5]): n << 23 added to p's exponent field
inline mmssm_vf mmssm_scale(mmssm_vf p, mmssm_vf s) {
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p),
                                              _mm512_slli_epi32(_mm512_castps_si512(s), 23)));
}
#else
#define MMSSM_PS(op) _mm256_##op##_ps
using mmssm_vf = __m256;
inline mmssm_vf mmssm_scale(mmssm_vf p, mmssm_vf s) {
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p),
                                              _mm256_slli_epi32(_mm256_castps_si256(s), 23)));
}
#endif
// max(a, b) without ATen's NaN blend (returns b when a is NaN; the callers' other
// terms carry the NaN)
inline mmssm_vf mmssm_max(mmssm_vf a, mmssm_vf b) { return MMSSM_PS(max)(a, b); }
constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: x + kShifter rounds x to an integer

template <>
constexpr bool kLog2Decay<float> = true;

template <>
inline Vectorized<float> decay<float>(const Vectorized<float>& dt, const Vectorized<float>& A2) {
  // max(lo, t) / min(hi, t) return t when it is NaN (the second operand)
  mmssm_vf t = MMSSM_PS(mul)(dt, A2);
  t = MMSSM_PS(min)(MMSSM_PS(set1)(127.0f), MMSSM_PS(max)(MMSSM_PS(set1)(-126.0f), t));
  const mmssm_vf s = MMSSM_PS(add)(t, MMSSM_PS(set1)(kShifter));
  const mmssm_vf r = MMSSM_PS(sub)(t, MMSSM_PS(sub)(s, MMSSM_PS(set1)(kShifter)));  // exact
  // 2^r, |r| <= 1/2: minimax, constant term 1 exactly
  mmssm_vf p = MMSSM_PS(set1)(1.535334159e-04f);
  p = MMSSM_PS(fmadd)(p, r, MMSSM_PS(set1)(1.339887269e-03f));
  p = MMSSM_PS(fmadd)(p, r, MMSSM_PS(set1)(9.618437849e-03f));
  p = MMSSM_PS(fmadd)(p, r, MMSSM_PS(set1)(5.550332367e-02f));
  p = MMSSM_PS(fmadd)(p, r, MMSSM_PS(set1)(2.402264774e-01f));
  p = MMSSM_PS(fmadd)(p, r, MMSSM_PS(set1)(6.931471825e-01f));
  p = MMSSM_PS(fmadd)(p, r, MMSSM_PS(set1)(1.0f));
  return Vectorized<float>(mmssm_scale(p, s));
}

// exp(x) = 2^n e^r: n = round(x log2 e) by the shifter (fused into one FMA), Cody-Waite
// r = x - n ln2 in two parts (ln2_hi has 9 trailing zero bits: n ln2_hi is exact),
// |r| <= ln2 / 2, e^r by a degree-6 minimax polynomial; ~1 ulp. x is clamped to
// [-87.34, 88.03] (n in [-126, 127]): below, ~1.2e-38 (not 0); above, ~1.7e38.
template <>
inline Vectorized<float> exp_fast<float>(const Vectorized<float>& xv) {
  const mmssm_vf x = MMSSM_PS(min)(MMSSM_PS(set1)(88.0296919f),
                                   MMSSM_PS(max)(MMSSM_PS(set1)(-87.3365479f), xv));
  const mmssm_vf s =
      MMSSM_PS(fmadd)(x, MMSSM_PS(set1)(1.44269502f), MMSSM_PS(set1)(kShifter));
  const mmssm_vf n = MMSSM_PS(sub)(s, MMSSM_PS(set1)(kShifter));
  mmssm_vf r = MMSSM_PS(fnmadd)(n, MMSSM_PS(set1)(0.693145752f), x);
  r = MMSSM_PS(fnmadd)(n, MMSSM_PS(set1)(1.42860677e-06f), r);
  // Estrin's scheme (3 dependent FMAs after r^2, not 6): the softplus of the n = 1 scan
  // (VMamba) is latency-bound, one chain per step
  const mmssm_vf r2 = MMSSM_PS(mul)(r, r);
  const mmssm_vf p01 = MMSSM_PS(fmadd)(r, MMSSM_PS(set1)(1.0f), MMSSM_PS(set1)(1.0f));
  const mmssm_vf p23 =
      MMSSM_PS(fmadd)(r, MMSSM_PS(set1)(1.666643173e-01f), MMSSM_PS(set1)(4.999999404e-01f));
  const mmssm_vf p45 =
      MMSSM_PS(fmadd)(r, MMSSM_PS(set1)(8.374153636e-03f), MMSSM_PS(set1)(4.166800156e-02f));
  const mmssm_vf p46 = MMSSM_PS(fmadd)(r2, MMSSM_PS(set1)(1.384363626e-03f), p45);
  const mmssm_vf p03 = MMSSM_PS(fmadd)(r2, p23, p01);
  const mmssm_vf r4 = MMSSM_PS(mul)(r2, r2);
  return Vectorized<float>(mmssm_scale(MMSSM_PS(fmadd)(r4, p46, p03), s));
}
#undef MMSSM_PS
#endif

// torch.nn.functional.softplus (x above threshold 20 is returned as is) and sigmoid.
template <typename acc_t>
inline Vectorized<acc_t> softplus(const Vectorized<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  return Vec::blendv(x.exp().log1p(), x, x > Vec(acc_t(20)));
}

template <typename acc_t>
inline Vectorized<acc_t> sigmoid(const Vectorized<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  return Vec(acc_t(1)) / (Vec(acc_t(1)) + (Vec(acc_t(0)) - x).exp());
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// fp32 with the inline exp: softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1],
// where log1p(e) = k ln2 + 2 atanh(s) with s = e / (2 + e) (k = 0) or, above
// e = sqrt(2) - 1, s = (e - 1) / (e + 3) (k = 1: log of (1 + e) / 2); |s| <= 0.172, so
// atanh's series to s^9 is within 2e-9 relative. ~2 ulp, against two SLEEF calls
// (exp, log1p), which are most of the work per step at n = 1 (VMamba).
template <>
inline Vectorized<float> softplus<float>(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  const Vec e = exp_fast<float>(Vec(0.f) - x.abs());
  const Vec big = e > Vec(0.414213562f);
  const Vec s = Vec::blendv(e, e - Vec(1.f), big) / (e + Vec::blendv(Vec(2.f), Vec(3.f), big));
  const Vec s2 = s * s, s4 = s2 * s2;  // Estrin, as in exp_fast
  const Vec p = at::vec::fmadd(
      s4, at::vec::fmadd(s4, Vec(2.f / 9.f), at::vec::fmadd(s2, Vec(2.f / 7.f), Vec(2.f / 5.f))),
      at::vec::fmadd(s2, Vec(2.f / 3.f), Vec(2.f)));
  const Vec lg = at::vec::fmadd(p, s, Vec::blendv(Vec(0.f), Vec(0.693147182f), big));
  const Vec sp = Vec(mmssm_max(x, Vec(0.f))) + lg;
  return Vec::blendv(sp, x, x > Vec(20.f));
}

template <>
inline Vectorized<float> sigmoid<float>(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  return Vec(1.f) / (Vec(1.f) + exp_fast<float>(Vec(0.f) - x));
}
#endif

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
  View<scalar_t> u, delta, z;  // activations
  // input-dependent B / C, transposed to (b, g, l, n) in the work dtype once per call
  // (a tile then reads n contiguous values per step, with no per-block transpose)
  const acc_t *Bl = nullptr, *Cl = nullptr;
  const acc_t *A = nullptr, *Bc = nullptr, *Cc = nullptr, *D = nullptr, *bias = nullptr;
  // input-dependent B / C, z gate given (explicit: an empty tensor's data pointer is null)
  bool Bv = false, Cv = false, zv = false;
  bool softplus = false, reverse = false;
};

// Per-thread scratch: per-lane parameters and one tile of every operand.
template <typename acc_t>
struct Scratch {
  int64_t n, W;
  std::vector<acc_t> A, A2, Bc, Cc, D, bias;  // (n, W) / (W) per lane; A2: decay()'s A
  std::vector<acc_t> u, raw, dt, dtu, z, y, g;  // (kChunk, W) tiles
  const acc_t *Bt = nullptr, *Ct = nullptr;  // this tile's B/C rows (step j: Bt + j * bcs)
  int64_t bcs = 0;                            // n, or -n for a reverse scan
  std::vector<acc_t> h, h0;               // (n, W) state
  Scratch(int64_t n_, int64_t W_) : n(n_), W(W_) {
    for (auto* v : {&A, &A2, &Bc, &Cc, &h, &h0}) v->assign(n * W, 0);
    for (auto* v : {&D, &bias}) v->assign(W, 0);
    for (auto* v : {&u, &raw, &dt, &dtu, &z, &y, &g}) v->assign(kChunk * W, 0);
  }
};

// Lane-wise parameters of block [c0, c0 + nl); unused lanes get 0 (A = 0 -> a = 1,
// u = 0 -> no input: dead lanes stay finite and contribute nothing).
template <typename scalar_t, typename acc_t>
void load_params(const Operands<scalar_t, acc_t>& op, const Geometry& g, int64_t c0, int64_t nl,
                 Scratch<acc_t>& s) {
  const int64_t W = g.W, n = g.n;
  std::fill(s.A.begin(), s.A.end(), acc_t(0));
  std::fill(s.A2.begin(), s.A2.end(), acc_t(0));
  std::fill(s.Bc.begin(), s.Bc.end(), acc_t(0));
  std::fill(s.Cc.begin(), s.Cc.end(), acc_t(0));
  std::fill(s.D.begin(), s.D.end(), acc_t(0));
  std::fill(s.bias.begin(), s.bias.end(), acc_t(0));
  for (int64_t i = 0; i < nl; ++i) {
    const int64_t c = c0 + i;
    for (int64_t k = 0; k < n; ++k) {
      s.A[k * W + i] = op.A[c * n + k];
      s.A2[k * W + i] = kLog2Decay<acc_t>
                            ? static_cast<acc_t>(double(op.A[c * n + k]) * 1.4426950408889634)
                            : op.A[c * n + k];
      if (op.Bc) s.Bc[k * W + i] = op.Bc[c * n + k];
      if (op.Cc) s.Cc[k * W + i] = op.Cc[c * n + k];
    }
    if (op.D) s.D[i] = op.D[c];
    if (op.bias) s.bias[i] = op.bias[c];
  }
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// In-register transpose of an 8 x 8 fp32 block (rows r[0..7] become its columns).
inline void transpose8(__m256 r[8]) {
  __m256 t[8], q[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    q[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    q[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    q[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    q[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(q[i], q[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(q[i], q[i + 4], 0x31);
  }
}
inline __m256 reverse8(__m256 x) {
  return _mm256_permutevar8x32_ps(x, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0));
}
#define MMSSM_TRANSPOSE8 1
#endif

// Steps [s0, s0 + T) of nl lanes into a (T, W) tile in the work dtype: lane i of step
// j is src[i * ls + time(s0 + j) * ts]. Lanes >= nl are left as they are. fp32 on
// AVX2 with a full block moves 8 x 8 blocks through registers (step-contiguous rows:
// transposed; lane-contiguous: one vector per step); everything else goes element by
// element.
template <typename scalar_t, typename acc_t>
void gather_tile(const scalar_t* src, int64_t ls, int64_t ts, const Geometry& g, bool reverse,
                 int64_t s0, int64_t T, int64_t nl, acc_t* dst) {
  const int64_t W = g.W;
  int64_t j = 0;
#ifdef MMSSM_TRANSPOSE8
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (nl == 8 && W == 8 && ts == 1) {
      for (; j + 8 <= T; j += 8) {
        const int64_t t = reverse ? g.l - 1 - (s0 + j) - 7 : s0 + j;  // lowest time
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          r[i] = _mm256_loadu_ps(src + i * ls + t);
          if (reverse) r[i] = reverse8(r[i]);
        }
        transpose8(r);
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(dst + (j + q) * W, r[q]);
      }
    } else if (nl == 8 && W == 8 && ls == 1) {
      for (; j < T; ++j)
        _mm256_storeu_ps(dst + j * W, _mm256_loadu_ps(src + g.time(s0 + j, reverse) * ts));
    }
  }
#endif
  for (; j < T; ++j) {
    const scalar_t* p = src + g.time(s0 + j, reverse) * ts;
    for (int64_t i = 0; i < nl; ++i) dst[j * W + i] = static_cast<acc_t>(p[i * ls]);
  }
}

// Inverse of gather_tile into a contiguous (b, d, l) tensor: rows of l steps per lane.
// add: out += tile instead of out = tile (the forward's accumulate, see store_out).
template <typename acc_t, typename out_t>
void store_tile(out_t* out, const Geometry& g, bool reverse, int64_t bi, int64_t c0, int64_t nl,
                int64_t s0, int64_t T, const acc_t* tile, bool add = false) {
  const int64_t W = g.W, l = g.l;
  out_t* base = out + (bi * g.d + c0) * l;
  int64_t j = 0;
#ifdef MMSSM_TRANSPOSE8
  if constexpr (std::is_same_v<out_t, float> && std::is_same_v<acc_t, float>) {
    if (nl == 8 && W == 8) {
      for (; j + 8 <= T; j += 8) {
        const int64_t t = reverse ? l - 1 - (s0 + j) - 7 : s0 + j;
        __m256 r[8];
        for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(tile + (j + q) * W);
        transpose8(r);
        for (int i = 0; i < 8; ++i) {
          __m256 v = reverse ? reverse8(r[i]) : r[i];
          if (add) v = _mm256_add_ps(_mm256_loadu_ps(base + i * l + t), v);
          _mm256_storeu_ps(base + i * l + t, v);
        }
      }
    }
  }
#endif
  for (; j < T; ++j) {  // add decided outside the lane loops: the plain store reads nothing
    out_t* p = base + g.time(s0 + j, reverse);
    const acc_t* t = tile + j * W;
    if (add)
      for (int64_t i = 0; i < nl; ++i) p[i * l] = static_cast<out_t>(acc_t(p[i * l]) + t[i]);
    else
      for (int64_t i = 0; i < nl; ++i) p[i * l] = static_cast<out_t>(t[i]);
  }
}

// The forward's output (b, d, l) has u's layout (see scan_fwd), or any layout when the
// caller gives it (scan_fwd_out): contiguous rows go through store_tile (transposed), a
// lane-contiguous layout (token-major: V2M's and Vim's passes) takes one vector per
// step, anything else element by element. add: the tile is added to what out holds
// (old + new, one rounding to out_t: Vim's backward direction into the forward's
// output, at the same time positions g.time() gives the plain store).
struct OutLayout {
  int64_t s0, s1, s2;
  bool contiguous;
};

template <typename acc_t, typename out_t>
void store_out(out_t* out, const OutLayout& o, const Geometry& g, bool reverse, int64_t bi,
               int64_t c0, int64_t nl, int64_t s0, int64_t T, const acc_t* tile,
               bool add = false) {
  if (o.contiguous) return store_tile(out, g, reverse, bi, c0, nl, s0, T, tile, add);
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W;
  out_t* base = out + bi * o.s0 + c0 * o.s1;
  if constexpr (std::is_same_v<out_t, acc_t>) {
    if (o.s1 == 1 && nl == W) {
      for (int64_t j = 0; j < T; ++j) {
        acc_t* p = base + g.time(s0 + j, reverse) * o.s2;
        if (add)
          (Vec::loadu(p) + Vec::loadu(tile + j * W)).store(p);
        else
          Vec::loadu(tile + j * W).store(p);
      }
      return;
    }
  }
  for (int64_t j = 0; j < T; ++j) {
    out_t* p = base + g.time(s0 + j, reverse) * o.s2;
    const acc_t* t = tile + j * W;
    if (add)
      for (int64_t i = 0; i < nl; ++i)
        p[i * o.s1] = static_cast<out_t>(acc_t(p[i * o.s1]) + t[i]);
    else
      for (int64_t i = 0; i < nl; ++i) p[i * o.s1] = static_cast<out_t>(t[i]);
  }
}

// Prefetch steps [s0, s0 + T) of nl time-contiguous rows (b, rows, l) into cache. The
// tiles read 8 rows of 256 bytes 4 KB+ apart, u / delta / z / dout at once: at the
// Vim-T shapes (1.5 MB each at 512^2, beyond L2) the gathers waited on L3 for ~40%
// of the tile loads' time; prefetching the next tile while this one is scanned hides it.
template <typename T_>
void prefetch_rows(const T_* base, int64_t ls, int64_t ts, const Geometry& g, bool reverse,
                   int64_t s0, int64_t T, int64_t nl) {
  if (ts != 1 || T <= 0 || !base) return;
  const int64_t lo = reverse ? g.l - s0 - T : s0;  // lowest time of the tile
  const char* p0 = reinterpret_cast<const char*>(base + lo);
  const int64_t bytes = T * int64_t(sizeof(T_));
  for (int64_t i = 0; i < nl; ++i) {
    const char* p = p0 + i * ls * int64_t(sizeof(T_));
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
    __builtin_prefetch(p + bytes - 1, 0, 3);
  }
}

template <typename scalar_t, typename acc_t>
void prefetch_tile(const Operands<scalar_t, acc_t>& op, const Geometry& g, int64_t bi,
                   int64_t c0, int64_t nl, int64_t s0, int64_t T) {
  for (const View<scalar_t>* v : {&op.u, &op.delta, &op.z})
    if (v->p) prefetch_rows(v->p + bi * v->s0 + c0 * v->s1, v->s1, v->s2, g, op.reverse, s0, T, nl);
}

// Load one tile of steps [s0, s0 + T) into (step, lane) buffers (work dtype): u,
// raw = delta + bias, dt = softplus(raw) (or raw), z; and point Bt / Ct at the
// tile's rows of the transposed B / C.
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
  auto gather = [&](const View<scalar_t>& v, acc_t* dst) {
    gather_tile(v.p + bi * v.s0 + c0 * v.s1, v.s1, v.s2, g, op.reverse, s0, T, nl, dst);
  };
  gather(op.u, s.u.data());
  gather(op.delta, s.raw.data());
  if (op.zv) gather(op.z, s.z.data());
  const Vec bias = Vec::loadu(s.bias.data());  // 0 in dead lanes
  for (int64_t j = 0; j < T; ++j) {
    const Vec r = Vec::loadu(s.raw.data() + j * W) + bias;
    r.store(s.raw.data() + j * W);
    (op.softplus ? softplus<acc_t>(r) : r).store(s.dt.data() + j * W);
  }
  s.bcs = op.reverse ? -n : n;
  const int64_t t0 = g.time(s0, op.reverse);
  if (op.Bv) s.Bt = op.Bl + ((bi * g.gB + c0 / g.sizeB) * g.l + t0) * n;
  if (op.Cv) s.Ct = op.Cl + ((bi * g.gC + c0 / g.sizeC) * g.l + t0) * n;
}

// Forward recurrence of states [kb, kb + K) over one tile of T steps, the states
// held in registers (K vectors) across the tile; y (T, W) accumulates sum_k h_k C_k.
// BV / CV: B / C input-dependent (one broadcast scalar per (step, state)) or
// constant (a per-lane vector per state). Buffers: dt, dtu (T, W); A, Bc, Cc, h
// (n, W) (A: A2 of decay()); Bt, Ct (T, n). With hs, the states of every step are stored too
// ((T, K, W) for this block: the backward's recompute, which runs the adjoint scan of
// the block right after, while they are in L1), with as the decays.
template <typename acc_t, int K, bool BV, bool CV>
void scan_states(int64_t T, int64_t n, int64_t W, int64_t kb, const acc_t* dt, const acc_t* dtu,
                 const acc_t* A, const acc_t* Bc, const acc_t* Cc, const acc_t* Bt,
                 const acc_t* Ct, int64_t bcs, acc_t* h, acc_t* y, bool first, acc_t* hs, acc_t* as) {
  using Vec = Vectorized<acc_t>;
  Vec hk[K], Ak[K];
  for (int k = 0; k < K; ++k) {
    hk[k] = Vec::loadu(h + (kb + k) * W);
    Ak[k] = Vec::loadu(A + (kb + k) * W);
  }
  for (int64_t j = 0; j < T; ++j) {
    const Vec dtv = Vec::loadu(dt + j * W), dtuv = Vec::loadu(dtu + j * W);
    Vec yv = first ? Vec(acc_t(0)) : Vec::loadu(y + j * W);
    for (int k = 0; k < K; ++k) {
      const Vec a = decay<acc_t>(dtv, Ak[k]);
      const Vec bk = BV ? Vec(Bt[j * bcs + kb + k]) : Vec::loadu(Bc + (kb + k) * W);
      const Vec ck = CV ? Vec(Ct[j * bcs + kb + k]) : Vec::loadu(Cc + (kb + k) * W);
      hk[k] = at::vec::fmadd(a, hk[k], dtuv * bk);
      yv = at::vec::fmadd(hk[k], ck, yv);
      if (hs) {
        hk[k].store(hs + (j * K + k) * W);
        a.store(as + (j * K + k) * W);
      }
    }
    yv.store(y + j * W);
  }
  for (int k = 0; k < K; ++k) hk[k].store(h + (kb + k) * W);
}

// All n states over one tile: blocks of kStates states, then the remainder.
#ifndef MMSSM_KSTATES
#define MMSSM_KSTATES 4
#endif
constexpr int kStates = MMSSM_KSTATES;
template <typename acc_t, bool BV, bool CV>
void scan_tile(int64_t T, int64_t n, int64_t W, const acc_t* dt, const acc_t* dtu,
               const acc_t* A, const acc_t* Bc, const acc_t* Cc, const acc_t* Bt,
               const acc_t* Ct, int64_t bcs, acc_t* h, acc_t* y, acc_t* hs, acc_t* as) {
  int64_t kb = 0;
  for (; kb + kStates <= n; kb += kStates)
    scan_states<acc_t, kStates, BV, CV>(T, n, W, kb, dt, dtu, A, Bc, Cc, Bt, Ct, bcs, h, y, kb == 0,
                                        hs, as);
  switch (n - kb) {
#define MMSSM_REST(R)                                                                        \
  case R:                                                                                    \
    scan_states<acc_t, R, BV, CV>(T, n, W, kb, dt, dtu, A, Bc, Cc, Bt, Ct, bcs, h, y, kb == 0, hs, \
                                  as);                                                       \
    break;
    MMSSM_REST(1)
    MMSSM_REST(2)
    MMSSM_REST(3)
#if MMSSM_KSTATES > 4
    MMSSM_REST(4)
    MMSSM_REST(5)
    MMSSM_REST(6)
    MMSSM_REST(7)
#endif
#undef MMSSM_REST
    default:
      break;
  }
}

// scan_tile on the scratch tiles, dispatched on constant / input-dependent B and C;
// the tile's y (without D u and the gate) ends in s.y, the states in s.h.
template <typename scalar_t, typename acc_t>
void scan_tile(const Operands<scalar_t, acc_t>& op, int64_t T, Scratch<acc_t>& s,
               acc_t* hs = nullptr, acc_t* as = nullptr) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = s.W;
  for (int64_t j = 0; j < T; ++j)  // dt u, shared by every state
    (Vec::loadu(s.dt.data() + j * W) * Vec::loadu(s.u.data() + j * W)).store(s.dtu.data() + j * W);
  auto run = [&](auto bv, auto cv) {
    scan_tile<acc_t, decltype(bv)::value, decltype(cv)::value>(
        T, s.n, W, s.dt.data(), s.dtu.data(), s.A2.data(), s.Bc.data(), s.Cc.data(), s.Bt, s.Ct,
        s.bcs, s.h.data(), s.y.data(), hs, as);
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  if (op.Bv) {
    if (op.Cv) run(T_{}, T_{}); else run(T_{}, F_{});
  } else {
    if (op.Cv) run(F_{}, T_{}); else run(F_{}, F_{});
  }
}

// MMSSM_SCAN_TILED_ONLY=1 in the environment turns the one-pass n = 1 loops off (the
// tiled path then runs every block): read at each call, for A/B benchmarks in one process.
inline bool one_pass_enabled() {
  const char* e = std::getenv("MMSSM_SCAN_TILED_ONLY");
  return !(e && e[0] == '1');
}

// One full block (nl == W) at n = 1 of lane-contiguous activations (u / delta / z
// views (b, d, l) with stride 1 along d: token-major tensors, V2M's passes) in one
// pass per step: a step is one W-wide load of each operand at time t, softplus,
// decay, state update, readout, gate. The tiled path stages each of these through
// (kChunk, W) buffers (6 passes over L1 per step); here only the state is carried
// between steps, so the core overlaps the softplus / decay / gate of the next steps
// with the current one's dependent FMA. The rows of step t + kAheadN1 are
// prefetched (the column passes step over w d elements). The outputs of a chunk go
// to a (kChunk, W) tile stored by store_tile, as the tiled path's. Same operations
// in the same order as the tiled path: bit-identical results.
constexpr int64_t kAheadN1 = 16;  // steps of prefetch distance (also cross_forward_n1)

// The state update of one n = 1 step on W lanes, shared by forward_n1 and
// cross_forward_n1: dt = softplus(delta + bias) (or delta + bias), h = exp(dt A) h +
// dt u B; the tiled path's operations in its order (bit-identical results).
template <typename acc_t>
inline void n1_update(Vectorized<acc_t>& h, const Vectorized<acc_t>& delta,
                      const Vectorized<acc_t>& uv, const Vectorized<acc_t>& bk,
                      const Vectorized<acc_t>& bias, const Vectorized<acc_t>& A2,
                      bool softplus_on) {
  const Vectorized<acc_t> r = delta + bias;
  const Vectorized<acc_t> dt = softplus_on ? softplus<acc_t>(r) : r;
  h = at::vec::fmadd(decay<acc_t>(dt, A2), h, (dt * uv) * bk);
}

// dst[i * stride] = lane i of h (n = 1 chunk states and last states).
template <typename acc_t>
inline void store_lanes(const Vectorized<acc_t>& h, acc_t* dst, int64_t stride) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  acc_t hv[W];
  h.store(hv);
  for (int64_t i = 0; i < W; ++i) dst[i * stride] = hv[i];
}

template <typename acc_t, bool BV, bool CV, bool ZV>
void forward_n1(const Operands<acc_t, acc_t>& op, const Geometry& g, int64_t bi, int64_t c0,
                Scratch<acc_t>& s, acc_t* out, const OutLayout& ol, bool add, acc_t* last,
                acc_t* states) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, l = g.l, nch = g.n_chunks();
  const acc_t* u = op.u.p + bi * op.u.s0 + c0;
  const acc_t* dl = op.delta.p + bi * op.delta.s0 + c0;
  const acc_t* zp = ZV ? op.z.p + bi * op.z.s0 + c0 : nullptr;
  const int64_t us = op.u.s2, ds = op.delta.s2, zs = ZV ? op.z.s2 : 0;
  // input-dependent B / C: (b, g, l, 1) in the work dtype, one scalar per time step
  const acc_t* Bp = BV ? op.Bl + (bi * g.gB + c0 / g.sizeB) * l : nullptr;
  const acc_t* Cp = CV ? op.Cl + (bi * g.gC + c0 / g.sizeC) * l : nullptr;
  const Vec A2 = Vec::loadu(s.A2.data()), D = Vec::loadu(s.D.data());
  const Vec bias = Vec::loadu(s.bias.data());
  const Vec Bc = Vec::loadu(s.Bc.data()), Cc = Vec::loadu(s.Cc.data());
  // lane-contiguous output (token-major): y goes straight to its place, no tile
  acc_t* yo = !ol.contiguous && ol.s1 == 1 ? out + bi * ol.s0 + c0 : nullptr;
  Vec h(acc_t(0));
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t s0 = ch * kChunk, T = std::min(kChunk, l - s0);
    if (states)  // state entering this chunk: (b, d, nch, 1)
      store_lanes(h, states + (bi * g.d + c0) * nch + ch, nch);
    for (int64_t j = 0; j < T; ++j) {
      const int64_t sj = s0 + j, t = g.time(sj, op.reverse);
      if (sj + kAheadN1 < l) {
        const int64_t ta = g.time(sj + kAheadN1, op.reverse);
        __builtin_prefetch(u + ta * us, 0, 3);
        __builtin_prefetch(dl + ta * ds, 0, 3);
        if (ZV) __builtin_prefetch(zp + ta * zs, 0, 3);
      }
      const Vec uv = Vec::loadu(u + t * us);
      const Vec ck = CV ? Vec(Cp[t]) : Cc;
      n1_update(h, Vec::loadu(dl + t * ds), uv, BV ? Vec(Bp[t]) : Bc, bias, A2, op.softplus);
      Vec y = at::vec::fmadd(D, uv, at::vec::fmadd(h, ck, Vec(acc_t(0))));
      if (ZV) {
        const Vec z = Vec::loadu(zp + t * zs);
        y = y * z * sigmoid<acc_t>(z);
      }
      if (!yo)
        y.store(s.y.data() + j * W);
      else if (add)
        (Vec::loadu(yo + t * ol.s2) + y).store(yo + t * ol.s2);
      else
        y.store(yo + t * ol.s2);
    }
    if (!yo) store_out(out, ol, g, op.reverse, bi, c0, W, s0, T, s.y.data(), add);
  }
  store_lanes(h, last + bi * g.d + c0, 1);
}

// forward_n1 when it applies (n = 1, a full block, io == work dtype, lane-contiguous
// u / delta / z, the output in the work dtype); false: the caller runs the tiled path.
template <typename scalar_t, typename acc_t>
bool try_forward_n1(const Operands<scalar_t, acc_t>& op, const Geometry& g, int64_t bi,
                    int64_t c0, int64_t nl, bool enabled, Scratch<acc_t>& s, at::Tensor& out,
                    const OutLayout& ol, bool add, acc_t* last, acc_t* states) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return false;
  } else {
    if (!enabled || g.n != 1 || nl != g.W || op.u.s1 != 1 || op.delta.s1 != 1 ||
        (op.zv && op.z.s1 != 1) || out.scalar_type() != c10::CppTypeToScalarType<acc_t>::value)
      return false;
    acc_t* o = out.data_ptr<acc_t>();
    auto run = [&](auto bv, auto cv, auto zv) {
      forward_n1<acc_t, decltype(bv)::value, decltype(cv)::value, decltype(zv)::value>(
          op, g, bi, c0, s, o, ol, add, last, states);
    };
    using T_ = std::true_type;
    using F_ = std::false_type;
    auto with_z = [&](auto bv, auto cv) { op.zv ? run(bv, cv, T_{}) : run(bv, cv, F_{}); };
    if (op.Bv) {
      op.Cv ? with_z(T_{}, T_{}) : with_z(T_{}, F_{});
    } else {
      op.Cv ? with_z(F_{}, T_{}) : with_z(F_{}, F_{});
    }
    return true;
  }
}

// add: the output is added to out's values (scan_fwd_out's accumulate), else written.
template <typename scalar_t, typename acc_t>
void forward_kernel(const Operands<scalar_t, acc_t>& op, const Geometry& g, at::Tensor& out,
                    at::Tensor& last, at::Tensor& states, bool save, bool add = false) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, n = g.n, nblk = g.c0.size(), nch = g.n_chunks();
  const bool out_acc = out.scalar_type() != c10::CppTypeToScalarType<scalar_t>::value;
  acc_t* last_p = last.data_ptr<acc_t>();
  acc_t* st_p = save ? states.data_ptr<acc_t>() : nullptr;
  const bool one_pass = one_pass_enabled();
  const OutLayout ol{out.stride(0), out.stride(1), out.stride(2), out.is_contiguous()};
  at::parallel_for(0, g.b * nblk, grain(g.l, n, W), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(n, W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / nblk, blk = task % nblk, c0 = g.c0[blk], nl = g.nl[blk];
      load_params(op, g, c0, nl, s);
      if (try_forward_n1(op, g, bi, c0, nl, one_pass, s, out, ol, add, last_p, st_p)) continue;
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
        if (ch + 1 < nch) prefetch_tile(op, g, bi, c0, nl, s0 + kChunk, std::min(kChunk, g.l - s0 - kChunk));
        scan_tile(op, T, s);
        for (int64_t j = 0; j < T; ++j) {
          const Vec u = Vec::loadu(s.u.data() + j * W);
          Vec y = at::vec::fmadd(D, u, Vec::loadu(s.y.data() + j * W));
          if (op.zv) {
            const Vec z = Vec::loadu(s.z.data() + j * W);
            y = y * z * sigmoid<acc_t>(z);
          }
          y.store(s.y.data() + j * W);
        }
        if (out_acc)
          store_out(out.data_ptr<acc_t>(), ol, g, op.reverse, bi, c0, nl, s0, T, s.y.data(),
                    add);
        else
          store_out(out.data_ptr<scalar_t>(), ol, g, op.reverse, bi, c0, nl, s0, T, s.y.data(),
                    add);
      }
      for (int64_t i = 0; i < nl; ++i)
        for (int64_t k = 0; k < n; ++k) last_p[(bi * g.d + c0 + i) * n + k] = h[k * W + i];
    }
  });
}

// Sums of the W lanes of m consecutive vectors: out[i] = sum_w P[i * W + w]. The
// backward's dB/dC of an input-dependent B/C need one such sum per (step, state);
// reducing 8 vectors at once (AVX2: a tree of horizontal adds) costs ~1/6 of 8
// separate reductions.
template <typename acc_t>
void lane_sums(const acc_t* P, int64_t m, int64_t W, acc_t* out) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; i + 8 <= m; i += 8) {
      const float* p = P + i * 8;
      const __m256 t0 = _mm256_hadd_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
      const __m256 t1 = _mm256_hadd_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24));
      const __m256 t2 = _mm256_hadd_ps(_mm256_loadu_ps(p + 32), _mm256_loadu_ps(p + 40));
      const __m256 t3 = _mm256_hadd_ps(_mm256_loadu_ps(p + 48), _mm256_loadu_ps(p + 56));
      // u0 = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low / high 128-bit halves of vectors 0-3)
      const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                              _mm256_permute2f128_ps(u0, u1, 0x31)));
    }
  }
#endif
  for (; i < m; ++i) out[i] = hsum<acc_t>(Vectorized<acc_t>::loadu(P + i * W));
}

// Backward outputs; partial sums are reduced by the caller (fixed order).
template <typename scalar_t, typename acc_t>
struct Grads {
  scalar_t *du, *ddelta, *dz;       // (b, d, l) contiguous
  acc_t *dA, *dD, *dbias;           // per batch row: (b, d, n), (b, d), (b, d)
  acc_t *dBc, *dCc;                 // constant B/C: (b, d, n)
  acc_t *dBp, *dCp;                 // input-dependent B/C: per block (b, nblk, l, n)
};

// Per-thread buffers of the backward, (kChunk, n, W) or (kChunk, W) / (n, W).
template <typename acc_t>
struct BwdScratch {
  std::vector<acc_t> hbuf, abuf, Pb, Pc;  // states, decays of a block (T, K, W); dB / dC per lane (T, n, W)
  std::vector<acc_t> dy, du, dd, dz;      // (T, W)
  std::vector<acc_t> G, dA, dBc, dCc;     // (n, W)
  std::vector<acc_t> dBt;                 // (T, n) lane sums of a reverse tile
  BwdScratch(int64_t n, int64_t W) {
    for (auto* v : {&hbuf, &abuf, &Pb, &Pc}) v->assign(kChunk * n * W, 0);
    for (auto* v : {&dy, &du, &dd, &dz}) v->assign(kChunk * W, 0);
    for (auto* v : {&G, &dA, &dBc, &dCc}) v->assign(n * W, 0);
    dBt.assign(kChunk * n, 0);
  }
};

// Adjoint scan of states [kb, kb + K) over one tile, steps T-1 .. 0:
//   G_s = dL/dh_s = C_s dy_s + a_{s+1} G_{s+1}   (G enters as a_T G_T of the next tile)
// G, dA and (constant B/C) dB, dC of the block stay in registers; d(dt) and du of
// every step accumulate over the blocks in the (T, W) buffers dd / du; dB / dC of an
// input-dependent B/C are stored per lane (Pb / Pc) and lane-summed afterwards.
template <typename acc_t, int K, bool BV, bool CV>
void adjoint_states(int64_t T, int64_t n, int64_t W, int64_t kb, const Scratch<acc_t>& s,
                    BwdScratch<acc_t>& w) {
  using Vec = Vectorized<acc_t>;
  Vec G[K], dA[K], dBc[K], dCc[K];
  for (int k = 0; k < K; ++k) {
    G[k] = Vec::loadu(w.G.data() + (kb + k) * W);
    dA[k] = Vec::loadu(w.dA.data() + (kb + k) * W);
    dBc[k] = Vec::loadu(w.dBc.data() + (kb + k) * W);
    dCc[k] = Vec::loadu(w.dCc.data() + (kb + k) * W);
  }
  const acc_t *hbuf = w.hbuf.data(), *abuf = w.abuf.data(), *A = s.A.data();
  for (int64_t j = T - 1; j >= 0; --j) {
    const Vec u = Vec::loadu(s.u.data() + j * W), dt = Vec::loadu(s.dt.data() + j * W);
    const Vec dtu = Vec::loadu(s.dtu.data() + j * W), dy = Vec::loadu(w.dy.data() + j * W);
    // sgb = sum_k G_k B_k: d(dt) gets sgb u, du gets sgb dt, once per step
    Vec ddt(acc_t(0)), sgb(acc_t(0));
    // h_{s-1}: this block's previous step, or the state entering the tile
    const acc_t* hp = j ? hbuf + (j - 1) * K * W : s.h0.data() + kb * W;
    for (int k = 0; k < K; ++k) {
      const int64_t o = (j * n + kb + k) * W, ob = (j * K + k) * W;
      const Vec bk = BV ? Vec(s.Bt[j * s.bcs + kb + k]) : Vec::loadu(s.Bc.data() + (kb + k) * W);
      const Vec ck = CV ? Vec(s.Ct[j * s.bcs + kb + k]) : Vec::loadu(s.Cc.data() + (kb + k) * W);
      const Vec a = Vec::loadu(abuf + ob), hk = Vec::loadu(hbuf + ob);
      const Vec Gk = at::vec::fmadd(ck, dy, G[k]);
      const Vec hdy = hk * dy, gdtu = Gk * dtu;
      if (CV) hdy.store(w.Pc.data() + o); else dCc[k] = dCc[k] + hdy;
      if (BV) gdtu.store(w.Pb.data() + o); else dBc[k] = dBc[k] + gdtu;
      sgb = at::vec::fmadd(Gk, bk, sgb);
      const Vec x = Gk * a * Vec::loadu(hp + k * W);  // dL/d(dt A_k)
      ddt = at::vec::fmadd(x, Vec::loadu(A + (kb + k) * W), ddt);
      dA[k] = at::vec::fmadd(x, dt, dA[k]);
      G[k] = a * Gk;
    }
    ddt = at::vec::fmadd(sgb, u, ddt);
    (Vec::loadu(w.dd.data() + j * W) + ddt).store(w.dd.data() + j * W);
    at::vec::fmadd(sgb, dt, Vec::loadu(w.du.data() + j * W)).store(w.du.data() + j * W);
  }
  for (int k = 0; k < K; ++k) {
    G[k].store(w.G.data() + (kb + k) * W);
    dA[k].store(w.dA.data() + (kb + k) * W);
    dBc[k].store(w.dBc.data() + (kb + k) * W);
    dCc[k].store(w.dCc.data() + (kb + k) * W);
  }
}

// Recompute (states, decays, un-gated y) and adjoint scan of one tile, one block of
// K states at a time: the block's (T, K, W) states and decays stay in L1 between the
// two (v2 recomputed all n states into (T, n, W) buffers first: 64 KB at n = 16,
// twice L1, so the adjoint read them back from L2).
template <typename acc_t, int K, bool BV, bool CV>
void block_backward(int64_t T, int64_t n, int64_t W, int64_t kb, Scratch<acc_t>& s,
                    BwdScratch<acc_t>& w) {
  scan_states<acc_t, K, BV, CV>(T, n, W, kb, s.dt.data(), s.dtu.data(), s.A2.data(),
                                s.Bc.data(), s.Cc.data(), s.Bt, s.Ct, s.bcs, s.h.data(),
                                s.y.data(), kb == 0, w.hbuf.data(), w.abuf.data());
  adjoint_states<acc_t, K, BV, CV>(T, n, W, kb, s, w);
}

template <typename acc_t, bool BV, bool CV>
void backward_tile(int64_t T, int64_t n, int64_t W, Scratch<acc_t>& s, BwdScratch<acc_t>& w) {
  int64_t kb = 0;
  for (; kb + kStates <= n; kb += kStates) block_backward<acc_t, kStates, BV, CV>(T, n, W, kb, s, w);
  switch (n - kb) {
    case 1: block_backward<acc_t, 1, BV, CV>(T, n, W, kb, s, w); break;
    case 2: block_backward<acc_t, 2, BV, CV>(T, n, W, kb, s, w); break;
    case 3: block_backward<acc_t, 3, BV, CV>(T, n, W, kb, s, w); break;
#if MMSSM_KSTATES > 4
    case 4: block_backward<acc_t, 4, BV, CV>(T, n, W, kb, s, w); break;
    case 5: block_backward<acc_t, 5, BV, CV>(T, n, W, kb, s, w); break;
    case 6: block_backward<acc_t, 6, BV, CV>(T, n, W, kb, s, w); break;
    case 7: block_backward<acc_t, 7, BV, CV>(T, n, W, kb, s, w); break;
#endif
    default: break;
  }
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const Operands<scalar_t, acc_t>& op, const Geometry& g, const acc_t* dout,
                     const acc_t* dlast, const acc_t* states, Grads<scalar_t, acc_t>& gr) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, n = g.n, nblk = g.c0.size(), nch = g.n_chunks(), l = g.l;
  at::parallel_for(0, g.b * nblk, grain(g.l, n, W), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(n, W);
    BwdScratch<acc_t> w(n, W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / nblk, blk = task % nblk, c0 = g.c0[blk], nl = g.nl[blk];
      load_params(op, g, c0, nl, s);
      std::fill(w.G.begin(), w.G.end(), acc_t(0));
      if (dlast)
        for (int64_t i = 0; i < nl; ++i)
          for (int64_t k = 0; k < n; ++k) w.G[k * W + i] = dlast[(bi * g.d + c0 + i) * n + k];
      for (auto* v : {&w.dA, &w.dBc, &w.dCc}) std::fill(v->begin(), v->end(), acc_t(0));
      Vec dD(acc_t(0)), dbias(acc_t(0));
      const Vec D = Vec::loadu(s.D.data());
      for (int64_t ch = nch - 1; ch >= 0; --ch) {
        const int64_t s0 = ch * kChunk, T = std::min(kChunk, l - s0);
        load_tile(op, g, bi, c0, nl, s0, T, s);
        // dout tile (g buffer), zero in dead lanes
        if (nl < W) std::fill(s.g.begin(), s.g.end(), acc_t(0));
        gather_tile(dout + (bi * g.d + c0) * l, l, int64_t{1}, g, op.reverse, s0, T, nl,
                    s.g.data());
        if (ch > 0) {  // the next tile (earlier steps)
          prefetch_tile(op, g, bi, c0, nl, s0 - kChunk, kChunk);
          prefetch_rows(dout + (bi * g.d + c0) * l, l, int64_t{1}, g, op.reverse, s0 - kChunk,
                        kChunk, nl);
        }
        // 1) gate: dy (gated); du starts at D dy, d(dt) at 0; sigmoid(z) parked in dz
        for (int64_t j = 0; j < T; ++j) {
          const Vec u = Vec::loadu(s.u.data() + j * W);
          Vec dy = Vec::loadu(s.g.data() + j * W);
          if (op.zv) {
            const Vec z = Vec::loadu(s.z.data() + j * W), sg = sigmoid<acc_t>(z);
            sg.store(w.dz.data() + j * W);
            dy = dy * z * sg;
          }
          dy.store(w.dy.data() + j * W);
          (D * dy).store(w.du.data() + j * W);
          Vec(acc_t(0)).store(w.dd.data() + j * W);
          (Vec::loadu(s.dt.data() + j * W) * u).store(s.dtu.data() + j * W);
          dD = at::vec::fmadd(dy, u, dD);
        }
        // 2) per block of states: recompute the tile's states and decays from the saved
        //    state (s.y gets the un-gated y without D u), then the adjoint scan
        std::fill(s.h0.begin(), s.h0.end(), acc_t(0));
        for (int64_t i = 0; i < nl; ++i)
          for (int64_t k = 0; k < n; ++k)
            s.h0[k * W + i] = states[((bi * g.d + c0 + i) * nch + ch) * n + k];
        std::copy(s.h0.begin(), s.h0.end(), s.h.begin());
        if (op.Bv) {
          if (op.Cv) backward_tile<acc_t, true, true>(T, n, W, s, w);
          else backward_tile<acc_t, true, false>(T, n, W, s, w);
        } else {
          if (op.Cv) backward_tile<acc_t, false, true>(T, n, W, s, w);
          else backward_tile<acc_t, false, false>(T, n, W, s, w);
        }
        // 3) dz = dout y sg (1 + z (1 - sg)), y = D u + sum_k h_k C_k
        if (op.zv)
          for (int64_t j = 0; j < T; ++j) {
            const Vec z = Vec::loadu(s.z.data() + j * W), sg = Vec::loadu(w.dz.data() + j * W);
            const Vec one(acc_t(1));
            const Vec y = at::vec::fmadd(D, Vec::loadu(s.u.data() + j * W),
                                         Vec::loadu(s.y.data() + j * W));
            (Vec::loadu(s.g.data() + j * W) * y * sg * (one + z * (one - sg)))
                .store(w.dz.data() + j * W);
          }
        // 4) softplus' chain rule, delta_bias
        for (int64_t j = 0; j < T; ++j) {
          Vec ddt = Vec::loadu(w.dd.data() + j * W);
          if (op.softplus) ddt = ddt * sigmoid<acc_t>(Vec::loadu(s.raw.data() + j * W));
          dbias = dbias + ddt;
          ddt.store(w.dd.data() + j * W);
        }
        store_tile(gr.du, g, op.reverse, bi, c0, nl, s0, T, w.du.data());
        store_tile(gr.ddelta, g, op.reverse, bi, c0, nl, s0, T, w.dd.data());
        if (op.zv) store_tile(gr.dz, g, op.reverse, bi, c0, nl, s0, T, w.dz.data());
        // dB / dC partials of this block, (l, n) rows: straight into place unless reversed
        acc_t* part[2] = {op.Bv ? gr.dBp : nullptr, op.Cv ? gr.dCp : nullptr};
        const acc_t* lanes[2] = {w.Pb.data(), w.Pc.data()};
        for (int m = 0; m < 2; ++m) {
          if (!part[m]) continue;
          acc_t* base = part[m] + (bi * nblk + blk) * l * n;
          if (!op.reverse) {
            lane_sums(lanes[m], T * n, W, base + s0 * n);
            continue;
          }
          lane_sums(lanes[m], T * n, W, w.dBt.data());
          for (int64_t j = 0; j < T; ++j)
            std::copy_n(w.dBt.data() + j * n, n, base + g.time(s0 + j, true) * n);
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
          gr.dA[row * n + k] = w.dA[k * W + i];
          if (!op.Bv) gr.dBc[row * n + k] = w.dBc[k * W + i];
          if (!op.Cv) gr.dCc[row * n + k] = w.dCc[k * W + i];
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

// B / C in the work dtype: constant (d, n) as is, input-dependent (b, g, n, l) as
// (b, g, l, n) (group-shared, so this is small next to the (b, d, l) activations).
at::Tensor bc_operand(const at::Tensor& X, at::ScalarType acc) {
  return X.dim() == 2 ? X.to(acc).contiguous() : X.to(acc).transpose(2, 3).contiguous();
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
  if (op.Bv) op.Bl = B.data_ptr<acc_t>(); else op.Bc = B.data_ptr<acc_t>();
  if (op.Cv) op.Cl = C.data_ptr<acc_t>(); else op.Cc = C.data_ptr<acc_t>();
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

// The forward of scan_fwd / scan_fwd_out: into == undefined allocates the output (u's
// layout, out_t); else the scan is written into `into` (any layout, its dtype), or added
// to it when `add`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const c10::optional<at::Tensor>& D_in,
    const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& bias_in,
    bool softplus, bool out_fp32, bool reverse, bool save_states, const at::Tensor& into,
    bool add) {
  check(u_in, A_in, B_in, C_in);
  const auto acc = acc_type(u_in.scalar_type());
  const at::Tensor z_opt = z_in.has_value() ? *z_in : at::Tensor();
  const auto io = io_type(u_in, {delta_in, B_in, C_in, z_opt});
  const at::Tensor u = as_io(u_in, io), delta = as_io(delta_in, io), z = as_io(z_opt, io);
  const at::Tensor B = bc_operand(B_in, acc), C = bc_operand(C_in, acc);
  const at::Tensor A = A_in.to(acc).contiguous(), D = param(D_in, acc), bias = param(bias_in, acc);
  const auto out_t = into.defined() ? into.scalar_type()
                     : acc == at::kDouble ? acc : (out_fp32 ? at::kFloat : u_in.scalar_type());
  // the kernel writes either the io dtype or the work dtype; anything else is cast after
  const auto write_t = (out_t == io || out_t == acc) ? out_t : acc;
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2), n = A.size(1);
  // out has u's layout when u is dense (torch.empty_like's rule; the fake kernel
  // follows it too): token-major views (V2M's passes) get a token-major output, stored
  // one vector per step instead of transposed, and a caller's transpose back to tokens
  // becomes a no-op; contiguous u (every other caller) gets a contiguous out, as before
  const bool direct = into.defined() && write_t == out_t;  // the kernel stores into `into`
  at::Tensor out = direct ? into
                          : at::empty_like(u, u.options().dtype(write_t),
                                           at::MemoryFormat::Preserve);
  at::Tensor last = at::empty({b, d, n}, u.options().dtype(acc));
  at::Tensor states = save_states ? at::empty({b, d, (l + kChunk - 1) / kChunk, n},
                                              u.options().dtype(acc))
                                  : at::empty({0}, u.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, io, "mmssm_scan_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = make_geometry(u, A, B, C, Vectorized<acc_t>::size());
    auto op = make_operands<scalar_t, acc_t>(u, delta, A, B, C, D, z, bias, softplus, reverse);
    forward_kernel<scalar_t, acc_t>(op, g, out, last, states, save_states, direct && add);
  });
  if (into.defined() && !direct) {  // a dtype the kernel does not write: via a temporary
    if (add) into.add_(out);
    else into.copy_(out);
    out = into;
  }
  if (out.scalar_type() != out_t) out = out.to(out_t);
  return {out, last, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const c10::optional<at::Tensor>& D_in,
    const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& bias_in,
    bool softplus, bool out_fp32, bool reverse, bool save_states) {
  return forward_impl(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, softplus,
                      out_fp32, reverse, save_states, at::Tensor(), false);
}

// The forward scan into a given (b, d, l) tensor `out` (any strides, u's dtype or the work
// dtype), added to its values when `accumulate` (inference: no chunk states); returns the
// last state. Each step's u / delta / z are read before its output is stored at the same
// position, so out may be u, delta or z itself (Vim's forward direction overwrites its
// conv output), but must not partially overlap them, nor overlap A, B, C, D, delta_bias.
at::Tensor scan_fwd_out(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                        const c10::optional<at::Tensor>& bias, bool softplus, bool reverse,
                        bool accumulate, at::Tensor out) {
  check(u, A, B, C);
  TORCH_CHECK(out.device().is_cpu() && out.sizes() == u.sizes(),
              "mmssm CPU scan: out must be a CPU tensor of u's shape ", u.sizes(), ", got ",
              out.sizes());
  const auto acc = acc_type(u.scalar_type());
  TORCH_CHECK(out.scalar_type() == u.scalar_type() || out.scalar_type() == acc,
              "mmssm CPU scan: out must have u's dtype or ", acc, ", got ", out.scalar_type());
  at::assert_no_internal_overlap(out);
  for (const auto& x : {u, delta, z.has_value() ? *z : at::Tensor()})
    if (x.defined()) at::assert_no_partial_overlap(out, x);
  for (const auto& x : {A, B, C, D.has_value() ? *D : at::Tensor(),
                        bias.has_value() ? *bias : at::Tensor()})
    if (x.defined()) at::assert_no_overlap(out, x);
  return std::get<1>(forward_impl(u, delta, A, B, C, D, z, bias, softplus,
                                  out.scalar_type() != u.scalar_type(), reverse, false, out,
                                  accumulate));
}

// The backward kernels' output pointers: du / ddelta / dz in the io type, the rest in
// acc_t; dBx / dCx hold constant B / C gradients (b, d, n) or per-block partials
// (b, nblk, l, n) of input-dependent ones (scan_bwd, bidir_bwd_fast).
template <typename scalar_t, typename acc_t>
Grads<scalar_t, acc_t> grad_pointers(const at::Tensor& du, const at::Tensor& ddelta,
                                     const at::Tensor& dz, const at::Tensor& dA,
                                     const at::Tensor& dD, const at::Tensor& dbias,
                                     const at::Tensor& dBx, const at::Tensor& dCx,
                                     const at::Tensor& B, const at::Tensor& C, bool has_z) {
  Grads<scalar_t, acc_t> gr;
  gr.du = du.data_ptr<scalar_t>();
  gr.ddelta = ddelta.data_ptr<scalar_t>();
  gr.dz = has_z ? dz.data_ptr<scalar_t>() : nullptr;
  gr.dA = dA.data_ptr<acc_t>();
  gr.dD = dD.data_ptr<acc_t>();
  gr.dbias = dbias.data_ptr<acc_t>();
  gr.dBc = B.dim() == 2 ? dBx.data_ptr<acc_t>() : nullptr;
  gr.dCc = C.dim() == 2 ? dCx.data_ptr<acc_t>() : nullptr;
  gr.dBp = B.dim() == 4 ? dBx.data_ptr<acc_t>() : nullptr;
  gr.dCp = C.dim() == 4 ? dCx.data_ptr<acc_t>() : nullptr;
  return gr;
}

// Per-block dB / dC partials (b, nblk, l, n) -> per group (b, groups, n, l), summed over
// the group's blocks in order (deterministic); constant B / C: (b, d, n) -> (d, n).
at::Tensor reduce_bc_partials(const at::Tensor& part, const at::Tensor& X, int64_t nblk) {
  if (X.dim() == 2) return part.sum(0);
  const int64_t b = part.size(0), l = part.size(2), n = part.size(3), groups = X.size(1);
  return part.view({b, groups, nblk / groups, l, n}).sum(2).transpose(2, 3).contiguous();
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
  const at::Tensor B = bc_operand(B_in, acc), C = bc_operand(C_in, acc);
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
    at::Tensor dBx = B.dim() == 2 ? at::empty({b, d, n}, fo) : at::empty({b, nblk, l, n}, fo);
    at::Tensor dCx = C.dim() == 2 ? at::empty({b, d, n}, fo) : at::empty({b, nblk, l, n}, fo);
    auto gr = grad_pointers<scalar_t, acc_t>(du, ddelta, dz, dA, dD, dbias, dBx, dCx, B, C,
                                             z.defined());
    backward_kernel<scalar_t, acc_t>(op, g, dout.data_ptr<acc_t>(),
                                     dlast.defined() ? dlast.data_ptr<acc_t>() : nullptr,
                                     states.data_ptr<acc_t>(), gr);
    dB = reduce_bc_partials(dBx, B, nblk);
    dC = reduce_bc_partials(dCx, C, nblk);
  });
  return {du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0)};
}

std::string capability() { return MMSSM_STR(CPU_CAPABILITY); }

}  // namespace

#include "cross_selective_scan.h"  // the direction-aware entry (VMamba), on the above
#include "bidir_selective_scan.h"  // two directions over shared operands (V2M)

TORCH_LIBRARY(MMSSM_SCAN_NS, m) {
  m.def("fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, bool out_fp32, bool reverse, "
        "bool save_states) -> (Tensor, Tensor, Tensor)");
  m.def("fwd_out(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, bool reverse, bool accumulate, "
        "Tensor(a!) out) -> Tensor");
  m.def("bwd(Tensor dout, Tensor? dlast, Tensor u, Tensor delta, Tensor A, Tensor B, "
        "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor chunk_states, "
        "bool delta_softplus, bool reverse) -> Tensor[]");
  m.def("cross_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
        "Tensor? delta_bias, bool delta_softplus, bool save_states) -> (Tensor, Tensor)");
  m.def("cross_bwd(Tensor dy, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? delta_bias, Tensor states, bool delta_softplus) -> Tensor[]");
  m.def("cross_scan(Tensor x) -> Tensor");
  m.def("cross_merge(Tensor y, int h, int w) -> Tensor");
  m.def("corner_rotate_all(Tensor x, int[] flips) -> Tensor");
  m.def("corner_merge_all(Tensor y, int[] flips) -> Tensor");
  m.def("capability() -> str", []() { return capability(); });
  m.def("chunk() -> int", []() { return kChunk; });
}

TORCH_LIBRARY_IMPL(MMSSM_SCAN_NS, CPU, m) {
  m.impl("fwd", &scan_fwd);
  m.impl("fwd_out", &scan_fwd_out);
  m.impl("bwd", &scan_bwd);
  m.impl("cross_fwd", &cross_scan_fwd);
  m.impl("cross_bwd", &cross_scan_bwd);
  m.impl("cross_scan", &cross_scan_cpu);
  m.impl("cross_merge", &cross_merge_cpu);
  m.impl("corner_rotate_all", &corner_rotate_all_cpu);
  m.impl("corner_merge_all", &corner_merge_all_cpu);
}
