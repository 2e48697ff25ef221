"""Invalid draws: a valid drawn configuration with one bad value (out of range, wrong
type, or incompatible with the rest) must stop at build time with a ValueError or
TypeError whose message names the argument -- never an exception from deep inside
(a shape error in a conv, a KeyError, ...), never silently.
"""
from typing import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prop_common import budget, build
from test_convnext_s4nd_options import convnext_options
from test_plain_backbones import plain_arch, plain_common, v2m_options
from test_pyramid_backbones import common_options, v2m_pyramid_arch, vmamba_arch


def bad(where: str, key: str, value, names: Sequence[str] = ()) -> tuple:
    """One mutation: set ``cfg[key]`` (where='top') or ``cfg['arch'][key]`` (where='arch')
    or ``cfg['layer_cfg'][key]``; the message must name ``key`` or one of ``names``."""
    return (where, key, value, tuple(names) or (key, ))


PLAIN_BAD = [
    bad('arch', 'embed_dims', 0), bad('arch', 'embed_dims', 8.5), bad('arch', 'embed_dims', '8'),
    bad('arch', 'num_layers', 0), bad('arch', 'num_layers', 2.0), bad('arch', 'num_layers', None),
    bad('arch', 'd_state', 0), bad('arch', 'expand', 0), bad('arch', 'expand', 1.5),
    bad('arch', 'd_conv', -1), bad('arch', 'dt_rank', 0), bad('arch', 'dt_rank', 'big'),
    bad('arch', 'dt_rank', 1.5), bad('arch', 'depth', 3, ['unknown arch key']),
    bad('top', 'arch', [8, 2]), bad('top', 'arch', 'huge'),
    bad('top', 'img_size', 0), bad('top', 'img_size', -8), bad('top', 'img_size', (8, )),
    bad('top', 'img_size', (8, 8, 8)), bad('top', 'img_size', 'x'), bad('top', 'img_size', 8.0),
    bad('top', 'patch_size', 0), bad('top', 'patch_size', -4), bad('top', 'patch_size', 2.5),
    bad('top', 'stride', 0), bad('top', 'stride', 1.5),
    bad('top', 'in_channels', 0), bad('top', 'in_channels', 3.0),
    bad('top', 'out_indices', 7), bad('top', 'out_indices', []),
    bad('top', 'out_indices', [0, 0], ['repeats']), bad('top', 'out_indices', '0'),
    bad('top', 'out_indices', [0.5]), bad('top', 'out_indices', None),
    bad('top', 'out_type', 'map'), bad('top', 'out_type', None),
    bad('top', 'frozen_stages', -2), bad('top', 'frozen_stages', 99),
    bad('top', 'frozen_stages', 1.5), bad('top', 'frozen_stages', '1'),
    bad('top', 'interpolate_mode', 'cubic'), bad('top', 'interpolate_mode', None),
    bad('top', 'drop_rate', 1.0), bad('top', 'drop_rate', -0.1), bad('top', 'drop_rate', 'x'),
    bad('top', 'drop_path_rate', 1.0), bad('top', 'drop_path_rate', None),
]
VIM_BAD = PLAIN_BAD + [
    # a class token read-out without a class token
    bad('top', 'with_cls_token', False, ['cls_token']),
]
V2M_BAD = PLAIN_BAD + [
    bad('top', 'cls_position', 'top'), bad('top', 'cls_position', None),
    bad('top', 'corners', 0), bad('top', 'corners', 5), bad('top', 'corners', ['xx']),
    bad('top', 'corners', ('ul', 'ul')), bad('top', 'corners', True),
    bad('top', 'gate', 'first'), bad('top', 'gate', None),
    bad('top', 'with_cls_token', True, ['cls_position']),
    bad('top', 'directions', ('w1', ), ['direction']),
    bad('top', 'directions', 'h', ['direction']),
    bad('top', 'directions', [('h', ), ('v', ), ('h', ), ('v', )], ['directions']),
]


def apply(cfg: dict, mutation: tuple) -> dict:
    where, key, value, _ = mutation
    cfg = dict(cfg)
    if where == 'top':
        cfg[key] = value
    else:
        cfg[where] = dict(cfg[where], **{key: value})
    return cfg


