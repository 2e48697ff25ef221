"""`--launcher slurm` without CUDA: srun's SLURM_* variables -> torch.distributed's env:// ones.

mmengine 0.10.7's own slurm init (``mmengine.dist.utils._init_dist_slurm``) does the same
translation but then calls ``torch.cuda.set_device``, so on CPU nodes tools/_runner_utils.py
initialises gloo itself, as it does for the pytorch launcher. On GPU nodes mmengine's path runs.
"""
import os
import re
import shutil
import subprocess
from typing import MutableMapping, Optional

REQUIRED = ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST')


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, e.g. ``'gpu[07-09,12],cpu1'`` -> ``'gpu07'``.

    ``scontrol show hostnames`` is the authority where it exists; without it the first entry is
    expanded here (prefix + first number of its bracket, zero padding kept).
    """
    if shutil.which('scontrol'):
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True,
                             text=True, check=True).stdout.split()
        if out:
            return out[0]
    match = re.match(r'([^,\[]+)(?:\[(\d+))?', nodelist.strip())
    if match is None:
        raise ValueError(f'SLURM_NODELIST={nodelist!r} is not a Slurm node list')
    return match.group(1) + (match.group(2) or '')


def export_torch_env_from_slurm(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from srun's variables.

    MASTER_ADDR and MASTER_PORT that are already set win (default port 29500, as mmengine).
    """
    env = os.environ if environ is None else environ
    missing = [k for k in REQUIRED if k not in env]
    if missing:
        raise RuntimeError(
            f'--launcher slurm needs {", ".join(REQUIRED)} (srun sets them); missing '
            f'{", ".join(missing)}. Start the job with tools/slurm_train.sh / slurm_test.sh '
            'or srun, or use --launcher pytorch (tools/dist_train.sh).')
    env['RANK'] = str(int(env['SLURM_PROCID']))
    env['WORLD_SIZE'] = str(int(env['SLURM_NTASKS']))
    env['LOCAL_RANK'] = str(int(env.get('SLURM_LOCALID', '0')))
    env.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in env:
        env['MASTER_ADDR'] = first_host(env['SLURM_NODELIST'])
