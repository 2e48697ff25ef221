"""Checkpoint loading on torch>=2.6 and the early version errors."""
import argparse

import numpy as np
import pytest
import torch

import mmssm  # noqa: F401
from mmssm.utils import compat


def test_local_loader_reads_namespace_and_numpy(tmp_path):
    from mmengine.runner import CheckpointLoader
    path = tmp_path / 'official_like.pth'
    sd = {'w': torch.arange(3.)}
    torch.save({'model': sd, 'args': argparse.Namespace(lr=1e-3),
                'meta': {'np': np.float64(1.5), 'arr': np.ones(2)}}, path)
    with pytest.raises(Exception):  # torch's own default refuses it
        torch.load(path)
    ckpt = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert ckpt['args'].lr == 1e-3
    assert torch.equal(ckpt['model']['w'], sd['w'])


def test_missing_and_corrupt_checkpoints_are_named(tmp_path):
    from mmengine.runner import CheckpointLoader
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'nope.pth'))
    bad = tmp_path / 'truncated.pth'
    torch.save({'w': torch.randn(1000)}, bad)
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(RuntimeError, match='truncated.pth'):
        CheckpointLoader.load_checkpoint(str(bad))


@pytest.mark.parametrize('dist,version,match', [
    ('mmcv', '2.2.0', 'mmcv>=2.0.0rc4,<2.2.0'),
    ('setuptools', '81.0.0', 'setuptools>=77.0.3,<81'),
])
def test_out_of_matrix_versions_fail_early(monkeypatch, dist, version, match):
    real = compat._version
    monkeypatch.setattr(compat, '_version',
                        lambda name: version if name == dist else real(name))
    with pytest.raises(ImportError, match=match.replace('(', r'\(').replace('.', r'\.')):
        compat.check_environment()


def test_installed_matrix_passes():
    compat.check_environment()
    compat.check_mmcv_ops()
