"""FFT N-D convolution vs the explicit conv reference (causal/bidirectional, 1/2/3-D)."""
import pytest
import torch

from mmssm.ops.fftconv import (axis_operators, axis_spectra, conv_reference_nd, conv_sizes,
                               fft_size, fftconv_nd, fftconv_separable, outer_spectrum,
                               separable_conv, toeplitz_conv_separable, toeplitz_matrix)

IMPLS = [fftconv_nd, fftconv_separable, toeplitz_conv_separable]

CASES = [((7,), (5,)), ((9,), (9,)), ((5, 7), (3, 7)), ((6, 5), (6, 2)),
         ((3, 5, 7), (2, 5, 4))]


def _prime_factors_ok(n):
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def test_fft_size_is_smallest_smooth_number():
    for n in range(1, 300):
        m = fft_size(n)
        assert m >= n and _prime_factors_ok(m)
        assert all(not _prime_factors_ok(k) for k in range(n, m))
    assert fft_size(112) == 112 and fft_size(11) == 12 and fft_size(13) == 14
    with pytest.raises(ValueError, match='n >= 1'):
        fft_size(0)


@pytest.mark.parametrize('shape,klen', CASES)
@pytest.mark.parametrize('bidirectional', [False, True])
@pytest.mark.parametrize('heads', [False, True])
@pytest.mark.parametrize('impl', IMPLS)
def test_fftconv_matches_direct_conv(shape, klen, bidirectional, heads, impl):
    g = torch.Generator().manual_seed(len(shape) * 10 + sum(klen))
    H, lead = 3, ((2,) if heads else ())
    u = torch.randn(2, H, *shape, generator=g, dtype=torch.float64)
    ks = [torch.randn(*lead, H, k, generator=g, dtype=torch.float64) for k in klen]
    kb = [torch.randn(*lead, H, k, generator=g, dtype=torch.float64) for k in klen] \
        if bidirectional else None
    D = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    y = impl(u, ks, kb, D)
    ref = conv_reference_nd(u, ks, kb, D)
    assert y.shape == ((2, 2, H, *shape) if heads else (2, H, *shape))
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('impl', IMPLS)
def test_no_wraparound_and_long_kernels(impl):
    # an impulse at the last position must not leak to the start (circular conv would);
    # kernels longer than the input are truncated without changing the result
    u = torch.zeros(1, 1, 6, dtype=torch.float64)
    u[..., -1] = 1
    k = torch.arange(1.0, 11.0, dtype=torch.float64)[None]  # length 10 > 6
    y = impl(u, [k])
    torch.testing.assert_close(y, torch.zeros_like(y) + torch.tensor([0, 0, 0, 0, 0, 1.0],
                                                                      dtype=torch.float64))
    yb = impl(u, [k], [k])  # anti-causal half reaches back: offsets -1..-5
    torch.testing.assert_close(yb[0, 0], torch.tensor([5, 4, 3, 2, 1, 1.0], dtype=torch.float64))


def test_outer_spectrum_is_spectrum_of_outer_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
    spec = outer_spectrum(axis_spectra([a, b], [8, 6]))
    full = torch.zeros(4, 8, 6)
    full[:, :5, :3] = a[:, :, None] * b[:, None, :]
    torch.testing.assert_close(spec, torch.fft.rfftn(full, dim=(-2, -1)), atol=1e-5, rtol=1e-5)


def test_conv_sizes_are_minimal_linear_sizes():
    assert conv_sizes([56, 13, 7], [56, 13, 3]) == [112, 25, 10]  # L + min(L_k, L - 1)
    assert conv_sizes([56, 13], [56, 4], bidirectional=False) == [112, 16]  # L + L_k - 1
    assert conv_sizes([1], [5]) == [1]


