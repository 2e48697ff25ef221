// Direction-aware selective scan for VMamba's SS2D: the four cross-scan orders read
// from and merged back into the token grid inside the kernel.
//
// Included by selective_scan.h after its scan machinery (Scratch, load_params,
// scan_tile, backward_tile, lane_sums), which this file reuses unchanged.
//
// Operands (grid layout, L = h w tokens, row-major grid positions p = i w + j):
//   u      (b, L, D)        channels-last tokens (one copy shared by the 4 directions)
//   delta  (K, b, L, D)     pre-softplus delta of direction k at grid position p
//   B, C   (b, L, K, n)     direction k's B / C at grid position p
//   A (K D, n), Dskip (K D), bias (K D): channel k D + c belongs to direction k
// Direction k scans the grid in its own order: step s of direction k reads grid
// position pos_k(s) (k = 0 row-major, 1 column-major, 2 / 3 their reverses, as
// mmssm.ops.cross_scan), and the output is the sum over k of each direction's y at
// its own position: y (b, L, D), the work dtype, what cross_merge returns (transposed).
//
// Work split: a task is (batch row, block of W channels); it runs the 4 directions
// one after another and accumulates into its own (L, W) slice of y, so the merge
// is deterministic and needs no atomics. Because u / delta / y are channel-contiguous,
// a tile step is one W-wide vector load at a table-given position (no transposes).
// The backward mirrors selective_scan.h's (saved chunk states, recomputed tiles,
// adjoint scan); du is accumulated over the directions the same way, dB / dC are
// lane-summed per block and reduced over the blocks in a fixed order afterwards.
#pragma once

namespace {

constexpr int64_t kDirs = 4;

// pos[k L + s]: the grid position of step s of direction k.
std::vector<int64_t> cross_positions(int64_t h, int64_t w) {
  const int64_t L = h * w;
  std::vector<int64_t> pos(kDirs * L);
  for (int64_t s = 0; s < L; ++s) {
    pos[s] = s;
    pos[L + s] = (s % h) * w + s / h;  // column-major: step s = j h + i is (i, j)
  }
  for (int64_t s = 0; s < L; ++s) {
    pos[2 * L + s] = L - 1 - s;
    pos[3 * L + s] = pos[L + L - 1 - s];
  }
  return pos;
}

// dst[j W + i] = src[pos[j] ps + i], i < nl (lanes >= nl untouched).
template <typename scalar_t, typename acc_t>
void gather_pos(const scalar_t* src, int64_t ps, const int64_t* pos, int64_t T, int64_t nl,
                int64_t W, acc_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (nl == W) {
      for (int64_t j = 0; j < T; ++j)
        Vectorized<acc_t>::loadu(src + pos[j] * ps).store(dst + j * W);
      return;
    }
  }
  for (int64_t j = 0; j < T; ++j) {
    const scalar_t* p = src + pos[j] * ps;
    for (int64_t i = 0; i < nl; ++i) dst[j * W + i] = static_cast<acc_t>(p[i]);
  }
}

// dst[pos[j] ps + i] (+)= tile[j W + i], i < nl: the merge into the grid.
template <typename acc_t>
void scatter_pos(acc_t* dst, int64_t ps, const int64_t* pos, int64_t T, int64_t nl, int64_t W,
                 const acc_t* tile, bool add) {
  using Vec = Vectorized<acc_t>;
  if (nl == W) {
    for (int64_t j = 0; j < T; ++j) {
      acc_t* p = dst + pos[j] * ps;
      const Vec v = Vec::loadu(tile + j * W);
      (add ? Vec::loadu(p) + v : v).store(p);
    }
    return;
  }
  for (int64_t j = 0; j < T; ++j) {
    acc_t* p = dst + pos[j] * ps;
    for (int64_t i = 0; i < nl; ++i) p[i] = add ? p[i] + tile[j * W + i] : tile[j * W + i];
  }
}

