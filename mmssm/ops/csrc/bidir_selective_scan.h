// Two-direction selective scan: the forward (t = 0 .. l-1) and the reverse (t = l-1 .. 0)
// scan of the same operands in one call. V2M runs both row directions over one set of
// row operands and both column directions over one latent's; every (token, channel,
// state) then has the same decay a_t = exp(dt_t A) and input term x_t = dt_t u_t B_t in
// both directions, so a call computes them (softplus, exp, products) once.
//
// Included by selective_scan.h after its scan machinery (Geometry, Operands, Scratch,
// load_params, store_out, the vectorised softplus / decay / sigmoid, scan_fwd /
// scan_bwd), which this file reuses unchanged.
//
// Ops (registered here as fragments of the build's namespace):
//   bidir_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, out_fp32,
//             sum_directions, save_states) -> (out, states)
//     out: (2, b, d, l), out[0] the forward scan, out[1] the reverse one, each slice in
//          u's layout (torch.empty_like(u)'s rule, as the plain scan's output); or,
//          with sum_directions, (b, d, l) = forward + reverse.
//     states: (2, b, d, n_chunks, n), each direction's chunk states as the plain scan
//          saves them (empty unless save_states).
//   bidir_bwd(dout, u, delta, A, B, C, D?, z?, delta_bias?, states, delta_softplus,
//             sum_directions) -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]
//     both directions' gradients, summed (dout: out's shape, any strides); du, d(delta)
//     and dz in u's layout (torch.empty_like(u)'s rule, as out).
//   bidir_sum_into(u, delta, A, B, C, D?, delta_bias?, delta_softplus, out!, gate?) -> bool
//     inference: out += forward + reverse, then out *= silu(gate), in place, on the fast
//     path's token-major layout (u, delta, out, gate of one layout); false (out
//     untouched) elsewhere. V2M adds its second latent's column passes to the first's.
//
// Fast path (V2M's passes: n = 1, fp32 / fp64 activations of one dtype, lane-contiguous
// u / delta / z (token-major (b, l, d) memory seen as (b, d, l)), full channel blocks,
// l <= kBidirMaxLine): a task (batch row, block of W channels) walks the line forward
// once, computing and keeping a_t, x_t (and sigmoid(z_t)) in (l, W) buffers (56 steps x
// 16 lanes x 4 B = 3.5 KB each: L1) while it runs the forward recurrence, then runs the
// reverse recurrence from the buffers (u_t, z_t re-read: the line is still in cache). Each direction does the plain
// scan's operations in its order: its output is bit-identical to a plain scan's. The
// backward of such a line recomputes it whole (no saved states needed): the shared terms
// and the forward states (t ascending), the reverse states with the forward direction's
// adjoint scan (t descending), the reverse direction's adjoint scan (t ascending), each
// adjoint step the plain backward's; the directions' gradients are summed per step.
// Everything else runs the plain kernel twice (scan_fwd / scan_bwd) and adds; so does
// MMSSM_SCAN_TILED_ONLY=1, which turns the plain kernel's one-pass loops off too (A/B).
#pragma once