@pytest.mark.parametrize('impl', IMPLS)
def test_gradcheck_float64(impl):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k1 = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    D = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: impl(a[0], [a[1], a[2]], [a[3], a[4]], a[5]), (u, k0, k1, b0, b1, D))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('impl', IMPLS)
def test_half_inputs_computed_in_fp32(dtype, impl):
    g = torch.Generator().manual_seed(2)
    u = torch.randn(2, 4, 9, 11, generator=g)
    ks = [torch.randn(4, 9, generator=g) * 0.3, torch.randn(4, 11, generator=g) * 0.3]
    y = impl(u.to(dtype), ks, ks)
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref = impl(u.to(dtype).float(), ks, ks)
    torch.testing.assert_close(y.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize('impl', IMPLS)
def test_bad_input(impl):
    with pytest.raises(ValueError, match='spatial axes'):
        impl(torch.randn(1, 2, 5), [torch.randn(2, 3), torch.randn(2, 3)])


def test_toeplitz_matrix_and_mixed_axes():
    k = torch.tensor([1.0, 2.0, 3.0])
    kb = torch.tensor([10.0, 20.0])
    T = toeplitz_matrix(k, kb, 4)  # T[i, j] = k(i - j)
    want = torch.tensor([[1, 10, 20, 0], [2, 1, 10, 20], [3, 2, 1, 10], [0, 3, 2, 1.0]])
    torch.testing.assert_close(T, want)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 3, 6, 300, generator=g, dtype=torch.float64)
    ks = [torch.randn(3, 6, generator=g, dtype=torch.float64),
          torch.randn(3, 40, generator=g, dtype=torch.float64)]
    ops = axis_operators([6, 300], ks, ks, toeplitz_max=256)  # axis 0 matmul, axis 1 FFT
    assert [o[0] for o in ops] == ['toeplitz', 'fft']
    torch.testing.assert_close(separable_conv(u, ops), conv_reference_nd(u, ks, ks))


@pytest.mark.parametrize('shape', [(3, 24, 25), (3, 5, 7), (1, 24, 25), (1, 7, 7)])
@pytest.mark.parametrize('heads', [False, True])
@pytest.mark.parametrize('with_D', [False, True])
def test_toeplitz_2d_gemm_paths(shape, heads, with_D):
    # 2-D Toeplitz operators with one kernel per channel take batched GEMMs: image by
    # image (>= 576 positions, B > 1, no autograd, 1 thread) or all images in one GEMM
    # pair; both equal the conv reference, from full matrices, compact kernels, and
    # non-contiguous inputs
    B, Y, X = shape
    g = torch.Generator().manual_seed(Y * X + B)
    lead = (1,) if heads else ()
    u = torch.randn(B, 3, X, Y, generator=g, dtype=torch.float64).transpose(-1, -2)
    ks = [torch.randn(*lead, 3, n, generator=g, dtype=torch.float64) for n in (Y, X)]
    kb = [torch.randn(*lead, 3, n - 1, generator=g, dtype=torch.float64) for n in (Y, X)]
    D = torch.randn(*lead, 3, generator=g, dtype=torch.float64) if with_D else None
    ref = conv_reference_nd(u, ks, kb, D)
    threads = torch.get_num_threads()
    for compact in (False, True):
        ops = axis_operators([Y, X], ks, kb, compact=compact)
        with torch.no_grad():
            torch.testing.assert_close(separable_conv(u, ops, D), ref)
            torch.set_num_threads(1)  # the per-image path runs single-threaded only
            try:
                torch.testing.assert_close(separable_conv(u, ops, D), ref)
            finally:
                torch.set_num_threads(threads)
        ug = u.detach().requires_grad_()
        y = separable_conv(ug, ops, D)
        torch.testing.assert_close(y, ref)
        y.pow(2).sum().backward()
        uf = u.detach().requires_grad_()
        conv_reference_nd(uf, ks, kb, D).pow(2).sum().backward()
        torch.testing.assert_close(ug.grad, uf.grad)
    traced = torch.jit.trace(lambda v: separable_conv(v, ops, D), u)  # einsum path
    torch.testing.assert_close(traced(u), ref)


def test_toeplitz_2d_gradcheck_batched():
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ks = [torch.randn(2, n, generator=g, dtype=torch.float64, requires_grad=True)
          for n in (4, 5)]
    D = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, k0, k1, d: toeplitz_conv_separable(a, [k0, k1], [k0, k1], d),
        (u, *ks, D))