template <typename scalar_t, typename acc_t>
struct CrossOperands {
  const scalar_t *u = nullptr, *delta = nullptr;  // (b, L, D), (K, b, L, D)
  const acc_t *B = nullptr, *C = nullptr;         // (b, L, K, n)
  const acc_t *A = nullptr, *D = nullptr, *bias = nullptr;
  int64_t b = 0, L = 0, d = 0, n = 0;
  bool softplus = false;
  const int64_t* pos = nullptr;  // (K, L)
  // direction k's parameters as the plain scan's Operands (for load_params)
  Operands<scalar_t, acc_t> direction(int64_t k) const {
    Operands<scalar_t, acc_t> op;
    op.A = A + k * d * n;
    op.D = D ? D + k * d : nullptr;
    op.bias = bias ? bias + k * d : nullptr;
    op.Bv = op.Cv = true;
    op.softplus = softplus;
    return op;
  }
};

// Per-thread extras: this tile's B / C rows in scan order, (kChunk, n).
template <typename acc_t>
struct CrossScratch {
  std::vector<acc_t> Bt, Ct;
  explicit CrossScratch(int64_t n) : Bt(kChunk * n), Ct(kChunk * n) {}
};

// One tile of direction k, steps [s0, s0 + T): u, raw = delta + bias, dt, B / C rows.
template <typename scalar_t, typename acc_t>
void load_cross_tile(const CrossOperands<scalar_t, acc_t>& op, int64_t k, int64_t bi, int64_t c0,
                     int64_t nl, int64_t s0, int64_t T, Scratch<acc_t>& s, CrossScratch<acc_t>& x) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = s.W, n = op.n, L = op.L, d = op.d;
  const int64_t* pos = op.pos + k * L + s0;
  if (nl < W) {
    std::fill(s.u.begin(), s.u.end(), acc_t(0));
    std::fill(s.raw.begin(), s.raw.end(), acc_t(0));
  }
  gather_pos(op.u + bi * L * d + c0, d, pos, T, nl, W, s.u.data());
  gather_pos(op.delta + (k * op.b + bi) * L * d + c0, d, pos, T, nl, W, s.raw.data());
  const Vec bias = Vec::loadu(s.bias.data());  // 0 in dead lanes
  for (int64_t j = 0; j < T; ++j) {
    const Vec r = Vec::loadu(s.raw.data() + j * W) + bias;
    r.store(s.raw.data() + j * W);
    (op.softplus ? softplus<acc_t>(r) : r).store(s.dt.data() + j * W);
  }
  for (int64_t j = 0; j < T; ++j) {
    const int64_t o = ((bi * L + pos[j]) * kDirs + k) * n;
    std::copy_n(op.B + o, n, x.Bt.data() + j * n);
    std::copy_n(op.C + o, n, x.Ct.data() + j * n);
  }
  s.Bt = x.Bt.data();
  s.Ct = x.Ct.data();
  s.bcs = n;
}

// Direction k of one full block at n = 1 (VMamba v2) in one pass per step: load u and
// delta at the step's grid position, softplus, decay, state update, readout, merge.
// The tiled path stages each of these through (kChunk, W) buffers (6 passes over L1
// per step); here only the state is carried between steps, so the out-of-order core
// overlaps the softplus / decay of the next steps with the current one. Same
// operations in the same order as the tiled path: bit-identical results. The step's
// update (n1_update), state stores (store_lanes) and prefetch distance (kAheadN1) are
// forward_n1's (selective_scan.h).

template <typename acc_t>
void cross_forward_n1(const CrossOperands<acc_t, acc_t>& op, int64_t k, int64_t bi, int64_t c0,
                      int64_t nch, const Scratch<acc_t>& s, acc_t* y, acc_t* states) {
  using Vec = Vectorized<acc_t>;
  const int64_t L = op.L, d = op.d;
  const acc_t* u = op.u + bi * L * d + c0;
  const acc_t* dl = op.delta + (k * op.b + bi) * L * d + c0;
  const acc_t* Bp = op.B + bi * L * kDirs + k;  // (b, L, K, 1): position p at p K
  const acc_t* Cp = op.C + bi * L * kDirs + k;
  const int64_t* pos = op.pos + k * L;
  acc_t* yo = y + bi * L * d + c0;
  const Vec A2 = Vec::loadu(s.A2.data()), D = Vec::loadu(s.D.data());
  const Vec bias = Vec::loadu(s.bias.data());
  Vec h(acc_t(0));
  for (int64_t t = 0; t < L; ++t) {
    if (states && t % kChunk == 0)  // state entering chunk t / kChunk: (b, K d, nch, 1)
      store_lanes(h, states + (bi * kDirs * d + k * d + c0) * nch + t / kChunk, nch);
    if (t + kAheadN1 < L) {  // column-major steps jump w D elements: prefetch ahead
      const int64_t q = pos[t + kAheadN1] * d;
      __builtin_prefetch(u + q, 0, 3);
      __builtin_prefetch(dl + q, 0, 3);
      __builtin_prefetch(yo + q, 1, 3);
    }
    const int64_t p = pos[t];
    const Vec uv = Vec::loadu(u + p * d);
    n1_update(h, Vec::loadu(dl + p * d), uv, Vec(Bp[p * kDirs]), bias, A2, op.softplus);
    const Vec yv = at::vec::fmadd(D, uv, h * Vec(Cp[p * kDirs]));
    acc_t* yp = yo + p * d;
    (k ? Vec::loadu(yp) + yv : yv).store(yp);
  }
}