namespace {

constexpr int64_t kBidirMaxLine = 1024;  // longest line buffered whole (64 KB per buffer)

// a = exp(dt A), x = dt u B of one n = 1 step on W lanes: n1_update's operations in its
// order (h = fmadd(a, h, x) is then its state update, bit for bit).
template <typename acc_t>
inline void n1_terms(const Vectorized<acc_t>& delta, const Vectorized<acc_t>& uv,
                     const Vectorized<acc_t>& bk, const Vectorized<acc_t>& bias,
                     const Vectorized<acc_t>& A2, bool softplus_on, Vectorized<acc_t>& a,
                     Vectorized<acc_t>& x) {
  const Vectorized<acc_t> r = delta + bias;
  const Vectorized<acc_t> dt = softplus_on ? softplus<acc_t>(r) : r;
  a = decay<acc_t>(dt, A2);
  x = (dt * uv) * bk;
}

// The operands of one n = 1 line (batch row bi, channel block c0 of W full lanes):
// activation pointers and their step strides, the input-dependent B / C rows ((b, g, l, 1)
// in the work dtype, one scalar per time step), the block's parameters (A: the plain A,
// A2: decay()'s).
template <typename acc_t, bool BV, bool CV, bool ZV>
struct LineN1 {
  using Vec = Vectorized<acc_t>;
  const acc_t *u, *dl, *zp, *Bp, *Cp;
  int64_t us, ds, zs;
  Vec A, A2, D, bias, Bc, Cc;
  LineN1(const Operands<acc_t, acc_t>& op, const Geometry& g, int64_t bi, int64_t c0,
         const Scratch<acc_t>& s)
      : u(op.u.p + bi * op.u.s0 + c0), dl(op.delta.p + bi * op.delta.s0 + c0),
        zp(ZV ? op.z.p + bi * op.z.s0 + c0 : nullptr),
        Bp(BV ? op.Bl + (bi * g.gB + c0 / g.sizeB) * g.l : nullptr),
        Cp(CV ? op.Cl + (bi * g.gC + c0 / g.sizeC) * g.l : nullptr),
        us(op.u.s2), ds(op.delta.s2), zs(ZV ? op.z.s2 : 0),
        A(Vec::loadu(s.A.data())), A2(Vec::loadu(s.A2.data())), D(Vec::loadu(s.D.data())),
        bias(Vec::loadu(s.bias.data())), Bc(Vec::loadu(s.Bc.data())),
        Cc(Vec::loadu(s.Cc.data())) {}
  Vec u_at(int64_t t) const { return Vec::loadu(u + t * us); }
  Vec delta_at(int64_t t) const { return Vec::loadu(dl + t * ds); }
  Vec z_at(int64_t t) const { return Vec::loadu(zp + t * zs); }
  Vec B_at(int64_t t) const { return BV ? Vec(Bp[t]) : Bc; }
  Vec C_at(int64_t t) const { return CV ? Vec(Cp[t]) : Cc; }
};

// Per-thread (l, W) buffers of one line: the shared terms and the outputs when they
// cannot be stored in place.
template <typename acc_t>
struct LineBuffers {
  std::vector<acc_t> a, x, sg, y0, y1;
  LineBuffers(int64_t l, int64_t W) {
    for (auto* v : {&a, &x, &sg, &y0, &y1}) v->assign(l * W, acc_t(0));
  }
};

// Output pointers of one task: y[k] the lane-contiguous place of direction k's step 0
// (null: the line goes through LineBuffers and store_out); y[1] is null when summed.
// A summed call that adds into its output: out = out + (forward + reverse), then, with a
// gate g, out * silu(g) (g: an activation in out's layout). Only on the direct layout.
template <typename acc_t>
struct SumInto {
  bool on = false;
  const acc_t* g = nullptr;  // the gate's (b, d, l) memory, null: no gate
};

template <typename acc_t, bool BV, bool CV, bool ZV>
void bidir_line_n1(const Operands<acc_t, acc_t>& op, const Geometry& g, int64_t bi, int64_t c0,
                   const Scratch<acc_t>& s, LineBuffers<acc_t>& lb, acc_t* const out[2],
                   const OutLayout& ol, acc_t* states, const SumInto<acc_t>& into = {}) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, l = g.l, nch = g.n_chunks();
  const LineN1<acc_t, BV, CV, ZV> ln(op, g, bi, c0, s);
  const bool sum = out[1] == nullptr, direct = !ol.contiguous && ol.s1 == 1;
  // adding into out: the forward outputs wait in the line buffer (out holds the addend)
  acc_t* const line_out = direct ? out[0] + bi * ol.s0 + c0 : nullptr;
  acc_t* yf = direct && !into.on ? line_out : lb.y0.data();
  acc_t* yr = sum ? (into.on ? line_out : yf)
                  : (direct ? out[1] + bi * ol.s0 + c0 : lb.y1.data());
  const int64_t ys = direct ? ol.s2 : W;  // step stride of yr (and of yf unless into.on)
  const int64_t fs = direct && !into.on ? ol.s2 : W;  // step stride of yf
  const acc_t* gp = into.g ? into.g + bi * ol.s0 + c0 : nullptr;
  acc_t *a = lb.a.data(), *x = lb.x.data(), *sgb = lb.sg.data();
  // the readout and gate of one step, as forward_n1's
  auto readout = [&](const Vec& h, const Vec& uv, int64_t t, const Vec& z, const Vec& sg) {
    Vec y = at::vec::fmadd(ln.D, uv, at::vec::fmadd(h, ln.C_at(t), Vec(acc_t(0))));
    return ZV ? y * z * sg : y;
  };
  // forward direction; the terms of every step are kept for the reverse one
  Vec h(acc_t(0));
  for (int64_t t = 0; t < l; ++t) {
    if (states && t % kChunk == 0)  // state entering chunk t / kChunk: (b, d, nch, 1)
      store_lanes(h, states + (bi * g.d + c0) * nch + t / kChunk, nch);
    if (t + kAheadN1 < l) {
      __builtin_prefetch(ln.u + (t + kAheadN1) * ln.us, 0, 3);
      __builtin_prefetch(ln.dl + (t + kAheadN1) * ln.ds, 0, 3);
      if (ZV) __builtin_prefetch(ln.zp + (t + kAheadN1) * ln.zs, 0, 3);
    }
    const Vec uv = ln.u_at(t);
    Vec av, xt, z(acc_t(0)), sg(acc_t(0));
    n1_terms(ln.delta_at(t), uv, ln.B_at(t), ln.bias, ln.A2, op.softplus, av, xt);
    h = at::vec::fmadd(av, h, xt);
    av.store(a + t * W);
    xt.store(x + t * W);
    if (ZV) {
      z = ln.z_at(t);
      sg = sigmoid<acc_t>(z);
      sg.store(sgb + t * W);
    }
    readout(h, uv, t, z, sg).store(yf + t * fs);
  }
  acc_t* st_r = states ? states + g.b * g.d * nch : nullptr;  // the reverse direction's
  Vec hr(acc_t(0));
  for (int64_t sj = 0; sj < l; ++sj) {
    const int64_t t = l - 1 - sj;
    if (st_r && sj % kChunk == 0) store_lanes(hr, st_r + (bi * g.d + c0) * nch + sj / kChunk, nch);
    hr = at::vec::fmadd(Vec::loadu(a + t * W), hr, Vec::loadu(x + t * W));
    const Vec z = ZV ? ln.z_at(t) : Vec(acc_t(0));  // u, z: re-read (in cache)
    const Vec sg = ZV ? Vec::loadu(sgb + t * W) : Vec(acc_t(0));
    Vec y = readout(hr, ln.u_at(t), t, z, sg);
    if (sum) y = Vec::loadu(yf + t * fs) + y;  // forward + reverse
    if (into.on) {  // out + (forward + reverse), gated: silu(g) = g * sigmoid(g)
      y = Vec::loadu(yr + t * ys) + y;
      if (gp) {
        const Vec gv = Vec::loadu(gp + t * ys);
        y = y * (gv * sigmoid<acc_t>(gv));
      }
    }
    y.store(yr + t * ys);
  }
  if (!direct) {
    store_out(out[0], ol, g, false, bi, c0, W, 0, l, lb.y0.data());
    if (!sum) store_out(out[1], ol, g, false, bi, c0, W, 0, l, lb.y1.data());
  }
}

