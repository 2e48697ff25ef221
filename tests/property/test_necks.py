"""Property tests of the necks: SimplePyramid on maps of any size, SelectFeature.

Size rule (documented in ``SimplePyramid``): an h x w map gives ``s*h x s*w`` levels
for s in {4, 2, 1} and ``ceil(h/2) x ceil(w/2)`` for s = 0.5.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prop_common import budget, build


@st.composite
def pyramid_case(draw):
    n_maps = draw(st.integers(1, 3))
    scales = draw(st.lists(st.sampled_from([4, 2, 1, 0.5]), min_size=1, max_size=4))
    if draw(st.booleans()):
        in_index = draw(st.integers(-n_maps, n_maps - 1))
    else:
        in_index = [draw(st.integers(-n_maps, n_maps - 1)) for _ in scales]
    norm = draw(st.sampled_from([dict(type='BN'), dict(type='GN', num_groups=1)]))
    return dict(n_maps=n_maps, scale_factors=scales, in_index=in_index,
                out_channels=draw(st.sampled_from([None, 4])), norm_cfg=norm)


@settings(max_examples=budget(10))
@given(case=pyramid_case(), b=st.sampled_from([1, 3]), h=st.integers(1, 9),
       w=st.integers(1, 9))
def test_simple_pyramid_on_backbone_maps(case, b, h, w):
    """A plain backbone's declared out_channels sizes the neck; every level has the
    documented size, is finite, gets gradients, and batch items stay independent."""
    n = case.pop('n_maps')
    vim = build(dict(type='Vim', arch=dict(embed_dims=8, num_layers=n, d_state=1),
                     img_size=8, patch_size=4, stride=4, out_type='featmap',
                     out_indices=list(range(n))))
    neck = build(dict(type='SimplePyramid', in_channels=vim.out_channels[0], **case))
    x = torch.randn(b, 3, 4 * h, 4 * w)
    feats = vim(x)
    assert [f.shape[-2:] for f in feats] == [(h, w)] * n
    neck.train(b > 1 or case['norm_cfg']['type'] != 'BN')  # BN cannot train on one value
    outs = neck(feats)
    c = case['out_channels'] or vim.out_channels[0]
    size = {4: (4 * h, 4 * w), 2: (2 * h, 2 * w), 1: (h, w),
            0.5: (math.ceil(h / 2), math.ceil(w / 2))}
    assert [tuple(o.shape) for o in outs] == [(b, c) + size[s] for s in case['scale_factors']]
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in vim.parameters() if p.grad is not None)
    vim.eval()
    neck.eval()
    with torch.no_grad():
        full = neck(vim(x))
        for i in range(b):
            for a, o in zip(full, neck(vim(x[i:i + 1]))):
                torch.testing.assert_close(o[0], a[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kw,feats,msg', [
    (dict(in_channels=8, in_index=3), [torch.randn(1, 8, 2, 2)], r'in_index=3 is out of range'),
    (dict(in_channels=8, in_index=(0, 2), scale_factors=(1, 2)), [torch.randn(1, 8, 2, 2)] * 2,
     r'in_index=\(0, 2\) is out of range'),
    (dict(in_channels=8), [torch.randn(1, 6, 2, 2)], 'in_channels=8'),
    (dict(in_channels=8), [torch.randn(1, 8)], "out_type='featmap'"),
])
def test_simple_pyramid_bad_inputs_name_the_cause(kw, feats, msg):
    """Used to be an IndexError (in_index past the backbone outputs), a conv channel
    error deep inside, or silently wrong (identity level with other channels)."""
    neck = build(dict(type='SimplePyramid', **kw))
    with pytest.raises(ValueError, match=msg):
        neck(feats)


def test_simple_pyramid_half_level_of_a_one_pixel_map():
    """A 1 x 1 map (e.g. a 16 px image at stride 16) made the 0.5 level's max-pool fail
    ('Output size is too small'); it now gives a 1 x 1 level (ceil rule)."""
    neck = build(dict(type='SimplePyramid', in_channels=4, scale_factors=(1, 0.5)))
    assert [tuple(o.shape) for o in neck([torch.randn(2, 4, 1, 3)])] == [(2, 4, 1, 3),
                                                                        (2, 4, 1, 2)]


@settings(max_examples=budget(5))
@given(n=st.integers(1, 4), data=st.data())
def test_select_feature_picks_the_output(n, data):
    index = data.draw(st.integers(-n, n - 1))
    feats = tuple(torch.full((1, 2, 1, 1, 1), float(i)) for i in range(n))
    neck = build(dict(type='SelectFeature', index=index))
    out, aux = neck(feats)
    assert out is feats[index] and aux == {}
