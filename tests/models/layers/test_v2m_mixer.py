"""V2MMixer2D: layout (every corner's output on its own token), causality, keys, errors."""
import pytest
import torch

import mmssm.ops
from mmssm.models.layers import V2MMixer2D
from mmssm.ops import selective_scan_cpp
from mmssm.models.layers.v2m_mixer import parse_corners

CORNER_NAMES = ('ul', 'lr', 'ur', 'll')


def _identity_mixer(c, corners):
    """d_conv=0, no gate, in_proj = [I; 0], out_proj = I: only the scans and layout remain."""
    m = V2MMixer2D(c, d_state=2, expand=1, d_conv=0, corners=corners, use_z=False)
    with torch.no_grad():
        m.in_proj.weight.zero_()
        m.in_proj.weight[:c] = torch.eye(c)
        m.out_proj.weight.copy_(torch.eye(c))
    return m


def _fake_scan(kind, log):
    def scan(u, delta, A, B, C, D=None, z=None, reverse=False, **kw):
        # the constant of each pass is passed as (d, n), never materialised
        log.append((tuple(u.shape), tuple(B.shape), tuple(C.shape), reverse))
        if kind == 'id':
            return u
        # a reverse scan accumulates from the last step (the right / bottom corners)
        return u.flip(-1).cumsum(-1).flip(-1) if reverse else u.cumsum(-1)
    return scan


def _onehot_grid(h, w):
    # token t = (i, j) carries the one-hot vector e_t: output channels name the sources
    return torch.eye(h * w).view(1, h, w, h * w)


@pytest.mark.parametrize('corners', [1, 2, 3, 4, ('lr', ), ('ur', 'll')])
def test_identity_scans_keep_every_token_in_place(patch_scans, corners):
    h, w = 3, 5  # non-square: a transpose cannot go unnoticed
    log = []
    patch_scans(_fake_scan('id', log))
    m = _identity_mixer(h * w, corners)
    x = _onehot_grid(h, w)
    y = m(x)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    names = parse_corners(corners)
    d = h * w
    # pass 1 runs along rows (length w) with C constant, once per row direction the
    # corners need (left to right for ul/ll, reversed for ur/lr); pass 2 along the
    # columns of each row latent with B constant, top down (ul/ur) or reversed (ll/lr)
    row_dirs = sorted({c in ('ur', 'lr') for c in names})
    n_rows = len(row_dirs)
    assert log[:n_rows] == [((h, d, w), (h, 2, w), (d, 2), r) for r in row_dirs]
    assert sorted(log[n_rows:]) == sorted(((w, d, h), (d, 2), (w, 2, h), c in ('ll', 'lr'))
                                          for c in names)


@pytest.mark.parametrize('corner', CORNER_NAMES)
def test_cumsum_scans_reach_the_quadrant_behind_the_corner(patch_scans, corner):
    h, w = 3, 4
    patch_scans(_fake_scan('cumsum', []))
    m = _identity_mixer(h * w, (corner, ))
    y = m(_onehot_grid(h, w))[0]  # (h, w, h*w): y[i, j, t] = 1 iff token t reaches (i, j)
    for i in range(h):
        for j in range(w):
            expect = torch.zeros(h, w)
            rows = slice(0, i + 1) if corner in ('ul', 'ur') else slice(i, h)
            cols = slice(0, j + 1) if corner in ('ul', 'll') else slice(j, w)
            expect[rows, cols] = 1
            assert torch.equal(y[i, j].view(h, w), expect), (corner, i, j)


@pytest.mark.parametrize('corner', CORNER_NAMES)
def test_real_scan_is_causal_from_its_corner(corner):
    """Full mixer, real scan and convs: a perturbed token only moves its quadrant."""
    torch.manual_seed(0)
    h, w, c = 4, 5, 8
    m = V2MMixer2D(c, d_state=4, corners=(corner, )).eval()
    x = torch.randn(1, h, w, c)
    x2 = x.clone()
    pi, pj = 1, 2
    x2[0, pi, pj] += 1.0
    changed = (m(x2) - m(x)).abs().amax(-1)[0] > 1e-7  # (h, w)
    rows = torch.arange(h)[:, None]
    cols = torch.arange(w)[None, :]
    down = rows >= pi if corner in ('ul', 'ur') else rows <= pi
    right = cols >= pj if corner in ('ul', 'll') else cols <= pj
    assert torch.equal(changed, down & right)


