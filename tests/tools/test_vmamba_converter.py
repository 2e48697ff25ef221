"""tools/model_converters/vmamba2mmssm.py: official VMamba checkpoints -> mmssm."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmssm  # noqa: F401
from mmssm.registry import MODELS

REPO = Path(__file__).resolve().parents[2]
FIX = REPO.parent / 'shared' / 'fixtures' / 'official' / 'vmamba'
TOOL = REPO / 'tools' / 'model_converters' / 'vmamba2mmssm.py'
pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f'official fixtures not found at {FIX}')
ARCH_A1 = dict(depths=[1, 1, 2, 1], dims=32, d_state=1, ssm_ratio=1.0)


def _tool():
    spec = importlib.util.spec_from_file_location('vmamba2mmssm', TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fixture():
    return torch.load(FIX / 'vmamba_v2_tiny_cfg_a.pt', weights_only=True)


def test_cli_official_training_checkpoint_to_backbone(tmp_path):
    pytest.importorskip('yacs')
    dst = tmp_path / 'vmamba_mmssm.pth'
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    src = str(FIX / 'vmamba_v2_tiny_cfg_a_official_format.pth')
    res = subprocess.run([sys.executable, str(TOOL), src, str(dst), '--key', 'model_ema',
                          '--arch', 'tiny'], capture_output=True, text=True, env=env)
    # arch 'tiny' is full-size: the tiny fixture must be refused, with the reason
    assert res.returncode != 0 and 'mismatched' in res.stdout + res.stderr
    assert not dst.exists()

    res = subprocess.run([sys.executable, str(TOOL), src, str(dst), '--key', 'model_ema',
                          '--arch', json.dumps(ARCH_A1)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert 'coverage of VMamba' in res.stdout and '100.0%' in res.stdout
    out = torch.load(dst, weights_only=True)['state_dict']
    _, report = _tool().convert(torch.load(src, weights_only=False), key='model_ema', arch=ARCH_A1)
    assert report['coverage'] == 1.0 and not report['missing'] and not report['unexpected']
    assert report['new_outnorm'] == [f'outnorm{i}.{p}' for i in range(4) for p in ('weight', 'bias')]
    assert sorted(report['dropped']) == sorted(k for k in _fixture()['state_dict'] if k.startswith('classifier'))
    m = MODELS.build(dict(type='mmssm.VMamba', arch=ARCH_A1,
                          init_cfg=dict(type='Pretrained', checkpoint=str(dst))))
    m.init_weights()
    ref = _fixture()['state_dict']
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items() if not k.startswith('outnorm'))


def test_head_mode_gives_official_logits_in_mmpretrain(tmp_path):
    """--head: an mmpretrain ImageClassifier reproduces the official VSSM logits."""
    pytest.importorskip('mmpretrain')
    from mmpretrain.registry import MODELS as PRETRAIN
    d = _fixture()
    out, _ = _tool().convert({'model': d['state_dict']}, with_head=True, arch=ARCH_A1)
    clf = PRETRAIN.build(dict(
        type='ImageClassifier',
        backbone=dict(type='mmssm.VMamba', arch=ARCH_A1, out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=256)))
    clf.load_state_dict(out, strict=True)
    with torch.no_grad():
        logits = clf.eval()(d['input'], mode='tensor')
    assert (logits - d['output']).abs().max() < 1e-4 * max(1, d['output'].abs().max())


def test_detector_checkpoint_keeps_neck_and_heads():
    d = _fixture()
    det = {f'backbone.{k}': v for k, v in d['state_dict'].items() if not k.startswith('classifier')}
    det.update({f'backbone.{k}': v for k, v in d['det_state_dict'].items()})
    det['neck.fpn_convs.0.conv.weight'] = torch.ones(2, 2, 3, 3)
    det['rpn_head.rpn_conv.bias'] = torch.ones(2)
    out, report = _tool().convert({'state_dict': det, 'meta': {}}, arch=ARCH_A1)
    assert report['coverage'] == 1.0 and not report['new_outnorm'] and report['other_keys'] == 2
    assert torch.equal(out['neck.fpn_convs.0.conv.weight'], det['neck.fpn_convs.0.conv.weight'])
    assert set(out) == set(det)


def test_legacy_and_root_file_names():
    """Pre-refactor names and the root vmamba.py grouped-conv layout map onto ours."""
    sd = dict(_fixture()['state_dict'])
    legacy = {}
    for k, v in sd.items():
        k2 = k.replace('patch_embed.0.', 'patch_embed.proj.').replace('.blocks.0.norm.', '.blocks.0.ln_1.')
        if k.endswith('op.x_proj_weight'):
            k2, v = k.replace('x_proj_weight', 'x_proj.weight'), v.reshape(-1, v.shape[-1], 1)
        legacy[k2] = v
    out, report = _tool().convert(legacy, arch=ARCH_A1)
    assert report['coverage'] == 1.0 and not report['mismatched'] and not report['unexpected']
    assert torch.equal(out['backbone.layers.2.blocks.1.op.x_proj_weight'],
                       sd['layers.2.blocks.1.op.x_proj_weight'])
