"""Property tests of the scan core's public ops against float64 references.

Written against the public functions only (``mmssm.ops.selective_scan`` and friends),
so they cover whatever CPU backend is the default (chunked PyTorch, or a compiled
one when built). Draws: random shapes, B/C layouts and group counts, optional
operands and flags, dtypes, and non-contiguous memory layouts.
"""
import itertools

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from prop_common import budget

from mmssm.ops import (conv_reference_nd, corner_merge_all, corner_rotate_all, cross_merge,
                       cross_scan, fftconv_nd, fftconv_separable, local_reverse, local_scan,
                       selective_scan, selective_scan_ref, toeplitz_conv_separable)

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4),
       torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, transposed storage, or a
    strided slice of a larger tensor."""
    if kind == 'transposed' and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == 'strided':
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


@st.composite
def scan_case(draw):
    b, d, n, l = (draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4, 6])),
                  draw(st.integers(1, 4)), draw(st.integers(1, 40)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    def bc():
        kind = draw(st.sampled_from(['const', 'bnl', 'grouped']))
        if kind == 'const':
            return rnd(d, n)
        if kind == 'bnl':
            return rnd(b, n, l)
        groups = draw(st.sampled_from([k for k in (1, 2, 3, 6) if d % k == 0]))
        return rnd(b, groups, n, l)

    softplus = draw(st.booleans())
    delta = rnd(b, d, l, scale=0.5) if softplus else rnd(b, d, l).abs() * 0.3
    case = dict(u=rnd(b, d, l), delta=delta, A=-torch.exp(rnd(d, n, scale=0.5)), B=bc(),
                C=bc(), D=rnd(d) if draw(st.booleans()) else None,
                z=rnd(b, d, l) if draw(st.booleans()) else None,
                delta_bias=rnd(d, scale=0.3) if draw(st.booleans()) else None,
                delta_softplus=softplus, reverse=draw(st.booleans()),
                out_fp32=draw(st.booleans()))
    kinds = {k: draw(st.sampled_from(['contiguous', 'transposed', 'strided']))
             for k in ('u', 'delta', 'B', 'C', 'z')}
    return case, dtype, kinds


TENSORS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def _cast(case: dict, dtype, kinds: dict) -> dict:
    """Inputs in the drawn dtype (A, D, delta_bias stay fp32 unless fp64: the model's
    parameters), each in its drawn layout."""
    out = dict(case)
    for k in TENSORS:
        if case[k] is None:
            continue
        dt = dtype if k in ('u', 'delta', 'B', 'C', 'z') or dtype == torch.float64 \
            else torch.float32
        out[k] = layout(case[k].to(dt), kinds.get(k, 'contiguous'))
    return out


@settings(max_examples=budget(25))
@given(drawn=scan_case())
def test_selective_scan_matches_float64_reference(drawn):
    case, dtype, kinds = drawn
    args = _cast(case, dtype, kinds)
    out, last = selective_scan(**args, return_last_state=True)
    # the reference sees exactly the (rounded) values the op saw, in float64
    ref_args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    ref_args['out_fp32'] = False
    ref, ref_last = selective_scan_ref(**ref_args, return_last_state=True)
    want_dtype = torch.float32 if case['out_fp32'] and dtype != torch.float64 else dtype
    assert out.dtype == want_dtype and out.shape == case['u'].shape
    assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol, atol = TOL[want_dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * (1 + ref.abs().max()))
    rtol, atol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(last.double(), ref_last, rtol=rtol,
                               atol=atol * (1 + ref_last.abs().max()))


@settings(max_examples=budget(12))
@given(drawn=scan_case())
def test_selective_scan_gradients_match_float64_reference(drawn):
    case, _, kinds = drawn
    args = _cast(case, torch.float64, kinds)
    leaves = {k: args[k].detach().clone().requires_grad_(True) for k in TENSORS
              if args[k] is not None}
    ref_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    g = torch.Generator().manual_seed(0)
    w = torch.randn(case['u'].shape, generator=g, dtype=torch.float64)
    wl = torch.randn(case['u'].shape[0], case['u'].shape[1], case['A'].shape[1], generator=g,
                     dtype=torch.float64)
    out, last = selective_scan(**{**args, **leaves}, return_last_state=True)
    ref, ref_last = selective_scan_ref(**{**args, **ref_leaves}, return_last_state=True)
    ((out * w).sum() + (last * wl).sum()).backward()
    ((ref * w).sum() + (ref_last * wl).sum()).backward()
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, rtol=1e-8, atol=1e-8,
                                   msg=lambda m: f'grad of {k}: {m}')


@settings(max_examples=budget(10))
@given(drawn=scan_case())
def test_selective_scan_reverse_is_the_flipped_scan(drawn):
    case, _, kinds = drawn
    args = _cast(case, torch.float64, kinds)
    flipped = {k: (v.flip(-1) if k in ('u', 'delta', 'z') or (k in 'BC' and v.dim() > 2)
                   else v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    fwd = selective_scan(**{**flipped, 'reverse': not args['reverse']})
    torch.testing.assert_close(fwd.flip(-1), selective_scan(**args), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------- scan orders
grids = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
dtypes = st.sampled_from([torch.float64, torch.float32, torch.bfloat16])
layouts = st.sampled_from(['contiguous', 'channels_last', 'transposed'])


def grid_tensor(shape, dtype, kind, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(dtype)
    if kind == 'channels_last':
        return x.contiguous(memory_format=torch.channels_last)
    return layout(x, kind)


def _inner(a, b):
    return (a.double() * b.double()).sum()


@settings(max_examples=budget(15))
@given(shape=grids, dtype=dtypes, kind=layouts)
def test_cross_scan_and_merge(shape, dtype, kind):
    x = grid_tensor(shape, dtype, kind)
    b, c, h, w = shape
    y = cross_scan(x)
    row, col = x.flatten(2), x.transpose(2, 3).flatten(2)
    assert torch.equal(y, torch.stack([row, col, row.flip(-1), col.flip(-1)], 1))
    # cross_merge is the adjoint of cross_scan (and autograd uses that pair)
    r = grid_tensor((b, 4, c, h * w), torch.float64, 'contiguous', seed=1)
    x64 = x.double().requires_grad_(True)
    torch.testing.assert_close(_inner(cross_scan(x64), r),
                               _inner(x64, cross_merge(r, h, w).view(b, c, h, w)))
    (cross_scan(x64) * r).sum().backward()
    torch.testing.assert_close(x64.grad, cross_merge(r, h, w).view(b, c, h, w))


@settings(max_examples=budget(15))
@given(shape=grids, dtype=dtypes, kind=layouts,
       corners=st.lists(st.sampled_from(['ul', 'lr', 'ur', 'll']), min_size=1, max_size=4,
                        unique=True))
def test_corner_rotations(shape, dtype, kind, corners):
    x = grid_tensor(shape, dtype, kind)
    flips = {'ul': [], 'lr': [-2, -1], 'ur': [-1], 'll': [-2]}
    y = corner_rotate_all(x, corners)
    want = torch.cat([x.flip(flips[c]) if flips[c] else x for c in corners])
    assert torch.equal(y, want)
    assert torch.equal(corner_merge_all(y.double(), corners), len(corners) * x.double())
    r = torch.randn(y.shape, dtype=torch.float64)
    torch.testing.assert_close(_inner(corner_rotate_all(x.double(), corners), r),
                               _inner(x, corner_merge_all(r, corners)))


def local_scan_reference(x, k, flip, column_first):
    b, c, h, w = x.shape
    hg, wg = -(-h // k), -(-w // k)
    xp = F.pad(x, (0, wg * k - w, 0, hg * k - h))
    seq = []
    if column_first:
        for wj, wi, j, i in itertools.product(range(wg), range(hg), range(k), range(k)):
            seq.append(xp[..., wi * k + i, wj * k + j])
    else:
        for wi, wj, i, j in itertools.product(range(hg), range(wg), range(k), range(k)):
            seq.append(xp[..., wi * k + i, wj * k + j])
    y = torch.stack(seq, -1)
    return y.flip(-1) if flip else y


@settings(max_examples=budget(15))
@given(shape=grids, dtype=dtypes, kind=layouts, k=st.integers(1, 5), flip=st.booleans(),
       column_first=st.booleans())
def test_local_scan_and_reverse(shape, dtype, kind, k, flip, column_first):
    x = grid_tensor(shape, dtype, kind)
    h, w = shape[2:]
    y = local_scan(x, k, flip, column_first)
    assert torch.equal(y, local_scan_reference(x, k, flip, column_first))
    assert torch.equal(local_reverse(y, k, h, w, flip, column_first), x)
    # adjoint pair (zero-padded positions are cropped by the reverse)
    r = torch.randn(y.shape, dtype=torch.float64)
    x64 = x.double().requires_grad_(True)
    torch.testing.assert_close(_inner(local_scan(x64, k, flip, column_first), r),
                               _inner(x64, local_reverse(r, k, h, w, flip, column_first)))
    (local_scan(x64, k, flip, column_first) * r).sum().backward()
    torch.testing.assert_close(x64.grad, local_reverse(r, k, h, w, flip, column_first))


# ------------------------------------------------------------------------- fftconv
@st.composite
def conv_case(draw):
    nd = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 9 if nd < 3 else 5)) for _ in range(nd)]
    H = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([None, 1, 2]))
    lead = () if heads is None else (heads, )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    klen = [draw(st.integers(1, 2 * n + 1)) for n in sizes]  # shorter and longer than L
    ks = [torch.randn(*lead, H, k, generator=g, dtype=torch.float64) for k in klen]
    kb = ([torch.randn(*lead, H, draw(st.integers(1, 2 * n + 1)), generator=g,
                       dtype=torch.float64) for n in sizes] if draw(st.booleans()) else None)
    D = torch.randn(*lead, H, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    u = torch.randn(draw(st.integers(1, 2)), H, *sizes, generator=g, dtype=torch.float64)
    return u, ks, kb, D


@settings(max_examples=budget(20))
@given(case=conv_case(), impl=st.sampled_from([fftconv_nd, fftconv_separable,
                                               toeplitz_conv_separable]),
       dtype=st.sampled_from([torch.float64, torch.float32]), kind=layouts)
def test_fftconv_matches_direct_convolution(case, impl, dtype, kind):
    u, ks, kb, D = case
    ref = conv_reference_nd(u, ks, kb, D)
    x = u.to(dtype)
    if kind == 'transposed' or (kind == 'channels_last' and u.dim() == 4):
        x = layout(x, 'transposed') if kind == 'transposed' else \
            x.contiguous(memory_format=torch.channels_last)
    y = impl(x, [k.to(dtype) for k in ks], None if kb is None else [k.to(dtype) for k in kb],
             None if D is None else D.to(dtype))
    assert y.dtype == dtype and y.shape == ref.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol * (1 + ref.abs().max()))
