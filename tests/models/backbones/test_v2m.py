"""mmssm.V2M: layout through the real block, counts, options, checkpoints, errors."""
import importlib
import math

import pytest
import torch

import mmssm.ops
from mmssm.models.backbones import V2M
from mmssm.models.backbones.v2m import join_cross, split_cross
from mmssm.models.layers import LocalV2MMixer, PreNormSSMBlock, V2MMixer2D

SMALL = dict(embed_dims=32, num_layers=2)


def _fake_scan(kind):
    def scan(u, delta, A, B, C, D=None, z=None, reverse=False, **kw):
        if kind == 'id':
            return u
        # a reverse scan accumulates from the last step (V2M's right / bottom corners)
        return u.flip(-1).cumsum(-1).flip(-1) if reverse else u.cumsum(-1)
    return scan


def _make_identity(mixer):
    """in_proj = [I; 0], out_proj = I, no gate and no conv: only scans + layout remain."""
    c = mixer.d_model
    with torch.no_grad():
        mixer.in_proj.weight.zero_()
        mixer.in_proj.weight[:c] = torch.eye(c)
        mixer.out_proj.weight.copy_(torch.eye(c))
    return mixer


# ------------------------------------------------------- layout (token ids)
@pytest.mark.parametrize('corners', [1, 2, 3, 4])
def test_token_ids_through_real_block_with_identity_scans(patch_scans, corners):
    patch_scans(_fake_scan('id'))
    h, w = 3, 5
    c = h * w
    mixer = _make_identity(V2MMixer2D(c, d_state=2, expand=1, d_conv=0, use_z=False,
                                      corners=corners))
    block = PreNormSSMBlock(c, mixer)
    x = torch.eye(c).view(1, h, w, c) * 3.0  # token (i, j) = 3 * e_{i*w+j}
    y = block(x)
    # RMSNorm maps 3*e_t to sqrt(c)*e_t; the mixer must put it back on (i, j)
    torch.testing.assert_close(y, x + math.sqrt(c) * torch.eye(c).view(1, h, w, c),
                               atol=1e-5, rtol=1e-4)  # RMSNorm eps


@pytest.mark.parametrize('corner', ['ul', 'lr', 'ur', 'll'])
def test_quadrants_through_real_block_with_cumsum_scans(patch_scans, corner):
    patch_scans(_fake_scan('cumsum'))
    h, w = 3, 4
    c = h * w
    mixer = _make_identity(V2MMixer2D(c, d_state=2, expand=1, d_conv=0, use_z=False,
                                      corners=(corner, )))
    block = PreNormSSMBlock(c, mixer)
    x = torch.eye(c).view(1, h, w, c)
    reach = (block(x) - x)[0] / math.sqrt(c)  # (h, w, sources)
    for i in range(h):
        for j in range(w):
            exp = torch.zeros(h, w)
            exp[slice(0, i + 1) if corner in ('ul', 'ur') else slice(i, h),
                slice(0, j + 1) if corner in ('ul', 'll') else slice(j, w)] = 1
            torch.testing.assert_close(reach[i, j].view(h, w), exp, atol=1e-4, rtol=0)


@pytest.mark.parametrize('dirs', [('h', 'h_flip', 'v', 'v_flip'), ('w2', 'w2_flip', 'w3'),
                                  ('w7', 'v')])
def test_local_mixer_identity_scans_keep_tokens_in_place(monkeypatch, dirs):
    monkeypatch.setattr(mmssm.ops, 'selective_scan', _fake_scan('id'))
    h, w = 5, 3  # windows pad this grid
    c = h * w
    m = _make_identity(LocalV2MMixer(c, dirs, d_state=2, expand=1, d_conv=0, use_z=False))
    with torch.no_grad():  # BiAttn gate = sigmoid(0) = 0.5 for every channel
        m.attn.channel_select.weight.zero_()
        m.attn.channel_select.bias.zero_()
    x = torch.eye(c).view(1, h, w, c)
    torch.testing.assert_close(m(x), 0.5 * len(dirs) * x, atol=1e-6, rtol=0)


