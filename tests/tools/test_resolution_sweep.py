"""tools/analysis_tools/resolution_sweep.py on the tiny ImageNet-style set (CPU)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    subprocess.run([sys.executable, str(REPO / 'tools/misc/make_tiny_datasets.py'), '--out',
                    str(root), '--tasks', 'imagenet'], check=True, capture_output=True)
    return root


def run_sweep(args, tiny_root):
    env = dict(os.environ, OMP_NUM_THREADS='1', MMSSM_TINY_DATA=str(tiny_root),
               PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    res = subprocess.run([sys.executable, 'tools/analysis_tools/resolution_sweep.py', *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def check_png(path):
    img = np.asarray(Image.open(path).convert('RGB'))
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 10


def test_retarget_pipeline_keeps_ratio():
    from resolution_sweep import retarget_pipeline
    pipe = [dict(type='LoadImageFromFile'), dict(type='ResizeEdge', scale=256, edge='short'),
            dict(type='CenterCrop', crop_size=224), dict(type='PackInputs')]
    out = retarget_pipeline(pipe, 112)
    assert out[1] == dict(type='ResizeEdge', scale=128, edge='short')
    assert out[2] == dict(type='CenterCrop', crop_size=112)
    assert pipe[1]['scale'] == 256  # input untouched
    # no crop: one is added before PackInputs
    out = retarget_pipeline([dict(type='LoadImageFromFile'), dict(type='PackInputs')], 40)
    assert out[1] == dict(type='CenterCrop', crop_size=40)


def test_accuracy_mode(tiny_root, tmp_path):
    log = run_sweep(['configs/vim/vim_in1k_tiny.py', 'none', '--sizes', '64', '32', '48',
                     '--out-dir', str(tmp_path)], tiny_root)
    assert 'top-1' in log
    with open(tmp_path / 'resolution_sweep.csv') as f:
        rows = list(csv.DictReader(f))
    n_val = sum(1 for p in (tiny_root / 'imagenet' / 'val').rglob('*') if p.is_file())
    assert list(rows[0]) == ['size', 'top1', 'n_images']
    assert [int(r['size']) for r in rows] == [32, 48, 64]
    for r in rows:
        assert int(r['n_images']) == n_val
        # top-1 is a whole number of correct images out of n_val
        k = float(r['top1']) * n_val / 100
        assert 0 <= k <= n_val and abs(k - round(k)) < 1e-3
    check_png(tmp_path / 'resolution_sweep.png')


def test_stability_mode(tiny_root, tmp_path):
    run_sweep(['configs/vmamba/vmamba_in1k_tiny.py', 'none', '--mode', 'stability', '--sizes',
               '32', '64', '96', '--num-images', '4', '--out-dir', str(tmp_path)], tiny_root)
    with open(tmp_path / 'resolution_sweep.csv') as f:
        rows = {int(r['size']): r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == ['size', 'cos_sim_mean', 'cos_sim_std', 'ref_size',
                                               'n_images']
    assert rows[64]['ref_size'] == '64' and rows[64]['n_images'] == '4'
    assert abs(float(rows[64]['cos_sim_mean']) - 1) < 1e-5   # the training size itself
    for s in (32, 96):
        assert -1 <= float(rows[s]['cos_sim_mean']) < 0.9999
    check_png(tmp_path / 'resolution_sweep.png')


def test_model_gets_the_configs_data_preprocessor():
    """mmpretrain configs keep data_preprocessor at the top level (the Runner
    merges it into the model); without it predictions use unnormalised pixels."""
    import torch
    from _model_utils import build_model, load_config
    cfg = load_config(str(REPO / 'configs/vim/vim_in1k_tiny.py'))
    model = build_model(cfg, init=False)
    mean = torch.tensor(cfg.data_preprocessor.mean).view(-1)
    assert torch.allclose(model.data_preprocessor.mean.view(-1), mean)
    assert model.data_preprocessor.to_rgb == cfg.data_preprocessor.get('to_rgb')