// True when the fast path applies to the whole call (see the file comment); out_ok: the
// output is in the work dtype.
template <typename scalar_t, typename acc_t>
bool bidir_fast(const Operands<scalar_t, acc_t>& op, const Geometry& g, bool out_ok) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return false;
  } else {
    const bool full = std::all_of(g.nl.begin(), g.nl.end(), [&](int64_t nl) { return nl == g.W; });
    return one_pass_enabled() && g.n == 1 && full && g.l <= kBidirMaxLine && op.u.s1 == 1 &&
           op.delta.s1 == 1 && (!op.zv || op.z.s1 == 1) && out_ok;
  }
}

// f(bv, cv, zv), each std::true_type or std::false_type: input-dependent B, C and a z
// gate as the compile-time flags of the n = 1 line loops.
template <typename acc_t, typename F>
void dispatch_bcz(const Operands<acc_t, acc_t>& op, F&& f) {
  using T_ = std::true_type;
  using F_ = std::false_type;
  auto with_z = [&](auto bv, auto cv) { op.zv ? f(bv, cv, T_{}) : f(bv, cv, F_{}); };
  if (op.Bv) {
    op.Cv ? with_z(T_{}, T_{}) : with_z(T_{}, F_{});
  } else {
    op.Cv ? with_z(F_{}, T_{}) : with_z(F_{}, F_{});
  }
}