def test_local_window_reach_is_window_quadrant_then_window_order(monkeypatch):
    monkeypatch.setattr(mmssm.ops, 'selective_scan', _fake_scan('cumsum'))
    h = w = 4
    c = h * w
    m = _make_identity(LocalV2MMixer(c, ('w2', ), d_state=2, expand=1, d_conv=0, use_z=False))
    with torch.no_grad():
        m.attn.channel_select.weight.zero_()
        m.attn.channel_select.bias.fill_(30.0)  # gate ~ 1
    reach = m(torch.eye(c).view(1, h, w, c))[0].round()  # (h, w, sources)

    def src(i, j):
        return reach[i, j].view(h, w).nonzero().tolist()
    # bottom-right of window 0 sees its whole window
    assert src(1, 1) == [[0, 0], [0, 1], [1, 0], [1, 1]]
    # top-left of window 1 (columns 2-3): its row pass starts there, its column pass
    # comes down column 0 of window 0 first
    assert src(0, 2) == [[0, 0], [0, 2], [1, 0]]


def test_real_scan_backbone_is_causal_in_patch_coordinates():
    """Full V2M (real scan, convs, 'middle' extra tokens), one 'ul' corner."""
    torch.manual_seed(0)
    m = V2M(dict(embed_dims=16, num_layers=1), img_size=64, corners=('ul', ),
            out_type='featmap').eval()
    x = torch.randn(1, 3, 64, 80)
    x2 = x.clone()
    x2[..., 16:32, 32:48] += 1.0  # only patch (1, 2) changes
    with torch.no_grad():
        changed = (m(x2)[0] - m(x)[0]).abs().amax(1)[0] > 1e-6  # (4, 5)
    expect = (torch.arange(4)[:, None] >= 1) & (torch.arange(5)[None] >= 2)
    assert torch.equal(changed, expect)


# ------------------------------------------------------------- token grid
def test_cross_split_join_roundtrip():
    t = torch.randn(2, 5, 6, 3)
    for r, c in [(2, 3), (4, 5), (0, 0)]:
        parts = split_cross(t, r, c)
        assert parts[0].shape == (2, 4, 5, 3) and parts[1].shape == (2, 5, 3)
        assert torch.equal(join_cross(*parts, r, c), t)


@pytest.mark.parametrize('cls_position', ['mean', 'edge', 'middle'])
def test_cls_readout_and_dense_maps_skip_extra_tokens(cls_position):
    """Zero mixers (layers = identity): outputs are norm_f(tokens) in the right places."""
    torch.manual_seed(0)
    m = V2M(SMALL, img_size=64, cls_position=cls_position, out_type='raw').eval()
    for layer in m.layers:
        torch.nn.init.zeros_(layer.mixer.out_proj.weight)
    x = torch.randn(2, 3, 64, 48)  # grid 4 x 3
    with torch.no_grad():
        raw = m(x)[0]
        patches = m.patch_embed(x)
        grid, extra = m._pos_parts((4, 3))
        exp_maps = m.norm_f(patches + grid)
        m.out_type = 'featmap'
        torch.testing.assert_close(m(x)[0], exp_maps.permute(0, 3, 1, 2))
        m.out_type = 'cls_token'
        cls = m(x)[0]
    if cls_position == 'mean':
        assert raw.shape == (2, 4, 3, 32) and m.cls_token is None
        torch.testing.assert_close(cls, exp_maps.mean((1, 2)))
        return
    assert raw.shape == (2, 5, 4, 32)
    r, c = (4, 3) if cls_position == 'edge' else (2, 1)
    expect_cls = m.norm_f(m.cls_token[0, 0] + extra[2][0]).expand(2, -1)
    torch.testing.assert_close(cls, expect_cls)
    torch.testing.assert_close(raw[:, r, c], expect_cls)
    # the extra row is cls + its position entries, not a patch
    torch.testing.assert_close(raw[0, r, 0], m.norm_f(m.cls_token[0, 0] + extra[0][0, 0]))


# ------------------------------------------------------------- counts
PAPER = {('tiny', False): 7e6, ('small', False): 26e6, ('tiny', True): 8e6, ('small', True): 28e6}