def expect_clear_error(cfg: dict, names: Sequence[str], x: torch.Tensor = None) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        m = build(cfg)
        if x is not None:
            m(x)
    msg = str(info.value)
    assert any(n in msg for n in names), f'{type(info.value).__name__}: {msg!r} names none of {names}'


@settings(max_examples=budget(30))
@given(data=st.data())
def test_vim_invalid_options(data):
    arch = data.draw(plain_arch(), 'arch')
    cfg = dict(type='Vim', arch=arch, **data.draw(plain_common(arch['num_layers'], True)))
    mutation = data.draw(st.sampled_from(VIM_BAD), 'mutation')
    if mutation[1] == 'with_cls_token':
        cfg['out_type'] = 'cls_token'
    expect_clear_error(apply(cfg, mutation), mutation[3])


@settings(max_examples=budget(30))
@given(data=st.data())
def test_v2m_invalid_options(data):
    arch = data.draw(plain_arch(max_layers=2), 'arch')
    mutation = data.draw(st.sampled_from(V2M_BAD), 'mutation')
    opts = data.draw(v2m_options(arch['num_layers']), 'v2m options')
    opts.pop('directions', None)
    opts.pop('corners', None)
    if mutation[1] == 'directions':  # directions exist only with the local window
        opts['local_window'] = True
    if mutation[1] == 'corners':  # corners exist only without it
        opts['local_window'] = False
    cfg = dict(type='V2M', arch=arch, **opts, **data.draw(plain_common(arch['num_layers'], True)))
    expect_clear_error(apply(cfg, mutation), mutation[3])


@pytest.mark.parametrize('kw,names', [
    (dict(local_window=False, directions=('h', )), ['directions']),
    (dict(local_window=True, corners=2), ['corners']),
])
def test_v2m_incompatible_options(kw, names):
    expect_clear_error(dict(type='V2M', arch=dict(embed_dims=8, num_layers=1), **kw), names)


PYRAMID_BAD = [
    bad('arch', 'depths', []), bad('arch', 'depths', [-1, 1]), bad('arch', 'depths', [1.5]),
    bad('arch', 'depths', 2), bad('arch', 'dims', 0), bad('arch', 'dims', 8.5),
    bad('arch', 'dims', [8, 0, 8, 8, 8, 8], ['dims']),
    bad('arch', 'downsample', 'v9'), bad('arch', 'patch_embed', 'v9'),
    bad('arch', 'd_state', 0), bad('arch', 'd_state', 1.5), bad('arch', 'mlp_ratio', -1),
    bad('arch', 'dt_rank', 0), bad('arch', 'dt_rank', 'big'),
    bad('arch', 'drop_path_rate', 1.0),
    bad('arch', 'depth', 3, ['unknown arch key']), bad('top', 'arch', 'huge'),
    bad('top', 'in_channels', 0), bad('top', 'in_channels', 3.0),
    bad('top', 'out_indices', 9), bad('top', 'out_indices', []), bad('top', 'out_indices', '0'),
    bad('top', 'frozen_stages', 9), bad('top', 'frozen_stages', -2),
    bad('top', 'frozen_stages', 1.5), bad('top', 'drop_path_rate', 1.0),
    bad('top', 'drop_path_rate', 'x'),
]
VMAMBA_BAD = PYRAMID_BAD + [
    bad('arch', 'forward_type', 'v9'), bad('arch', 'norm_layer', 'bn'),
    bad('arch', 'ssm_ratio', 0), bad('arch', 'ssm_ratio', -1.0), bad('arch', 'd_conv', -1),
    bad('arch', 'd_conv', 2, ['d_conv']), bad('arch', 'd_conv', 1.5),
]
V2M_PYRAMID_BAD = PYRAMID_BAD + [
    bad('arch', 'norm_layer', 'ln2d'), bad('arch', 'corners', 7), bad('arch', 'corners', 'xx'),
    bad('arch', 'expand', 0), bad('arch', 'd_conv', -1), bad('arch', 'd_conv2d', 2),
    bad('arch', 'd_conv2d', -3), bad('arch', 'ssm_ratio', 2.0, ['unknown arch key']),
]


