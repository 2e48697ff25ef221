"""The direction-aware VMamba scan (:func:`mmssm.ops.cross_selective_scan`) against the
composition cross_scan -> selective_scan -> cross_merge: values, every gradient,
float64 gradcheck, SS2D through it and the FLOP handle."""
import pytest
import torch

from mmssm.ops import cross_selective_scan, cross_selective_scan_ref, selective_scan_cpp
from mmssm.ops.cross_selective_scan import cross_selective_scan_fwd

needs_ext = pytest.mark.skipif(not selective_scan_cpp.available(),
                               reason='compiled scan not built')
NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')


def make_inputs(b, h, w, d, n, dtype=torch.float32, r=3, seed=0):
    """Grid-layout operands; B / C are strided views of one x_proj-like output."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, h, w, d, generator=g, dtype=dtype)
    delta = torch.randn(4, b, h, w, d, generator=g, dtype=dtype) * 0.5
    A = -torch.rand(4 * d, n, generator=g, dtype=dtype) - 0.2
    xd = torch.randn(b, h, w, 4, r + 2 * n, generator=g, dtype=dtype)
    D = torch.randn(4 * d, generator=g, dtype=dtype)
    bias = torch.randn(4 * d, generator=g, dtype=dtype) * 0.3
    return [u, delta, A, xd[..., r:r + n], xd[..., r + n:], D, bias]


# (b, h, w, d, n): non-square, odd sizes, batch > 1, d not a multiple of the SIMD
# width, n = 1 (VMamba v2) and n = 16 (v0), L over one 64-step tile
CASES = [(1, 3, 5, 7, 1), (2, 9, 11, 20, 16), (1, 1, 13, 16, 1), (2, 13, 7, 33, 4),
         (1, 10, 9, 17, 1)]


@needs_ext
@pytest.mark.parametrize('case', CASES, ids=str)
def test_values_and_grads_match_composition(case):
    x = make_inputs(*case)
    xk = [t.detach().clone().requires_grad_() for t in x]
    xr = [t.detach().clone().requires_grad_() for t in x]
    y, yr = cross_selective_scan(*xk), cross_selective_scan_ref(*xr)
    assert y.shape == yr.shape and y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    for name, a, r in zip(NAMES, xk, xr):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():  # inference (direct kernel, no saved states): same values
        assert torch.equal(cross_selective_scan(*x), y.detach())


@needs_ext
def test_without_D_bias_softplus_and_channels_last_view():
    u, delta, A, B, C, _, _ = make_inputs(2, 5, 6, 9, 2)
    u_cl = u.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # strided (b, h, w, D)
    u_nc = u.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    for uu in (u_cl, u_nc):
        torch.testing.assert_close(
            cross_selective_scan(uu, delta, A, B, C, delta_softplus=False),
            cross_selective_scan_ref(uu, delta, A, B, C, delta_softplus=False),
            rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize('n', [1, 3])
def test_gradcheck_float64(n):
    x = make_inputs(2, 3, 5, 3, n, dtype=torch.float64)
    x = [t.detach().clone().requires_grad_() for t in x]
    assert torch.autograd.gradcheck(lambda *a: cross_selective_scan(*a), x)


def test_fallback_op_without_extension(monkeypatch):
    """Without the compiled kernel the ops run the composition (values and grads)."""
    x = make_inputs(1, 4, 3, 5, 2, dtype=torch.float64)
    ref = cross_selective_scan_ref(*x)
    monkeypatch.setattr(selective_scan_cpp, '_EXT', None)
    xk = [t.detach().clone().requires_grad_() for t in x]
    y, _ = cross_selective_scan_fwd(*xk, True, True)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    xr = [t.detach().clone().requires_grad_() for t in x]
    cross_selective_scan_ref(*xr).sum().backward()
    for name, a, r in zip(NAMES, xk, xr):
        torch.testing.assert_close(a.grad, r.grad, msg=name)


def test_bad_shapes_name_the_argument():
    u, delta, A, B, C, D, bias = make_inputs(1, 3, 4, 5, 1)
    with pytest.raises(ValueError, match='delta must be'):
        cross_selective_scan(u, delta[:2], A, B, C, D, bias)
    with pytest.raises(ValueError, match='B must be'):
        cross_selective_scan(u, delta, A, B[..., :2, :], C, D, bias)
    with pytest.raises(ValueError, match='A must be'):
        cross_selective_scan(u, delta, A[:5], B, C, D, bias)
    with pytest.raises(ValueError, match='D must be'):
        cross_selective_scan(u, delta, A, B, C, D[:3], bias)


@needs_ext
def test_compile_and_fake_kernel():
    x = make_inputs(1, 4, 5, 6, 1)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(lambda *a: cross_selective_scan(*a), backend=backend,
                        fullgraph=True)(*x)
    torch.testing.assert_close(out, cross_selective_scan_ref(*x), rtol=1e-5, atol=1e-5)
    nodes = [n for g in graphs for n in g.graph.nodes if 'cross_selective_scan' in str(n.target)]
    assert len(nodes) == 1


@needs_ext
@pytest.mark.parametrize('forward_type,channel_first,d_state',
                         [('v05_noz', True, 1), ('v0', False, 16)])
def test_ss2d_kernel_equals_composition(forward_type, channel_first, d_state):
    from mmssm.models.layers.ss2d import SS2D
    torch.manual_seed(0)
    m = SS2D(12, d_state=d_state, forward_type=forward_type, channel_first=channel_first)
    x = torch.randn(2, 12, 5, 7) if channel_first else torch.randn(2, 5, 7, 12)
    if channel_first:
        x = x.contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for fused in (True, False):
        m.use_cross_kernel = fused
        m.zero_grad()
        xi = x.detach().clone().requires_grad_()
        out = m(xi)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_ext
def test_flop_count_is_unchanged():
    from mmssm.models.layers.ss2d import SS2D
    from mmssm.utils.flops import count_flops
    m = SS2D(16, d_state=1).eval()
    x = torch.randn(1, 16, 6, 5).contiguous(memory_format=torch.channels_last)
    totals = []
    for fused in (True, False):
        m.use_cross_kernel = fused
        analyzer = count_flops(m, (x,))
        totals.append((analyzer.total(), dict(analyzer.by_operator())))
    assert totals[0][0] == totals[1][0], totals
    assert totals[0][1]['selective_scan'] == totals[1][1]['selective_scan'] > 0


@needs_ext
def test_one_pass_n1_path_equals_tiled_path():
    """n = 1 full channel blocks take the one-pass loop, a partial block the tiled
    path; channels are independent, so dropping the last channel moves channels
    16..30 from one to the other: the results must be bit-identical."""
    u, delta, A, B, C, D, bias = make_inputs(1, 9, 10, 32, 1)

    def cut(d):  # the first d channels of every direction
        return (u[..., :d], delta[..., :d], A.view(4, 32, 1)[:, :d].reshape(4 * d, 1), B, C,
                D.view(4, 32)[:, :d].reshape(-1), bias.view(4, 32)[:, :d].reshape(-1))
    with torch.no_grad():
        full, part = cross_selective_scan(*cut(32)), cross_selective_scan(*cut(31))
    assert torch.equal(full[..., :31], part)
