"""Property tests of ConvNeXt-S4ND (2-D images and 3-D video).

Size rule (documented in ``ConvNeXtS4ND``): every pooling floors, as ConvNeXt, so
stage i of an input of size n (per axis) has ``n // stride_i`` entries, with
``stride_i`` the stem stride times the stage strides up to i (``out_strides``);
inputs smaller than the total stride are refused. ``gap_before_final_norm`` pools
every output to size 1.
"""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prop_common import budget, build, check_backbone, split_prefix_position

from mmssm.models.backbones.convnext_s4nd import STAGE_LAYER_CFG, STEM_LAYER_CFG


@st.composite
def layer_cfg(draw) -> dict:
    cfg = dict(d_state=draw(st.sampled_from([2, 4])), bidirectional=draw(st.booleans()))
    if draw(st.booleans()):
        cfg['mode'] = 'diag'
        cfg['init'] = draw(st.sampled_from(['diag-legs', 'diag-lin', 'diag-inv', 'diag-real']))
    elif draw(st.booleans()):
        cfg['init'] = 'legs'
    return cfg


@st.composite
def convnext_options(draw, nd: int) -> dict:
    arch = dict(depths=draw(st.lists(st.integers(0, 1), min_size=4, max_size=4)),
                dims=draw(st.lists(st.sampled_from([4, 8]), min_size=4, max_size=4)))
    idx = draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True))
    opts = dict(arch=arch, out_indices=[i - 4 if draw(st.booleans()) else i for i in idx],
                stem_type=draw(st.sampled_from(['new_s4nd_patch', 'patch'])),
                stem_channels=draw(st.sampled_from([2, 4])),
                downsample_type=draw(st.sampled_from(['s4nd', 'conv'])),
                downsample_act=draw(st.booleans()), downsample_glu=draw(st.booleans()),
                layer_cfg=draw(layer_cfg()),
                frozen_stages=draw(st.integers(-1, 4)),
                gap_before_final_norm=draw(st.booleans()),
                rate=draw(st.sampled_from([0.5, 1.0, 2.0])),
                drop_path_rate=draw(st.sampled_from([0.0, 0.2])),
                in_channels=draw(st.sampled_from([1, 3])))
    # overrides on keys the stem / stage defaults do not set (the clashing ones: see
    # test_layer_overrides_of_default_keys)
    if draw(st.booleans()):
        opts['stem_layer_cfg'] = dict(d_state=draw(st.sampled_from([2, 4])))
    if draw(st.booleans()):
        opts['stage_layer_cfg'] = dict(bidirectional=draw(st.booleans()))
    if nd == 2:
        opts['patch_size'] = draw(st.sampled_from([2, 4]))
        opts['stem_l_max'] = draw(st.sampled_from([4, 8]))
    else:
        opts['patch_size'] = (draw(st.sampled_from([1, 2])), 2, 2)
        opts['stem_l_max'] = (2, 4, 4)
        opts['temporal_strides'] = draw(st.lists(st.sampled_from([1, 2]), min_size=3,
                                                 max_size=3))
    # training size: at least the total stride on each axis (smaller is refused), and
    # not necessarily square or a multiple of it
    img = [t + draw(st.sampled_from([0, t // 2, t])) for t in stage_strides(opts, nd)[-1]]
    opts['img_size'] = img[0] if nd == 2 and img[0] == img[1] and draw(st.booleans()) \
        else tuple(img)
    return opts


def stage_strides(opts: dict, nd: int):
    p = opts['patch_size']
    cur = [p] * 2 if nd == 2 else list(p)
    out = [list(cur)]
    for i in range(1, 4):
        t = [] if nd == 2 else [opts['temporal_strides'][i - 1]]
        cur = [c * s for c, s in zip(cur, t + [2, 2])]
        out.append(list(cur))
    return out


def expectations(opts: dict, size, nd: int):
    st_ = stage_strides(opts, nd)
    dims = opts['arch']['dims']
    idx = sorted(i % 4 for i in opts['out_indices'])  # outputs come in depth order
    if opts['gap_before_final_norm']:
        expected = [(dims[i], ) + (1, ) * nd for i in idx]
        strides = [None] * len(idx)
    else:
        expected = [(dims[i], ) + tuple(n // s for n, s in zip(size, st_[i])) for i in idx]
        strides = [st_[i][0] if len(set(st_[i])) == 1 else tuple(st_[i]) for i in idx]
    f = opts['frozen_stages']
    frozen = (['stem.'] if f >= 0 else []) + [f'stages.{i}.' for i in range(f)] + \
        [f'norm{i}.' for i in range(f)]
    order = {'stem.': -1}
    for i in range(4):
        order.update({f'stages.{i}.norm_layer.': i - 0.25,
                      f'stages.{i}.downsample.': i - 0.25, f'norm{i}.': i + 0.5})
        order.update({f'stages.{i}.blocks.{j}.': i + j / 100 for j in range(2)})
    return expected, strides, frozen, split_prefix_position(order)


def _run(data, nd: int):
    opts = data.draw(convnext_options(nd), 'options')
    total = stage_strides(opts, nd)[-1]
    b = data.draw(st.sampled_from([1, 3]), 'batch')
    # any size from the total stride (the smallest accepted) up to ~1.7x it
    size = tuple(data.draw(st.integers(s, s + s * 2 // 3), f'size axis {a}')
                 for a, s in enumerate(total))
    cfg = dict(type='ConvNeXtS4ND' if nd == 2 else 'ConvNeXtS4ND3D', **opts)
    torch.manual_seed(1)
    x = torch.randn(b, opts['in_channels'], *size)
    check_backbone(cfg, x, *expectations(opts, size, nd), atol=1e-4)


@settings(max_examples=budget(5))
@given(data=st.data())
def test_convnext_s4nd_2d_option_space(data):
    _run(data, 2)


@settings(max_examples=budget(3))
@given(data=st.data())
def test_convnext_s4nd_3d_option_space(data):
    _run(data, 3)


@settings(max_examples=budget(2))
@given(stem=st.dictionaries(st.sampled_from(sorted(STEM_LAYER_CFG)),
                            st.sampled_from([0.1, 'fourier']), min_size=1),
       stage=st.dictionaries(st.sampled_from(sorted(STAGE_LAYER_CFG)), st.just(0.2)),
       video=st.booleans())
def test_layer_overrides_of_default_keys(stem, stage, video):
    """The official values (e.g. stem dt_min=0.1, init='fourier') must be accepted and used."""
    stem = {k: (v if (k == 'init') == (v == 'fourier') else STEM_LAYER_CFG[k])
            for k, v in stem.items()}
    kw = dict(arch=dict(depths=[1, 1, 1, 1], dims=[4, 4, 4, 4]), stem_channels=2,
              layer_cfg=dict(d_state=2), stem_layer_cfg=stem, stage_layer_cfg=stage)
    if video:
        cfg = dict(type='ConvNeXtS4ND3D', img_size=(2, 16, 16), patch_size=(1, 2, 2),
                   stem_l_max=(2, 4, 4), **kw)
    else:
        cfg = dict(type='ConvNeXtS4ND', img_size=16, patch_size=2, stem_l_max=4, **kw)
    m = build(cfg)
    x = torch.randn(1, 3, *((2, 16, 16) if video else (16, 16)))
    assert all(torch.isfinite(o).all() for o in m(x))