template <typename acc_t>
void bidir_kernel(const Operands<acc_t, acc_t>& op, const Geometry& g, at::Tensor& out, bool sum,
                  at::Tensor& states, bool save, const SumInto<acc_t>& into = {}) {
  const int64_t nblk = g.c0.size();
  acc_t* o = out.data_ptr<acc_t>();
  acc_t* const outs[2] = {o, sum ? nullptr : o + out.stride(0)};
  const at::Tensor o0 = sum ? out : out.select(0, 0);  // direction 0's layout = direction 1's
  const OutLayout ol{o0.stride(0), o0.stride(1), o0.stride(2), o0.is_contiguous()};
  acc_t* st = save ? states.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, g.b * nblk, grain(2 * g.l, g.n, g.W), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(g.n, g.W);
    LineBuffers<acc_t> lb(g.l, g.W);
    // tasks run block-major (task = blk * b + bi): consecutive lines of one channel
    // block share its parameters, loaded once (short lines: the load was ~1/5 of a task)
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task / g.b, bi = task % g.b, c0 = g.c0[blk];
      if (blk != loaded) load_params(op, g, c0, g.W, s);
      loaded = blk;
      dispatch_bcz(op, [&](auto bv, auto cv, auto zv) {
        bidir_line_n1<acc_t, decltype(bv)::value, decltype(cv)::value, decltype(zv)::value>(
            op, g, bi, c0, s, lb, outs, ol, st, into);
      });
    }
  });
}

// (2, b, d, l) with each slice in u's layout (or (b, d, l) when summed).
at::Tensor bidir_out(const at::Tensor& u, at::ScalarType t, bool sum) {
  at::Tensor one = at::empty_like(u, u.options().dtype(t), at::MemoryFormat::Preserve);
  if (sum) return one;
  std::vector<int64_t> size{2}, stride{one.numel()};
  size.insert(size.end(), one.sizes().begin(), one.sizes().end());
  stride.insert(stride.end(), one.strides().begin(), one.strides().end());
  return at::empty_strided(size, stride, one.options());
}

// out += forward + reverse (then out *= silu(gate)) on the fast path's direct layout: u,
// delta (and the gate) token-major views of one layout, out of that layout, all of the
// work dtype; inference only (no states). False (out untouched) when the fast path does
// not apply: the caller then runs bidir_fwd and adds.
bool bidir_scan_sum_into(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A_in,
                         const at::Tensor& B_in, const at::Tensor& C_in,
                         const c10::optional<at::Tensor>& D_in,
                         const c10::optional<at::Tensor>& bias_in, bool softplus,
                         at::Tensor& out, const c10::optional<at::Tensor>& gate_in) {
  check(u, A_in, B_in, C_in);
  const auto acc = acc_type(u.scalar_type());
  const at::Tensor gate = gate_in.has_value() ? *gate_in : at::Tensor();
  auto same = [&](const at::Tensor& t) {
    return t.scalar_type() == acc && t.sizes() == u.sizes() && t.strides() == u.strides();
  };
  // direct layout: lane-contiguous, not dense (bidir_line_n1's `direct`)
  if (u.scalar_type() != acc || !same(delta) || !same(out) || (gate.defined() && !same(gate)) ||
      A_in.size(1) != 1 || u.size(2) > kBidirMaxLine || u.stride(1) != 1 || u.is_contiguous() ||
      (B_in.dim() > 2 && B_in.scalar_type() != acc) ||
      (C_in.dim() > 2 && C_in.scalar_type() != acc))
    return false;
  const at::Tensor B = bc_operand(B_in, acc), C = bc_operand(C_in, acc);
  const at::Tensor A = A_in.to(acc).contiguous(), D = param(D_in, acc), bias = param(bias_in, acc);
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(acc, "mmssm_bidir_sum_into", [&] {
    const auto g = make_geometry(u, A, B, C, Vectorized<scalar_t>::size());
    auto op = make_operands<scalar_t, scalar_t>(u, delta, A, B, C, D, at::Tensor(), bias,
                                                softplus, false);
    done = bidir_fast(op, g, true);
    if (done) {
      SumInto<scalar_t> into;
      into.on = true;
      into.g = gate.defined() ? gate.data_ptr<scalar_t>() : nullptr;
      at::Tensor states = at::empty({0}, u.options());
      bidir_kernel<scalar_t>(op, g, out, true, states, false, into);
    }
  });
  return done;
}