@settings(max_examples=budget(30))
@given(data=st.data())
def test_vmamba_invalid_options(data):
    arch = data.draw(vmamba_arch(), 'arch')
    mutation = data.draw(st.sampled_from(VMAMBA_BAD), 'mutation')
    if mutation[1] == 'forward_type':
        arch['norm_layer'] = 'ln'
    cfg = dict(type='VMamba', arch=arch, **data.draw(common_options(len(arch['depths']))))
    expect_clear_error(apply(cfg, mutation), mutation[3])


@settings(max_examples=budget(30))
@given(data=st.data())
def test_v2m_pyramid_invalid_options(data):
    arch = data.draw(v2m_pyramid_arch(), 'arch')
    mutation = data.draw(st.sampled_from(V2M_PYRAMID_BAD), 'mutation')
    cfg = dict(type='V2MPyramid', arch=arch, **data.draw(common_options(len(arch['depths']))))
    expect_clear_error(apply(cfg, mutation), mutation[3])


def test_vmamba_v0_forward_type_needs_channel_last():
    expect_clear_error(dict(type='VMamba', arch=dict(depths=[1], dims=8, forward_type='v0',
                                                     norm_layer='ln2d')), ['norm_layer'])


CONVNEXT_BAD = [
    bad('arch', 'depths', [1, 1, 1], ['depths']), bad('arch', 'depths', [1, -1, 1, 1]),
    bad('arch', 'depths', [1, 1.5, 1, 1]), bad('arch', 'dims', [4, 0, 4, 4]),
    bad('arch', 'dims', [4, 4.5, 4, 4]), bad('arch', 'depth', 3, ['unknown arch key']),
    bad('top', 'arch', 'huge'),
    bad('top', 'stem_type', 'conv'), bad('top', 'downsample_type', 'pool'),
    bad('top', 'img_size', 0), bad('top', 'img_size', -16), bad('top', 'img_size', 'x'),
    bad('top', 'patch_size', 0), bad('top', 'patch_size', 1.5),
    bad('top', 'stem_channels', 0), bad('top', 'stem_l_max', 0),
    bad('top', 'in_channels', 0), bad('top', 'in_channels', 3.0),
    bad('top', 'rate', 0.0), bad('top', 'rate', -1.0), bad('top', 'rate', 'x'),
    bad('top', 'out_indices', 4), bad('top', 'out_indices', []),
    bad('top', 'frozen_stages', 5), bad('top', 'frozen_stages', 1.5),
    bad('top', 'drop_path_rate', 1.0), bad('top', 'ls_init_value', 'x'),
    bad('top', 'layer_cfg', 'x'), bad('layer_cfg', 'd_state', 0),
    bad('layer_cfg', 'foo', 1, ['foo']),
]


@settings(max_examples=budget(25))
@given(data=st.data())
def test_convnext_s4nd_invalid_options(data):
    opts = data.draw(convnext_options(2), 'options')
    mutation = data.draw(st.sampled_from(CONVNEXT_BAD), 'mutation')
    expect_clear_error(apply(dict(type='ConvNeXtS4ND', **opts), mutation), mutation[3])


@pytest.mark.parametrize('kw,names', [
    (dict(temporal_strides=(1, 1)), ['temporal_strides']),
    (dict(temporal_strides=(0, 1, 1)), ['temporal_strides']),
    (dict(img_size=(16, 16)), ['img_size']),
    (dict(patch_size=(2, 2)), ['patch_size']),
])
def test_convnext_s4nd_3d_invalid_options(kw, names):
    cfg = dict(type='ConvNeXtS4ND3D', arch=dict(depths=[1, 1, 1, 1], dims=[4, 4, 4, 4]),
               img_size=(2, 16, 16), patch_size=(1, 2, 2), stem_l_max=(2, 4, 4), stem_channels=2,
               layer_cfg=dict(d_state=2))
    expect_clear_error(dict(cfg, **kw), names)