// Prefetch the W-lane rows of steps [s0, s0 + T) of direction k (u, delta and one more
// grid tensor: y in the forward, dy in the backward): the tiled paths' next tile.
template <typename scalar_t, typename acc_t>
void prefetch_cross_tile(const CrossOperands<scalar_t, acc_t>& op, int64_t k, int64_t bi,
                         int64_t c0, int64_t s0, int64_t T, const acc_t* grid) {
  const int64_t L = op.L, d = op.d;
  const int64_t* pos = op.pos + k * L;
  const scalar_t* u = op.u + bi * L * d + c0;
  const scalar_t* dl = op.delta + (k * op.b + bi) * L * d + c0;
  const acc_t* g = grid + bi * L * d + c0;
  for (int64_t j = s0; j < std::min(s0 + T, L); ++j) {
    const int64_t q = pos[j] * d;
    __builtin_prefetch(u + q, 0, 3);
    __builtin_prefetch(dl + q, 0, 3);
    __builtin_prefetch(g + q, 0, 3);
  }
}

template <typename scalar_t, typename acc_t>
void cross_forward_kernel(const CrossOperands<scalar_t, acc_t>& op, const Geometry& g, acc_t* y,
                          acc_t* states) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, n = g.n, nblk = g.c0.size(), nch = g.n_chunks(), L = op.L, d = op.d;
  const bool one_pass = one_pass_enabled();  // MMSSM_SCAN_TILED_ONLY (selective_scan.h)
  at::parallel_for(0, op.b * nblk, grain(kDirs * L, n, W), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(n, W);
    CrossScratch<acc_t> x(n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / nblk, blk = task % nblk, c0 = g.c0[blk], nl = g.nl[blk];
      for (int64_t k = 0; k < kDirs; ++k) {
        const auto opk = op.direction(k);
        load_params(opk, g, c0, nl, s);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (one_pass && n == 1 && nl == W) {
            cross_forward_n1<acc_t>(op, k, bi, c0, nch, s, y, states);
            continue;
          }
        }
        std::fill(s.h.begin(), s.h.end(), acc_t(0));
        const Vec D = Vec::loadu(s.D.data());
        for (int64_t ch = 0; ch < nch; ++ch) {
          const int64_t s0 = ch * kChunk, T = std::min(kChunk, L - s0);
          if (states)  // state entering this chunk: (b, K d, nch, n)
            for (int64_t i = 0; i < nl; ++i)
              for (int64_t m = 0; m < n; ++m)
                states[((bi * kDirs * d + k * d + c0 + i) * nch + ch) * n + m] = s.h[m * W + i];
          load_cross_tile(op, k, bi, c0, nl, s0, T, s, x);
          prefetch_cross_tile(op, k, bi, c0, s0 + kChunk, kChunk, y);
          scan_tile(opk, T, s);
          for (int64_t j = 0; j < T; ++j)
            at::vec::fmadd(D, Vec::loadu(s.u.data() + j * W), Vec::loadu(s.y.data() + j * W))
                .store(s.y.data() + j * W);
          scatter_pos(y + bi * L * d + c0, d, op.pos + k * L + s0, T, nl, W, s.y.data(), k > 0);
        }
      }
    }
  });
}

// Backward outputs, all in the work dtype (the glue casts du / ddelta to the I/O dtype).
template <typename acc_t>
struct CrossGrads {
  acc_t *du, *ddelta;    // (b, L, D), (K, b, L, D)
  acc_t *dBp, *dCp;      // per block (b, nblk, L, K, n)
  acc_t *dA, *dD, *dbias;  // per batch row (b, K D, n), (b, K D), (b, K D)
};