std::tuple<at::Tensor, at::Tensor> bidir_scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const c10::optional<at::Tensor>& D_in,
    const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& bias_in,
    bool softplus, bool out_fp32, bool sum, bool save_states) {
  check(u_in, A_in, B_in, C_in);
  const auto acc = acc_type(u_in.scalar_type());
  const at::Tensor z_opt = z_in.has_value() ? *z_in : at::Tensor();
  const auto io = io_type(u_in, {delta_in, B_in, C_in, z_opt});
  const auto out_t = acc == at::kDouble ? acc : (out_fp32 ? at::kFloat : u_in.scalar_type());
  if (io == acc && out_t == acc && A_in.size(1) == 1 && u_in.size(2) <= kBidirMaxLine) {
    const at::Tensor u = as_io(u_in, io), delta = as_io(delta_in, io), z = as_io(z_opt, io);
    const at::Tensor B = bc_operand(B_in, acc), C = bc_operand(C_in, acc);
    const at::Tensor A = A_in.to(acc).contiguous(), D = param(D_in, acc);
    const at::Tensor bias = param(bias_in, acc);
    at::Tensor out = bidir_out(u, acc, sum);
    const int64_t b = u.size(0), d = u.size(1), nch = (u.size(2) + kChunk - 1) / kChunk;
    at::Tensor states = save_states ? at::empty({2, b, d, nch, 1}, u.options().dtype(acc))
                                    : at::empty({0}, u.options().dtype(acc));
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES(io, "mmssm_bidir_fwd", [&] {
      const auto g = make_geometry(u, A, B, C, Vectorized<scalar_t>::size());
      auto op = make_operands<scalar_t, scalar_t>(u, delta, A, B, C, D, z, bias, softplus, false);
      done = bidir_fast(op, g, true);  // out is in the work dtype here
      if (done) bidir_kernel<scalar_t>(op, g, out, sum, states, save_states);
    });
    if (done) return {out, states};
  }
  // anything else: the plain kernel once per direction
  auto f = scan_fwd(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, softplus, out_fp32,
                    false, save_states);
  auto r = scan_fwd(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, softplus, out_fp32,
                    true, save_states);
  at::Tensor out = bidir_out(u_in, std::get<0>(f).scalar_type(), sum);
  if (sum) {
    out.copy_(std::get<0>(f)).add_(std::get<0>(r));
  } else {
    out.select(0, 0).copy_(std::get<0>(f));
    out.select(0, 1).copy_(std::get<0>(r));
  }
  at::Tensor states = save_states ? at::stack({std::get<2>(f), std::get<2>(r)})
                                  : at::empty({0}, std::get<2>(f).options());
  return {out, states};
}


// ---------------------------------------------------------------- backward, n = 1
// Per-thread (l, W) buffers of one line's backward: the shared terms (u, dt, a, dt u,
// sigmoid of the pre-softplus delta, z, sigmoid(z)), both directions' states, the two
// cotangents, and the gradients accumulated over the directions (du, d(dt), dz, and
// per lane the dB / dC terms of an input-dependent B / C).
template <typename acc_t>
struct BidirBwdBuffers {
  std::vector<acc_t> u, dt, a, dtu, sp, z, sg, hf, hr, g0, g1, du, dd, dz, pB, pC;
  BidirBwdBuffers(int64_t l, int64_t W) {
    for (auto* v : {&u, &dt, &a, &dtu, &sp, &z, &sg, &hf, &hr, &g0, &g1, &du, &dd, &dz, &pB, &pC})
      v->assign(l * W, acc_t(0));
  }
};

// Gradient sums of one task that are not per step: (W) lanes each.
template <typename acc_t>
struct BidirBwdSums {
  Vectorized<acc_t> dA{acc_t(0)}, dD{acc_t(0)}, dbias{acc_t(0)}, dBc{acc_t(0)}, dCc{acc_t(0)};
};