def test_corners_are_flip_equivariant_and_averaged():
    torch.manual_seed(0)
    m = V2MMixer2D(8, d_state=4, corners=4).eval()
    x = torch.randn(2, 3, 4, 8)
    with torch.no_grad():
        outs = {}
        for c in CORNER_NAMES:
            m.corners = (c, )
            outs[c] = m(x)
        m.corners = ('ul', )
        # seen from 'lr', the grid is the 'ul' scan of the fully flipped input
        torch.testing.assert_close(outs['lr'], m(x.flip(1, 2)).flip(1, 2))
        torch.testing.assert_close(outs['ur'], m(x.flip(2)).flip(2))
        m.corners = CORNER_NAMES
        # out_proj is linear and bias-free: the 4-corner output is the mean of the corners
        torch.testing.assert_close(m(x), sum(outs.values()) / 4, atol=1e-6, rtol=1e-5)


def test_keys_shapes_and_backward():
    m = V2MMixer2D(32, d_state=16, expand=2, d_conv=4)
    sd = m.state_dict()
    R, di = 2, 64
    expect = {
        'A_log': (di, 16), 'D': (di, ), 'A_2_log': (di, 16), 'D_2': (di, ),
        'in_proj.weight': (2 * di, 32), 'conv1d.weight': (di, 1, 4), 'conv1d.bias': (di, ),
        'x_proj.weight': (R + 16, di), 'dt_proj.weight': (di, R), 'dt_proj.bias': (di, ),
        'conv1d_2.weight': (di, 1, 4), 'conv1d_2.bias': (di, ), 'x_proj_2.weight': (R + 16, di),
        'dt_proj_2.weight': (di, R), 'dt_proj_2.bias': (di, ), 'out_proj.weight': (32, di)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expect
    x = torch.randn(2, 3, 5, 32, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())


def test_options():
    x = torch.randn(1, 3, 3, 16)
    m = V2MMixer2D(16, d_state=4, d_conv=0, d_conv2d=3, use_z=False, gate='last', corners=2)
    assert 'conv1d.weight' not in m.state_dict() and 'conv2d.weight' in m.state_dict()
    assert m(x).shape == x.shape
    # gate='last' differs from the official double gate
    torch.manual_seed(0)
    a = V2MMixer2D(16, d_state=4)
    b = V2MMixer2D(16, d_state=4, gate='last')
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize('bad', [0, 5, -1, ('ul', 'ul'), ('up', ), (), True])
def test_bad_corners(bad):
    with pytest.raises((ValueError, TypeError), match='corners'):
        V2MMixer2D(8, corners=bad)


def test_bad_args():
    with pytest.raises(ValueError, match='gate'):
        V2MMixer2D(8, gate='first')
    with pytest.raises(ValueError, match='d_conv'):
        V2MMixer2D(8, d_conv=-1)
    with pytest.raises(ValueError, match='d_conv2d'):
        V2MMixer2D(8, d_conv2d=2)
    with pytest.raises(ValueError, match='B, H, W, C'):
        V2MMixer2D(8)(torch.randn(2, 9, 8))


def _naive_pass(u, z, conv, x_proj, dt_proj, A_log, D, varying):
    """Explicit per-step recurrence for one sequence u, z: (l, d) (no selective_scan)."""
    l, d = u.shape
    k = conv.weight.shape[-1]
    pad = torch.cat([u.new_zeros(k - 1, d), u])
    u = torch.stack([torch.nn.functional.silu(
        (pad[t:t + k] * conv.weight[:, 0].T).sum(0) + conv.bias) for t in range(l)])
    R, N = dt_proj.in_features, A_log.shape[1]
    A = -torch.exp(A_log)
    h = u.new_zeros(d, N)
    ys = []
    for t in range(l):
        dbl = x_proj.weight @ u[t]
        dt = torch.nn.functional.softplus(dt_proj.weight @ dbl[:R] + dt_proj.bias)  # (d,)
        Bt = dbl[R:] if varying == 'B' else torch.ones(N)
        Ct = dbl[R:] if varying == 'C' else torch.ones(N)
        h = torch.exp(dt[:, None] * A) * h + (dt * u[t])[:, None] * Bt[None]
        y = (h * Ct[None]).sum(-1) + D * u[t]
        ys.append(y * torch.nn.functional.silu(z[t]))
    return torch.stack(ys)


def test_matches_explicit_2d_recurrence():
    """Upper-left corner == row recurrence (C = 1) then column recurrence (B = 1), gated twice."""
    torch.manual_seed(0)
    c, h, w = 6, 3, 4
    m = V2MMixer2D(c, d_state=3, expand=2, corners=('ul', )).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, h, w, c, dtype=torch.float64)
    with torch.no_grad():
        xs, z = m.in_proj(x[0]).chunk(2, dim=-1)  # (h, w, d)
        lat = torch.stack([_naive_pass(xs[i], z[i], m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D,
                                       'B') for i in range(h)])
        out = torch.stack([_naive_pass(lat[:, j], z[:, j], m.conv1d_2, m.x_proj_2, m.dt_proj_2,
                                       m.A_2_log, m.D_2, 'C') for j in range(w)], dim=1)
        ref = m.out_proj(out)
        torch.testing.assert_close(m(x)[0], ref, atol=1e-10, rtol=1e-8)
        # four corners: the mean of the re-oriented single-corner results
        m.corners = ('ul', 'lr', 'ur', 'll')
        parts = []
        for c_, dims in zip(m.corners, [(), (1, 2), (2, ), (1, )]):
            m.corners = ('ul', )
            xf = x.flip(dims) if dims else x
            parts.append(m(xf).flip(dims) if dims else m(xf))
        m.corners = ('ul', 'lr', 'ur', 'll')
        torch.testing.assert_close(m(x), sum(parts) / 4, atol=1e-10, rtol=1e-8)


