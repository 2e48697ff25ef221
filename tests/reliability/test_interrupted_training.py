"""Interrupted training: a run killed with SIGKILL resumes from its last checkpoint and
then logs exactly the losses of an uninterrupted run; a kill while a checkpoint is being
written leaves the previous checkpoint and ``last_checkpoint`` valid."""
import builtins
import os
import signal
import subprocess
import time
import uuid

import pytest
import torch
from conftest import REF_CONFIG, REF_ITERS, REF_OPTIONS
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import save_checkpoint
from rel_common import REPO, losses, run_train, state_dict_of, train_cmd
from torch import nn


def _kill_after_checkpoint(cmd, work, env, name='iter_8.pth', timeout=300):
    """Start ``cmd``; SIGKILL it as soon as ``work/name`` exists and last_checkpoint names it."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout and proc.poll() is None:
            last = work / 'last_checkpoint'
            if (work / name).exists() and last.exists() and name in last.read_text():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f'not killed (rc {proc.returncode}):\n{out[-3000:]}'
    return out


def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, tiny_data_env, tmp_path):
    ref_dir, ref = reference_run
    killed_log = _kill_after_checkpoint(
        train_cmd(REF_CONFIG, tmp_path, REF_ITERS, options=REF_OPTIONS, val=False),
        tmp_path, tiny_data_env)
    done = losses(killed_log)
    assert done and max(done) < REF_ITERS, 'the run finished before it was killed'
    assert all(done[i] == ref[i] for i in done)  # same seed, same losses up to the kill
    resumed_from = int((tmp_path / 'last_checkpoint').read_text().strip()
                       .rsplit('iter_', 1)[1].split('.')[0])
    assert resumed_from >= 8

    log = run_train(REF_CONFIG, tmp_path, tiny_data_env, REF_ITERS, '--resume',
                    options=REF_OPTIONS, val=False)
    assert f'resumed epoch: 0, iter: {resumed_from}' in log, log[-3000:]
    after = losses(log)
    assert sorted(after) == list(range(resumed_from + 1, REF_ITERS + 1))
    mismatch = {i: (after[i], ref[i]) for i in after if after[i] != ref[i]}
    assert not mismatch, f'resumed losses differ from the uninterrupted run: {mismatch}'
    # the printed losses have 4 decimals: the weights must agree bit for bit as well
    final, expected = (state_dict_of(d / f'iter_{REF_ITERS}.pth') for d in (tmp_path, ref_dir))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_resume_restores_torch_rng_state(reference_run, tiny_data_env, tmp_path):
    """RNGStateHook puts the RNG states in the checkpoint; resuming restores torch's."""
    ref_dir, _ = reference_run
    ckpt = torch.load(ref_dir / 'iter_8.pth', map_location='cpu', weights_only=False)
    assert set(ckpt['rng_state']) >= {'torch', 'numpy', 'python'}
    # the state saved at iteration 8 differs from the one at 12: drop path consumed it
    later = torch.load(ref_dir / 'iter_12.pth', map_location='cpu', weights_only=False)
    assert not torch.equal(ckpt['rng_state']['torch'], later['rng_state']['torch'])


# ------------------------------------------------------------------ atomic checkpoints
class SimulatedKill(BaseException):
    """Stands for SIGKILL arriving in the middle of a write (not an Exception: nothing
    in the runner may swallow it)."""


class _HalfWriter:
    """A file whose first write puts half the bytes on disk, then 'the process dies'."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise SimulatedKill

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.fixture
def fail_write(monkeypatch):
    """``fail_write(k)``: the k-th opening for writing of a ``*.pth`` or ``last_checkpoint``
    file (temporary names included) writes half its data and raises SimulatedKill."""
    real_open = builtins.open
    state = dict(count=0, fail_at=None)

    def fake_open(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = os.path.basename(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ''
        if any(c in mode for c in 'wax') and ('.pth' in name or 'last_checkpoint' in name):
            state['count'] += 1
            if state['count'] == state['fail_at']:
                return _HalfWriter(f)
        return f

    monkeypatch.setattr(builtins, 'open', fake_open)

    def arm(k):
        state.update(count=0, fail_at=k)
    return arm


def test_interrupted_save_keeps_the_previous_file(fail_write, tmp_path):
    path = tmp_path / 'model.pth'
    old = dict(state_dict=dict(w=torch.arange(1000.)), meta=dict(iter=1))
    save_checkpoint(old, str(path))
    fail_write(1)
    with pytest.raises(SimulatedKill):
        save_checkpoint(dict(state_dict=dict(w=torch.zeros(1000)), meta=dict(iter=2)), str(path))
    got = torch.load(path, weights_only=False)
    assert got['meta']['iter'] == 1 and torch.equal(got['state_dict']['w'], old['state_dict']['w'])
    assert sorted(os.listdir(tmp_path)) == ['model.pth']  # no temporary file left behind


class _Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.linear(torch.stack(inputs))
        return dict(loss=out.square().mean()) if mode == 'loss' else out


def _toy_runner(work, iters, resume=False):
    torch.manual_seed(0)
    data = [dict(inputs=torch.randn(4)) for _ in range(16)]
    return Runner(
        model=_Toy(), work_dir=str(work), experiment_name=f'toy_{uuid.uuid4().hex[:8]}',
        train_dataloader=dict(dataset=data, sampler=dict(type='InfiniteSampler', shuffle=True),
                              batch_size=4, num_workers=0, collate_fn=dict(type='pseudo_collate')),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        resume=resume, default_scope='mmengine', randomness=dict(seed=0))


@pytest.mark.parametrize('fail_at,what', [(5, 'iter_3.pth'), (6, 'last_checkpoint')])
def test_kill_while_saving_leaves_a_resumable_work_dir(fail_write, tmp_path, fail_at, what):
    """CheckpointHook writes iter_N.pth, then last_checkpoint (2 writes per save): die in
    the middle of the 3rd save's checkpoint file or of its last_checkpoint update."""
    fail_write(fail_at)
    with pytest.raises(SimulatedKill):
        _toy_runner(tmp_path, 4).train()
    fail_write(None)
    last = (tmp_path / 'last_checkpoint').read_text().strip()
    assert last.endswith('iter_2.pth'), last  # the previous, complete checkpoint
    ckpt = torch.load(last, weights_only=False)  # complete and loadable
    assert ckpt['meta']['iter'] == int(last.rsplit('iter_', 1)[1][:-4])
    # no truncated iter_3.pth lying around either
    if (tmp_path / 'iter_3.pth').exists():
        torch.load(tmp_path / 'iter_3.pth', weights_only=False)
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    runner = _toy_runner(tmp_path, 4, resume=True)
    runner.train()
    assert runner.iter == 4 and (tmp_path / 'iter_4.pth').exists()