// Both directions' backward of one line (n = 1, the forward fast path's conditions):
// 1) t ascending: the shared terms and the forward direction's states; 2) t descending:
// the reverse direction's states and the forward direction's adjoint scan; 3) t
// ascending: the reverse direction's adjoint scan, then the softplus chain rule. The
// adjoint step is the plain backward's (adjoint_states) at n = 1.
template <typename acc_t, bool BV, bool CV, bool ZV>
void bidir_bwd_line_n1(const Operands<acc_t, acc_t>& op, const Geometry& g, int64_t bi,
                       int64_t c0, const Scratch<acc_t>& s, BidirBwdBuffers<acc_t>& b,
                       const acc_t* const dout[2], const OutLayout& dl,
                       BidirBwdSums<acc_t>& acc) {
  using Vec = Vectorized<acc_t>;
  const int64_t W = g.W, l = g.l;
  const LineN1<acc_t, BV, CV, ZV> ln(op, g, bi, c0, s);
  const Vec A = ln.A, D = ln.D, one(acc_t(1));
  auto ld = [&](const std::vector<acc_t>& v, int64_t t) { return Vec::loadu(v.data() + t * W); };
  auto st = [&](std::vector<acc_t>& v, int64_t t, const Vec& x) { x.store(v.data() + t * W); };
  // the cotangents, (l, W) in time order, read in dout's own layout (dl); a summed call's
  // directions share one (g1 unused)
  const bool one_dout = dout[0] == dout[1];
  for (int k = 0; k < (one_dout ? 1 : 2); ++k) {
    const acc_t* p = dout[k] + bi * dl.s0 + c0 * dl.s1;
    acc_t* dst = (k ? b.g1 : b.g0).data();
    if (dl.s1 == 1) {  // lane-contiguous (token-major dout): one vector per step
      for (int64_t t = 0; t < l; ++t) Vec::loadu(p + t * dl.s2).store(dst + t * W);
    } else {
      gather_tile(p, dl.s1, dl.s2, g, false, 0, l, W, dst);
    }
  }
  // 1) shared terms, forward states
  Vec h(acc_t(0));
  for (int64_t t = 0; t < l; ++t) {
    const Vec uv = ln.u_at(t), r = ln.delta_at(t) + ln.bias;
    const Vec dt = op.softplus ? softplus<acc_t>(r) : r, a = decay<acc_t>(dt, ln.A2);
    const Vec dtu = dt * uv;
    h = at::vec::fmadd(a, h, dtu * ln.B_at(t));
    st(b.u, t, uv), st(b.dt, t, dt), st(b.a, t, a), st(b.dtu, t, dtu), st(b.hf, t, h);
    if (op.softplus) st(b.sp, t, sigmoid<acc_t>(r));
    if (ZV) {
      const Vec z = ln.z_at(t);
      st(b.z, t, z), st(b.sg, t, sigmoid<acc_t>(z));
    }
  }
  // one direction's adjoint step at time t: h its state, hp its previous state, G the
  // adjoint carried from its previous adjoint step (a G). The first direction's steps
  // (first: std::true_type) store the per-step gradients, the second's add to them (the
  // stored values are those of adding to zeros, so no buffer is zeroed)
  auto adjoint = [&](auto first, int64_t t, const Vec& hv, const Vec& hp, Vec& G,
                     const Vec& dout_t) {
    constexpr bool F = decltype(first)::value;
    const Vec uv = ld(b.u, t), dt = ld(b.dt, t), dtu = ld(b.dtu, t), a = ld(b.a, t);
    const Vec bk = ln.B_at(t), ck = ln.C_at(t);
    Vec dy = dout_t;
    if (ZV) {  // out = y z sigmoid(z), y = h C + D u
      const Vec z = ld(b.z, t), sg = ld(b.sg, t);
      const Vec y = at::vec::fmadd(D, uv, hv * ck);
      dy = dout_t * z * sg;
      const Vec dzv = dout_t * y * sg * (one + z * (one - sg));
      st(b.dz, t, F ? dzv : ld(b.dz, t) + dzv);
    }
    acc.dD = at::vec::fmadd(dy, uv, acc.dD);
    const Vec Gk = at::vec::fmadd(ck, dy, G);
    const Vec hdy = hv * dy, gdtu = Gk * dtu;
    if (CV) st(b.pC, t, F ? hdy : ld(b.pC, t) + hdy); else acc.dCc = acc.dCc + hdy;
    if (BV) st(b.pB, t, F ? gdtu : ld(b.pB, t) + gdtu); else acc.dBc = acc.dBc + gdtu;
    const Vec sgb = Gk * bk, x = Gk * a * hp;  // x = dL/d(dt A)
    acc.dA = at::vec::fmadd(x, dt, acc.dA);
    G = a * Gk;
    const Vec ddv = at::vec::fmadd(sgb, uv, x * A);
    st(b.dd, t, F ? ddv : ld(b.dd, t) + ddv);
    st(b.du, t, at::vec::fmadd(sgb, dt, F ? D * dy : at::vec::fmadd(D, dy, ld(b.du, t))));
  };
  // 2) reverse states; forward adjoint (its previous state is h_{t-1})
  Vec hr(acc_t(0)), G(acc_t(0));
  for (int64_t t = l - 1; t >= 0; --t) {
    hr = at::vec::fmadd(ld(b.a, t), hr, ld(b.dtu, t) * ln.B_at(t));
    st(b.hr, t, hr);
    adjoint(std::true_type{}, t, ld(b.hf, t), t ? ld(b.hf, t - 1) : Vec(acc_t(0)), G,
            ld(b.g0, t));
  }
  // 3) reverse adjoint (its previous state is h_{t+1}); all of step t is then known
  G = Vec(acc_t(0));
  for (int64_t t = 0; t < l; ++t) {
    adjoint(std::false_type{}, t, ld(b.hr, t), t + 1 < l ? ld(b.hr, t + 1) : Vec(acc_t(0)), G,
            ld(one_dout ? b.g0 : b.g1, t));
    Vec dr = ld(b.dd, t);
    if (op.softplus) dr = dr * ld(b.sp, t);
    acc.dbias = acc.dbias + dr;
    st(b.dd, t, dr);
  }
}

