// Fused Cauchy products of S4 (DPLR) kernel generation, float64, CPU: forward and backward.
//
// mmssm.ops.ssm_kernels.cauchy_outer computes, for every channel h, pair k = (a, b) and
// frequency node l (V = Bs[a] * Cs[b], products of the (B|P) and (C|Q) vectors),
//   r[h, a, b, l] = sum_n V[h, k, n] r1[h, n, l] + conj(V[h, k, n]) r2[h, n, l],
//   r1 = 1 / (z_l - w_hn),  r2 = 1 / (z_l - conj(w_hn)),
// optionally with a real per-channel step dt[h] scaling Cs (V = Bs[a] * (dt[h] Cs[b])): the
// S4 operand dt [C; Q] is then never built in memory, nor its backward (the training step's
// largest elementwise passes over (H, ch+R, N) complex128 operands).
// In PyTorch this is ~30 elementwise float64 passes over (H, N, Lf) to build the real
// matrix M = [[p1 + p2, q1 + q2], [q2 - q1, p1 - p2]] (r = p + i q) plus a batched GEMM,
// and as many again in the backward for M and the "squared" matrix E (r1^2, r2^2), plus
// complex128 products for V and the gradients of Bs and Cs: memory bound, and the largest
// part of a ConvNeXt-S4ND training step at batch 1. Here every (n, l) entry of M and E is
// computed in registers and used at once, and V, gBs, gCs stay in a per-channel buffer.
//
// Operands (float64, contiguous, complex numbers as (re, im) pairs, i.e. view_as_real):
//   Bs (S, A, N, 2) with S = 1 (shared by all channels) or H;  Cs (H, Bc, N, 2), any
//   strides over H and Bc (e.g. a channel-minor (Bc, H, N, 2) layout, transposed);
//   z (Lf, 2) nodes;  w (H, N, 2) poles;  out / G (H, A, Bc, Lf, 2): r and its gradient g;
//   dt (H,) real (optional).
// Backward (PyTorch's conjugate-Wirtinger convention, as ssm_kernels._CauchyOuter):
//   gV = sum_l g conj(r1) + conj(g) r2 (= G M^T),  gBs[a] = sum_b gV conj(Cs[b]),
//   gCs[b] = sum_a gV conj(Bs[a]),  gw = sum_k conj(V_k) U_k with
//   U = sum_l g conj(r1^2) + conj(g) r2^2 (= G E^T).  gBs is per channel (H, A, N, 2): the
//   caller sums it over H for a shared Bs. With dt: gCs and gw are taken as above for the
//   scaled operand dt Cs, then gdt[h] = sum_{b,n} Re(gCs conj(Cs)) and gCs <- dt gCs
//   (the backward of the product dt * Cs, PyTorch's rule); gCs has Cs's strides.
//
// SIMD: the inner loops run over the N poles; the kernels are compiled for AVX-512, AVX2,
// FMA (AVX) and baseline x86-64 (GCC function multi-versioning, picked by the CPU's
// feature bits when the library loads), so one build runs on any x86-64 CPU at its best
// width.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "clones.h"