def _rotated_corners_reference(m, x):
    """The mixer the way the paper draws it: in_proj, the grid re-oriented for every
    corner (batched), SSM2D.scan2d, rotated back, averaged, out_proj."""
    from mmssm.ops import corner_merge_all, corner_rotate_all
    xs, z = m.in_proj(x).permute(0, 3, 1, 2).chunk(2, dim=1)
    if m.conv2d is not None:
        xs = torch.nn.functional.silu(m.conv2d(xs))
    xs = corner_rotate_all(xs, m.corners)
    z = corner_rotate_all(z, m.corners) if m.use_z else None
    y = corner_merge_all(m.scan2d(xs, z), m.corners) / len(m.corners)
    return m.out_proj(y.permute(0, 2, 3, 1))


@pytest.mark.parametrize('kw', [dict(d_conv=0, d_conv2d=3), dict(d_conv=3, gate='last'),
                                dict(d_conv=0, use_z=False, corners=('ur', 'll')),
                                dict(d_conv=4, corners=('lr', ))])
def test_direction_scans_equal_rotated_corners(kw):
    """Corners as forward / reverse scans (no rotated copies, shared projections) equal
    re-orienting the grid per corner, values and gradients, batch > 1, h != w."""
    torch.manual_seed(0)
    m = V2MMixer2D(8, d_state=3, **kw)
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    gx, *gp = torch.autograd.grad(y, [x, *m.parameters()], g)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = _rotated_corners_reference(m, x2)
    gx2, *gp2 = torch.autograd.grad(y2, [x2, *m.parameters()], g, allow_unused=True)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx2, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(m.named_parameters(), gp, gp2):
        if b is None:  # a parameter the reference does not use either way
            assert a is None or not a.abs().any(), name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('kw, b', [
    (dict(), 1), (dict(), 3), (dict(corners=3, d_conv2d=0), 2), (dict(d_state=1), 1),
    (dict(d_state=1), 2), (dict(corners=('ll', 'ur'), gate='last', d_state=3), 1),
    (dict(use_z=False, corners=('lr', ), d_conv2d=0), 2)])