template <typename acc_t>
void bidir_bwd_kernel(const Operands<acc_t, acc_t>& op, const Geometry& g,
                      const acc_t* const dout[2], const OutLayout& dl, const OutLayout& gl,
                      Grads<acc_t, acc_t>& gr) {
  const int64_t W = g.W, l = g.l, nblk = g.c0.size();
  at::parallel_for(0, g.b * nblk, grain(4 * l, g.n, W), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(g.n, W);
    BidirBwdBuffers<acc_t> b(l, W);
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {  // block-major, as the forward
      const int64_t blk = task / g.b, bi = task % g.b, c0 = g.c0[blk];
      if (blk != loaded) load_params(op, g, c0, W, s);
      loaded = blk;
      BidirBwdSums<acc_t> acc;
      dispatch_bcz(op, [&](auto bv, auto cv, auto zv) {
        bidir_bwd_line_n1<acc_t, decltype(bv)::value, decltype(cv)::value, decltype(zv)::value>(
            op, g, bi, c0, s, b, dout, dl, acc);
      });
      // du, d(delta), dz in u's layout (gl): token-major stores for V2M's token-major u
      store_out(gr.du, gl, g, false, bi, c0, W, 0, l, b.du.data());
      store_out(gr.ddelta, gl, g, false, bi, c0, W, 0, l, b.dd.data());
      if (op.zv) store_out(gr.dz, gl, g, false, bi, c0, W, 0, l, b.dz.data());
      // input-dependent B / C: this block's lane sums per step, (b, nblk, l, 1)
      if (op.Bv) lane_sums(b.pB.data(), l, W, gr.dBp + (bi * nblk + blk) * l);
      if (op.Cv) lane_sums(b.pC.data(), l, W, gr.dCp + (bi * nblk + blk) * l);
      const int64_t row = bi * g.d + c0;  // (b, d[, 1]) per-row sums: W lanes in a row
      acc.dA.store(gr.dA + row);
      acc.dD.store(gr.dD + row);
      acc.dbias.store(gr.dbias + row);
      if (!op.Bv) acc.dBc.store(gr.dBc + row);
      if (!op.Cv) acc.dCc.store(gr.dCc + row);
    }
  });
}

