"""mmssm.Vim: official parity, keys/counts, checkpoint paths, shapes, options, errors."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mmssm.models.backbones import Vim
from mmssm.models.layers.embed import split_middle_cls

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO.parent / 'shared' / 'fixtures' / 'official' / 'vim'
FIXTURE = FIXTURES / 'vim_small_cfg_a.pt'
OFFICIAL = FIXTURES / 'vim_small_cfg_a_official_format.pth'
needs_fixtures = pytest.mark.skipif(not FIXTURE.exists(),
                                    reason=f'official Vim fixtures not found at {FIXTURES}')
SMALL = dict(embed_dims=32, num_layers=2)


def _fixture():
    return torch.load(FIXTURE, weights_only=True)


def _fixture_model(checkpoint, **kw):
    fx = _fixture()
    c = fx['constructor']
    m = Vim(dict(embed_dims=c['embed_dim'], num_layers=c['depth'], d_state=c['d_state']),
            img_size=c['img_size'], patch_size=c['patch_size'], stride=c['stride'],
            init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint), **kw))
    m.init_weights()
    return m.eval(), fx


def _head(fx):
    sd = fx['state_dict']
    head = nn.Linear(sd['head.weight'].shape[1], sd['head.weight'].shape[0])
    head.load_state_dict({'weight': sd['head.weight'], 'bias': sd['head.bias']})
    return head


def _assert_parity(m, fx):
    head = _head(fx)
    x = fx['input'].clone().requires_grad_(True)
    feat = m(x)[-1]
    logits = head(feat)
    logits.sum().backward()
    # fixture README: atol 1e-4 (scaled to the output) for outputs, 1e-5 for input grads
    for got, ref, tol in [(feat, fx['features'], 1e-4), (logits, fx['output'], 1e-4),
                          (x.grad, fx['grad_check']['input_grad'], 1e-5)]:
        atol = tol * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got.detach(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(m.forward_features(fx['input']), fx['features'], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ parity
@needs_fixtures
def test_parity_state_dict_through_init_cfg(tmp_path):
    path = tmp_path / 'sd.pth'
    torch.save(_fixture()['state_dict'], path)
    m, fx = _fixture_model(path, min_coverage=1.0)
    _assert_parity(m, fx)


@needs_fixtures
@pytest.mark.parametrize('key', [None, 'model_ema'])
def test_parity_official_checkpoint_through_init_cfg(key):
    m, fx = _fixture_model(OFFICIAL, checkpoint_key=key, min_coverage=1.0)
    _assert_parity(m, fx)


def _load_converter():
    path = REPO / 'tools' / 'model_converters' / 'vim2mmssm.py'
    spec = importlib.util.spec_from_file_location('vim2mmssm', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_fixtures
@pytest.mark.parametrize('ema', [False, True])
def test_parity_through_converter(tmp_path, ema):
    out = tmp_path / 'vim_mmssm.pth'
    report = _load_converter().convert(str(OFFICIAL), str(out), ema=ema)
    assert report['coverage'] == 1.0 and not report['missing'] and not report['unexpected']
    cfg = report['meta']['backbone']
    assert cfg['stride'] == 16 and cfg['img_size'] == 64 and cfg['with_cls_token']
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {'state_dict', 'meta'}
    assert {k for k in saved['state_dict'] if not k.startswith('backbone.')} == \
        {'head.fc.weight', 'head.fc.bias'}
    m, fx = _fixture_model(out, min_coverage=1.0)
    _assert_parity(m, fx)


@needs_fixtures
def test_converted_checkpoint_in_mmpretrain_image_classifier(tmp_path):
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS
    out = tmp_path / 'vim_mmssm.pth'
    report = _load_converter().convert(str(OFFICIAL), str(out))
    cfg = report['meta']['backbone']
    model = MODELS.build(dict(
        type='ImageClassifier', backbone=cfg, neck=None,
        head=dict(type='LinearClsHead', num_classes=10, in_channels=64)))
    load_checkpoint(model, str(out), strict=True)
    model.eval()
    fx = _fixture()
    with torch.no_grad():
        logits = model(fx['input'], mode='tensor')
    torch.testing.assert_close(logits, fx['output'], atol=1e-4, rtol=0)


# ----------------------------------------------------------- keys, counts
COUNTS = {'tiny': 7_148_008, 'small': 25_796_584, 'base': 97_598_440}


@pytest.mark.parametrize('arch', list(COUNTS))
def test_param_count_and_keys_match_official(arch):
    m = Vim(arch)
    # official count includes a 1000-class head, our backbone has none
    n = sum(p.numel() for p in m.parameters()) + (m.embed_dims + 1) * 1000
    assert n == COUNTS[arch]
    if arch == 'tiny' and (FIXTURES / 'vim_ti_keys.json').exists():
        man = json.loads((FIXTURES / 'vim_ti_keys.json').read_text())['manifests']
        ref = next(v for k, v in man.items() if k.startswith('vim_tiny_patch16_224'))
        ref = {k: tuple(s) for k, s in ref.items() if not k.startswith('head.')}
        assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == ref
        assert list(m.state_dict()) == list(ref)  # same order too


def test_stride8_count():
    m = Vim('tiny', stride=8)
    assert m.patch_resolution == (27, 27)
    assert sum(p.numel() for p in m.parameters()) + 193 * 1000 == 7_250_344


def test_official_init_quirks():
    torch.manual_seed(0)
    m = Vim(dict(embed_dims=64, num_layers=4))
    mix = m.layers[0].mixer
    assert torch.all(mix.dt_proj_b.bias == 0)  # official: zeroed by the Linear-bias init
    dt = torch.nn.functional.softplus(mix.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    bound = 1 / math.sqrt(mix.d_inner) / math.sqrt(4)  # kaiming-uniform bound / sqrt(depth)
    assert mix.out_proj.weight.abs().max() <= bound + 1e-7
    assert mix.out_proj.weight.abs().max() > 0.8 * bound
    torch.testing.assert_close(mix.A_log, torch.log(torch.arange(1., 17.)).repeat(128, 1))
    assert torch.all(m.patch_embed.proj.bias == 0)
    assert 0.01 < m.pos_embed.std() < 0.03
    # drop path schedule: layer i uses linspace(0, rate, depth)[i]
    m = Vim(dict(embed_dims=32, num_layers=4), drop_path_rate=0.3)
    rates = [getattr(layer.drop_path, 'drop_prob', 0.0) for layer in m.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


# ------------------------------------------------------ sizes and outputs
@pytest.mark.parametrize('stride', [16, 8])
@pytest.mark.parametrize('hw', [(64, 64), (48, 80), (50, 37)])
def test_any_input_size_featmaps(stride, hw):
    m = Vim(SMALL, img_size=64, stride=stride, out_indices=(0, 1), out_type='featmap')
    x = torch.randn(2, 3, *hw, requires_grad=True)
    outs = m(x)
    gh, gw = (math.ceil((n - 16) / stride) + 1 for n in hw)  # padded, nothing dropped
    assert [o.shape for o in outs] == [torch.Size([2, 32, gh, gw])] * 2
    sum(o.square().sum() for o in outs).backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_pos_embed_resize_keeps_middle_cls_and_matches_rebuilt_model():
    torch.manual_seed(0)
    small = Vim(SMALL, img_size=32).eval()  # 2 x 2 grid
    big = Vim(SMALL, img_size=48).eval()  # 3 x 3 grid
    big.load_state_dict(big.convert_checkpoint(small.state_dict()))
    # the class entry moves from index 2 (of 5) to index 4 (of 10) unchanged
    torch.testing.assert_close(split_middle_cls(big.pos_embed)[1],
                               split_middle_cls(small.pos_embed)[1])
    torch.testing.assert_close(big.pos_embed[:, 4], small.pos_embed[:, 2])
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], big(x)[0])  # on-the-fly == converted


def test_out_types_and_batch_independence():
    torch.manual_seed(0)
    m = Vim(SMALL, img_size=32, out_indices=(0, -1)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cls = m(x)
        assert [t.shape for t in cls] == [torch.Size([3, 32])] * 2
        torch.testing.assert_close(m(x[1:2])[1], cls[1][1:2], atol=1e-5, rtol=1e-5)
        m.out_type = 'raw'
        raw = m(x)[1]  # (B, M + 1, C), normed by norm_f (last layer)
        assert raw.shape == (3, 5, 32)
        torch.testing.assert_close(raw[:, 2], cls[1])  # class token at M // 2
        m.out_type = 'featmap'
        fm = m(x)[1]
        torch.testing.assert_close(fm.flatten(2).transpose(1, 2),
                                   torch.cat([raw[:, :2], raw[:, 3:]], 1))
        m.out_type = 'avg_featmap'
        torch.testing.assert_close(m(x)[1], fm.mean((2, 3)))


def test_with_cp_gives_the_same_gradients():
    torch.manual_seed(0)
    a = Vim(SMALL, img_size=32, out_type='featmap')
    b = Vim(SMALL, img_size=32, out_type='featmap', with_cp=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (a, b):
        m(x)[0].square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_input_smaller_than_a_patch():
    m = Vim(SMALL, img_size=32, out_type='featmap')
    assert m(torch.randn(1, 3, 10, 20))[0].shape == (1, 32, 1, 2)


def test_no_cls_token_and_out_norms():
    m = Vim(SMALL, img_size=32, with_cls_token=False, out_type='avg_featmap',
            out_indices=(0, 1), out_norms=True)
    assert m.cls_token is None and m.pos_embed.shape == (1, 4, 32)
    assert 'out_norms.1.weight' in m.state_dict()
    outs = m(torch.randn(2, 3, 40, 40))
    assert [o.shape for o in outs] == [torch.Size([2, 32])] * 2
    with pytest.raises(ValueError, match='cls_token'):
        Vim(SMALL, with_cls_token=False)


def test_image_classifier_end_to_end():
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    model = MODELS.build(dict(
        type='ImageClassifier', backbone=dict(type='mmssm.Vim', arch=SMALL, img_size=32), neck=None,
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32)))
    x = torch.randn(2, 3, 32, 32)
    assert model(x, mode='tensor').shape == (2, 5)
    losses = model(x, [DataSample().set_gt_label(1), DataSample().set_gt_label(3)], mode='loss')
    losses['loss'].backward()
    assert model.backbone.cls_token.grad is not None


@pytest.mark.parametrize('registry', ['mmpretrain', 'mmdet', 'mmseg'])
def test_builds_from_downstream_registries(registry):
    reg = importlib.import_module(f'{registry}.registry').MODELS
    m = reg.build(dict(type='mmssm.Vim', arch=SMALL, img_size=32, out_indices=(0, 1),
                       out_type='featmap'))
    assert isinstance(m, Vim)
    assert [o.shape for o in m(torch.randn(1, 3, 32, 32))] == [torch.Size([1, 32, 2, 2])] * 2


# ------------------------------------------------------ freezing, lr decay
def test_frozen_stages():
    m = Vim(SMALL, img_size=32, frozen_stages=1)
    m.train()
    assert not m.patch_embed.proj.weight.requires_grad
    assert not m.pos_embed.requires_grad and not m.cls_token.requires_grad
    assert not any(p.requires_grad for p in m.layers[0].parameters())
    assert all(p.requires_grad for p in m.layers[1].parameters())
    assert not m.layers[0].training and m.layers[1].training
    m = Vim(SMALL, img_size=32, frozen_stages=2)
    assert not m.norm_f.weight.requires_grad


def test_get_layer_depth():
    m = Vim(dict(embed_dims=32, num_layers=4), img_size=32)
    assert m.get_layer_depth('backbone.pos_embed', 'backbone.') == (0, 6)
    assert m.get_layer_depth('backbone.cls_token', 'backbone.') == (0, 6)
    assert m.get_layer_depth('backbone.patch_embed.proj.weight', 'backbone.') == (0, 6)
    assert m.get_layer_depth('backbone.layers.2.mixer.A_log', 'backbone.') == (3, 6)
    assert m.get_layer_depth('backbone.norm_f.weight', 'backbone.') == (5, 6)
    assert m.get_layer_depth('head.fc.weight', 'backbone.') == (5, 6)


def test_layer_decay_optim_wrapper_constructor():
    from mmpretrain.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
    model = MODELS.build(dict(
        type='ImageClassifier', neck=None,
        backbone=dict(type='mmssm.Vim', arch=dict(embed_dims=32, num_layers=3), img_size=32),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=32)))
    ctor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type='LearningRateDecayOptimWrapperConstructor',
        optim_wrapper_cfg=dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1.0,
                                                                weight_decay=0.05)),
        paramwise_cfg=dict(layer_decay_rate=0.5)))
    wrapper = ctor(model)
    scale = {id(p): g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}
    bb = model.backbone
    assert scale[id(bb.pos_embed)] == pytest.approx(0.5 ** 4)
    assert scale[id(bb.layers[0].mixer.A_log)] == pytest.approx(0.5 ** 3)
    assert scale[id(bb.layers[2].mixer.A_log)] == pytest.approx(0.5)
    assert scale[id(model.head.fc.weight)] == pytest.approx(1.0)


# ----------------------------------------------------------------- errors
def test_bad_arguments():
    with pytest.raises(ValueError, match="arch='huge'"):
        Vim('huge')
    with pytest.raises(ValueError, match='embed_dims'):
        Vim(dict(num_layers=2))
    with pytest.raises(ValueError, match=r"unknown arch key\(s\) \['d_stat'\]"):
        Vim(dict(SMALL, d_stat=8))
    with pytest.raises(ValueError, match='out_indices'):
        Vim(SMALL, out_indices=(0, 2))
    with pytest.raises(ValueError, match='out_type'):
        Vim(SMALL, out_type='tokens')
    with pytest.raises(ValueError, match='frozen_stages'):
        Vim(SMALL, frozen_stages=3)


@needs_fixtures
def test_checkpoint_of_other_size_is_resized_and_wrong_family_refused(tmp_path):
    path = tmp_path / 'sd.pth'
    torch.save(_fixture()['state_dict'], path)
    arch = dict(embed_dims=64, num_layers=2)
    m = Vim(arch, img_size=96, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    m.init_weights()
    grid, cls = split_middle_cls(_fixture()['state_dict']['pos_embed'])
    torch.testing.assert_close(m.pos_embed[:, 18], cls[:, 0])  # 6 x 6 grid: middle is 18
    bad = Vim(dict(embed_dims=32, num_layers=2), img_size=64,
              init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(RuntimeError, match='shape mismatch'):
        bad.init_weights()
