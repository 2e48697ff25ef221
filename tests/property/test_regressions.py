"""Minimal examples of the failures the property tests found, kept as explicit tests.

Each test names what used to happen.
"""
import pytest
import torch
from prop_common import build, check_layer_depth

from mmssm.models.backbones.convnext_s4nd import ConvNeXtS4ND, ConvNeXtS4ND3D
from mmssm.models.backbones.v2m import V2M
from mmssm.models.backbones.vim import Vim
from mmssm.models.backbones.vmamba import VMamba
from mmssm.models.layers.embed import resize_grid_embed

TINY_VIM = dict(arch=dict(embed_dims=8, num_layers=2, d_state=2), img_size=8, patch_size=4,
                stride=4)
TINY_CNX = dict(arch=dict(depths=[1, 1, 1, 1], dims=[4, 4, 4, 4]), img_size=16, patch_size=2,
                stem_l_max=4, stem_channels=2, layer_cfg=dict(d_state=2))


def test_nearest_exact_position_embedding_resize():
    """interpolate_mode='nearest-exact' (a listed valid mode) crashed with 'align_corners
    option can only be set with the interpolating modes: linear | ...' on any input whose
    grid differs from img_size's."""
    pos = torch.randn(1, 4, 8)
    assert resize_grid_embed(pos, (2, 2), (3, 5), 'nearest-exact').shape == (1, 15, 8)
    m = build(dict(type='Vim', interpolate_mode='nearest-exact', out_type='featmap', **TINY_VIM))
    assert m(torch.randn(1, 3, 12, 20))[0].shape == (1, 8, 3, 5)


def test_vim_d_conv_zero_means_no_conv():
    """arch d_conv=0 (the mixer's documented 'no conv1d') was refused by Vim."""
    m = build(dict(type='Vim', **dict(TINY_VIM, arch=dict(TINY_VIM['arch'], d_conv=0))))
    assert m.layers[0].mixer.conv1d is None
    assert torch.isfinite(m(torch.randn(1, 3, 8, 8))[0]).all()


def test_vim_out_norm_layer_depth_follows_its_layer():
    """out_norms.k got the last lr-decay id (num - 1) even for an early layer, so its
    learning rate was above the layers after it."""
    m = Vim(**TINY_VIM, out_indices=(0, 1), out_norms=True, out_type='featmap')
    assert m.get_layer_depth('out_norms.0.weight') == (1, 4)
    assert m.get_layer_depth('out_norms.1.weight') == (2, 4)


def test_convnext_s4nd_layer_depths_in_range_and_monotone():
    """norm0..norm2 (dense output norms) got the head's id max + 1 (above the later
    stages), and a custom stage 2 deeper than 27 blocks got ids past the range."""
    m = ConvNeXtS4ND(**TINY_CNX, out_indices=(0, 1, 2, 3))
    assert [m.get_layer_depth(f'norm{i}.weight')[0] for i in range(4)] == [1, 2, 3, 7]
    deep = ConvNeXtS4ND(**dict(TINY_CNX, arch=dict(depths=[1, 1, 40, 1], dims=[4, 4, 4, 4])),
                        out_indices=(1, 2))
    for n, _ in deep.named_parameters():
        lid, num = deep.get_layer_depth(n)
        assert 0 <= lid < num, (n, lid, num)

    def position(name):
        p = name.split('.')
        if p[0] == 'stem':
            return -1
        if p[0].startswith('norm'):
            return int(p[0][4:]) + 0.5
        return int(p[1]) + (int(p[3]) / 100 if p[2] == 'blocks' else -0.25)
    check_layer_depth(deep, position)


@pytest.mark.parametrize('make', [
    lambda: VMamba(arch=dict(depths=[1, 1, 1], dims=4), out_indices=(2, 0)),
    lambda: Vim(**TINY_VIM, out_indices=(1, 0), out_type='featmap', out_norms=True),
    lambda: ConvNeXtS4ND(**TINY_CNX, out_indices=(3, -4)),
])
def test_unsorted_out_indices_follow_the_outputs(make):
    """Outputs come in depth order: given out_indices=(2, 0), output 0 was stage 0 while
    out_indices[0] (and the per-output norms/channels keyed on it) said stage 2."""
    m = make().eval()
    assert list(m.out_indices) == sorted(m.out_indices)
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 16, 16))
    assert [o.shape[1] for o in outs] == list(m.out_channels)
    assert [f['index'] for f in m.feature_info] == list(m.out_indices)


def test_declared_channels_and_strides():
    """out_channels / out_strides / feature_info describe the outputs (new: the dense
    contract as data)."""
    vim = Vim(**dict(TINY_VIM, patch_size=8, stride=4), out_indices=(0, 1), out_type='featmap')
    assert vim.out_channels == (8, 8) and vim.out_strides == (4, 4)
    assert Vim(**TINY_VIM, out_type='cls_token').out_strides == (None, )
    vm = VMamba(arch=dict(depths=[1, 1, 1, 1], dims=[4, 6, 8, 10]), out_indices=(1, 3))
    assert vm.out_channels == (6, 10) and vm.out_strides == (8, 32)
    assert vm.feature_info == [dict(num_chs=6, reduction=8, index=1),
                               dict(num_chs=10, reduction=32, index=3)]
    cnx = ConvNeXtS4ND(**TINY_CNX, out_indices=(0, 3))
    assert cnx.out_strides == (2, 16)
    assert ConvNeXtS4ND(**TINY_CNX, gap_before_final_norm=True).out_strides == (None, )
    video = ConvNeXtS4ND3D(arch=TINY_CNX['arch'], img_size=(4, 16, 16), patch_size=(2, 2, 2),
                           stem_l_max=(2, 4, 4), stem_channels=2, layer_cfg=dict(d_state=2),
                           temporal_strides=(2, 1, 1), out_indices=(0, 1, 3))
    assert video.out_strides == (2, 4, (4, 16, 16))  # one int when all axes agree


