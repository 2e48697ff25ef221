"""Malicious and unusual checkpoints for the security tests.

The payload is ``os.makedirs(<tmp>/PWNED)``: harmless, and the directory shows whether
it ran. Every refused load must leave no such directory behind.
"""
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# the official fixtures: beside the checkout (main), or two levels up (worktrees)
FIXTURES = next((p / 'fixtures' / 'official' for p in (REPO / 'shared', REPO.parent / 'shared',
                                                       REPO.parent.parent / 'shared')
                 if (p / 'fixtures' / 'official').is_dir()), None)


class Payload:
    """Unpickling this calls ``func(*args)``; by default it makes the directory ``path``."""

    def __init__(self, path, func=os.makedirs, args=None):
        self.func, self.args = func, (str(path), ) if args is None else args

    def __reduce__(self):
        return self.func, self.args


def malicious(path: Path, where: str, pwned: Path, state_dict=None) -> Path:
    """Write a checkpoint with the payload at ``where``: top, meta, optimizer or nested."""
    sd = dict(state_dict or {'w': torch.zeros(2)})
    p = Payload(pwned)
    ckpt = dict(state_dict=sd, meta=dict(epoch=1))
    if where == 'top':
        ckpt['state_dict']['evil'] = p
    elif where == 'meta':
        ckpt['meta']['hook_msgs'] = p
    elif where == 'optimizer':
        ckpt['optimizer'] = dict(state={0: dict(step=torch.tensor(1.0), exp_avg=p)},
                                 param_groups=[dict(lr=0.1, params=[0])])
    elif where == 'nested':
        ckpt['meta']['history'] = [1, [2.0, ('x', [p])]]
    else:
        raise ValueError(where)
    torch.save(ckpt, path)
    return path


VARIANTS = ('top', 'meta', 'optimizer', 'nested')


@pytest.fixture
def pwned(tmp_path):
    """Where the payload would create a directory; asserts afterwards that it did not."""
    path = tmp_path / 'PWNED'
    yield path
    assert not path.exists(), 'the checkpoint payload ran'


def with_date(path: Path, state_dict=None) -> Path:
    """A benign checkpoint that needs a global outside the allowlist (datetime.date)."""
    torch.save(dict(state_dict=dict(state_dict or {}),
                    meta=dict(saved=datetime.date(2024, 1, 2))), path)
    return path


@pytest.fixture(scope='session')
def tiny_env(tmp_path_factory):
    """Environment for tools/*.py on a tiny ImageNet-layout set."""
    root = tmp_path_factory.mktemp('tiny_data')
    subprocess.run([sys.executable, str(REPO / 'tools/misc/make_tiny_datasets.py'), '--out',
                    str(root), '--tasks', 'imagenet'], check=True, capture_output=True)
    env = dict(os.environ, MMSSM_TINY_DATA=str(root), OMP_NUM_THREADS='1')
    env.pop('MMSSM_TRUSTED_CHECKPOINTS', None)
    env['PYTHONPATH'] = f'{REPO}{os.pathsep}{env.get("PYTHONPATH", "")}'
    return env


CLS_CONFIG = 'configs/vim/vim_in1k_tiny.py'


def run_tool(env, *args, timeout=300):
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr
