"""Official-layout ConvNeXt-S4ND checkpoints convert and load exactly."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO.parent / 'shared' / 'fixtures' / 'official' / 's4nd' / 'convnext_s4nd_keys.json'
sys.path.insert(0, str(REPO / 'tools' / 'model_converters'))


def official_like(model, generator):
    """An official Lightning-style file: `model.` prefix, classifier under head.*."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith('norm3.'):
            k = 'head.norm.' + k[len('norm3.'):]
        if v.is_floating_point():
            v = torch.randn(v.shape, generator=generator)
        sd['model.' + k] = v
    sd['model.head.fc.weight'] = torch.randn(1000, 768, generator=generator)
    sd['model.head.fc.bias'] = torch.randn(1000, generator=generator)
    return {'state_dict': sd, 'epoch': 3, 'hyper_parameters': {'lr': 4e-3}}


def test_official_manifest_keys_convert_and_reload(tmp_path):
    from convnext_s4nd2mmssm import convert
    from mmssm.models.backbones import ConvNeXtS4ND
    if not MANIFEST.exists():
        pytest.skip(f'{MANIFEST} not found')
    official = json.loads(MANIFEST.read_text())['convnext_s4nd_tiny_2d']['state_dict']
    model = ConvNeXtS4ND(arch='tiny', img_size=224, out_indices=(3, ))
    ckpt = official_like(model, torch.Generator().manual_seed(0))
    # the file we build has exactly the official key set
    assert {k[len('model.'):] for k in ckpt['state_dict']} == set(official)
    src, dst = tmp_path / 'official.ckpt', tmp_path / 'mmssm.pth'
    torch.save(ckpt, src)
    report = convert(str(src), str(dst), arch='tiny', img_size=224)
    assert report['coverage'] == 1.0
    out = torch.load(dst, weights_only=False)['state_dict']
    assert torch.equal(out['backbone.norm3.weight'], ckpt['state_dict']['model.head.norm.weight'])
    assert torch.equal(out['head.fc.weight'], ckpt['state_dict']['model.head.fc.weight'])
    # and the output loads through the user-facing init_cfg path, exactly
    fresh = ConvNeXtS4ND(arch='tiny', img_size=224, out_indices=(3, ),
                         init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    fresh.init_weights()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, out['backbone.' + k]), k


def test_cli_inflates_to_video(tmp_path):
    from mmssm.models.backbones import ConvNeXtS4ND
    small = dict(depths=[1, 1, 1, 1], dims=[16, 32, 64, 128])
    model = ConvNeXtS4ND(arch=small, img_size=32)
    sd = {k: v for k, v in model.state_dict().items()}
    src, dst = tmp_path / 'sd2d.pth', tmp_path / 'video.pth'
    torch.save(sd, src)
    # small archs are reachable through the Python API; the CLI takes named archs
    from convnext_s4nd2mmssm import convert
    report = convert(str(src), str(dst), arch=small, video=(4, 32, 32))
    assert report['coverage'] >= 0.9
    out = torch.load(dst, weights_only=False)['state_dict']
    spatial = [k for k in sd if '.kernel.1.' in k and k.startswith('stages.0.blocks.0.')]
    assert spatial and all(
        torch.equal(out['backbone.' + k.replace('.kernel.1.', '.kernel.2.')], sd[k])
        for k in spatial)
    r = subprocess.run([sys.executable, str(REPO / 'tools/model_converters/convnext_s4nd2mmssm.py'),
                        '--help'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and '--video' in r.stdout