template <typename scalar_t, typename acc_t>
void cross_backward_kernel(const CrossOperands<scalar_t, acc_t>& op, const Geometry& g,
                           const acc_t* dy, const acc_t* states, CrossGrads<acc_t>& gr) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, n = g.n, nblk = g.c0.size(), nch = g.n_chunks(), L = op.L, d = op.d;
  at::parallel_for(0, op.b * nblk, grain(kDirs * L, n, W), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(n, W);
    BwdScratch<acc_t> w(n, W);
    CrossScratch<acc_t> x(n);
    std::vector<acc_t> sums(kChunk * n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / nblk, blk = task % nblk, c0 = g.c0[blk], nl = g.nl[blk];
      for (int64_t k = 0; k < kDirs; ++k) {
        const auto opk = op.direction(k);
        load_params(opk, g, c0, nl, s);
        for (auto* v : {&w.G, &w.dA, &w.dBc, &w.dCc}) std::fill(v->begin(), v->end(), acc_t(0));
        Vec dD(acc_t(0)), dbias(acc_t(0));
        const Vec D = Vec::loadu(s.D.data());
        for (int64_t ch = nch - 1; ch >= 0; --ch) {
          const int64_t s0 = ch * kChunk, T = std::min(kChunk, L - s0);
          const int64_t* pos = op.pos + k * L + s0;
          load_cross_tile(op, k, bi, c0, nl, s0, T, s, x);
          if (ch > 0) prefetch_cross_tile(op, k, bi, c0, s0 - kChunk, kChunk, dy);
          if (nl < W) std::fill(w.dy.begin(), w.dy.end(), acc_t(0));
          gather_pos(dy + bi * L * d + c0, d, pos, T, nl, W, w.dy.data());
          // dy of every direction is the merged output's gradient at its position
          for (int64_t j = 0; j < T; ++j) {
            const Vec u = Vec::loadu(s.u.data() + j * W), dyj = Vec::loadu(w.dy.data() + j * W);
            (D * dyj).store(w.du.data() + j * W);
            Vec(acc_t(0)).store(w.dd.data() + j * W);
            (Vec::loadu(s.dt.data() + j * W) * u).store(s.dtu.data() + j * W);
            dD = at::vec::fmadd(dyj, u, dD);
          }
          std::fill(s.h0.begin(), s.h0.end(), acc_t(0));
          for (int64_t i = 0; i < nl; ++i)
            for (int64_t m = 0; m < n; ++m)
              s.h0[m * W + i] = states[((bi * kDirs * d + k * d + c0 + i) * nch + ch) * n + m];
          std::copy(s.h0.begin(), s.h0.end(), s.h.begin());
          backward_tile<acc_t, true, true>(T, n, W, s, w);
          for (int64_t j = 0; j < T; ++j) {  // softplus' chain rule, delta_bias
            Vec ddt = Vec::loadu(w.dd.data() + j * W);
            if (op.softplus) ddt = ddt * sigmoid<acc_t>(Vec::loadu(s.raw.data() + j * W));
            dbias = dbias + ddt;
            ddt.store(w.dd.data() + j * W);
          }
          scatter_pos(gr.du + bi * L * d + c0, d, pos, T, nl, W, w.du.data(), k > 0);
          scatter_pos(gr.ddelta + (k * op.b + bi) * L * d + c0, d, pos, T, nl, W, w.dd.data(),
                      false);
          // dB / dC of this block: lane sums per (step, state), into grid position order
          acc_t* part[2] = {gr.dBp, gr.dCp};
          const acc_t* lanes[2] = {w.Pb.data(), w.Pc.data()};
          for (int mm = 0; mm < 2; ++mm) {
            lane_sums(lanes[mm], T * n, W, sums.data());
            acc_t* base = part[mm] + (bi * nblk + blk) * L * kDirs * n;
            for (int64_t j = 0; j < T; ++j)
              std::copy_n(sums.data() + j * n, n, base + (pos[j] * kDirs + k) * n);
          }
        }
        acc_t dDa[64], dba[64];
        dD.store(dDa);
        dbias.store(dba);
        for (int64_t i = 0; i < nl; ++i) {
          const int64_t row = bi * kDirs * d + k * d + c0 + i;
          gr.dD[row] = dDa[i];
          gr.dbias[row] = dba[i];
          for (int64_t m = 0; m < n; ++m) gr.dA[row * n + m] = w.dA[m * W + i];
        }
      }
    }
  });
}

