"""Property tests of the plain (single-stride) backbones: Vim and V2M (+ local window).

Size rule (documented in ``PatchEmbed``/``Vim``): the token grid of an H x W input is
``ceil(max(0, H - patch) / stride) + 1`` rows (inputs that do not fit are zero-padded
right/bottom, so no pixel is dropped), same for W.
"""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prop_common import budget, check_backbone, split_prefix_position

OUT_TYPES = ('cls_token', 'featmap', 'avg_featmap', 'raw')
MODES = ('nearest', 'bilinear', 'bicubic', 'area', 'nearest-exact')


def grid(n: int, patch: int, stride: int) -> int:
    return math.ceil(max(0, n - patch) / stride) + 1


@st.composite
def plain_arch(draw, max_layers: int = 3) -> dict:
    # d_state always small: the default 16 only costs time (the unit tests cover it)
    arch = dict(embed_dims=draw(st.sampled_from([8, 12, 16])),
                num_layers=draw(st.integers(1, max_layers)),
                d_state=draw(st.sampled_from([1, 2, 4])))
    for key, values in (('expand', [1, 2]), ('d_conv', [0, 2, 3, 4]),
                        ('dt_rank', ['auto', 1, 3])):
        if draw(st.booleans()):
            arch[key] = draw(st.sampled_from(values))
    return arch


@st.composite
def plain_common(draw, num_layers: int, has_cls_types: bool) -> dict:
    """Options shared by Vim and V2M (patch/stride incl. overlapping 'stride 8' patches)."""
    # overlapping patches (stride = patch / 2, as Vim's 'stride 8') only for the larger
    # patches: the token count (= the run time) stays below ~100 for inputs up to 33 px
    patch = draw(st.sampled_from([4, 8, 16]))
    stride = draw(st.sampled_from([patch] if patch == 4 else [patch, patch // 2]))
    img = draw(st.one_of(st.sampled_from([8, 16, 24]),
                         st.tuples(st.sampled_from([8, 16]), st.sampled_from([12, 20]))))
    types = OUT_TYPES if has_cls_types else OUT_TYPES[1:]
    idx = draw(st.lists(st.integers(0, num_layers - 1), min_size=1, max_size=num_layers,
                        unique=True))
    # negative indices count from the end
    idx = [i - num_layers if draw(st.booleans()) else i for i in idx]
    return dict(img_size=img, patch_size=patch, stride=stride,
                in_channels=draw(st.sampled_from([1, 3])),
                out_type=draw(st.sampled_from(types)), out_indices=idx,
                out_norms=draw(st.booleans()), final_norm=draw(st.booleans()),
                frozen_stages=draw(st.integers(-1, num_layers)),
                interpolate_mode=draw(st.sampled_from(MODES)),
                drop_path_rate=draw(st.sampled_from([0.0, 0.2])))


inputs = st.tuples(st.sampled_from([1, 3]), st.integers(1, 33), st.integers(1, 33))


def plain_expectations(cfg: dict, C: int, L: int, h: int, w: int, extra: int, flat_raw: bool):
    """Per output: shape, frozen prefixes, depth position of each parameter."""
    p, s = cfg['patch_size'], cfg['stride']
    gh, gw = grid(h, p, s), grid(w, p, s)
    idx = sorted(i % L for i in cfg['out_indices'])  # outputs come in depth order
    shape = {'featmap': (C, gh, gw), 'cls_token': (C, ), 'avg_featmap': (C, ),
             'raw': ((gh * gw + extra, C) if flat_raw else (gh + extra, gw + extra, C))}
    expected = [shape[cfg['out_type']]] * len(idx)
    strides = [s if cfg['out_type'] == 'featmap' else None] * len(idx)
    f = cfg['frozen_stages']
    frozen = []
    if f >= 0:
        frozen = ['patch_embed.', 'pos_embed', 'cls_token']
        frozen += [f'layers.{i}.' for i in range(f)]
        frozen += [f'out_norms.{k}.' for k, i in enumerate(idx) if i < f and cfg['out_norms']]
        frozen += ['norm_f.'] if f == L else []
    order = {'patch_embed.': -1, 'pos_embed': -1, 'cls_token': -1, 'norm_f.': L}
    order.update({f'layers.{i}.': i for i in range(L)})
    order.update({f'out_norms.{k}.': i for k, i in enumerate(idx)})
    return expected, strides, frozen, split_prefix_position(order)


@settings(max_examples=budget(6))
@given(data=st.data())
def test_vim_option_space(data):
    arch = data.draw(plain_arch(), 'arch')
    with_cls = data.draw(st.booleans(), 'with_cls_token')
    cfg = dict(type='Vim', arch=arch, with_cls_token=with_cls,
               **data.draw(plain_common(arch['num_layers'], with_cls), 'options'))
    b, h, w = data.draw(inputs, 'input')
    torch.manual_seed(1)
    x = torch.randn(b, cfg['in_channels'], h, w)
    expected, strides, frozen, position = plain_expectations(
        cfg, arch['embed_dims'], arch['num_layers'], h, w, int(with_cls), flat_raw=True)
    check_backbone(cfg, x, expected, strides, frozen, position)


@st.composite
def v2m_options(draw, num_layers: int) -> dict:
    local = draw(st.booleans())
    opts = dict(cls_position=draw(st.sampled_from(['mean', 'edge', 'middle'])),
                gate=draw(st.sampled_from(['both', 'last'])), local_window=local)
    if local:
        name = st.builds(lambda base, flip: base + ('_flip' if flip else ''),
                         st.sampled_from(['h', 'v', 'w2', 'w3', 'w4']), st.booleans())
        one = st.lists(name, min_size=1, max_size=3).map(tuple)
        kind = draw(st.sampled_from(['default', 'shared', 'per_layer']))
        if kind == 'shared':
            opts['directions'] = draw(one)
        elif kind == 'per_layer':
            opts['directions'] = [draw(one) for _ in range(num_layers)]
    else:
        opts['corners'] = draw(st.one_of(
            st.integers(1, 4),
            st.lists(st.sampled_from(['ul', 'lr', 'ur', 'll']), min_size=1, max_size=4,
                     unique=True).map(tuple)))
    return opts


@settings(max_examples=budget(6))
@given(data=st.data())
def test_v2m_option_space(data):
    arch = data.draw(plain_arch(max_layers=2), 'arch')
    opts = data.draw(v2m_options(arch['num_layers']), 'v2m options')
    common = data.draw(plain_common(arch['num_layers'], True), 'options')
    cfg = dict(type='V2M', arch=arch, **opts, **common)
    b, h, w = data.draw(inputs, 'input')
    torch.manual_seed(1)
    x = torch.randn(b, cfg['in_channels'], h, w)
    extra = int(opts['cls_position'] != 'mean')
    expected, strides, frozen, position = plain_expectations(
        cfg, arch['embed_dims'], arch['num_layers'], h, w, extra, flat_raw=False)
    if not extra:  # no class token parameter to freeze
        frozen = [p for p in frozen if p != 'cls_token']
    check_backbone(cfg, x, expected, strides, frozen, position)
