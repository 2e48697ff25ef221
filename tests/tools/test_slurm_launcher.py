"""`--launcher slurm` of tools/train.py without a cluster, and tools/slurm_*.sh (issue 16, part 5).

Two processes get the variables srun gives each task (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_NODELIST, ...) and train over gloo, as on a CPU partition.
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools'))
from _slurm import export_torch_env_from_slurm, first_host  # noqa: E402


@pytest.mark.parametrize('nodelist,host', [
    ('node7', 'node7'), ('gpu[07-09,12]', 'gpu07'), ('gpu[3,5],cpu1', 'gpu3'),
    ('a-b.c,d', 'a-b.c')])
def test_first_host_of_a_node_list(nodelist, host, monkeypatch):
    monkeypatch.setenv('PATH', '')  # no scontrol: our own expansion
    assert first_host(nodelist) == host


def test_export_translates_srun_variables():
    env = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '1',
           'SLURM_NODELIST': 'n[10-11]', 'MASTER_PORT': '1234'}
    export_torch_env_from_slurm(env)
    assert (env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK']) == ('5', '8', '1')
    assert env['MASTER_PORT'] == '1234' and env['MASTER_ADDR'] == 'n10'


def test_export_names_missing_variables():
    with pytest.raises(RuntimeError, match='missing SLURM_NTASKS, SLURM_NODELIST'):
        export_torch_env_from_slurm({'SLURM_PROCID': '0'})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_train_py_slurm_launcher_two_gloo_processes(tmp_path):
    data = tmp_path / 'tiny'
    subprocess.run([sys.executable, str(REPO / 'tools/misc/make_tiny_datasets.py'), '--out',
                    str(data), '--tasks', 'imagenet'], check=True, capture_output=True)
    base = {k: v for k, v in os.environ.items()
            if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')}
    base.update(MMSSM_TINY_DATA=str(data), MASTER_PORT=str(free_port()),
                PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}',
                SLURM_NTASKS='2', SLURM_NNODES='1', SLURM_NODELIST='localhost',
                SLURM_JOB_ID='4242', SLURM_JOB_NAME='mmssm-test')
    cmd = [sys.executable, 'tools/train.py', 'configs/vim/vim_in1k_tiny.py', '--launcher',
           'slurm', '--work-dir', str(tmp_path / 'work'), '--cfg-options',
           'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
           'default_hooks.checkpoint.interval=2']
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    rank0 = logs[0]
    assert 'Distributed launcher: slurm' in rank0 and 'Distributed training: True' in rank0
    assert 'GPU number: 2' in rank0  # mmengine's name for the world size
    # one gloo group of two: only rank 0 logs iterations (rank 1 knows it is rank 1)
    assert 'Iter(train)' not in logs[1]
    assert re.search(r'Iter\(train\) \[2/2\]', rank0)
    assert re.search(r'accuracy/top1: [\d.]+', rank0)
    assert (tmp_path / 'work' / 'iter_2.pth').exists()


@pytest.mark.parametrize('script', ['slurm_train.sh', 'slurm_test.sh'])
def test_slurm_scripts_pass_the_conventional_arguments(script, tmp_path):
    """A stand-in `srun` on PATH records what the script would run on the cluster."""
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'srun').write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    (fake / 'srun').chmod(0o755)
    env = dict(os.environ, PATH=f'{fake}{os.pathsep}{os.environ["PATH"]}', GPUS='16',
               GPUS_PER_NODE='8', CPUS_PER_TASK='6', SRUN_ARGS='--quotatype=auto',
               SRUN_LOG=str(tmp_path / 'srun.txt'))
    run = subprocess.run(['bash', f'tools/{script}', 'part1', 'job1', 'cfg.py', 'DIR_OR_CKPT',
                          '--cfg-options', 'a=1'], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / 'srun.txt').read_text().split('\n')
    for expected in ('-p', 'part1', '--job-name=job1', '--gres=gpu:8', '--ntasks=16',
                     '--ntasks-per-node=8', '--cpus-per-task=6', '--quotatype=auto',
                     'cfg.py', '--launcher=slurm', '--cfg-options', 'a=1'):
        assert expected in args, (expected, args)
    tool = 'train.py' if script == 'slurm_train.sh' else 'test.py'
    assert any(a.endswith(f'tools/{tool}') for a in args)
    assert ('--work-dir=DIR_OR_CKPT' if tool == 'train.py' else 'DIR_OR_CKPT') in args