// ---------------------------------------------------------------- glue
void cross_check(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                 const at::Tensor& B, const at::Tensor& C) {
  TORCH_CHECK(u.device().is_cpu(), "mmssm cross scan: tensors must be on the CPU");
  TORCH_CHECK(u.dim() == 4, "mmssm cross scan: u must be (b, h, w, D)");
  const int64_t b = u.size(0), h = u.size(1), w = u.size(2), d = u.size(3);
  TORCH_CHECK(delta.dim() == 5 && delta.size(0) == kDirs && delta.size(1) == b &&
                  delta.size(2) == h && delta.size(3) == w && delta.size(4) == d,
              "mmssm cross scan: delta must be (4, b, h, w, D)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == kDirs * d, "mmssm cross scan: A must be (4 D, n)");
  for (const auto* X : {&B, &C})
    TORCH_CHECK(X->dim() == 5 && X->size(0) == b && X->size(1) == h && X->size(2) == w &&
                    X->size(3) == kDirs && X->size(4) == A.size(1),
                "mmssm cross scan: B / C must be (b, h, w, 4, n)");
}

template <typename scalar_t, typename acc_t>
CrossOperands<scalar_t, acc_t> make_cross_operands(const at::Tensor& u, const at::Tensor& delta,
                                                   const at::Tensor& A, const at::Tensor& B,
                                                   const at::Tensor& C, const at::Tensor& D,
                                                   const at::Tensor& bias, bool softplus,
                                                   const std::vector<int64_t>& pos) {
  CrossOperands<scalar_t, acc_t> op;
  op.u = u.data_ptr<scalar_t>();
  op.delta = delta.data_ptr<scalar_t>();
  op.B = B.data_ptr<acc_t>();
  op.C = C.data_ptr<acc_t>();
  op.A = A.data_ptr<acc_t>();
  op.D = D.defined() ? D.data_ptr<acc_t>() : nullptr;
  op.bias = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  op.b = u.size(0);
  op.L = u.size(1) * u.size(2);
  op.d = u.size(3);
  op.n = A.size(1);
  op.softplus = softplus;
  op.pos = pos.data();
  return op;
}

// Channel blocks of W lanes over the D channels of one direction (B / C are shared
// by all channels of a direction, so blocks need no group alignment).
Geometry cross_geometry(int64_t b, int64_t d, int64_t L, int64_t n, int64_t W) {
  Geometry g;
  g.b = b;
  g.d = d;
  g.l = L;
  g.n = n;
  g.W = W;
  g.gB = g.gC = 1;
  g.sizeB = g.sizeC = d;
  for (int64_t c = 0; c < d; c += W) {
    g.c0.push_back(c);
    g.nl.push_back(std::min(W, d - c));
  }
  return g;
}

// The operands of one call, checked and in the kernel's dtypes: u / delta in the I/O
// dtype (delta is read as u's dtype), everything else in the work dtype; dense.
struct CrossInputs {
  at::ScalarType io, acc;
  at::Tensor u, delta, A, B, C, D, bias;
  int64_t b, h, w, d, n, L, nch;

  CrossInputs(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
              const at::Tensor& B_in, const at::Tensor& C_in,
              const c10::optional<at::Tensor>& D_in, const c10::optional<at::Tensor>& bias_in) {
    cross_check(u_in, delta_in, A_in, B_in, C_in);
    acc = acc_type(u_in.scalar_type());
    io = delta_in.scalar_type() == u_in.scalar_type() ? u_in.scalar_type() : acc;
    u = u_in.to(io).contiguous();
    delta = delta_in.to(io).contiguous();
    A = A_in.to(acc).contiguous();
    B = B_in.to(acc).contiguous();
    C = C_in.to(acc).contiguous();
    D = param(D_in, acc);
    bias = param(bias_in, acc);
    b = u.size(0), h = u.size(1), w = u.size(2), d = u.size(3), n = A.size(1);
    L = h * w;
    nch = (L + kChunk - 1) / kChunk;
  }
};

std::tuple<at::Tensor, at::Tensor> cross_scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const c10::optional<at::Tensor>& D_in,
    const c10::optional<at::Tensor>& bias_in, bool softplus, bool save_states) {
  const CrossInputs in(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in);
  const auto io = in.io, acc = in.acc;
  const at::Tensor &u = in.u, &delta = in.delta, &A = in.A, &B = in.B, &C = in.C, &D = in.D,
                   &bias = in.bias;
  const int64_t b = in.b, h = in.h, w = in.w, d = in.d, n = in.n, L = in.L, nch = in.nch;
  at::Tensor y = at::empty({b, h, w, d}, u.options().dtype(acc));
  at::Tensor states = save_states ? at::empty({b, kDirs * d, nch, n}, u.options().dtype(acc))
                                  : at::empty({0}, u.options().dtype(acc));
  if (L == 0 || d == 0 || b == 0) return {y.zero_(), states};
  const auto pos = cross_positions(h, w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, io, "mmssm_cross_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = cross_geometry(b, d, L, n, Vectorized<acc_t>::size());
    const auto op = make_cross_operands<scalar_t, acc_t>(u, delta, A, B, C, D, bias, softplus, pos);
    cross_forward_kernel<scalar_t, acc_t>(op, g, y.data_ptr<acc_t>(),
                                          save_states ? states.data_ptr<acc_t>() : nullptr);
  });
  return {y, states};
}

