"""The two-direction scan (:func:`mmssm.ops.bidir_selective_scan`) against two calls of
the plain scan: values (bit-identical to the compiled plain kernel on its fast path),
every gradient, float64 gradcheck, the Python fallback, fake kernels and the FLOP handle."""
import pytest
import torch
from scan_cases import NAMES, simd_namespaces

from mmssm.ops import (bidir_selective_scan, bidir_selective_scan_ref, selective_scan,
                       selective_scan_cpp, selective_scan_ref)
from mmssm.ops.bidir_selective_scan import bidir_selective_scan_fwd

needs_ext = pytest.mark.skipif(not selective_scan_cpp.available(),
                               reason='compiled scan not built')


def make_inputs(b, d, l, n=1, varying='B', layout='tokens', z=True, D=True, bias=True,
                dtype=torch.float32, seed=0):
    """Scan operands as a dict; 'tokens': u / delta / z are (b, d, l) views of (b, l, d)
    memory (V2M's passes, the kernel's fast path when n = 1), 'contiguous': (b, d, l)."""
    g = torch.Generator().manual_seed(seed)

    def act(scale=1.0, shift=0.0):
        if layout == 'tokens':
            return (torch.randn(b, l, d, generator=g, dtype=dtype) * scale + shift).transpose(1, 2)
        return torch.randn(b, d, l, generator=g, dtype=dtype) * scale + shift

    wd = torch.float64 if dtype == torch.float64 else torch.float32
    var = torch.randn(b, 1, n, l, generator=g, dtype=wd)
    const = torch.randn(d, n, generator=g, dtype=wd)
    return dict(u=act(), delta=act(0.5, -0.5), A=-torch.rand(d, n, generator=g, dtype=wd) - 0.2,
                B=var if varying == 'B' else const, C=const if varying == 'B' else var,
                D=torch.randn(d, generator=g, dtype=wd) if D else None,
                z=act() if z else None,
                delta_bias=torch.randn(d, generator=g, dtype=wd) * 0.3 if bias else None)


def two_scans(x, sum_directions, **kw):
    """The reference: selective_scan_ref forward and reverse (float64 math for fp64 x)."""
    ys = [selective_scan_ref(**x, reverse=rev, **kw) for rev in (False, True)]
    return ys[0] + ys[1] if sum_directions else torch.stack(ys)


def leaves(x):
    return {k: None if v is None else v.detach().clone().requires_grad_() for k, v in x.items()}


# (b, d, l, n, layout): the fast path (n = 1, tokens, full SIMD blocks: d = 16 / 32), odd and
# > 64-step lines; and the plain-kernel fallback (partial block d = 20, n > 1, contiguous)
CASES = [(2, 32, 7, 1, 'tokens'), (1, 16, 70, 1, 'tokens'), (3, 32, 13, 1, 'tokens'),
         (2, 20, 9, 1, 'tokens'), (2, 16, 11, 3, 'tokens'), (2, 16, 9, 1, 'contiguous')]


@needs_ext
@pytest.mark.parametrize('case', CASES, ids=str)
@pytest.mark.parametrize('varying', ['B', 'C'])
@pytest.mark.parametrize('sum_directions', [False, True])
def test_values_and_grads_match_two_scans(case, varying, sum_directions):
    b, d, l, n, layout = case
    x = make_inputs(b, d, l, n, varying, layout)
    xk, xr = leaves(x), leaves(x)
    y = bidir_selective_scan(**xk, delta_softplus=True, sum_directions=sum_directions)
    yr = two_scans(xr, sum_directions, delta_softplus=True)
    assert y.shape == yr.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, yr, rtol=2e-5, atol=2e-5)
    dy = torch.randn_like(y)
    gk = torch.autograd.grad((y * dy).sum(), [xk[k] for k in NAMES])
    gr = torch.autograd.grad((yr * dy).sum(), [xr[k] for k in NAMES])
    for name, a, r in zip(NAMES, gk, gr):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=name)


@needs_ext
@pytest.mark.parametrize('layout', ['tokens', 'contiguous'])
@pytest.mark.parametrize('flags', [dict(), dict(z=False), dict(D=False, bias=False),
                                   dict(z=False, D=False)], ids=str)