namespace mmssm_cauchy {

// Column (zr, zi) of M (r = 1 / (z - w)) and, if kSquare, of E (r^2) for N poles:
// sp = p1 + p2, sq = q1 + q2, dq = q2 - q1, dp = p1 - p2 with r1 = p1 + i q1 (pole w),
// r2 = p2 + i q2 (pole conj w). Same arithmetic as ssm_kernels._cauchy_real.
// Inlined into each multi-versioned caller, so it is vectorised at the caller's width.
template <bool kSquare>
MMSSM_INLINE void terms(int64_t N, double zr, double zi, const double* wr, const double* wi,
                        double* sp, double* sq, double* dq, double* dp, double* Sp, double* Sq,
                        double* Dq, double* Dp) {
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    const double a = zr - wr[n], b1 = zi - wi[n], b2 = zi + wi[n];
    const double a2 = a * a;
    const double d1 = 1.0 / (b1 * b1 + a2), d2 = 1.0 / (b2 * b2 + a2);  // 1 / |z - w|^2
    const double p1 = a * d1, p2 = a * d2, q1 = -(b1 * d1), q2 = -(b2 * d2);
    sp[n] = p1 + p2;
    sq[n] = q1 + q2;
    dq[n] = q2 - q1;
    dp[n] = p1 - p2;
    if (kSquare) {  // r^2 = (a - i b)^2 d^2 = (a^2 - b^2) d^2 - 2i a b d^2
      const double e1 = d1 * d1, e2 = d2 * d2;
      const double P1 = (a2 - b1 * b1) * e1, P2 = (a2 - b2 * b2) * e2;
      const double Q1 = (a * b1) * e1 * -2.0, Q2 = (a * b2) * e2 * -2.0;
      Sp[n] = P1 + P2;
      Sq[n] = Q1 + Q2;
      Dq[n] = Q2 - Q1;
      Dp[n] = P1 - P2;
    }
  }
}

// Sizes of one call.
struct Dims {
  int64_t H, S, A, Bc, N, Lf;
  int64_t sh, sb;  // strides of Cs over H and Bc (in doubles)
  int64_t K() const { return A * Bc; }
};

// Per channel h: poles (wr, wi) and pair products (Vr, Vi) (K, N), deinterleaved.
// With dt, V = Bs[a] (dt Cs[b]): dt Cs rounded first, as the PyTorch operand dt * Cs.
MMSSM_INLINE void load_channel(const Dims& d, int64_t h, const double* Bs, const double* Cs,
                               const double* dt, const double* w, double* wr, double* wi,
                               double* Vr, double* Vi) {
  const int64_t N = d.N;
  for (int64_t n = 0; n < N; ++n) {
    wr[n] = w[(h * N + n) * 2];
    wi[n] = w[(h * N + n) * 2 + 1];
  }
  const double* b0 = Bs + (d.S == 1 ? 0 : h * d.A * N * 2);
  const double* c0 = Cs + h * d.sh;
  const double s = dt == nullptr ? 1.0 : dt[h];  // x * 1.0 == x: no dt, same values
  for (int64_t a = 0; a < d.A; ++a) {
    for (int64_t b = 0; b < d.Bc; ++b) {
      const double *bp = b0 + a * N * 2, *cp = c0 + b * d.sb;
      double *vr = Vr + (a * d.Bc + b) * N, *vi = Vi + (a * d.Bc + b) * N;
      for (int64_t n = 0; n < N; ++n) {
        const double br = bp[2 * n], bi = bp[2 * n + 1];
        const double cr = s * cp[2 * n], ci = s * cp[2 * n + 1];
        vr[n] = br * cr - bi * ci;
        vi[n] = br * ci + bi * cr;
      }
    }
  }
}

// Forward for channels [h0, h1); buf holds (6 + 2K) N doubles.
MMSSM_CLONES void fwd_rows(const Dims& d, int64_t h0, int64_t h1, const double* Bs,
                           const double* Cs, const double* dt, const double* z,
                           const double* w, double* out, double* buf) {
  const int64_t N = d.N, K = d.K(), Lf = d.Lf;
  double *sp = buf, *sq = buf + N, *dq = buf + 2 * N, *dp = buf + 3 * N;
  double *wr = buf + 4 * N, *wi = buf + 5 * N, *Vr = buf + 6 * N, *Vi = Vr + K * N;
  for (int64_t h = h0; h < h1; ++h) {
    load_channel(d, h, Bs, Cs, dt, w, wr, wi, Vr, Vi);
    double* o = out + h * K * Lf * 2;
    for (int64_t l = 0; l < Lf; ++l) {
      terms<false>(N, z[2 * l], z[2 * l + 1], wr, wi, sp, sq, dq, dp, nullptr, nullptr,
                   nullptr, nullptr);
      for (int64_t k = 0; k < K; ++k) {  // [Re V, Im V] @ M, columns l and Lf + l
        const double *vr = Vr + k * N, *vi = Vi + k * N;
        double re = 0.0, im = 0.0;
#pragma omp simd reduction(+ : re, im)
        for (int64_t n = 0; n < N; ++n) {
          re += vr[n] * sp[n] + vi[n] * dq[n];
          im += vr[n] * sq[n] + vi[n] * dp[n];
        }
        o[(k * Lf + l) * 2] = re;
        o[(k * Lf + l) * 2 + 1] = im;
      }
    }
  }
}