@pytest.mark.parametrize('arch,local', list(PAPER))
def test_param_counts_match_paper(arch, local):
    m = V2M(arch, local_window=local)
    n = sum(p.numel() for p in m.parameters()) + (m.embed_dims + 1) * 1000  # + 1000-class head
    assert abs(n - PAPER[(arch, local)]) / PAPER[(arch, local)] < 0.05, n


def test_official_v2m_count_and_keys():
    """cls_position='mean' is the released model: 6,852,712 params with its head."""
    m = V2M('tiny', cls_position='mean')
    assert sum(p.numel() for p in m.parameters()) + 193 * 1000 == 6_852_712
    keys = {k.split('mixer.')[1] for k in m.state_dict() if k.startswith('layers.0.mixer.')}
    assert keys == {'A_log', 'D', 'A_2_log', 'D_2', 'in_proj.weight', 'conv1d.weight',
                    'conv1d.bias', 'x_proj.weight', 'dt_proj.weight', 'dt_proj.bias',
                    'conv1d_2.weight', 'conv1d_2.bias', 'x_proj_2.weight', 'dt_proj_2.weight',
                    'dt_proj_2.bias', 'out_proj.weight'}
    assert m.layers[0].mixer.x_proj.weight.shape == (12 + 16, 384)
    assert set(k for k in m.state_dict() if not k.startswith('layers.')) == \
        {'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm_f.weight'}


# ------------------------------------------------ forward/backward options
@pytest.mark.parametrize('kw', [
    dict(cls_position='mean', corners=1),
    dict(cls_position='edge', corners=('lr', 'ur')),
    dict(cls_position='middle', corners=4, gate='last'),
    dict(cls_position='middle', stride=8),
    dict(local_window=True),
    dict(local_window=True, cls_position='edge', directions=[('w2', 'v_flip'), ('h', 'w7_flip')]),
])
def test_forward_backward_options(kw):
    m = V2M(SMALL, img_size=64, out_indices=(0, 1), out_type='featmap', drop_path_rate=0.1, **kw)
    x = torch.randn(2, 3, 70, 50, requires_grad=True)  # non-square, not a multiple of 16
    outs = m(x)
    s = kw.get('stride', 16)
    gh, gw = (math.ceil((n - 16) / s) + 1 for n in (70, 50))
    assert [o.shape for o in outs] == [torch.Size([2, 32, gh, gw])] * 2
    sum(o.square().sum() for o in outs).backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())


def test_local_window_default_directions_alternate():
    m = V2M(dict(embed_dims=16, num_layers=3), img_size=32, local_window=True)
    assert [layer.mixer.directions for layer in m.layers] == [
        ('h', 'h_flip', 'w2', 'w2_flip'), ('v', 'v_flip', 'w7', 'w7_flip'),
        ('h', 'h_flip', 'w2', 'w2_flip')]
    assert 'layers.0.mixer.ssms.3.A_2_log' in m.state_dict()
    assert 'layers.0.mixer.attn.global_reduce.weight' in m.state_dict()


@pytest.mark.parametrize('cls_position', ['mean', 'edge', 'middle'])
def test_pos_embed_resize_on_the_fly_matches_converted(cls_position):
    torch.manual_seed(0)
    small = V2M(SMALL, img_size=32, cls_position=cls_position).eval()
    big = V2M(SMALL, img_size=64, cls_position=cls_position).eval()
    res = big.load_state_dict(big.convert_checkpoint(small.state_dict()))
    assert not res.missing_keys and not res.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], big(x)[0])