@pytest.mark.parametrize('softplus', [False, True])
def test_bit_identical_to_plain_kernel(layout, flags, softplus):
    """Inference (the direct kernel call): each direction equals the plain compiled scan
    bit for bit, the sum equals their sum, each slice laid out like the plain output."""
    x = make_inputs(2, 32, 19, layout=layout, **flags)
    if not softplus:  # keep dt positive without softplus
        x['delta'] = x['delta'].abs()
    with torch.no_grad():
        f, r = (selective_scan(**x, delta_softplus=softplus, reverse=rev) for rev in (0, 1))
        y = bidir_selective_scan(**x, delta_softplus=softplus)
        s = bidir_selective_scan(**x, delta_softplus=softplus, sum_directions=True)
    assert torch.equal(y[0], f) and torch.equal(y[1], r) and torch.equal(s, f + r)
    assert y[0].stride() == y[1].stride() == s.stride() == f.stride()


@needs_ext
def test_chunk_states_equal_plain_kernel():
    """The saved states (the backward's input) are each direction's plain-kernel states."""
    x = make_inputs(2, 16, 130, varying='C')
    args = [x[k] for k in NAMES]
    ext = selective_scan_cpp._EXT
    _, states = ext.bidir_fwd(*args, True, False, False, True)
    for k, rev in enumerate((False, True)):
        assert torch.equal(states[k], ext.fwd(*args, True, False, rev, True)[2])