// Backward for channels [h0, h1); buf holds (10 + 6K) N doubles.
MMSSM_CLONES void bwd_rows(const Dims& d, int64_t h0, int64_t h1, const double* Bs,
                           const double* Cs, const double* dt, const double* z,
                           const double* w, const double* G, double* gB, double* gC,
                           double* gW, double* gdt, double* buf) {
  const int64_t N = d.N, K = d.K(), Lf = d.Lf, A = d.A, Bc = d.Bc;
  double *sp = buf, *sq = buf + N, *dq = buf + 2 * N, *dp = buf + 3 * N;
  double *Sp = buf + 4 * N, *Sq = buf + 5 * N, *Dq = buf + 6 * N, *Dp = buf + 7 * N;
  double *wr = buf + 8 * N, *wi = buf + 9 * N, *Vr = buf + 10 * N, *Vi = Vr + K * N;
  double *Xr = Vi + K * N, *Xi = Xr + K * N;  // gV (K, N)
  double *Ur = Xi + K * N, *Ui = Ur + K * N;  // U (K, N)
  for (int64_t h = h0; h < h1; ++h) {
    load_channel(d, h, Bs, Cs, dt, w, wr, wi, Vr, Vi);
    const double* g = G + h * K * Lf * 2;
    std::fill(Xr, Xr + 4 * K * N, 0.0);  // Xr, Xi, Ur, Ui
    for (int64_t l = 0; l < Lf; ++l) {
      terms<true>(N, z[2 * l], z[2 * l + 1], wr, wi, sp, sq, dq, dp, Sp, Sq, Dq, Dp);
      for (int64_t k = 0; k < K; ++k) {  // rows k of G M^T and G E^T, one node at a time
        const double gr = g[(k * Lf + l) * 2], gi = g[(k * Lf + l) * 2 + 1];
        double *xr = Xr + k * N, *xi = Xi + k * N, *ur = Ur + k * N, *ui = Ui + k * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          xr[n] += gr * sp[n] + gi * sq[n];
          xi[n] += gr * dq[n] + gi * dp[n];
          ur[n] += gr * Sp[n] + gi * Sq[n];
          ui[n] += gr * Dq[n] + gi * Dp[n];
        }
      }
    }
    double* gw = gW + h * N * 2;  // gw = sum_k conj(V_k) U_k
    for (int64_t n = 0; n < N; ++n) {
      double re = 0.0, im = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        re += Vr[k * N + n] * Ur[k * N + n] + Vi[k * N + n] * Ui[k * N + n];
        im += Vr[k * N + n] * Ui[k * N + n] - Vi[k * N + n] * Ur[k * N + n];
      }
      gw[2 * n] = re;
      gw[2 * n + 1] = im;
    }
    // gBs[a] = sum_b gV[a, b] conj(Cs[b]),  gCs[b] = sum_a gV[a, b] conj(Bs[a])
    const double* b0 = Bs + (d.S == 1 ? 0 : h * A * N * 2);
    // (with dt: the operand is dt Cs, rebuilt here as in load_channel)
    const double* c0 = Cs + h * d.sh;
    const double s = dt == nullptr ? 1.0 : dt[h];
    double *gb = gB + h * A * N * 2, *gc = gC + h * d.sh;
    std::fill(gb, gb + A * N * 2, 0.0);
    for (int64_t b = 0; b < Bc; ++b) std::fill(gc + b * d.sb, gc + b * d.sb + N * 2, 0.0);
    for (int64_t a = 0; a < A; ++a) {
      for (int64_t b = 0; b < Bc; ++b) {
        const double *xr = Xr + (a * Bc + b) * N, *xi = Xi + (a * Bc + b) * N;
        const double *bp = b0 + a * N * 2, *cp = c0 + b * d.sb;
        double *gbp = gb + a * N * 2, *gcp = gc + b * d.sb;
        for (int64_t n = 0; n < N; ++n) {
          const double cr = s * cp[2 * n], ci = s * cp[2 * n + 1];
          gbp[2 * n] += xr[n] * cr + xi[n] * ci;
          gbp[2 * n + 1] += xi[n] * cr - xr[n] * ci;
          gcp[2 * n] += xr[n] * bp[2 * n] + xi[n] * bp[2 * n + 1];
          gcp[2 * n + 1] += xi[n] * bp[2 * n] - xr[n] * bp[2 * n + 1];
        }
      }
    }
    if (dt != nullptr) {  // gdt = sum Re(gCs conj(Cs)), then the gradient of Cs itself
      double acc = 0.0;
      for (int64_t b = 0; b < Bc; ++b) {
        const double* cp = c0 + b * d.sb;
        double* gcp = gc + b * d.sb;
        for (int64_t n = 0; n < 2 * N; ++n) {
          acc += gcp[n] * cp[n];
          gcp[n] *= s;
        }
      }
      gdt[h] = acc;
    }
  }
}

