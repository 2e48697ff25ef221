"""VMamba: parity with the official fixtures, parameter counts, dense-prediction contract."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmssm  # noqa: F401  (registers the trusted checkpoint loader)
from mmssm.models.backbones.vmamba import VMamba
from mmssm.registry import MODELS

REPO = Path(__file__).resolve().parents[3]
FIX = REPO.parent / 'shared' / 'fixtures' / 'official' / 'vmamba'
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f'official fixtures not found at {FIX}')

# the fixture constructors, in mmssm arch terms
ARCH_A1 = dict(depths=[1, 1, 2, 1], dims=32, d_state=1, ssm_ratio=1.0)  # v2, v05_noz, ln2d
ARCH_A2 = dict(depths=[1, 1, 2, 1], dims=32, d_state=4, ssm_ratio=2.0, forward_type='v0',
               mlp_ratio=0.0, downsample='v1', patch_embed='v1', norm_layer='ln', conv_bias=True)
CASES = [('vmamba_v2_tiny_cfg_a.pt', ARCH_A1), ('vmamba_v0_tiny_cfg_a.pt', ARCH_A2)]
# the same v2 weights in the channel-last ('ln') build give the same outputs
CASES_LN = CASES + [('vmamba_v2_tiny_cfg_a.pt', dict(ARCH_A1, norm_layer='ln'))]


def _close(out, ref, rtol=1e-4):
    tol = rtol * max(1.0, ref.abs().max().item())  # atol 1e-4 scaled to the output
    err = (out - ref).abs().max().item()
    assert err <= tol, f'max |diff| {err:.3g} > {tol:.3g}'
    return err


def _logits(backbone, head_w, head_b, x):
    """Official VSSM classifier: norm (= outnorm3 here) -> avg pool -> Linear."""
    feat = backbone(x)[-1]
    return F.linear(feat.mean((2, 3)), head_w, head_b)


def _classify(fixture, arch, ckpt_path, tmp_path, **init):
    d = torch.load(FIX / fixture, weights_only=True)
    m = MODELS.build(dict(type='mmssm.VMamba', arch=arch, out_indices=(3, ),
                          init_cfg=dict(type='Pretrained', checkpoint=str(ckpt_path), **init)))
    m.init_weights()
    sd = d['state_dict']
    # the classifier's norm plays the role of the last output norm
    m.outnorm3.load_state_dict({'weight': sd['classifier.norm.weight'],
                                'bias': sd['classifier.norm.bias']})
    return d, m.eval()


@needs_fixtures
@pytest.mark.parametrize('fixture,arch', CASES)
def test_fixture_logits_and_grad(fixture, arch, tmp_path):
    d = torch.load(FIX / fixture, weights_only=True)
    path = tmp_path / 'official_state_dict.pth'
    torch.save(d['state_dict'], path)  # a bare official VSSM state dict
    d, m = _classify(fixture, arch, path, tmp_path)
    x = d['input'].clone().requires_grad_(True)
    logits = _logits(m, d['state_dict']['classifier.head.weight'],
                     d['state_dict']['classifier.head.bias'], x)
    _close(logits, d['output'])
    logits.sum().backward()
    _close(x.grad, d['grad_check'])


@needs_fixtures
@pytest.mark.parametrize('fixture,arch', CASES_LN)
def test_fixture_stage_features_det_checkpoint(fixture, arch, tmp_path):
    """An MM_VSSM detector checkpoint (backbone.* + neck keys) gives the official stage features."""
    d = torch.load(FIX / fixture, weights_only=True)
    sd = {f'backbone.{k}': v for k, v in d['state_dict'].items() if not k.startswith('classifier')}
    sd.update({f'backbone.{k}': v for k, v in d['det_state_dict'].items()})
    sd['neck.lateral_convs.0.conv.weight'] = torch.zeros(4, 32, 1, 1)  # not ours: ignored
    path = tmp_path / 'mask_rcnn_vssm.pth'
    torch.save({'state_dict': sd, 'meta': {}}, path)
    m = MODELS.build(dict(type='mmssm.VMamba', arch=arch,
                          init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    m.init_weights()
    for k, v in d['det_state_dict'].items():  # the outnorms came from the checkpoint
        assert torch.equal(m.state_dict()[k], v)
    with torch.no_grad():
        outs = m.eval()(d['input'])
    assert len(outs) == 4
    for o, r in zip(outs, d['stage_features']):
        assert o.shape == r.shape
        _close(o, r)


@needs_fixtures
@pytest.mark.parametrize('key', [None, 'model_ema'])
def test_official_training_checkpoint(key, tmp_path):
    """The official save_checkpoint_ema file (yacs CfgNode inside) loads through init_cfg."""
    pytest.importorskip('yacs')
    init = {} if key is None else dict(checkpoint_key=key)
    d, m = _classify('vmamba_v2_tiny_cfg_a.pt', ARCH_A1,
                     FIX / 'vmamba_v2_tiny_cfg_a_official_format.pth', tmp_path, **init)
    with torch.no_grad():
        logits = _logits(m, d['state_dict']['classifier.head.weight'],
                         d['state_dict']['classifier.head.bias'], d['input'])
    _close(logits, d['output'])


@needs_fixtures
def test_wrong_checkpoint_is_refused(tmp_path):
    d = torch.load(FIX / 'vmamba_v0_tiny_cfg_a.pt', weights_only=True)
    path = tmp_path / 'v0.pth'
    torch.save(d['state_dict'], path)
    m = VMamba(arch=ARCH_A1, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(RuntimeError, match='shape mismatch'):
        m.init_weights()


# ------------------------------------------------------------------ parameter counts
def _meta(arch, **kw):
    with torch.device('meta'):  # full-size models without allocating or initialising
        return VMamba(arch=arch, **kw)


def _n(m):
    return sum(p.numel() for p in m.parameters())


def _cls_params(m, num_classes=1000):
    """Official VSSM count = backbone with outnorm3 (== classifier.norm) + Linear head."""
    return _n(m) + m.dims[-1] * num_classes + num_classes


@pytest.mark.parametrize('name,arch', [('vmamba_tiny_s1l8', 'tiny'), ('vmamba_small_s1l20', 'small'),
                                       ('vmamba_base_s1l20', 'base'),
                                       ('vanilla_vmamba_tiny', 'vanilla-tiny')])
def test_keys_and_params_match_official_manifest(name, arch):
    if not (FIX / 'vmamba_keys.json').is_file():
        pytest.skip(f'manifest not found in {FIX}')
    man = json.loads((FIX / 'vmamba_keys.json').read_text())[name]
    m = _meta(arch, out_indices=(3, ))
    ours = {k: list(v.shape) for k, v in m.state_dict().items() if not k.startswith('outnorm')}
    ref = {k: list(v) for k, v in man['state_dict'].items() if not k.startswith('classifier')}
    assert ours == ref
    assert _cls_params(m) == man['n_params']


def test_param_counts():
    assert _cls_params(_meta('tiny', out_indices=(3, ))) == 30_249_064
    assert _cls_params(_meta('tiny-s1l8', out_indices=(3, ))) == 30_249_064
    assert _cls_params(_meta('tiny-s2l5', out_indices=(3, ))) == 30_705_832
    assert _cls_params(_meta('vanilla-tiny', out_indices=(3, ))) == 22_893_448
    assert _n(_meta('tiny')) == 29_481_408  # MM_VSSM tiny detection backbone
    assert _cls_params(_meta('small', out_indices=(3, ))) == 49_012_840
    assert _cls_params(_meta('base', out_indices=(3, ))) == 86_614_504
    # README-rounded sizes of the remaining released models
    for arch, millions in [('small-s2l15', 50), ('base-s2l15', 89), ('vanilla-small', 44),
                           ('vanilla-base', 76)]:
        assert round(_cls_params(_meta(arch, out_indices=(3, ))) / 1e6) == millions, arch


# ------------------------------------------------------------------ forward/backward, shapes
def _small(name):
    """The named arch's family settings with tiny depths/dims (CPU-sized)."""
    cfg = dict(VMamba.arch_zoo[name])
    cfg.update(depths=[1, 1, 1, 1], dims=16)
    return cfg