std::vector<at::Tensor> cross_scan_bwd(
    const at::Tensor& dy_in, const at::Tensor& u_in, const at::Tensor& delta_in,
    const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& C_in,
    const c10::optional<at::Tensor>& D_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& states_in, bool softplus) {
  const CrossInputs in(u_in, delta_in, A_in, B_in, C_in, D_in, bias_in);
  const auto io = in.io, acc = in.acc;
  const at::Tensor &u = in.u, &delta = in.delta, &A = in.A, &B = in.B, &C = in.C, &D = in.D,
                   &bias = in.bias;
  const int64_t b = in.b, h = in.h, w = in.w, d = in.d, n = in.n, L = in.L, nch = in.nch;
  TORCH_CHECK(states_in.numel() == b * kDirs * d * nch * n,
              "mmssm cross scan backward: states do not come from this kernel's forward "
              "(run the forward with save_states=True)");
  const at::Tensor states = states_in.to(acc).contiguous();
  const at::Tensor dy = dy_in.to(acc).contiguous();
  const auto fo = u.options().dtype(acc);
  at::Tensor du = at::zeros({b, h, w, d}, fo), ddelta = at::zeros({kDirs, b, h, w, d}, fo);
  at::Tensor dA = at::zeros({b, kDirs * d, n}, fo), dD = at::zeros({b, kDirs * d}, fo);
  at::Tensor dbias = at::zeros({b, kDirs * d}, fo);
  at::Tensor dB = at::zeros({b, h, w, kDirs, n}, fo), dC = at::zeros({b, h, w, kDirs, n}, fo);
  if (L > 0 && d > 0 && b > 0) {
    const auto pos = cross_positions(h, w);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, io, "mmssm_cross_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto g = cross_geometry(b, d, L, n, Vectorized<acc_t>::size());
      const int64_t nblk = g.c0.size();
      const auto op =
          make_cross_operands<scalar_t, acc_t>(u, delta, A, B, C, D, bias, softplus, pos);
      at::Tensor dBp = at::empty({b, nblk, L, kDirs, n}, fo);
      at::Tensor dCp = at::empty({b, nblk, L, kDirs, n}, fo);
      CrossGrads<acc_t> gr{du.data_ptr<acc_t>(),  ddelta.data_ptr<acc_t>(),
                           dBp.data_ptr<acc_t>(), dCp.data_ptr<acc_t>(),
                           dA.data_ptr<acc_t>(),  dD.data_ptr<acc_t>(),
                           dbias.data_ptr<acc_t>()};
      cross_backward_kernel<scalar_t, acc_t>(op, g, dy.data_ptr<acc_t>(),
                                             states.data_ptr<acc_t>(), gr);
      // per-block partials summed over the blocks in order (deterministic)
      dB = dBp.sum(1).view({b, h, w, kDirs, n});
      dC = dCp.sum(1).view({b, h, w, kDirs, n});
    });
  }
  return {du.to(io), ddelta.to(io), dA.sum(0), dB, dC, dD.sum(0), dbias.sum(0)};
}

}  // namespace
