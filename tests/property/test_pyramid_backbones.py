"""Property tests of the hierarchical backbones: VMamba (v0 and v2 fields) and V2MPyramid.

Size rule (documented in ``VMamba``): stage i of an H x W input has
``ceil(H / 2**(i+2))`` rows and ``ceil(W / 2**(i+2))`` columns, whatever the stem
('v1' pads to a multiple of 4, 'v2' is two k3 s2 p1 convs) and the downsample
('v1' patch merging and 'v2' k2 s2 conv pad odd sizes, 'v3' is k3 s2 p1).
"""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prop_common import budget, check_backbone, split_prefix_position

from mmssm.models.layers.ss2d import FORWARD_TYPES

inputs = st.tuples(st.sampled_from([1, 3]), st.integers(1, 40), st.integers(1, 40))


@st.composite
def stages(draw) -> dict:
    n = draw(st.integers(1, 4))
    depths = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    if draw(st.booleans()):
        dims = draw(st.sampled_from([4, 8]))
    else:
        dims = draw(st.lists(st.sampled_from([4, 8, 12]), min_size=n, max_size=n))
    return dict(depths=depths, dims=dims)


@st.composite
def common_options(draw, num_stages: int) -> dict:
    idx = draw(st.lists(st.integers(0, num_stages - 1), min_size=1, max_size=num_stages,
                        unique=True))
    idx = [i - num_stages if draw(st.booleans()) else i for i in idx]
    return dict(out_indices=idx, frozen_stages=draw(st.integers(-1, num_stages)),
                in_channels=draw(st.sampled_from([1, 3])),
                drop_path_rate=draw(st.sampled_from([None, 0.0, 0.2])))


def pyramid_expectations(cfg: dict, h: int, w: int):
    depths = cfg['arch']['depths']
    n = len(depths)
    dims = cfg['arch']['dims']
    dims = [dims * 2 ** i for i in range(n)] if isinstance(dims, int) else dims
    idx = sorted(i % n for i in cfg['out_indices'])  # outputs come in depth order
    strides = [2 ** (i + 2) for i in idx]
    expected = [(dims[i], math.ceil(h / s), math.ceil(w / s)) for i, s in zip(idx, strides)]
    f = cfg['frozen_stages']
    frozen = (['patch_embed.'] if f >= 0 else []) + [f'layers.{i}.' for i in range(f)] + \
        [f'outnorm{i}.' for i in range(f)]
    order = {'patch_embed.': -1}
    for i in range(n):  # the downsample at the end of stage i feeds stage i + 1
        order.update({f'layers.{i}.blocks.': i, f'outnorm{i}.': i,
                      f'layers.{i}.downsample.': i + 0.5})
    return expected, strides, frozen, split_prefix_position(order)


@st.composite
def vmamba_arch(draw) -> dict:
    arch = draw(stages())
    ftype = draw(st.sampled_from(FORWARD_TYPES))
    arch.update(forward_type=ftype,
                norm_layer='ln' if ftype == 'v0' else draw(st.sampled_from(['ln', 'ln2d'])),
                downsample=draw(st.sampled_from(['v1', 'v2', 'v3'])),
                patch_embed=draw(st.sampled_from(['v1', 'v2'])),
                d_state=draw(st.integers(1, 4)),
                ssm_ratio=draw(st.sampled_from([0.5, 1.0, 2.0])),
                mlp_ratio=draw(st.sampled_from([0.0, 1.0, 2.5, 4.0])))
    for key, values in (('conv_bias', [False, True]), ('d_conv', [0, 1, 3, 5]),
                        ('dt_rank', ['auto', 1, 2])):
        if draw(st.booleans()):
            arch[key] = draw(st.sampled_from(values))
    return arch


@settings(max_examples=budget(8))
@given(data=st.data())
def test_vmamba_option_space(data):
    arch = data.draw(vmamba_arch(), 'arch')
    cfg = dict(type='VMamba', arch=arch,
               **data.draw(common_options(len(arch['depths'])), 'options'))
    b, h, w = data.draw(inputs, 'input')
    torch.manual_seed(1)
    x = torch.randn(b, cfg['in_channels'], h, w)
    check_backbone(cfg, x, *pyramid_expectations(cfg, h, w))


@st.composite
def v2m_pyramid_arch(draw) -> dict:
    arch = draw(stages())
    arch.update(d_state=draw(st.integers(1, 3)), expand=draw(st.sampled_from([1, 2])),
                corners=draw(st.one_of(st.integers(1, 4), st.lists(
                    st.sampled_from(['ul', 'lr', 'ur', 'll']), min_size=1, max_size=4,
                    unique=True).map(tuple))),
                downsample=draw(st.sampled_from(['v1', 'v2', 'v3'])),
                patch_embed=draw(st.sampled_from(['v1', 'v2'])))
    for key, values in (('d_conv', [0, 2, 4]), ('d_conv2d', [0, 3]), ('use_z', [False, True]),
                        ('mlp_ratio', [0.0, 2.0, 3.5]), ('dt_rank', ['auto', 2])):
        if draw(st.booleans()):
            arch[key] = draw(st.sampled_from(values))
    return arch


@settings(max_examples=budget(6))
@given(data=st.data())
def test_v2m_pyramid_option_space(data):
    arch = data.draw(v2m_pyramid_arch(), 'arch')
    cfg = dict(type='V2MPyramid', arch=arch,
               **data.draw(common_options(len(arch['depths'])), 'options'))
    b, h, w = data.draw(inputs, 'input')
    torch.manual_seed(1)
    x = torch.randn(b, cfg['in_channels'], h, w)
    check_backbone(cfg, x, *pyramid_expectations(cfg, h, w))
