"""HiPPO matrices, S4D/DPLR kernel generators and their recurrent views."""
import math

import pytest
import torch

from mmssm.ops import cauchy_cpu
from mmssm.ops.ssm_kernels import (SSMKernelDiag, SSMKernelDPLR, diag_init, hippo_legs,
                                   nplr)


def _impulse_response(kern, L):
    """Run the kernel's recurrence on unit impulses: (channels, H, L)."""
    kern.setup_step()
    x = kern.default_state(1)
    ys = []
    for t in range(L):
        u = torch.full((1, kern.H), 1.0 if t == 0 else 0.0)
        y, x = kern.step(u, x)
        ys.append(y[0])
    return torch.stack(ys, -1)


def test_hippo_legs_closed_form():
    N = 8
    A, B = hippo_legs(N)
    for n in range(N):
        assert B[n] == pytest.approx(math.sqrt(2 * n + 1))
        for k in range(N):
            want = (-math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k
                    else -(n + 1) if n == k else 0.0)
            assert A[n, k].item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize('measure', ['legs', 'fourier'])
def test_nplr_reconstructs_normal_part(measure):
    N = 16
    W, P, B, V = nplr(measure, N, B_clip=None)
    assert W.shape == (N // 2,) and P.shape == (1, N // 2) and V.shape == (N, N // 2)
    assert (W.imag <= 1e-9).all()
    from mmssm.ops.ssm_kernels import hippo_fout, rank_correction
    A, B0 = hippo_legs(N) if measure == 'legs' else hippo_fout(N)
    P0 = rank_correction(measure, N)
    normal = A + P0.T @ P0
    # conjugate pairs: A + P P^T = 2 Re(V diag(W) V^*), B = 2 Re(V B~), P = 2 Re(V P~)
    torch.testing.assert_close(2 * (V @ torch.diag(W) @ V.conj().T).real, normal,
                               atol=1e-8, rtol=0)
    torch.testing.assert_close(2 * (V @ B).real, B0, atol=1e-8, rtol=0)
    torch.testing.assert_close(2 * (V @ P[0]).real, P0[0], atol=1e-8, rtol=0)


def test_diag_inits():
    N = 16
    n = torch.arange(N // 2, dtype=torch.float64)
    A, B = diag_init('lin', N)
    torch.testing.assert_close(A, -0.5 - 1j * math.pi * n)
    A, _ = diag_init('inv', N)
    torch.testing.assert_close(A.imag, -N / math.pi * (N / (2 * n + 1) - 1))
    A, _ = diag_init('real', N)
    torch.testing.assert_close(A, (-(n + 1)).to(A.dtype))
    A, B = diag_init('legs', N)
    W, _, B2, _ = nplr('legs', N)
    torch.testing.assert_close(A, -0.5 + 1j * W.imag)
    torch.testing.assert_close(B, B2)
    # the kernel module stores exactly these (A_real = log(-Re A), A_imag = -Im A)
    k = SSMKernelDiag(d_model=2, d_state=N, init='diag-lin')
    _, A_mod, _, _ = k.get_params()
    want = torch.complex(torch.full((N // 2,), -0.5, dtype=torch.float64),
                         -(math.pi * n).clamp(min=1e-4))  # Im A = 0 is stored clamped
    torch.testing.assert_close(A_mod[0].to(torch.complex128), want, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match='init must be one of'):
        SSMKernelDiag(d_model=2, d_state=N, init='nope')


@pytest.mark.parametrize('init', ['diag-legs', 'diag-lin', 'diag-inv', 'diag-real'])
@pytest.mark.parametrize('disc', ['zoh', 'bilinear'])
def test_s4d_kernel_equals_recurrence(init, disc):
    torch.manual_seed(0)
    k = SSMKernelDiag(d_model=3, d_state=16, channels=2, init=init, disc=disc,
                      dt_min=0.01, dt_max=0.2)
    with torch.no_grad():
        K = k(L=12)
        assert K.shape == (2, 3, 12)
        torch.testing.assert_close(K, _impulse_response(k, 12), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('init', ['legs', 'fourier', 'hippo', 'dplr-lin'])
def test_dplr_kernel_equals_recurrence_and_doubles(init):
    torch.manual_seed(0)
    k = SSMKernelDPLR(d_model=4, d_state=16, l_max=10, channels=2, init=init, n_ssm=2,
                      dt_min=0.01, dt_max=0.1)
    assert int(k.l_kernel) == 0
    with torch.no_grad():
        K = k(L=10)
        assert int(k.l_kernel) == 10  # C converted lazily to C~ on the first call
        scale = K.abs().max().item()
        torch.testing.assert_close(K, _impulse_response(k, 10), atol=1e-4 * scale, rtol=0)
        K2 = k(L=25)  # needs a longer attuned length: doubles 10 -> 20 -> 40
        assert int(k.l_kernel) == 40
        torch.testing.assert_close(K2, _impulse_response(k, 25), atol=1e-4 * scale, rtol=0)
        torch.testing.assert_close(K2[..., :10], K, atol=1e-4 * scale, rtol=0)


def test_dplr_with_zero_P_equals_s4d_bilinear():
    """Cauchy/Woodbury path vs Vandermonde path on the same diagonal system."""
    torch.manual_seed(0)
    dplr = SSMKernelDPLR(d_model=3, d_state=16, l_max=14, channels=2, init='diag-inv')
    diag = SSMKernelDiag(d_model=3, d_state=16, channels=2, init='diag-inv', disc='bilinear')
    diag.load_state_dict({k: v for k, v in dplr.state_dict().items()
                          if k not in ('P', 'l_kernel')})
    with torch.no_grad():
        torch.testing.assert_close(dplr(L=14), diag(L=14), atol=1e-5, rtol=1e-4)


def test_rate_scales_dt():
    torch.manual_seed(0)
    k = SSMKernelDiag(d_model=3, d_state=8, init='diag-lin')
    k2 = SSMKernelDiag(d_model=3, d_state=8, init='diag-lin')
    k2.load_state_dict(k.state_dict())
    with torch.no_grad():
        k2.inv_dt += math.log(0.5)
        torch.testing.assert_close(k(L=9, rate=0.5), k2(L=9))


def test_bandlimit_masks_high_frequency_modes():
    torch.manual_seed(0)
    kw = dict(d_model=3, d_state=16, init='diag-lin', dt_min=0.1, dt_max=0.5)
    base = SSMKernelDiag(**kw)
    sd = base.state_dict()
    off = SSMKernelDiag(**kw, bandlimit=0.0)
    off.load_state_dict(sd)
    wide = SSMKernelDiag(**kw, bandlimit=1e6)
    wide.load_state_dict(sd)
    half = SSMKernelDiag(**kw, bandlimit=0.5)
    half.load_state_dict(sd)
    with torch.no_grad():
        assert off(L=8).abs().max() == 0
        torch.testing.assert_close(wide(L=8), base(L=8))
        dt = sd['inv_dt'].exp()  # (H, 1)
        freqs = dt * sd['A_imag'].abs() / (2 * math.pi)  # (H, N/2)
        keep = (freqs < 0.25)
        assert keep.any() and not keep.all()
        base.C.mul_(keep[None, :, :, None])
        torch.testing.assert_close(half(L=8), base(L=8))


def test_optimizer_hints_and_buffers():
    k = SSMKernelDPLR(d_model=2, d_state=8, lr=0.001)
    for name in ('inv_dt', 'B', 'A_real', 'A_imag', 'P'):
        assert getattr(k, name)._optim == {'lr': 0.001, 'weight_decay': 0.0}
    assert k.C._optim == {'lr': 0.001}
    # lr=0.0 freezes everything (C included, as the official lr dict does) into buffers
    k0 = SSMKernelDPLR(d_model=2, d_state=8, lr=0.0)
    assert not list(k0.parameters()) and set(k0.state_dict()) == set(k.state_dict())
    # a dict freezes only the named groups
    k1 = SSMKernelDPLR(d_model=2, d_state=8, lr={'dt': 0.0, 'A': 0.01})
    assert {n for n, _ in k1.named_parameters()} == {'C', 'B', 'A_real', 'A_imag', 'P'}
    assert k1.A_real._optim == {'lr': 0.01, 'weight_decay': 0.0} and k1.B._optim == {
        'weight_decay': 0.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match='disc'):
        SSMKernelDiag(d_model=2, d_state=8, disc='euler')
    with pytest.raises(ValueError, match='d_state must be even'):
        SSMKernelDiag(d_model=2, d_state=7)
    with pytest.raises(ValueError, match='n_ssm'):
        SSMKernelDiag(d_model=4, d_state=8, n_ssm=3)
    with pytest.raises(ValueError, match='dt_transform'):
        SSMKernelDiag(d_model=2, d_state=8, dt_transform='cube')


def test_cauchy_custom_backward_gradcheck():
    from mmssm.ops.ssm_kernels import cauchy
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.complex128, requires_grad=True)
    w = torch.complex(-torch.rand(4, 5, generator=g, dtype=torch.float64) - 0.1,
                      torch.randn(4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    z = 1j * torch.linspace(0, 3, 6, dtype=torch.float64).to(torch.complex128)
    assert torch.autograd.gradcheck(lambda v, w: cauchy(v, z, w), (v, w))
    # same values as the direct definition
    ref = (v[..., None] / (z - w[..., None]) + v.conj()[..., None] / (z - w.conj()[..., None])
           ).sum(-2)
    torch.testing.assert_close(cauchy(v, z, w), ref)


_needs_cauchy_ext = pytest.mark.skipif(
    not cauchy_cpu.available(),
    reason='compiled Cauchy kernel not built (python setup.py build_ext --inplace)')


def _cauchy_operands(seed: int, H: int, A: int, N: int, shared: bool, c_shape: tuple,
                     wide: bool):
    """Random complex128 Cauchy operands (with gradients): Bs (A, N) shared or (H, A, N),
    Cs of ``c_shape``, poles w (H, N) in the left half-plane (``wide``: near the axis, with
    3x larger imaginary parts). Returns the generator too, for the test's further draws."""
    g = torch.Generator().manual_seed(seed)
    cplx = dict(generator=g, dtype=torch.complex128)
    Bs = torch.randn(*(() if shared else (H,)), A, N, **cplx).requires_grad_()
    Cs = torch.randn(*c_shape, **cplx).requires_grad_()
    re = torch.rand(H, N, generator=g, dtype=torch.float64)
    im = torch.randn(H, N, generator=g, dtype=torch.float64)
    w = torch.complex(-re * 0.1, 3 * im) if wide else torch.complex(-re - 0.1, im)
    return g, Bs, Cs, w.requires_grad_()


@pytest.mark.parametrize('fused', [False, pytest.param(True, marks=_needs_cauchy_ext)])
@pytest.mark.parametrize('shared', [True, False])
def test_cauchy_outer_gradcheck(shared, fused, monkeypatch):
    from mmssm.ops.ssm_kernels import cauchy, cauchy_outer
    monkeypatch.setattr(cauchy_cpu, 'enabled', fused)
    H, N = 3, 4
    _, Bs, Cs, w = _cauchy_operands(1, H, 2, N, shared, (H, 3, N), wide=False)
    z = 1j * torch.linspace(0, 3, 5, dtype=torch.float64).to(torch.complex128)
    assert torch.autograd.gradcheck(lambda b, c, w: cauchy_outer(b, c, z, w), (Bs, Cs, w))
    # equals the plain Cauchy product of every (Bs[a], Cs[b]) pair
    B_ = Bs if not shared else Bs.expand(H, -1, -1)
    v = (B_[:, :, None] * Cs[:, None]).permute(1, 2, 0, 3)  # (A, Bc, H, N)
    torch.testing.assert_close(cauchy_outer(Bs, Cs, z, w), cauchy(v, z, w).permute(2, 0, 1, 3))


@_needs_cauchy_ext
@pytest.mark.parametrize('shape', [(5, 2, 3, 32, 29, True), (7, 3, 4, 9, 2, False),
                                   (1, 1, 1, 1, 1, True)])
def test_cauchy_outer_compiled_equals_pytorch(shape, monkeypatch):
    """The compiled kernel (values, no-grad values, gradients of Bs, Cs, w) against the
    PyTorch path, float64 round-off; N and Lf not multiples of the SIMD width."""
    from mmssm.ops.ssm_kernels import _fused, cauchy_outer, _bilinear_nodes
    H, A, Bc, N, Lf, shared = shape
    g, Bs, Cs, w = _cauchy_operands(2, H, A, N, shared, (H, Bc, N), wide=True)
    z = _bilinear_nodes(2 * Lf - 1, torch.float64, torch.device('cpu'))[0]
    gr = torch.randn(H, A, Bc, z.shape[0], generator=g, dtype=torch.complex128)
    out = {}
    for fused in (False, True):
        monkeypatch.setattr(cauchy_cpu, 'enabled', fused)
        assert _fused(Bs, Cs, z, w) == fused
        r = cauchy_outer(Bs, Cs, z, w)
        with torch.no_grad():
            r0 = cauchy_outer(Bs, Cs, z, w)
        out[fused] = (r, r0, *torch.autograd.grad(r, (Bs, Cs, w), gr))
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * a.abs().max().item())
    # complex64 operands (not the compiled kernel's float64) keep the PyTorch path
    assert not _fused(Bs.detach().to(torch.complex64), Cs, z, w)


@pytest.mark.parametrize('fused', [False, pytest.param(True, marks=_needs_cauchy_ext)])
@pytest.mark.parametrize('shared', [True, False])
def test_cauchy_outer_dt_gradcheck(shared, fused, monkeypatch):
    """``cauchy_outer(..., dt)`` (S4's dt [C; Q] operand scaled inside the compiled kernel)
    passes gradcheck for Bs, Cs, w and dt, with Cs contiguous and as the transposed view of
    a contiguous (Bc, H, N) tensor (read in place by the compiled kernel)."""
    from mmssm.ops.ssm_kernels import cauchy_outer
    monkeypatch.setattr(cauchy_cpu, 'enabled', fused)
    H, N = 3, 5
    g, Bs, Ct, w = _cauchy_operands(4, H, 2, N, shared, (3, H, N), wide=False)  # Ct (Bc, H, N)
    dt = (torch.rand(H, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    z = 1j * torch.linspace(0, 3, 4, dtype=torch.float64).to(torch.complex128)
    for layout in (lambda c: c.transpose(0, 1), lambda c: c.transpose(0, 1).contiguous()):
        assert torch.autograd.gradcheck(
            lambda b, c, w, d: cauchy_outer(b, layout(c), z, w, d), (Bs, Ct, w, dt))


@_needs_cauchy_ext
@pytest.mark.parametrize('shape', [(5, 2, 3, 32, 29, True), (7, 1, 4, 9, 2, False)])
def test_cauchy_outer_dt_compiled_equals_pytorch(shape, monkeypatch):
    """The compiled kernel with ``dt`` (scaled in registers, transposed Cs read in place)
    against the PyTorch path on the operand ``dt * Cs``: values, no-grad values and the
    gradients of Bs, Cs, w, dt to float64 round-off."""
    from mmssm.ops.ssm_kernels import _bilinear_nodes, cauchy_outer
    H, A, Bc, N, Lf, shared = shape
    g, Bs, Ct, w = _cauchy_operands(5, H, A, N, shared, (Bc, H, N), wide=True)
    dt = (torch.rand(H, generator=g, dtype=torch.float64) + 0.01).requires_grad_()
    z = _bilinear_nodes(2 * Lf - 1, torch.float64, torch.device('cpu'))[0]
    gr = torch.randn(H, A, Bc, z.shape[0], generator=g, dtype=torch.complex128)
    out = {}
    for fused in (False, True):
        monkeypatch.setattr(cauchy_cpu, 'enabled', fused)
        if fused:
            r = cauchy_outer(Bs, Ct.transpose(0, 1), z, w, dt)
            with torch.no_grad():
                r0 = cauchy_outer(Bs, Ct.transpose(0, 1), z, w, dt)
        else:  # the former operand: dt [C; Q] made by PyTorch
            r = cauchy_outer(Bs, Ct.transpose(0, 1) * dt[:, None, None], z, w)
            with torch.no_grad():
                r0 = cauchy_outer(Bs, Ct.transpose(0, 1) * dt[:, None, None], z, w)
        out[fused] = (r, r0, *torch.autograd.grad(r, (Bs, Ct, w, dt), gr))
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * a.abs().max().item())
    with pytest.raises(ValueError, match='dt must be a float64'):
        cauchy_cpu.cauchy_fwd(Bs.detach(), Ct.detach().transpose(0, 1), z, w.detach(),
                              dt.detach().float())


def test_dplr_rank2_equals_recurrence():
    torch.manual_seed(0)
    k = SSMKernelDPLR(d_model=3, d_state=16, l_max=12, channels=2, init='dplr-lin', rank=2,
                      n_ssm=3, dt_min=0.01, dt_max=0.1)
    with torch.no_grad():
        K = k(L=12)
        scale = K.abs().max().item()
        torch.testing.assert_close(K, _impulse_response(k, 12), atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize('cap', [None, 100])
def test_dplr_batched_equals_separate_calls(cap, monkeypatch):
    """S4ND's stacked per-axis kernel generation: same kernels and gradients as one call per
    kernel, for shared (n_ssm=1) and per-feature B/P, and lengths that fall in different
    FFT-node groups (cap=100: the first two no longer share a Cauchy product either)."""
    if cap is not None:
        monkeypatch.setattr(SSMKernelDPLR, 'batch_elements', cap)
    torch.manual_seed(0)
    kw = dict(d_state=8, channels=2, init='fourier', dt_min=0.05, dt_max=0.5)
    ks = [SSMKernelDPLR(d_model=4, l_max=9, n_ssm=1, **kw),
          SSMKernelDPLR(d_model=6, l_max=9, **kw),
          SSMKernelDPLR(d_model=4, l_max=5, n_ssm=1, **kw)]
    lengths = [9, 7, 5]  # n = 9, 9, 5: the first two share one Cauchy product
    for rate in (1.0, 0.5):
        got = SSMKernelDPLR.batched(ks, lengths, rate)
        g_got = torch.autograd.grad(sum((K * K).sum() for K in got), list(ks[1].parameters()))
        ref = [k(L=L, rate=rate) for k, L in zip(ks, lengths)]
        g_ref = torch.autograd.grad(sum((K * K).sum() for K in ref), list(ks[1].parameters()))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('n_ssm', [1, None])
def test_dplr_batched_stacked_parameters(n_ssm):
    """Kernels of one configuration (the layers of a ConvNeXt-S4ND stage) share their
    parameter transforms (`_stacked_cauchy_args`) when batched without a size cap: same
    Cauchy operands, kernels and gradients as separate calls (float64 round-off), for
    shared (n_ssm=1) and per-feature (n_ssm=H) A/B/P, at two rates."""
    from mmssm.ops.ssm_kernels import SSMKernelDPLR
    torch.manual_seed(0)
    kw = dict(d_model=4, d_state=8, channels=2, init='fourier', dt_min=0.05, dt_max=0.5,
              n_ssm=n_ssm)
    ks = [SSMKernelDPLR(l_max=9, **kw) for _ in range(3)]
    assert SSMKernelDPLR._stackable(ks)
    assert not SSMKernelDPLR._stackable(ks + [SSMKernelDPLR(l_max=9, **{**kw, 'd_model': 2})])
    for rate in (1.0, 0.5):
        for k in ks:
            k._attune(9, rate)
        stacked = SSMKernelDPLR._stacked_cauchy_args(ks, rate, torch.float64)
        single = [k._cauchy_args(rate, torch.float64) for k in ks]
        for j, got in enumerate(stacked):  # a shared Bs stays one (1+R, N) per kernel
            ref = (torch.stack if j == 0 and n_ssm == 1 else torch.cat)([a[j] for a in single])
            torch.testing.assert_close(got, ref, rtol=1e-15, atol=0)
        # dt left to the Cauchy call: unscaled Cs (K, H, ch+R, N) and dt (K, H)
        Bs, Cs, w, dt = SSMKernelDPLR._stacked_cauchy_args(ks, rate, torch.float64,
                                                           defer_dt=True)
        assert Cs.transpose(1, 2).is_contiguous() and dt.shape == (3, 4)
        torch.testing.assert_close((Cs * dt[..., None, None]).flatten(0, 1), stacked[1],
                                   rtol=0, atol=0)
        torch.testing.assert_close(w, stacked[2], rtol=0, atol=0)
        got = SSMKernelDPLR.batched(ks, [9, 7, 9], rate, max_elements=1 << 62)
        params = [p for k in ks for p in k.parameters()]
        g_got = torch.autograd.grad(sum((K * K).sum() for K in got), params)
        ref = [k(L=L, rate=rate) for k, L in zip(ks, [9, 7, 9])]
        g_ref = torch.autograd.grad(sum((K * K).sum() for K in ref), params)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dplr_attune_in_channel_blocks_is_exact(monkeypatch):
    """The C -> C~ conversion runs in blocks of channels (bounded memory): same C~."""
    from mmssm.ops.ssm_kernels import SSMKernelDPLR
    torch.manual_seed(0)
    k = SSMKernelDPLR(d_model=10, d_state=8, l_max=12, channels=2, init='fourier',
                      dt_min=0.1, dt_max=1.0)  # n_ssm = H: per-channel A, P sliced too
    k2 = SSMKernelDPLR(d_model=10, d_state=8, l_max=12, channels=2, init='fourier')
    k2.load_state_dict(k.state_dict())
    k._attune(None, 1.0)
    monkeypatch.setattr(SSMKernelDPLR, 'attune_block', 3 * 4 * 4 * 4)  # 3 channels a block
    k2._attune(None, 1.0)
    assert k2.l_kernel.item() == k.l_kernel.item() == 12
    torch.testing.assert_close(k2.C, k.C, rtol=0, atol=0)


@pytest.mark.parametrize('n_ssm', [1, None])
def test_dplr_inference_kernels_in_channel_blocks(n_ssm, monkeypatch):
    """Without autograd the Cauchy products run in blocks of channels (bounded memory in a
    model's first forward): the same kernels as the one-block product with autograd, for
    shared (n_ssm=1) and per-channel B / P, and blocks that do not divide H."""
    torch.manual_seed(0)
    kw = dict(d_model=10, d_state=8, l_max=12, channels=2, init='fourier', dt_min=0.1,
              dt_max=1.0)
    k = SSMKernelDPLR(**kw) if n_ssm is None else SSMKernelDPLR(n_ssm=n_ssm, **kw)
    ref = k(L=12)  # grad enabled: one product over all 10 channels
    # the blocks are for the PyTorch Cauchy product (the compiled one runs in one block)
    monkeypatch.setattr(cauchy_cpu, 'enabled', False)
    # 3 channels per block (N/2 = 4 poles x n/2 + 1 = 7 nodes each): blocks of 3, 3, 3, 1
    monkeypatch.setattr(SSMKernelDPLR, 'infer_block', 3 * 4 * 7)
    with torch.no_grad():
        got = k(L=12)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-7)


def test_built_cauchy_kernel_is_what_kernel_generation_gets(monkeypatch):
    """A compiled Cauchy kernel that was built must load and be the one S4 kernel
    generation calls for CPU float64 operands (with and without autograd), so a broken
    build cannot hide behind the PyTorch path."""
    if cauchy_cpu._path() is None:
        pytest.skip('compiled Cauchy kernel not built (MMSSM_BUILD_EXT=0 or no compiler)')
    assert cauchy_cpu.available(), f'{cauchy_cpu._path()} was built but does not load'
    from mmssm.ops.ssm_kernels import cauchy_outer
    calls = []
    for name in ('cauchy_fwd', 'cauchy_bwd'):
        real = getattr(cauchy_cpu, name)
        monkeypatch.setattr(cauchy_cpu, name,
                            lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    g = torch.Generator().manual_seed(3)
    cplx = dict(generator=g, dtype=torch.complex128)
    Bs = torch.randn(2, 2, 4, **cplx).requires_grad_()
    Cs = torch.randn(2, 3, 4, **cplx)
    w = torch.complex(-torch.rand(2, 4, generator=g, dtype=torch.float64) - 0.1,
                      torch.randn(2, 4, generator=g, dtype=torch.float64))
    z = 1j * torch.linspace(0, 3, 5, dtype=torch.float64).to(torch.complex128)
    cauchy_outer(Bs, Cs, z, w).abs().sum().backward()
    with torch.no_grad():
        cauchy_outer(Bs, Cs, z, w)
    assert calls == ['cauchy_fwd', 'cauchy_bwd', 'cauchy_fwd']


_needs_dplr_op = pytest.mark.skipif(
    not cauchy_cpu.dplr_available(),
    reason='compiled DPLR spectrum op not built (python setup.py build_ext --inplace)')


def _spectrum_operands(seed: int, K: int, H: int, N: int, Lf: int, ch: int):
    """Random operands of the compiled rank-1 spectrum op: Bs (K, 2, N), poles A (K, N) in
    the left half-plane, dt (K, H) > 0, nodes z and factors F (Lf,), K C tensors
    (ch, H, N, 2) float64, all but z and F with gradients."""
    g = torch.Generator().manual_seed(seed)
    cplx = dict(generator=g, dtype=torch.complex128)
    Bs = torch.randn(K, 2, N, **cplx).requires_grad_()
    A = torch.complex(-torch.rand(K, N, generator=g, dtype=torch.float64) - 0.2,
                      3 * torch.randn(K, N, generator=g, dtype=torch.float64)).requires_grad_()
    dt = (torch.rand(K, H, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    z = 1j * torch.linspace(0, 3, Lf, dtype=torch.float64).to(torch.complex128)
    F = torch.randn(Lf, **cplx)
    Cs = [torch.randn(ch, H, N, 2, generator=g, dtype=torch.float64).requires_grad_()
          for _ in range(K)]
    return Bs, A, dt, z, F, Cs


def _spectrum_reference(Bs, A, dt, z, F, *Cs):
    """The compiled op's function in PyTorch ops: per kernel, the Cauchy products of
    [B; P] and dt [C; conj(P)] at the poles dt A, Woodbury step, factor F."""
    from mmssm.ops.ssm_kernels import cauchy_outer
    out = []
    for k, C in enumerate(Cs):
        C = torch.view_as_complex(C)  # (ch, H, N)
        Cc = torch.cat([C, Bs[k, 1].conj().expand(1, C.shape[1], -1)]).transpose(0, 1)
        r = cauchy_outer(Bs[k], Cc * dt[k, :, None, None], z, dt[k, :, None] * A[k])
        (r00, r01), (r10, r11) = (t.split([t.shape[1] - 1, 1], 1) for t in r.unbind(1))
        out.append((r00 - r01 / (1 + r11) * r10).transpose(0, 1) * F)
    return torch.cat(out, 1)  # (ch, K H, Lf)


@_needs_dplr_op
@pytest.mark.parametrize('ch', [1, 2])
def test_dplr_spectrum_op_gradcheck_and_reference(ch, monkeypatch):
    """The compiled rank-1 spectrum op: float64 gradcheck of every input (H = 10: a full
    and a partial block of 8 channels), and values and gradients equal to the same
    function in PyTorch ops (float64 round-off)."""
    from mmssm.ops.ssm_kernels import _DPLRSpectrum
    Bs, A, dt, z, F, Cs = _spectrum_operands(4, 2, 10, 3, 4, ch)
    op = lambda Bs, A, dt, *Cs: _DPLRSpectrum.apply(Bs, A, dt, z, F, *Cs)  # noqa: E731
    assert torch.autograd.gradcheck(op, (Bs, A, dt, *Cs))
    got = op(Bs, A, dt, *Cs)
    monkeypatch.setattr(cauchy_cpu, 'enabled', False)  # the reference in PyTorch ops
    ref = _spectrum_reference(Bs, A, dt, z, F, *Cs)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(5))
    inputs = (Bs, A, dt, *Cs)
    for a, b in zip(torch.autograd.grad(got, inputs, cot), torch.autograd.grad(ref, inputs, cot)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@_needs_dplr_op
def test_dplr_spectrum_op_float32_C_and_bad_input():
    """C is read (and its gradient written) in its stored dtype: float32 C gives the
    float64 C's results to float32 round-off; malformed operands raise a clear error."""
    from mmssm.ops.ssm_kernels import _DPLRSpectrum
    Bs, A, dt, z, F, Cs = _spectrum_operands(6, 2, 9, 4, 5, 2)
    C32 = [c.detach().float().requires_grad_() for c in Cs]
    C64 = [c.detach().double().requires_grad_() for c in C32]
    out32 = _DPLRSpectrum.apply(Bs, A, dt, z, F, *C32)
    out64 = _DPLRSpectrum.apply(Bs, A, dt, z, F, *C64)
    torch.testing.assert_close(out32, out64, rtol=0, atol=0)  # same float64 arithmetic
    g32 = torch.autograd.grad(out32.abs().sum(), C32)
    g64 = torch.autograd.grad(out64.abs().sum(), C64)
    for a, b in zip(g32, g64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match='2 C tensors expected, got 1'):
        cauchy_cpu.dplr_fwd(Bs.detach(), A.detach(), dt.detach(), z, F, C32[:1])
    with pytest.raises(RuntimeError, match=r'each C must have shape \(2, 9, 4, 2\)'):
        cauchy_cpu.dplr_fwd(Bs.detach(), A.detach(), dt.detach(), z, F,
                            [c.detach()[:, :5] for c in C32])
    with pytest.raises(RuntimeError, match='ch must be 1 or 2'):
        cauchy_cpu.dplr_fwd(Bs.detach(), A.detach(), dt.detach(), z, F,
                            [torch.zeros(3, 9, 4, 2)] * 2)


@_needs_dplr_op
@pytest.mark.parametrize('channels', [1, 2])
def test_dplr_batched_fused_spectrum_equals_pytorch(channels, monkeypatch):
    """`SSMKernelDPLR.batched` with the compiled spectrum op (rank 1, n_ssm = 1, tied dt:
    S4ND's kernels) against its PyTorch path: same kernels and parameter gradients, for
    groups of one and several kernels, two rates, autograd on and off."""
    torch.manual_seed(0)
    kw = dict(d_state=8, channels=channels, init='fourier', dt_min=0.05, dt_max=0.5,
              n_ssm=1)
    ks = [SSMKernelDPLR(d_model=11, l_max=9, **kw) for _ in range(3)]
    ks.append(SSMKernelDPLR(d_model=4, l_max=5, **kw))  # a group of its own
    lengths = [9, 7, 9, 5]
    params = [p for k in ks for p in k.parameters()]
    calls = []
    real = cauchy_cpu.dplr_fwd
    monkeypatch.setattr(cauchy_cpu, 'dplr_fwd', lambda *a: calls.append(1) or real(*a))

    def run(fused: bool, rate: float):
        monkeypatch.setattr(cauchy_cpu, 'enabled', fused)
        out = SSMKernelDPLR.batched(ks, lengths, rate, max_elements=1 << 62)
        grads = torch.autograd.grad(sum((K * K).sum() for K in out), params)
        with torch.no_grad():
            out_ng = SSMKernelDPLR.batched(ks, lengths, rate)
        return out, grads, out_ng

    for rate in (1.0, 0.5):
        calls.clear()
        got = run(True, rate)
        assert len(calls) == 4  # two groups, with and without autograd
        ref = run(False, rate)
        assert len(calls) == 4
        for a, b in zip(got[0] + got[2], ref[0] + ref[2]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(got[1], ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_built_dplr_spectrum_op_is_what_s4nd_kernels_get(monkeypatch):
    """If the Cauchy library was built with the spectrum op (GCC / Clang), S4ND's rank-1
    shared-SSM kernels (ConvNeXt-S4ND) must be generated by it, forward and backward."""
    if cauchy_cpu._path() is None:
        pytest.skip('compiled Cauchy kernel not built (MMSSM_BUILD_EXT=0 or no compiler)')
    import sys
    if not sys.platform.startswith('linux'):
        pytest.skip('the spectrum op is built by GCC / Clang')
    assert cauchy_cpu.dplr_available(), 'the Cauchy library loads without its dplr ops'
    from mmssm.models.layers.s4nd import S4ND
    calls = []
    for name in ('dplr_fwd', 'dplr_bwd'):
        real = getattr(cauchy_cpu, name)
        monkeypatch.setattr(cauchy_cpu, name,
                            lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    layer = S4ND(8, d_state=8, dim=2, l_max=[6, 6], channels=1, bidirectional=True,
                 n_ssm=1, init='fourier', linear=True, activation=None)
    layer(torch.randn(1, 8, 6, 6)).square().sum().backward()
    assert calls == ['dplr_fwd', 'dplr_bwd']