def test_loads_official_v2m_format_checkpoint(tmp_path):
    """Released V2M checkpoints: mean pooling, patch-only pos_embed, head.*."""
    torch.manual_seed(0)
    off = V2M(SMALL, img_size=32, cls_position='mean')
    sd = dict(off.state_dict())
    sd.update({'head.weight': torch.randn(10, 32), 'head.bias': torch.zeros(10)})
    path = tmp_path / 'v2m.pth'
    torch.save({'model': sd, 'epoch': 1}, path)
    m = V2M(SMALL, img_size=64, cls_position='middle',
            init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    m.init_weights()
    torch.testing.assert_close(m.layers[1].mixer.A_2_log, off.layers[1].mixer.A_2_log)
    grid, _ = m._pos_parts((4, 4))
    from mmssm.models.layers.embed import resize_grid_embed
    torch.testing.assert_close(grid.reshape(1, 16, 32),
                               resize_grid_embed(off.pos_embed, (2, 2), (4, 4)))


@pytest.mark.parametrize('registry', ['mmpretrain', 'mmdet', 'mmseg'])
def test_builds_from_downstream_registries(registry):
    reg = importlib.import_module(f'{registry}.registry').MODELS
    m = reg.build(dict(type='mmssm.V2M', arch=SMALL, img_size=32, local_window=True,
                       out_indices=(1, ), out_type='featmap'))
    assert isinstance(m, V2M)
    assert m(torch.randn(1, 3, 48, 32))[0].shape == (1, 32, 3, 2)


def test_image_classifier_and_layer_depth():
    from mmpretrain.registry import MODELS
    model = MODELS.build(dict(
        type='ImageClassifier', backbone=dict(type='mmssm.V2M', arch=SMALL, img_size=32),
        neck=None, head=dict(type='LinearClsHead', num_classes=4, in_channels=32)))
    assert model(torch.randn(2, 3, 32, 32), mode='tensor').shape == (2, 4)
    assert model.backbone.get_layer_depth('backbone.layers.1.mixer.D_2', 'backbone.') == (2, 4)


# ----------------------------------------------------------------- errors
def test_bad_arguments():
    with pytest.raises(ValueError, match='cls_position'):
        V2M(SMALL, cls_position='top')
    with pytest.raises(ValueError, match='corners'):
        V2M(SMALL, corners=5)
    with pytest.raises(ValueError, match='corners'):
        V2M(SMALL, corners=('ul', 'xx'))
    with pytest.raises(ValueError, match="arch='base'"):
        V2M('base')
    with pytest.raises(ValueError, match="arch='base'"):
        V2M('base', local_window=True)
    with pytest.raises(ValueError, match='out_indices'):
        V2M(SMALL, out_indices=(5, ))
    with pytest.raises(ValueError, match='direction'):
        V2M(SMALL, local_window=True, directions=('h', 'diag'))
    with pytest.raises(ValueError, match='one per layer'):
        V2M(SMALL, local_window=True, directions=[('h', ), ('v', ), ('w2', )])
    with pytest.raises(ValueError, match='local_window'):
        V2M(SMALL, directions=('h', ))
    with pytest.raises(ValueError, match='corners'):
        V2M(SMALL, local_window=True, corners=2)
    with pytest.raises(TypeError, match='cls_position'):
        V2M(SMALL, with_cls_token=False)


def test_mmseg_encoder_decoder_loss_and_predict():
    from mmengine.registry import DefaultScope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = _build_segmentor(MODELS)
    samples = []
    for _ in range(2):
        s = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 3, (1, 64, 64))))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    x = torch.randn(2, 3, 64, 64)
    losses = model(x, samples, mode='loss')
    losses['decode.loss_ce'].backward()
    assert model.backbone.layers[0].mixer.A_2_log.grad is not None
    model.eval()
    with torch.no_grad():
        pred = model(x, samples, mode='predict')
    assert pred[0].pred_sem_seg.data.shape == (1, 64, 64)


def _build_segmentor(MODELS):
    from mmengine.config import ConfigDict
    return MODELS.build(dict(
        type='EncoderDecoder', data_preprocessor=dict(type='SegDataPreProcessor', size=(64, 64)),
        backbone=dict(type='mmssm.V2M', arch=SMALL, img_size=64, out_indices=(0, 1),
                      out_type='featmap'),
        decode_head=dict(type='FCNHead', in_channels=32, in_index=1, channels=16, num_convs=1,
                         num_classes=3, norm_cfg=dict(type='BN', requires_grad=True)),
        test_cfg=ConfigDict(mode='whole')))
