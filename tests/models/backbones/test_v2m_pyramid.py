"""V2MPyramid (V2M-S*/B*): sizes, dense-prediction contract, weights, registries."""
import pytest
import torch
import torch.nn.functional as F

import mmssm  # noqa: F401
from mmssm.models.backbones import V2MPyramid, VMamba
from mmssm.models.layers import V2MMixer2D
from mmssm.registry import MODELS

TINY = dict(depths=[1, 1, 1, 1], dims=16)


def _small(name):
    cfg = dict(V2MPyramid.arch_zoo[name])
    cfg.update(TINY)
    return cfg


def _cls_params(arch):
    """Counted like the paper/VMamba: backbone with the last norm + 1000-class head."""
    with torch.device('meta'):
        m = V2MPyramid(arch=arch, out_indices=(3, ))
    return sum(p.numel() for p in m.parameters()) + m.dims[-1] * 1000 + 1000


@pytest.mark.parametrize('arch,paper', [('small', 30e6), ('base', 50e6)])
def test_param_counts_near_paper(arch, paper):
    n = _cls_params(arch)
    assert abs(n - paper) / paper < 0.05, (arch, n)
    assert n == {'small': 29_566_216, 'base': 48_193_384}[arch]


def test_uses_v2m_mixer_on_vmamba_skeleton():
    with torch.device('meta'):
        m = V2MPyramid(arch='small')
        v = VMamba(arch='tiny')
    blocks = [b for layer in m.layers for b in layer.blocks]
    assert len(blocks) == 14 and all(isinstance(b.op, V2MMixer2D) for b in blocks)
    assert blocks[0].op.corners == ('ul', 'lr', 'ur', 'll') and blocks[0].op.d_state == 1
    # same stem / downsample / output-norm keys and shapes as VMamba-T
    skeleton = lambda sd: {k: v.shape for k, v in sd.items() if '.blocks.' not in k}  # noqa: E731
    assert skeleton(m.state_dict()) == skeleton(v.state_dict())
    assert m.dims == [96, 192, 384, 768] and not m.channel_first


@pytest.mark.parametrize('name', ['small', 'base'])
def test_forward_backward(name):
    torch.manual_seed(0)
    m = V2MPyramid(arch=_small(name), drop_path_rate=0.1)
    m.init_weights()
    m.train()
    x = torch.randn(1, 3, 64, 96, requires_grad=True)
    outs = m(x)
    assert [tuple(o.shape) for o in outs] == [(1, 16 * 2 ** i, 16 // 2 ** i, 24 // 2 ** i)
                                              for i in range(4)]
    sum(o.pow(2).mean() for o in outs).backward()
    assert x.grad.abs().sum() > 0
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


def test_any_input_size_and_corner_locality():
    m = V2MPyramid(arch=dict(TINY, corners=1)).eval()  # one corner: causal from upper-left
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        outs = m(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(18, 12), (9, 6), (5, 3), (3, 2)]
    # upper-left scan only: changing the bottom-right pixels leaves stage-0
    # outputs far from them untouched (row/column passes look back only)
    x2 = x.clone()
    x2[..., 60:, 35:] += 1
    with torch.no_grad():
        o2 = m(x2)[0]
    assert torch.allclose(outs[0][..., :10, :6], o2[..., :10, :6], atol=1e-6)
    assert not torch.allclose(outs[0][..., -2:, -2:], o2[..., -2:, -2:])


def test_out_indices_frozen_stages_layer_depth():
    m = V2MPyramid(arch=TINY, out_indices=(2, 3), frozen_stages=1)
    m.train()
    assert not hasattr(m, 'outnorm0') and hasattr(m, 'outnorm2')
    assert not m.layers[0].training and all(not p.requires_grad for p in m.layers[0].parameters())
    assert all(p.requires_grad for p in m.layers[1].parameters())
    assert [o.shape[1] for o in m(torch.randn(1, 3, 64, 64))] == [64, 128]
    assert m.get_layer_depth('backbone.layers.1.blocks.0.op.A_log', 'backbone.') == (2, 6)


def test_init_keeps_dt_init():
    torch.manual_seed(0)
    m = V2MPyramid(arch=dict(TINY, dims=32))
    m.init_weights()
    op = m.layers[0].blocks[0].op
    for proj in (op.dt_proj, op.dt_proj_2):  # Mamba dt range, not zeroed by the Linear init
        dt = F.softplus(proj.bias)
        assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    w = m.layers[0].blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.004


def test_checkpoint_round_trip_through_init_cfg(tmp_path):
    """An mmdet-style checkpoint of the backbone loads (backbone. prefix, head dropped)."""
    torch.manual_seed(0)
    src = V2MPyramid(arch=TINY).eval()
    sd = {f'backbone.{k}': v for k, v in src.state_dict().items()}
    sd['neck.conv.weight'] = torch.zeros(1)
    path = tmp_path / 'v2m_pyramid_det.pth'
    torch.save({'state_dict': sd}, path)
    dst = MODELS.build(dict(type='mmssm.V2MPyramid', arch=TINY,
                            init_cfg=dict(type='Pretrained', checkpoint=str(path)))).eval()
    dst.init_weights()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('registry', ['mmpretrain', 'mmdet', 'mmseg'])
def test_builds_from_downstream_registries(registry):
    reg = pytest.importorskip(f'{registry}.registry')
    m = reg.MODELS.build(dict(type='mmssm.V2MPyramid', arch=TINY, out_indices=(1, 3)))
    assert isinstance(m, V2MPyramid) and m.out_indices == [1, 3]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch='tiny'.*'base', 'small'"):
        V2MPyramid(arch='tiny')
    with pytest.raises(ValueError, match="unknown arch key.*'ssm_ratio'"):
        V2MPyramid(arch=dict(TINY, ssm_ratio=2.0))
    with pytest.raises(ValueError, match='corners'):
        V2MPyramid(arch=dict(TINY, corners=5))
    with pytest.raises(ValueError, match="norm_layer must be 'ln'"):
        V2MPyramid(arch=dict(TINY, norm_layer='ln2d'))
    with pytest.raises(ValueError, match='out_indices'):
        V2MPyramid(arch=TINY, out_indices=(0, 7))
    with pytest.raises(ValueError, match='frozen_stages=-2'):
        V2MPyramid(arch=TINY, frozen_stages=-2)


def test_feeds_mmseg_uperhead():
    seg = pytest.importorskip('mmseg.registry')
    m = V2MPyramid(arch=TINY).eval()
    head = seg.MODELS.build(dict(type='UPerHead', in_channels=m.dims, in_index=[0, 1, 2, 3],
                                 channels=8, pool_scales=(1, 2), num_classes=3,
                                 norm_cfg=dict(type='BN'), align_corners=False)).eval()
    with torch.no_grad():
        logits = head(m(torch.randn(1, 3, 64, 96)))
    assert logits.shape == (1, 3, 16, 24) and torch.isfinite(logits).all()