// strided: only the last two dims need to be contiguous (Cs: any strides over H and Bc)
static void check(const at::Tensor& t, const char* name, int64_t dim, bool strided = false) {
  TORCH_CHECK(t.device().is_cpu(), "cauchy: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kDouble, "cauchy: ", name, " must be float64, got ",
              t.scalar_type());
  // (no overlap: the backward writes a gradient with the same strides, in parallel)
  TORCH_CHECK(strided ? (t.dim() == dim && t.stride(dim - 1) == 1 && t.stride(dim - 2) == 2 &&
                         t.is_non_overlapping_and_dense())
                      : t.is_contiguous(),
              "cauchy: ", name, strided ? " must be dense with contiguous (N, 2) rows" :
              " must be contiguous");
  TORCH_CHECK(t.dim() == dim && t.size(dim - 1) == 2, "cauchy: ", name, " must be a ", dim,
              "-dim (..., 2) real view of a complex tensor, got ", t.sizes());
}

static Dims dims(const at::Tensor& Bs, const at::Tensor& Cs, const at::Tensor& z,
                 const at::Tensor& w, const c10::optional<at::Tensor>& dt) {
  check(Bs, "Bs", 4);
  check(Cs, "Cs", 4, true);
  check(z, "z", 2);
  check(w, "w", 3);
  Dims d{Cs.size(0), Bs.size(0), Bs.size(1), Cs.size(1), Cs.size(2), z.size(0),
         Cs.stride(0), Cs.stride(1)};
  if (dt.has_value()) {
    TORCH_CHECK(dt->device().is_cpu() && dt->scalar_type() == at::kDouble &&
                    dt->is_contiguous() && dt->dim() == 1 && dt->size(0) == d.H,
                "cauchy: dt must be a contiguous float64 CPU tensor of shape (H,) = (", d.H,
                ",), got ", dt->scalar_type(), " ", dt->sizes());
  }
  TORCH_CHECK(d.S == 1 || d.S == d.H, "cauchy: Bs must have 1 or H = ", d.H,
              " rows, got ", d.S);
  TORCH_CHECK(Bs.size(2) == d.N && w.size(0) == d.H && w.size(1) == d.N,
              "cauchy: Bs (S, A, N), Cs (H, Bc, N) and w (H, N) disagree: ", Bs.sizes(), ", ",
              Cs.sizes(), ", ", w.sizes());
  return d;
}