@needs_ext
def test_low_precision_and_out_fp32():
    """bf16 activations (the plain kernel twice): the output dtype follows out_fp32."""
    x = make_inputs(2, 16, 10)
    xb = {k: v.bfloat16() if k in ('u', 'delta', 'z') else v for k, v in x.items()}
    for out_fp32, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        with torch.no_grad():
            y = bidir_selective_scan(**xb, delta_softplus=True, out_fp32=out_fp32)
            yr = bidir_selective_scan_ref(**xb, delta_softplus=True, out_fp32=out_fp32)
        assert y.dtype == dtype
        torch.testing.assert_close(y, yr, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize('varying', ['B', 'C'])
@pytest.mark.parametrize('sum_directions', [False, True])
def test_gradcheck_float64(varying, sum_directions):
    """float64 gradcheck through the fast path (W = 8 doubles with AVX-512: d = 16 is
    full blocks) and the fallback (d = 5)."""
    for d in (16, 5):
        x = make_inputs(1, d, 6, varying=varying, dtype=torch.float64)
        xs = [x[k].requires_grad_() for k in NAMES]
        assert torch.autograd.gradcheck(
            lambda *a: bidir_selective_scan(*a, delta_softplus=True,
                                            sum_directions=sum_directions), xs)


@needs_ext
def test_python_fallback_matches_kernel(monkeypatch):
    """Without the compiled kernel the op runs the plain op twice: same values, states and
    gradients as the kernel's."""
    x = make_inputs(2, 16, 9, varying='C')
    args = [x[k] for k in NAMES]
    for sum_dirs in (False, True):
        out, states = bidir_selective_scan_fwd(*args, True, False, sum_dirs, True)
        dout = torch.randn_like(out)
        grads = torch.ops.mmssm.bidir_selective_scan_bwd(dout, *args, states, True, sum_dirs)
        with monkeypatch.context() as m:
            m.setattr(selective_scan_cpp, '_EXT', None)
            out2, states2 = bidir_selective_scan_fwd(*args, True, False, sum_dirs, True)
            grads2 = torch.ops.mmssm.bidir_selective_scan_bwd(dout, *args, states2, True,
                                                              sum_dirs)
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
        assert out2.stride() == out.stride() and states2.shape[0] == 2
        for a, b in zip(grads2, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_ext
@pytest.mark.parametrize('case', CASES, ids=str)
@pytest.mark.parametrize('sum_directions', [False, True])
def test_backward_reads_any_dout_layout_and_gives_u_layout(case, sum_directions):
    """The backward reads dout in its own layout (contiguous, token-major, a stride-0
    expanded one: the same gradients bit for bit) and gives du / d(delta) / dz in u's
    layout on the fast path and the fallback alike, as its fake kernel says (opcheck)."""
    b, d, l, n, layout = case
    x = make_inputs(b, d, l, n=n, varying='C', layout=layout)
    args = [x[k] for k in NAMES]
    _, states = bidir_selective_scan_fwd(*args, True, False, sum_directions, True)
    shape = (b, d, l) if sum_directions else (2, b, d, l)
    dout = torch.randn(shape)
    bwd = torch.ops.mmssm.bidir_selective_scan_bwd
    ref = bwd(dout, *args, states, True, sum_directions)
    token_major = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
    expanded = torch.randn((1, ) * (len(shape) - 2) + (d, l)).expand(shape)
    ref_expanded = bwd(expanded.contiguous(), *args, states, True, sum_directions)
    for dl, want in ((token_major, ref), (expanded, ref_expanded)):
        for name, a, r in zip(NAMES, bwd(dl, *args, states, True, sum_directions), want):
            assert torch.equal(a, r), name
    u_strides = torch.empty_like(x['u']).stride()
    for i in (0, 1, 6):  # du, d(delta), dz
        assert ref[i].stride() == u_strides, NAMES[i]
    torch.library.opcheck(bwd.default, (token_major, *args, states, True, sum_directions),
                          test_utils=('test_schema', 'test_faketensor'))


@needs_ext
@pytest.mark.parametrize('sum_directions', [False, True])
def test_eager_autograd_equals_registered_op(sum_directions, monkeypatch):
    """Eager autograd calls the compiled ops directly (no custom-op dispatch): values and
    every gradient bit-identical to the registered op's autograd
    (``selective_scan_cpp.EAGER_AUTOGRAD = False``); under a TorchDispatchMode (as FLOP
    counting) the registered op runs."""
    x = make_inputs(2, 32, 13, varying='B')
    dout = torch.randn((2, 32, 13) if sum_directions else (2, 2, 32, 13))
    res = []
    for direct in (True, False):
        monkeypatch.setattr(selective_scan_cpp, 'EAGER_AUTOGRAD', direct)
        xs = leaves(x)
        args = [xs[k] for k in NAMES]
        y = bidir_selective_scan(*args, delta_softplus=True, sum_directions=sum_directions)
        assert ('EagerBidir' in type(y.grad_fn).__name__) == direct
        y.backward(dout)
        res.append((y.detach(), [None if a is None else a.grad for a in args]))
    assert torch.equal(res[0][0], res[1][0])
    for name, a, b in zip(NAMES, res[0][1], res[1][1]):
        assert (a is None and b is None) or torch.equal(a, b), name
    monkeypatch.setattr(selective_scan_cpp, 'EAGER_AUTOGRAD', True)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    xs = leaves(x)
    with Spy():
        bidir_selective_scan(*[xs[k] for k in NAMES], sum_directions=sum_directions)
    assert any('bidir_selective_scan_fwd' in f for f in seen)


@needs_ext
def test_opcheck_fake_kernels_and_autograd():
    """torch.library.opcheck: schema, fake kernel (shapes / strides), autograd registration."""
    x = make_inputs(2, 16, 9)
    for sum_dirs in (False, True):
        args = tuple(x[k] for k in NAMES) + (True, False, sum_dirs, True)
        torch.library.opcheck(torch.ops.mmssm.bidir_selective_scan_fwd.default, args)


def test_bad_input_names_the_argument():
    x = make_inputs(1, 4, 5, z=False)
    x['delta'] = x['delta'][..., :3]
    with pytest.raises(ValueError, match='delta'):
        bidir_selective_scan(**x)


@needs_ext
def test_flop_handle_counts_two_scans():
    from mmssm.utils.flops import count_flops, selective_scan_flops

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(-torch.rand(8, 1) - 0.2)

        def forward(self, u):
            return bidir_selective_scan(u, u, self.A, torch.ones(8, 1), torch.ones(8, 1),
                                        D=torch.ones(8), z=u, sum_directions=True)

    analyzer = count_flops(Two(), (torch.randn(2, 8, 5), ))
    assert analyzer.by_operator()['selective_scan'] == 2 * selective_scan_flops(
        2, 8, 5, 1, with_D=True, with_z=True)


@needs_ext
@pytest.mark.parametrize('varying', ['B', 'C'])
@pytest.mark.parametrize('sum_directions', [False, True])
@pytest.mark.parametrize('gate', [False, True])
def test_fused_backward_equals_two_plain_backwards(varying, sum_directions, gate, monkeypatch):
    """n = 1 token-major lines take the fused two-direction backward; with
    MMSSM_SCAN_TILED_ONLY=1 (every one-pass path off) the op runs the plain backward of each
    direction: the gradients agree to fp32 rounding (the directions' terms are added in
    another order)."""
    x = make_inputs(3, 32, 23, varying=varying, z=gate)
    args = [x[k] for k in NAMES]
    _, states = bidir_selective_scan_fwd(*args, True, False, sum_directions, True)
    dout = torch.randn((3, 32, 23) if sum_directions else (2, 3, 32, 23))
    bwd = torch.ops.mmssm.bidir_selective_scan_bwd
    fused = bwd(dout, *args, states, True, sum_directions)
    monkeypatch.setenv('MMSSM_SCAN_TILED_ONLY', '1')
    plain = bwd(dout, *args, states, True, sum_directions)
    for name, a, b in zip(NAMES, fused, plain):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@needs_ext
def test_every_built_simd_level():
    """Each SIMD build the CPU runs (separate compilations of one source): the fast path's
    directions equal that build's plain scan, the fused backward its plain backward, and
    it reads a token-major cotangent as it is and gives u's layout."""
    x = make_inputs(2, 32, 11, varying='C')
    args = [x[k] for k in NAMES]
    tested = []
    for level, ns in simd_namespaces():
        out, states = ns.bidir_fwd(*args, True, False, False, True)
        plain = [ns.fwd(*args, True, False, rev, True) for rev in (False, True)]
        assert torch.equal(out[0], plain[0][0]) and torch.equal(out[1], plain[1][0])
        dout = torch.randn_like(out)
        fused = ns.bidir_bwd(dout, *args, states, True, False)
        ref = [ns.bwd(dout[k], None, *args, plain[k][2], True, k == 1) for k in (0, 1)]
        for name, a, r0, r1 in zip(NAMES, fused, *ref):
            torch.testing.assert_close(a, r0 + r1, rtol=1e-5, atol=1e-5, msg=name)
        # a token-major cotangent is read as it is; du / d(delta) / dz come in u's layout
        dtok = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
        for name, a, b in zip(NAMES, ns.bidir_bwd(dtok, *args, states, True, False), fused):
            assert torch.equal(a, b), name
        assert fused[0].stride() == fused[1].stride() == x['u'].stride()
        tested.append(level)
    assert tested and 'default' in tested


@needs_ext
@pytest.mark.parametrize('case', CASES, ids=str)
@pytest.mark.parametrize('gate', [False, True])
def test_sum_into_adds_and_gates_in_place(case, gate):
    """``bidir_selective_scan_sum_into``: out + forward + reverse (times silu(gate)) in
    place on the kernel's fast path (fp32 rounding of the separate add / silu / multiply);
    elsewhere it declines (False) and leaves out untouched, as with a gradient."""
    from mmssm.ops import bidir_selective_scan_sum_into
    b, d, l, n, layout = case
    x = make_inputs(b, d, l, n, 'C', layout, z=False)
    x.pop('z')
    out0 = torch.randn(b, l, d).transpose(1, 2) if layout == 'tokens' else torch.randn(b, d, l)
    g = torch.randn_like(out0)  # out0's strides (a transposed view of (b, l, d) or contiguous)
    with torch.no_grad():
        expect = out0 + bidir_selective_scan(**x, delta_softplus=True, sum_directions=True)
        if gate:
            expect = expect * torch.nn.functional.silu(g)
        out = out0.clone().transpose(1, 2).contiguous().transpose(1, 2) if layout == 'tokens' \
            else out0.clone()
        done = bidir_selective_scan_sum_into(out, **x, delta_softplus=True,
                                             gate=g if gate else None)
    fast = n == 1 and d % 16 == 0 and layout == 'tokens'
    assert done == fast
    if fast:
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, out0)
    # a gradient is needed: declined
    u = x['u'].clone().requires_grad_()
    assert not bidir_selective_scan_sum_into(out, **{**x, 'u': u}, delta_softplus=True)