def test_convnext_s4nd_high_rate_on_a_short_stage():
    """rate=2 on a stage whose l_max is 1 rounded the kernel length to 0 and the forward
    died with 'ZeroDivisionError: complex division by zero'; the kernel keeps one tap."""
    m = ConvNeXtS4ND(**dict(TINY_CNX, img_size=(16, 32)), rate=2.0, out_indices=(3, ))
    assert m.stages[3].out_size == [1, 2]
    out = m(torch.randn(1, 3, 16, 16))[0]
    assert out.shape == (1, 4, 1, 1) and torch.isfinite(out).all()


def test_vmamba_even_d_conv_is_refused_at_build():
    """arch d_conv=4 built, then the forward died with 'The size of tensor a (4) must match
    the size of tensor b (3)' (SS2D's depthwise conv pads (k - 1) // 2)."""
    with pytest.raises(ValueError, match='d_conv=4: .*odd kernel'):
        VMamba(arch=dict(depths=[1], dims=8, d_conv=4), out_indices=(0, ))
    for k in (0, 1, 5):  # no conv, and odd kernels, keep the map size
        m = VMamba(arch=dict(depths=[1], dims=8, d_conv=k), out_indices=(0, ))
        assert m(torch.randn(1, 3, 9, 7))[0].shape == (1, 8, 3, 2)


# what each bad value used to do: silently accepted, or an exception that does not name it
SILENT_OR_UNCLEAR = [
    # silently accepted
    (lambda: Vim(**TINY_VIM, out_indices=[0.5]), TypeError, 'out_indices'),
    (lambda: Vim(**dict(TINY_VIM, img_size=0)), ValueError, 'img_size'),
    (lambda: Vim(**dict(TINY_VIM, img_size=-8)), ValueError, 'img_size'),
    (lambda: V2M(**TINY_VIM, local_window=True, directions='h_flip'), TypeError, 'directions'),
    (lambda: VMamba(arch=dict(depths=[1], dims=8, d_conv=-1), out_indices=0), ValueError,
     'd_conv'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, arch=dict(depths=[1, -1, 1, 1], dims=[4] * 4))),
     ValueError, 'depths'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, arch=dict(depths=[1] * 4, dims=[4, 0, 4, 4]))),
     ValueError, 'dims'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, arch=dict(depths=[1] * 4, dims=[4] * 4, depth=3))),
     ValueError, 'unknown arch key'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, img_size=0)), ValueError, 'img_size'),
    # a training size below the total stride on one axis: the last stage got length-0
    # S4ND kernels; it built, then every forward died with 'ZeroDivisionError: complex
    # division by zero'
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, img_size=(32, 24), patch_size=4)), ValueError,
     r'img_size=\(32, 24\) is smaller than the total stride \(32, 32\)'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, stem_channels=0)), ValueError, 'stem_channels'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, stem_l_max=0)), ValueError, 'stem_l_max'),
    (lambda: ConvNeXtS4ND(**TINY_CNX, in_channels=0), ValueError, 'in_channels'),
    (lambda: ConvNeXtS4ND(**TINY_CNX, rate=0.0), ValueError, 'rate'),
    (lambda: ConvNeXtS4ND(**TINY_CNX, rate='x'), ValueError, 'rate'),
    (lambda: ConvNeXtS4ND(**TINY_CNX, drop_path_rate=1.0), ValueError, 'drop_path_rate'),
    # an exception that did not name the argument
    (lambda: Vim(**TINY_VIM, out_indices='0'), TypeError, 'out_indices'),
    (lambda: Vim(**TINY_VIM, frozen_stages=1.5), TypeError, 'frozen_stages'),
    (lambda: Vim(**TINY_VIM, drop_path_rate=None), TypeError, 'drop_path_rate'),
    (lambda: Vim(**dict(TINY_VIM, img_size=8.0)), TypeError, 'img_size'),
    (lambda: Vim(**dict(TINY_VIM, patch_size=2.5)), TypeError, 'patch_size'),
    (lambda: VMamba(arch=dict(depths=2, dims=8)), ValueError, 'depths'),
    (lambda: VMamba(arch=dict(depths=[1], dims=8.5)), ValueError, 'dims'),
    (lambda: VMamba(arch=dict(depths=[1], dims=8, d_state=1.5)), ValueError, 'd_state'),
    (lambda: VMamba(arch=dict(depths=[1], dims=8, dt_rank=0)), ValueError, 'dt_rank'),
    (lambda: VMamba(arch=dict(depths=[1], dims=8, dt_rank='big')), ValueError, 'dt_rank'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, patch_size=0)), ValueError, 'patch_size'),
    (lambda: ConvNeXtS4ND(**TINY_CNX, ls_init_value='x'), TypeError, 'ls_init_value'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, layer_cfg='x')), TypeError, 'layer_cfg'),
    (lambda: ConvNeXtS4ND(**dict(TINY_CNX, layer_cfg=dict(d_state=0))), ValueError, 'd_state'),
    (lambda: ConvNeXtS4ND3D(arch=TINY_CNX['arch'], temporal_strides=(0, 1, 1)), ValueError,
     'temporal_strides'),
]


@pytest.mark.parametrize('make,err,name', SILENT_OR_UNCLEAR)
def test_bad_values_are_named(make, err, name):
    with pytest.raises(err, match=name):
        make()
