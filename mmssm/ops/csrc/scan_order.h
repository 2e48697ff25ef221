// Fused scan-order kernels (VMamba cross-scan / cross-merge, V2M corner rotations):
// one pass over the data each, instead of PyTorch's copy + flip + transpose + add
// chains (mmssm/ops/scan_order.py holds the PyTorch versions and the semantics).
// Included by selective_scan.h; memory-bound loops the compiler vectorises.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace {

inline int64_t plane_grain(int64_t plane) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, plane));
}

// (b, c, h, w) -> (b, 4, c, h*w): row-major, column-major and their reverses.
at::Tensor cross_scan_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 4, "cross_scan: x must be (b, c, h, w)");
  const at::Tensor x = x_in.contiguous();
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), L = h * w;
  at::Tensor out = at::empty({b, 4, c, L}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cross_scan", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, b * c, plane_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t pc = begin; pc < end; ++pc) {
        const int64_t bi = pc / c, ci = pc % c;
        const scalar_t* src = xp + pc * L;
        scalar_t* o0 = op + ((bi * 4 + 0) * c + ci) * L;
        scalar_t* o1 = op + ((bi * 4 + 1) * c + ci) * L;
        scalar_t* o2 = op + ((bi * 4 + 2) * c + ci) * L;
        scalar_t* o3 = op + ((bi * 4 + 3) * c + ci) * L;
        for (int64_t p = 0; p < L; ++p) {
          o0[p] = src[p];
          o2[L - 1 - p] = src[p];
        }
        for (int64_t j = 0; j < w; ++j)
          for (int64_t i = 0; i < h; ++i) {
            const scalar_t v = src[i * w + j];
            o1[j * h + i] = v;
            o3[L - 1 - (j * h + i)] = v;
          }
      }
    });
  });
  return out;
}

// (b, 4, c, h*w) -> (b, c, h*w): undo each direction and sum, as
// (y0 + flip(y2)) + transpose(y1 + flip(y3)) (the PyTorch version's order).
at::Tensor cross_merge_cpu(const at::Tensor& y_in, int64_t h, int64_t w) {
  TORCH_CHECK(y_in.dim() == 4 && y_in.size(1) == 4 && y_in.size(3) == h * w,
              "cross_merge: y must be (b, 4, c, h*w)");
  const at::Tensor y = y_in.contiguous();
  const int64_t b = y.size(0), c = y.size(2), L = h * w;
  at::Tensor out = at::empty({b, c, L}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "cross_merge", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, b * c, plane_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t pc = begin; pc < end; ++pc) {
        const int64_t bi = pc / c, ci = pc % c;
        const scalar_t* y0 = yp + ((bi * 4 + 0) * c + ci) * L;
        const scalar_t* y1 = yp + ((bi * 4 + 1) * c + ci) * L;
        const scalar_t* y2 = yp + ((bi * 4 + 2) * c + ci) * L;
        const scalar_t* y3 = yp + ((bi * 4 + 3) * c + ci) * L;
        scalar_t* dst = op + pc * L;
        for (int64_t i = 0; i < h; ++i)
          for (int64_t j = 0; j < w; ++j) {
            const int64_t p = i * w + j, q = j * h + i;
            const scalar_t row = static_cast<scalar_t>(static_cast<acc_t>(y0[p]) +
                                                       static_cast<acc_t>(y2[L - 1 - p]));
            const scalar_t col = static_cast<scalar_t>(static_cast<acc_t>(y1[q]) +
                                                       static_cast<acc_t>(y3[L - 1 - q]));
            dst[p] = static_cast<scalar_t>(static_cast<acc_t>(row) + static_cast<acc_t>(col));
          }
      }
    });
  });
  return out;
}

// Corner k's flips: bit 0 flips w, bit 1 flips h (each an involution).
// rotate_all: (b, c, h, w) -> (k*b, c, h, w), corner-major.
at::Tensor corner_rotate_all_cpu(const at::Tensor& x_in, at::IntArrayRef flips) {
  TORCH_CHECK(x_in.dim() == 4, "corner_rotate_all: x must be (b, c, h, w)");
  const at::Tensor x = x_in.contiguous();
  const int64_t k = flips.size(), b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t L = h * w;
  at::Tensor out = at::empty({k * b, c, h, w}, x.options());
  std::vector<int64_t> f(flips.begin(), flips.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "corner_rot", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, b * c, plane_grain(k * L), [&](int64_t begin, int64_t end) {
      for (int64_t pc = begin; pc < end; ++pc) {
        const scalar_t* src = xp + pc * L;
        for (int64_t kk = 0; kk < k; ++kk) {
          scalar_t* dst = op + (kk * b * c + pc) * L;
          const bool fw = f[kk] & 1, fh = f[kk] & 2;
          for (int64_t i = 0; i < h; ++i) {
            const scalar_t* srow = src + (fh ? h - 1 - i : i) * w;
            scalar_t* drow = dst + i * w;
            if (fw)
              for (int64_t j = 0; j < w; ++j) drow[j] = srow[w - 1 - j];
            else
              std::copy(srow, srow + w, drow);
          }
        }
      }
    });
  });
  return out;
}

// merge_all: (k*b, c, h, w) -> (b, c, h, w): un-flip each corner and sum in order.
at::Tensor corner_merge_all_cpu(const at::Tensor& y_in, at::IntArrayRef flips) {
  TORCH_CHECK(y_in.dim() == 4 && y_in.size(0) % static_cast<int64_t>(flips.size()) == 0,
              "corner_merge_all: y must be (k*b, c, h, w)");
  const at::Tensor y = y_in.contiguous();
  const int64_t k = flips.size(), b = y.size(0) / k, c = y.size(1), h = y.size(2),
                w = y.size(3), L = h * w;
  at::Tensor out = at::empty({b, c, h, w}, y.options());
  std::vector<int64_t> f(flips.begin(), flips.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "corner_merge", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, b * c, plane_grain(k * L), [&](int64_t begin, int64_t end) {
      for (int64_t pc = begin; pc < end; ++pc) {
        scalar_t* dst = op + pc * L;
        for (int64_t kk = 0; kk < k; ++kk) {
          const scalar_t* src = yp + (kk * b * c + pc) * L;
          const bool fw = f[kk] & 1, fh = f[kk] & 2;
          for (int64_t i = 0; i < h; ++i) {
            const scalar_t* srow = src + (fh ? h - 1 - i : i) * w;
            scalar_t* drow = dst + i * w;
            // sequential sum in corner order, rounded per step like the PyTorch adds
            for (int64_t j = 0; j < w; ++j) {
              const scalar_t v = srow[fw ? w - 1 - j : j];
              drow[j] = kk ? static_cast<scalar_t>(drow[j] + v) : v;
            }
          }
        }
      }
    });
  });
  return out;
}

}  // namespace