@pytest.mark.parametrize('name', sorted(VMamba.arch_zoo))
def test_forward_backward_all_archs(name):
    torch.manual_seed(0)
    m = VMamba(arch=_small(name), drop_path_rate=0.1)
    m.init_weights()
    m.train()
    x = torch.randn(1, 3, 64, 96, requires_grad=True)
    outs = m(x)
    assert [tuple(o.shape) for o in outs] == [(1, 16 * 2 ** i, 16 // 2 ** i, 24 // 2 ** i)
                                              for i in range(4)]
    sum(o.float().pow(2).mean() for o in outs).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


@pytest.mark.parametrize('name', ['tiny', 'vanilla-tiny'])
def test_any_input_size(name):
    """Non-square, not a multiple of 32: stage i has ceil(H / 2**(i+2)) rows."""
    m = VMamba(arch=_small(name)).eval()
    h, w = 70, 45
    with torch.no_grad():
        outs = m(torch.randn(1, 3, h, w))
    exp_h, exp_w = [], []
    for i in range(4):
        exp_h.append(-(-h // 2 ** (i + 2)))
        exp_w.append(-(-w // 2 ** (i + 2)))
    assert [o.shape[-2:] for o in outs] == [torch.Size([a, b]) for a, b in zip(exp_h, exp_w)]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('layout', ['ln2d', 'ln'])
def test_z_gated_v2_and_k2_downsample(layout):
    """Other official v2 options: z-gated SS2D ('v05'), Conv k2 downsample ('v2'), odd sizes."""
    m = VMamba(arch=dict(depths=[1, 1, 1, 1], dims=16, forward_type='v05', downsample='v2',
                         norm_layer=layout)).eval()
    op = m.layers[0].blocks[0].op
    assert op.use_z and op.in_proj.weight.shape == (32, 16)
    assert m.layers[0].downsample[1].kernel_size == (2, 2)
    outs = m(torch.randn(1, 3, 50, 75))
    assert [tuple(o.shape[-2:]) for o in outs] == [(13, 19), (7, 10), (4, 5), (2, 3)]


def test_out_indices_and_layout():
    m = VMamba(arch=_small('tiny'), out_indices=(1, -1)).eval()
    assert m.channel_first and not VMamba(arch=_small('vanilla-tiny')).channel_first
    assert hasattr(m, 'outnorm1') and hasattr(m, 'outnorm3') and not hasattr(m, 'outnorm0')
    outs = m(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]
    assert all(o.is_contiguous() for o in outs)


def test_channels_last_path_equals_nchw():
    """Linear2d / LayerNorm2d on a channels-last map (the v2 fast path: one GEMM over the
    tokens, no permute copies) equal the NCHW results, and the map stays channels-last."""
    from mmssm.models.layers.ss2d import LayerNorm2d, Linear2d, is_channels_last
    lin, norm = Linear2d(12, 20), LayerNorm2d(12)
    x = torch.randn(2, 12, 5, 7)
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert is_channels_last(xcl) and not is_channels_last(x)
    y, ycl = lin(x), lin(xcl)
    assert is_channels_last(ycl) and not is_channels_last(y)
    torch.testing.assert_close(ycl, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ycl, F.conv2d(x, lin.weight[:, :, None, None], lin.bias),
                               rtol=1e-5, atol=1e-5)
    n, ncl = norm(x), norm(xcl)
    assert is_channels_last(ncl)
    torch.testing.assert_close(ncl, n)
    # the backbone runs channels-last inside and still returns NCHW-contiguous maps
    m = VMamba(arch=_small('tiny')).eval()
    x = torch.randn(1, 3, 64, 64)
    outs, outs_cl = m(x), m(x.contiguous(memory_format=torch.channels_last))
    for o, ocl in zip(outs, outs_cl):
        assert o.is_contiguous()
        torch.testing.assert_close(o, ocl)


def test_frozen_stages():
    m = VMamba(arch=_small('tiny'), frozen_stages=2)
    m.train()
    for mod in (m.patch_embed, m.layers[0], m.layers[1], m.outnorm0, m.outnorm1):
        assert not mod.training
        assert all(not p.requires_grad for p in mod.parameters())
    assert m.layers[2].training and all(p.requires_grad for p in m.layers[2].parameters())
    assert all(p.requires_grad for p in m.outnorm2.parameters())


def test_get_layer_depth():
    m = VMamba(arch=_small('tiny'))
    p = 'backbone.'
    assert m.get_layer_depth(p + 'patch_embed.0.weight', p) == (0, 6)
    assert m.get_layer_depth(p + 'layers.0.blocks.0.op.A_logs', p) == (1, 6)
    assert m.get_layer_depth(p + 'layers.0.downsample.1.weight', p) == (2, 6)
    assert m.get_layer_depth(p + 'layers.3.blocks.0.mlp.fc1.weight', p) == (4, 6)
    assert m.get_layer_depth(p + 'outnorm2.weight', p) == (3, 6)
    assert m.get_layer_depth('head.fc.weight', p) == (5, 6)


def test_official_init():
    torch.manual_seed(0)
    m = VMamba(arch=dict(depths=[1, 1, 1, 1], dims=64))
    m.init_weights()
    w = m.layers[0].blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.003
    assert torch.equal(m.layers[0].blocks[0].mlp.fc1.bias, torch.zeros_like(w[:, 0]))
    op = m.layers[0].blocks[0].op
    assert torch.equal(op.Ds, torch.ones_like(op.Ds))
    dt = F.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def test_drop_path_schedule():
    m = VMamba(arch=dict(depths=[1, 1, 2, 1], dims=16), drop_path_rate=0.4)
    assert m.layers[0].blocks[0].drop_path.__class__.__name__ == 'Identity'
    assert m.layers[3].blocks[0].drop_path.drop_prob == pytest.approx(0.4)
    assert VMamba(arch='tiny').arch_settings['drop_path_rate'] == 0.2


# ------------------------------------------------------------------ registries, errors
@pytest.mark.parametrize('registry', ['mmpretrain', 'mmdet', 'mmseg'])
def test_builds_from_downstream_registries(registry):
    reg = pytest.importorskip(f'{registry}.registry')
    m = reg.MODELS.build(dict(type='mmssm.VMamba', arch=_small('tiny'), out_indices=(0, 2)))
    assert isinstance(m, VMamba) and m.out_indices == [0, 2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch='huge'.*tiny"):
        VMamba(arch='huge')
    with pytest.raises(ValueError, match='lacks'):
        VMamba(arch=dict(dims=32))
    with pytest.raises(ValueError, match="unknown arch key.*'dim'"):
        VMamba(arch=dict(depths=[1, 1, 1, 1], dims=16, dim=3))
    with pytest.raises(ValueError, match="forward_type='v0' needs norm_layer='ln'"):
        VMamba(arch=dict(depths=[1, 1, 1, 1], dims=16, forward_type='v0'))
    with pytest.raises(ValueError, match='forward_type'):
        VMamba(arch=dict(depths=[1, 1, 1, 1], dims=16, forward_type='m0'))
    with pytest.raises(ValueError, match='out_indices.*valid: -4..3'):
        VMamba(arch=_small('tiny'), out_indices=(4, ))
    with pytest.raises(ValueError, match='frozen_stages=5'):
        VMamba(arch=_small('tiny'), frozen_stages=5)


@pytest.mark.parametrize('name', ['tiny', 'vanilla-tiny'])
def test_feeds_mmdet_fpn_under_bf16_autocast(name):
    """Dense contract end to end: NCHW maps into mmdet's FPN, mixed precision, backward."""
    det = pytest.importorskip('mmdet.registry')
    m = VMamba(arch=_small(name))
    neck = det.MODELS.build(dict(type='FPN', in_channels=m.dims, out_channels=8, num_outs=5))
    x = torch.randn(1, 3, 64, 80, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        pyramid = neck(m(x))
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    sum(p.float().mean() for p in pyramid).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