// Channels per parallel task: ~64k multiply-adds, so that small layers run on one thread.
static int64_t grain(const Dims& d) {
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, 8 * d.K() * d.N * d.Lf));
}

at::Tensor cauchy_fwd(const at::Tensor& Bs, const at::Tensor& Cs, const at::Tensor& z,
                      const at::Tensor& w, const c10::optional<at::Tensor>& dt) {
  const Dims d = dims(Bs, Cs, z, w, dt);
  const double* pdt = dt.has_value() ? dt->data_ptr<double>() : nullptr;
  at::Tensor out = at::empty({d.H, d.A, d.Bc, d.Lf, 2}, Cs.options());
  const double *pb = Bs.data_ptr<double>(), *pc = Cs.data_ptr<double>(),
               *pz = z.data_ptr<double>(), *pw = w.data_ptr<double>();
  double* po = out.data_ptr<double>();
  at::parallel_for(0, d.H, grain(d), [&](int64_t h0, int64_t h1) {
    std::vector<double> buf((6 + 2 * d.K()) * d.N);
    fwd_rows(d, h0, h1, pb, pc, pdt, pz, pw, po, buf.data());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cauchy_bwd(
    const at::Tensor& Bs, const at::Tensor& Cs, const at::Tensor& z, const at::Tensor& w,
    const at::Tensor& G, const c10::optional<at::Tensor>& dt) {
  const Dims d = dims(Bs, Cs, z, w, dt);
  check(G, "G", 5);
  TORCH_CHECK(G.size(0) == d.H && G.size(1) == d.A && G.size(2) == d.Bc && G.size(3) == d.Lf,
              "cauchy: G must be (H, A, Bc, Lf, 2) = (", d.H, ", ", d.A, ", ", d.Bc, ", ",
              d.Lf, ", 2), got ", G.sizes());
  at::Tensor gB = at::empty({d.H, d.A, d.N, 2}, Cs.options());
  // gC with Cs's strides (the gradient of a transposed view stays a cheap transpose)
  at::Tensor gC = at::empty_strided(Cs.sizes(), Cs.strides(), Cs.options());
  at::Tensor gW = at::empty_like(w);
  at::Tensor gdt = dt.has_value() ? at::empty_like(*dt) : at::Tensor();
  const double* pdt = dt.has_value() ? dt->data_ptr<double>() : nullptr;
  double* pgdt = dt.has_value() ? gdt.data_ptr<double>() : nullptr;
  const double *pb = Bs.data_ptr<double>(), *pc = Cs.data_ptr<double>(),
               *pz = z.data_ptr<double>(), *pw = w.data_ptr<double>(),
               *pg = G.data_ptr<double>();
  double *pgb = gB.data_ptr<double>(), *pgc = gC.data_ptr<double>(),
         *pgw = gW.data_ptr<double>();
  at::parallel_for(0, d.H, std::max<int64_t>(1, grain(d) / 2), [&](int64_t h0, int64_t h1) {
    std::vector<double> buf((10 + 6 * d.K()) * d.N);
    bwd_rows(d, h0, h1, pb, pc, pdt, pz, pw, pg, pgb, pgc, pgw, pgdt, buf.data());
  });
  return {gB, gC, gW, gdt};
}

}  // namespace mmssm_cauchy

TORCH_LIBRARY(mmssm_cauchy, m) {
  m.def("cauchy_fwd(Tensor Bs, Tensor Cs, Tensor z, Tensor w, Tensor? dt=None) -> Tensor");
  m.def("cauchy_bwd(Tensor Bs, Tensor Cs, Tensor z, Tensor w, Tensor G, Tensor? dt=None)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmssm_cauchy, CPU, m) {
  m.impl("cauchy_fwd", &mmssm_cauchy::cauchy_fwd);
  m.impl("cauchy_bwd", &mmssm_cauchy::cauchy_bwd);
}