def test_conv_free_path_equals_general_path(monkeypatch, kw, b):
    """Mixers without conv1d take ``_forward_noconv`` (token-major latents, column passes
    on views, W channel groups per image when B > 1, the column gate on the corner sum,
    both directions of a pass in one two-direction scan; d_state = 1 and 16 channels is
    the compiled two-direction kernel's own path): outputs equal to the general path to
    fp32 rounding (bit-equal with the per-pass gate and one scan per direction), with and
    without grad, gradients equal to fp32 rounding."""
    torch.manual_seed(0)
    kw = {'d_state': 2, 'd_conv2d': 3, **kw}
    m = V2MMixer2D(16, expand=1, d_conv=0, **kw)
    with torch.no_grad():
        for p in m.parameters():  # away from the init symmetries (D = 1, A = -[1..N])
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(b, 3, 5, 16, requires_grad=True)
    g = torch.randn(b, 3, 5, 16)
    res = {}
    for fast, gate_sum, bidir in ((False, True, False), (True, False, False),
                                  (True, True, False), (True, False, True), (True, True, True)):
        monkeypatch.setattr(V2MMixer2D, 'fast_path', fast)
        monkeypatch.setattr(V2MMixer2D, 'gate_corner_sum', gate_sum)
        monkeypatch.setattr(V2MMixer2D, 'two_direction_scan', bidir)
        m.zero_grad()
        x.grad = None
        y = m(x)
        (y * g).sum().backward()
        with torch.no_grad():
            y_inf = m(x)
        res[fast, gate_sum, bidir] = (y.detach(), y_inf, x.grad.clone(),
                                      {n: p.grad.clone() for n, p in m.named_parameters()})
    y0, yi0, dx0, dp0 = res.pop((False, True, False))
    y1, yi1 = res[True, False, False][:2]
    assert torch.equal(y0, y1) and torch.equal(yi0, yi1)  # per-pass gate: same operations
    for y2, yi2, dx2, dp2 in res.values():
        torch.testing.assert_close(y2, y0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(yi2, yi0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx2, dx0, rtol=1e-5, atol=1e-6)
        assert dp0.keys() == dp2.keys()
        for n in dp0:
            torch.testing.assert_close(dp2[n], dp0[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize('kw, b', [(dict(d_state=1), 1), (dict(d_state=1, corners=2), 2),
                                   (dict(d_state=2, corners=3), 1)])
def test_folded_corner_mean_and_cached_params_are_exact(monkeypatch, kw, b):
    """The conv-free path's mean over 2 / 4 corners as a scale of the column passes' B
    and D (a power of two: exact) and the scan parameters kept between inference calls:
    outputs bit-equal to dividing the corner sum and recomputing the parameters, gradients
    equal to fp32 rounding; an in-place parameter change (as ``load_state_dict``) reaches
    the cached parameters; the cache is not in the state dict."""
    torch.manual_seed(0)
    m = V2MMixer2D(16, expand=1, d_conv=0, d_conv2d=3, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    keys = set(m.state_dict())
    x = torch.randn(b, 3, 5, 16, requires_grad=True)
    g = torch.randn(b, 3, 5, 16)

    def run(on):
        monkeypatch.setattr(V2MMixer2D, 'fold_corner_mean', on)
        monkeypatch.setattr(V2MMixer2D, 'cache_scan_params', on)
        m.zero_grad()
        x.grad = None
        y = m(x)
        (y * g).sum().backward()
        with torch.no_grad():
            y_inf, y_inf2 = m(x), m(x)  # the second call reads the cache
        return y.detach(), y_inf, y_inf2, x.grad.clone(), [p.grad.clone() for p in m.parameters()]

    old, new = run(False), run(True)
    for a, n in zip(old[:3], new[:3]):
        assert torch.equal(a, n)
    torch.testing.assert_close(new[3], old[3], rtol=1e-5, atol=1e-6)
    for a, n in zip(old[4], new[4]):
        torch.testing.assert_close(n, a, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        m.A_2_log.add_(0.5)
        m.D.mul_(2)
        y_cached = m(x)
        monkeypatch.setattr(V2MMixer2D, 'cache_scan_params', False)
        assert torch.equal(y_cached, m(x))
        assert not torch.equal(y_cached, new[1])
    assert set(m.state_dict()) == keys


@pytest.mark.skipif(not selective_scan_cpp.available(), reason='compiled scan not built')
@pytest.mark.parametrize('b', [1, 2])
def test_fused_column_sum_equals_separate_ops(monkeypatch, b):
    """Eager inference adds the second latent's column passes into the first's sum and
    gates it in the kernel (``fuse_column_sum``): equal to the add / silu / multiply to
    fp32 rounding; the kernel's fast path is taken (d_state 1, 16 channels)."""
    torch.manual_seed(0)
    m = V2MMixer2D(16, d_state=1, expand=1, d_conv=0, d_conv2d=3).eval()
    x = torch.randn(b, 3, 5, 16)
    done = []
    fused = mmssm.ops.bidir_selective_scan_sum_into
    monkeypatch.setattr(mmssm.ops, 'bidir_selective_scan_sum_into',
                        lambda *a, **k: done.append(fused(*a, **k)) or done[-1])
    with torch.no_grad():
        monkeypatch.setattr(V2MMixer2D, 'fuse_column_sum', False)
        y0 = m(x)
        assert not done
        monkeypatch.setattr(V2MMixer2D, 'fuse_column_sum', True)
        y1 = m(x)
    assert done == [True]
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('b', [1, 2])
def test_joint_column_passes_keep_every_token_in_place(patch_scans, monkeypatch, b):
    """Autograd code with 4 corners (``joint_columns``): both latents' column passes are
    one call over (2B, W*d, H) views (W column groups per batch row, the column
    parameters tiled W times): with cumsum scans every token gets the same quadrant
    mixture as with one call per latent."""
    h, w = 3, 5
    d = h * w
    log = []
    patch_scans(_fake_scan('cumsum', log))
    m = _identity_mixer(d, 4)
    x = _onehot_grid(h, w).repeat(b, 1, 1, 1) * torch.arange(1., b + 1).view(b, 1, 1, 1)
    y0 = m(x)
    n0 = len(log)
    monkeypatch.setattr(V2MMixer2D, 'joint_columns', True)
    y1 = m(x)
    # two row directions, then both column directions of both latents in one call
    assert log[n0 + 2:] == [((2 * b, w * d, h), (w * d, 2), (2 * b, w, 2, h), r)
                            for r in (False, True)]
    assert torch.equal(y1, y0)


@pytest.mark.skipif(not selective_scan_cpp.available(), reason='compiled scan not built')
@pytest.mark.parametrize('kw, b', [(dict(), 1), (dict(), 2), (dict(use_z=False), 1),
                                   (dict(d_state=2, d_conv2d=0), 2)])
def test_joint_column_passes_equal_per_latent_calls(monkeypatch, kw, b):
    """The real kernel (d_state 1, 16 channels: its fast path): the joint column call gives
    the per-latent calls' outputs and input gradients bit for bit (each direction is the
    plain scan, the latent sum one add); parameter gradients equal to fp32 rounding (the
    tiled parameters' gradients are summed over the W groups in another order)."""
    torch.manual_seed(0)
    m = V2MMixer2D(16, **{'d_state': 1, 'expand': 1, 'd_conv': 0, 'd_conv2d': 3, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(b, 3, 5, 16, requires_grad=True)
    g = torch.randn(b, 3, 5, 16)
    res = []
    for on in (False, True):
        monkeypatch.setattr(V2MMixer2D, 'joint_columns', on)
        m.zero_grad()
        x.grad = None
        y = m(x)
        (y * g).sum().backward()
        res.append((y.detach(), x.grad.clone(), {n: p.grad for n, p in m.named_parameters()}))
    (y0, dx0, dp0), (y1, dx1, dp1) = res
    assert torch.equal(y1, y0) and torch.equal(dx1, dx0)
    assert dp0.keys() == dp1.keys()
    for n in dp0:
        if dp0[n] is None:
            assert dp1[n] is None, n
            continue
        torch.testing.assert_close(dp1[n], dp0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_one_gemm_in_proj_equals_two(monkeypatch):
    """Autograd code on maps with fewer tokens than channels runs in_proj as one GEMM
    (``one_gemm_in_proj``): outputs and gradients equal to the two half GEMMs' to fp32
    rounding; inference keeps the two GEMMs."""
    torch.manual_seed(0)
    m = V2MMixer2D(32, d_state=1, expand=1, d_conv=0, d_conv2d=3)
    x = torch.randn(1, 3, 4, 32, requires_grad=True)  # 12 tokens < 32 channels
    g = torch.randn(1, 3, 4, 32)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, 'linear',
                        lambda a, w, b=None: calls.append(tuple(w.shape)) or linear(a, w, b))
    res = []
    for on in (False, True):
        monkeypatch.setattr(V2MMixer2D, 'one_gemm_in_proj', on)
        m.zero_grad()
        x.grad = None
        calls.clear()
        y = m(x)
        (y * g).sum().backward()
        res.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in m.parameters()]))
        assert ((64, 32) in calls) == on and ((32, 32) in calls[:2]) != on
    for a, b in zip(res[0][:2], res[1][:2]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for a, b in zip(res[0][2], res[1][2]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        calls.clear()
        m(x)
    assert (64, 32) not in calls