// The fast path of bidir_scan_bwd; an empty vector when it does not apply.
std::vector<at::Tensor> bidir_bwd_fast(const at::Tensor& dout, const at::Tensor& u_in,
                                       const at::Tensor& delta_in, const at::Tensor& A_in,
                                       const at::Tensor& B_in, const at::Tensor& C_in,
                                       const c10::optional<at::Tensor>& D_in,
                                       const c10::optional<at::Tensor>& z_in,
                                       const c10::optional<at::Tensor>& bias_in, bool softplus,
                                       bool sum) {
  const auto acc = acc_type(u_in.scalar_type());
  const at::Tensor z_opt = z_in.has_value() ? *z_in : at::Tensor();
  const auto io = io_type(u_in, {delta_in, B_in, C_in, z_opt});
  if (io != acc || A_in.size(1) != 1 || u_in.size(2) > kBidirMaxLine) return {};
  const at::Tensor u = as_io(u_in, io), delta = as_io(delta_in, io), z = as_io(z_opt, io);
  const at::Tensor B = bc_operand(B_in, acc), C = bc_operand(C_in, acc);
  const at::Tensor A = A_in.to(acc).contiguous(), D = param(D_in, acc), bias = param(bias_in, acc);
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2);
  // (b, d, l) or (2, b, d, l), read in its own layout (a token-major cotangent: no copy)
  const at::Tensor dsum = dout.to(acc);
  auto fo = u.options().dtype(acc);
  // du, d(delta), dz in u's layout (as the forward's output): token-major gradients of
  // token-major activations, so autograd adds them to the projections' gradients and
  // the delta projection's GEMM reads them without a layout copy
  at::Tensor du = bidir_out(u, acc, true), ddelta = bidir_out(u, acc, true);
  at::Tensor dz = z.defined() ? bidir_out(u, acc, true) : at::empty({0}, fo);
  at::Tensor dA = at::empty({b, d, 1}, fo), dD = at::empty({b, d}, fo), dbias = at::empty({b, d}, fo);
  std::vector<at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(io, "mmssm_bidir_bwd", [&] {
    const auto g = make_geometry(u, A, B, C, Vectorized<scalar_t>::size());
    auto op = make_operands<scalar_t, scalar_t>(u, delta, A, B, C, D, z, bias, softplus, false);
    if (!bidir_fast(op, g, true)) return;
    const int64_t nblk = g.c0.size();
    at::Tensor dBx = B.dim() == 2 ? at::empty({b, d, 1}, fo) : at::empty({b, nblk, l, 1}, fo);
    at::Tensor dCx = C.dim() == 2 ? at::empty({b, d, 1}, fo) : at::empty({b, nblk, l, 1}, fo);
    auto gr = grad_pointers<scalar_t, scalar_t>(du, ddelta, dz, dA, dD, dbias, dBx, dCx, B, C,
                                                z.defined());
    const scalar_t* p = dsum.data_ptr<scalar_t>();
    const scalar_t* const douts[2] = {p, sum ? p : p + dsum.stride(0)};
    const at::Tensor d0 = sum ? dsum : dsum.select(0, 0);  // direction 1: d0's strides
    const OutLayout dl{d0.stride(0), d0.stride(1), d0.stride(2), d0.is_contiguous()};
    const OutLayout gl{du.stride(0), du.stride(1), du.stride(2), du.is_contiguous()};
    bidir_bwd_kernel<scalar_t>(op, g, douts, dl, gl, gr);
    res = {du, ddelta, dA.sum(0), reduce_bc_partials(dBx, B, nblk),
           reduce_bc_partials(dCx, C, nblk), dD.sum(0), dz, dbias.sum(0)};
  });
  return res;
}

std::vector<at::Tensor> bidir_scan_bwd(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias,
    const at::Tensor& states, bool softplus, bool sum) {
  TORCH_CHECK(states.dim() == 5 && states.size(0) == 2,
              "mmssm bidir scan backward: states must be the (2, b, d, n_chunks, n) chunk "
              "states of the forward run with save_states=True");
  TORCH_CHECK(dout.dim() == (sum ? 3 : 4),
              "mmssm bidir scan backward: dout must be (b, d, l) with sum_directions, else "
              "(2, b, d, l)");
  check(u, A, B, C);
  std::vector<at::Tensor> fast = bidir_bwd_fast(dout, u, delta, A, B, C, D, z, bias, softplus, sum);
  if (!fast.empty()) return fast;
  // anything else: the plain backward of each direction, summed
  std::vector<at::Tensor> g = scan_bwd(sum ? dout : dout.select(0, 0), c10::nullopt, u, delta,
                                       A, B, C, D, z, bias, states.select(0, 0), softplus, false);
  const std::vector<at::Tensor> r =
      scan_bwd(sum ? dout : dout.select(0, 1), c10::nullopt, u, delta, A, B, C, D, z, bias,
               states.select(0, 1), softplus, true);
  for (size_t i = 0; i < g.size(); ++i) {
    if (!g[i].numel()) continue;
    if (i == 0 || i == 1 || i == 6) {  // du, d(delta), dz in u's layout, as the fast path
      at::Tensor o = bidir_out(u, g[i].scalar_type(), true);
      g[i] = at::add_out(o, g[i], r[i]);
    } else {
      g[i].add_(r[i]);
    }
  }
  return g;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(MMSSM_SCAN_NS, m) {
  m.def("bidir_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, bool out_fp32, bool sum_directions, "
        "bool save_states) -> (Tensor, Tensor)");
  m.def("bidir_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? delta_bias, Tensor states, bool delta_softplus, "
        "bool sum_directions) -> Tensor[]");
  m.def("bidir_sum_into(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
        "Tensor? delta_bias, bool delta_softplus, Tensor(a!) out, Tensor? gate) -> bool");
}

TORCH_LIBRARY_IMPL(MMSSM_SCAN_NS, CPU, m) {
  m.impl("bidir_fwd", &bidir_scan_fwd);
  m.impl("bidir_bwd", &bidir_scan_bwd);
  m.impl("bidir_sum_into", &bidir_scan_sum_into);
}