@pytest.mark.parametrize('shape', [(1, 4, 5), (2, 4, 5), (1, 1, 1), (3, 1, 2)])
def test_toeplitz_2d_channels_last_gradcheck(shape):
    # a channels-last input takes the channels-last output layout (2-D transposes in and
    # out of the GEMM layout, skip added afterwards, `_BatchedToeplitzConv2d`): gradcheck
    # in float64 for x, both kernels and D, incl. a 1x1 map (the transpose is a view there)
    B, Y, X = shape
    g = torch.Generator().manual_seed(B * 100 + Y * X)
    u = torch.randn(B, 3, Y, X, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    ks = [torch.randn(3, n, generator=g, dtype=torch.float64, requires_grad=True)
          for n in (Y, X)]
    D = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(a, k0, k1, d):
        return toeplitz_conv_separable(a, [k0, k1], [k0, k1], d)
    y = fn(u, *ks, D)
    assert y.permute(0, 2, 3, 1).is_contiguous()  # channels-last out
    torch.testing.assert_close(y, conv_reference_nd(u, ks, ks, D))
    assert torch.autograd.gradcheck(fn, (u, *ks, D))


@pytest.mark.parametrize('B', [1, 3])
def test_toeplitz_2d_channels_last_input_and_gradient(B, monkeypatch):
    # a ConvNeXt block feeds a channels-last residual sum and sends back the gradient of a
    # channels-last LayerNorm; the GEMM paths copy both once into their own layout (bmm
    # would otherwise copy every (Y, X) matrix separately): same values and gradients
    g = torch.Generator().manual_seed(B)
    H, Y, X = 4, 24, 25
    u = torch.randn(B, H, Y, X, generator=g, dtype=torch.float64)
    ks = [torch.randn(H, n, generator=g, dtype=torch.float64) for n in (Y, X)]
    kb = [torch.randn(H, n - 1, generator=g, dtype=torch.float64) for n in (Y, X)]
    D = torch.randn(H, generator=g, dtype=torch.float64)
    ref = conv_reference_nd(u, ks, kb, D)
    ops = axis_operators([Y, X], ks, kb, compact=True)
    u_cl = u.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # B > 1: the per-image path
    try:
        with torch.no_grad():
            y_cl = separable_conv(u_cl, ops, D)
            torch.testing.assert_close(y_cl, ref)
            assert y_cl.permute(0, 2, 3, 1).is_contiguous()  # channels-last in and out
    finally:
        torch.set_num_threads(threads)
    from mmssm.ops import fftconv
    with monkeypatch.context() as m, torch.no_grad():  # all images batched (> 1 thread)
        m.setattr(fftconv, '_PER_IMAGE_MIN', 1 << 30)
        y_cl = separable_conv(u_cl, ops, D)
        torch.testing.assert_close(y_cl, ref)
        assert y_cl.permute(0, 2, 3, 1).is_contiguous()
    w = torch.randn(B, Y, X, H, generator=g, dtype=torch.float64)  # channels-last consumer
    uf = u.detach().requires_grad_()
    kf = [k.detach().requires_grad_() for k in ks]
    (conv_reference_nd(uf, kf, kb, D).movedim(1, -1) * w).sum().backward()
    for n_threads in (threads, 1):  # B > 1 at 1 thread: the per-image path with autograd
        torch.set_num_threads(n_threads)
        try:
            for x in (u, u_cl):
                xg = x.detach().requires_grad_()
                kg = [k.detach().requires_grad_() for k in ks]
                y = separable_conv(xg, axis_operators([Y, X], kg, kb, compact=True), D)
                torch.testing.assert_close(y, ref)
                (y.movedim(1, -1) * w).sum().backward()
                torch.testing.assert_close(xg.grad, uf.grad)
                for a, b in zip(kg, kf):
                    torch.testing.assert_close(a.grad, b.grad)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize('gemm_max', [20, 0])  # 0/1-matrix GEMM / _ToeplitzMatrix
@pytest.mark.parametrize('L,lf,lb,lead', [(5, 5, 4, (3,)), (5, 3, 2, (1, 2)), (4, 4, None, (2,)),
                                          (1, 1, 0, (2,)), (6, 9, 9, ())])
def test_toeplitz_matrix_autograd_equals_window_construction(gemm_max, L, lf, lb, lead,
                                                             monkeypatch):
    # with autograd, toeplitz_matrix builds T from the kernel halves (a GEMM with a 0/1
    # matrix for short axes, else one custom node with diagonal-sum backward): the same T,
    # bit for bit, as the flip/unfold window of the two-sided kernel; the same gradients
    from mmssm.ops import fftconv
    from mmssm.ops.fftconv import _window_matrix, two_sided_kernel
    monkeypatch.setattr(fftconv, '_TOEPLITZ_GEMM_MAX', gemm_max)
    g = torch.Generator().manual_seed(L * 10 + lf)
    kf = torch.randn(*lead, lf, generator=g, dtype=torch.float64, requires_grad=True)
    kb = None if lb is None else torch.randn(*lead, lb, generator=g, dtype=torch.float64,
                                             requires_grad=True)
    ins = (kf,) if kb is None else (kf, kb)

    def build(*ks):
        return toeplitz_matrix(ks[0], ks[1] if len(ks) > 1 else None, L)
    T = build(*ins)
    assert T.grad_fn is not None
    ref = _window_matrix(two_sided_kernel(kf, kb, L - 1))
    assert torch.equal(T, ref)
    w = torch.randn(T.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(T, ins, w), torch.autograd.grad(ref, ins, w)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(build, ins)
    with torch.no_grad():  # no autograd: the window construction itself
        assert torch.equal(build(*ins), ref)
    ins32 = [k.detach().float().requires_grad_() for k in ins]
    with torch.autocast('cpu', dtype=torch.bfloat16):  # fp32 taps copied exactly
        assert torch.equal(build(*ins32), ref.float())


def test_diagonal_sums_in_blocks(monkeypatch):
    # the padded scratch is reused block by block (its padding stays zero): diagonal sums of
    # every matrix equal torch.diagonal sums, also with a scratch of one matrix per block
    from mmssm.ops import fftconv
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 6, generator=g, dtype=torch.float64)
    want = torch.stack([x.diagonal(o, -2, -1).sum(-1) for o in range(-5, 6)], -1)
    for scratch in (1 << 16, 1):
        monkeypatch.setattr(fftconv, '_DIAG_SCRATCH', scratch)
        torch.testing.assert_close(fftconv._diagonal_sums(x), want)
        torch.testing.assert_close(fftconv._diagonal_sums(x.transpose(-1, -2)), want.flip(-1))


@pytest.mark.parametrize('B', [1, 2])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('with_D', [False, True])
def test_batched_toeplitz_conv2d_backward(B, channels_last, with_D):
    # the all-images GEMM pair with its hand-written backward (gradients written into x's
    # layout, skip fused): gradcheck in float64 for x, Ty, Tx, D (dense matrices: the
    # backward does not assume Toeplitz structure), and only-some-inputs gradients
    from mmssm.ops.fftconv import _toeplitz_conv2d
    g = torch.Generator().manual_seed(B * 4 + channels_last * 2 + with_D)
    H, Y, X = 3, 4, 5
    x = torch.randn(B, H, Y, X, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    Ty = torch.randn(H, Y, Y, generator=g, dtype=torch.float64)
    Tx = torch.randn(H, X, X, generator=g, dtype=torch.float64)
    D = torch.randn(H, generator=g, dtype=torch.float64) if with_D else None
    args = [t.requires_grad_() for t in (x, Ty, Tx, D) if t is not None]

    def fn(*a):
        return _toeplitz_conv2d(a[0], a[1], a[2], a[3] if with_D else None)
    y = fn(*args)
    ref = torch.einsum('hij,bhjk,hlk->bhil', Ty, x, Tx)
    if with_D:
        ref = ref + D.view(H, 1, 1) * x
    torch.testing.assert_close(y, ref)
    assert y.permute(0, 2, 3, 1).is_contiguous() == channels_last
    assert torch.autograd.gradcheck(fn, tuple(args))
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for i in range(len(args)):  # one input at a time needs a gradient
        sub = [a.detach().requires_grad_(j == i) for j, a in enumerate(args)]
        got = torch.autograd.grad((fn(*sub) * w).sum(), sub[i])[0]
        torch.testing.assert_close(got, torch.autograd.grad((ref * w).sum(), args[i],
                                                            retain_graph=True)[0])


@pytest.mark.parametrize('shape', [(3, 7, 7, 7), (2, 1, 1, 1), (2, 3, 5, 2), (2, 8, 9, 10)])
def test_small_bmm_through_padded_contraction(shape):
    # products below ATen's BLAS size (M*K*N < 400) are zero-padded along K: same values
    from mmssm.ops.fftconv import _bmm
    H, M, K, N = shape
    g = torch.Generator().manual_seed(M * K * N)
    a = torch.randn(H, M, K, generator=g, dtype=torch.float64)
    b = torch.randn(H, N, K, generator=g, dtype=torch.float64).transpose(1, 2)  # strided
    c = torch.randn(H, M, N, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_bmm(a, b), torch.bmm(a, b))
    want = c + torch.bmm(a, b)
    got = _bmm(a, b, c)
    assert got.data_ptr() == c.data_ptr()  # accumulated in place
    torch.testing.assert_close(got, want)
