"""Shared helpers of the reliability tests: tiny backbones of every family, tool runs."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

import mmssm  # noqa: F401  (checkpoint loader, atomic writes)
from mmssm.models.backbones.convnext_s4nd import ConvNeXtS4ND
from mmssm.models.backbones.v2m import V2M
from mmssm.models.backbones.v2m_pyramid import V2MPyramid
from mmssm.models.backbones.vim import Vim
from mmssm.models.backbones.vmamba import VMamba

REPO = Path(__file__).resolve().parents[2]

_PLAIN = dict(arch=dict(embed_dims=16, num_layers=2), img_size=32, patch_size=8, stride=8,
              out_type='featmap', out_indices=(0, 1))
_V0 = dict(depths=[1, 1, 1, 1], dims=8, d_state=4, ssm_ratio=2.0, forward_type='v0',
           mlp_ratio=0.0, downsample='v1', patch_embed='v1', norm_layer='ln', conv_bias=True)
_S4ND = dict(arch=dict(depths=[1, 1, 1, 1], dims=[8, 16, 16, 16]), img_size=32,
             stem_channels=8, layer_cfg=dict(d_state=8), out_indices=(0, 1, 2, 3))

# name -> (builder(**kwargs), stride of each output, #layers/stages for out_indices/frozen_stages)
FAMILIES: Dict[str, Tuple[Callable, List[int], int]] = {
    'vim': (lambda **kw: Vim(**{**_PLAIN, **kw}), [8, 8], 2),
    'v2m': (lambda **kw: V2M(**{**_PLAIN, **kw}), [8, 8], 2),
    'v2m_local': (lambda **kw: V2M(local_window=True, **{**_PLAIN, **kw}), [8, 8], 2),
    'vmamba_v2': (lambda **kw: VMamba(arch=dict(depths=[1, 1, 1, 1], dims=8), **kw),
                  [4, 8, 16, 32], 4),
    'vmamba_v0': (lambda **kw: VMamba(arch=_V0, **kw), [4, 8, 16, 32], 4),
    'v2m_pyramid': (lambda **kw: V2MPyramid(arch=dict(depths=[1, 1, 1, 1], dims=8), **kw),
                    [4, 8, 16, 32], 4),
    'convnext_s4nd': (lambda **kw: ConvNeXtS4ND(**{**_S4ND, **kw}), [4, 8, 16, 32], 4),
}
NAMES = list(FAMILIES)
# ConvNeXt-S4ND floors at every pooling (as ConvNeXt); the SSM families pad (ceil)
FLOOR = {'convnext_s4nd'}


def build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name][0](**kw)


def expected_hw(name: str, h: int, w: int) -> List[Tuple[int, int]]:
    rnd = (lambda a, s: a // s) if name in FLOOR else (lambda a, s: math.ceil(a / s))
    return [(rnd(h, s), rnd(w, s)) for s in FAMILIES[name][1]]


# ----------------------------------------------------------------- tool runs
def tiny_env(root: Path) -> dict:
    """Environment for tools/*.py on the tiny datasets in ``root`` (made if missing)."""
    if not (root / 'imagenet').is_dir():
        subprocess.run([sys.executable, str(REPO / 'tools/misc/make_tiny_datasets.py'), '--out',
                        str(root), '--tasks', 'coco', 'ade', 'imagenet', 'video'], check=True,
                       capture_output=True)
    env = dict(os.environ, MMSSM_TINY_DATA=str(root), OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = f'{REPO}{os.pathsep}{env.get("PYTHONPATH", "")}'
    return env


def train_cmd(config: str, work_dir: Path, iters: int, *extra: str, ckpt_interval: int = 4,
              options: Tuple[str, ...] = (), val: bool = True) -> List[str]:
    """tools/train.py on the tiny data: seed 0, deterministic, every checkpoint kept;
    validation once at the end (none with ``val=False``)."""
    no_val = () if val else ('val_cfg=None', 'val_dataloader=None', 'val_evaluator=None')
    return [sys.executable, 'tools/train.py', config, '--work-dir', str(work_dir),
            '--cfg-options', f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            *no_val,
            f'default_hooks.checkpoint.interval={ckpt_interval}',
            'default_hooks.checkpoint.max_keep_ckpts=100', 'randomness.seed=0',
            'randomness.deterministic=True', *options, *extra]


def run_train(config: str, work_dir: Path, env: dict, iters: int, *extra: str,
              timeout: int = 600, **kw) -> str:
    out = subprocess.run(train_cmd(config, work_dir, iters, *extra, **kw), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


_ITER_LOSS = re.compile(r'Iter\(train\) \[\s*(\d+)/\d+\].*?\bloss: ([-\d.naninf]+)')


def losses(log: str) -> Dict[int, str]:
    """{iteration: the logged total loss string} from a training log (train lines only)."""
    return {int(i): v for i, v in _ITER_LOSS.findall(log)}


def state_dict_of(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location='cpu', weights_only=False)['state_dict']
