"""tools/visualization/erf.py: ERF maps and the side-by-side PNG."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools' / 'visualization'))
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))


class ConvNet(nn.Module):
    """A 'model' whose backbone is two 3x3 convs: receptive field 5x5."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))


def test_erf_map_support_is_the_receptive_field():
    from erf import area_ratios, erf_map
    torch.manual_seed(0)
    m = erf_map(ConvNet(), torch.randn(3, 3, 16, 12), stage=-1, batch=2)
    assert m.shape == (16, 12)
    nz = np.argwhere(m > 0)
    assert nz.min(0).tolist() == [8 - 2, 6 - 2] and nz.max(0).tolist() == [8 + 2, 6 + 2]
    assert (m > 0).sum() == 25
    r = area_ratios(m)
    assert r[0] <= r[1] <= r[2] <= 25 / (16 * 12) + 1e-9


def test_erf_cli_two_models(tmp_path):
    img_dir = tmp_path / 'imgs'
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img_dir / f'{i}.png')
    out = tmp_path / 'erf.png'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    res = subprocess.run([sys.executable, 'tools/visualization/erf.py',
                          'configs/vmamba/vmamba_in1k_tiny.py', 'configs/vim/vim_in1k_tiny.py',
                          '--labels', 'VMamba', 'Vim', '--images', str(img_dir), '--num-images', '2',
                          '--shape', '32', '--out', str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '2 images from' in res.stdout
    rows = re.findall(r'^\| (VMamba|Vim) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$', res.stdout, re.M)
    assert [r[0] for r in rows] == ['VMamba', 'Vim']
    for _, a, b, c in rows:
        assert 0 < float(a) <= float(b) <= float(c) <= 1
    img = np.asarray(Image.open(out).convert('RGB'))
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 100  # two panels side by side
    assert img.std() > 10


class ChannelNormed(nn.Module):
    """conv then a per-position LayerNorm over channels (VMamba's out norms)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Permuted(nn.LayerNorm(8)))


class Permuted(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_erf_of_layernormed_output_is_not_zero():
    """sum_c of a LayerNorm-ed feature is constant: the map needs the ReLU."""
    from erf import erf_map
    torch.manual_seed(0)
    m = erf_map(ChannelNormed(), torch.randn(2, 3, 9, 9))
    assert (m > 1e-3).sum() == 9  # the 3x3 conv window around the centre
