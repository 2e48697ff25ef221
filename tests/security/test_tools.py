"""The command-line entry points, in one fresh process (tests/security/cli_session.py):
``load_from`` and ``--resume`` of tools/train.py and tools/test.py refuse a malicious
checkpoint before it runs; a checkpoint tools/train.py writes loads as before; a file
with an unlisted global is tested only with ``MMSSM_TRUSTED_CHECKPOINTS=1``, with the
result of the same weights; ``import mmssm`` leaves torch and mmengine as strict as
they are without it."""
import re
from pathlib import Path

import pytest
import torch
from conftest import CLS_CONFIG, malicious, run_tool

from mmssm.utils.safe_load import TRUST_ENV, load_checkpoint_file

TOP1 = re.compile(r'accuracy/top1: ([\d.]+)')
REFUSED = 'UntrustedCheckpointError: checkpoint'


def test_command_line_entry_points(tiny_env, tmp_path, pwned):
    bad = {w: malicious(tmp_path / f'evil_{w}.pth', w, pwned)
           for w in ('meta', 'optimizer', 'nested')}
    rc, log = run_tool(tiny_env, str(Path(__file__).with_name('cli_session.py')),
                       str(tmp_path / 'work'), *map(str, bad.values()), timeout=600)
    assert rc == 0, log[-4000:]
    steps = dict(re.findall(r'^STEP (\w+) (.*)$', log, re.M))
    assert steps['import_allowlist'] == 'clean', steps
    # stock torch / mmengine behaviour after import mmssm
    assert steps['torch_load'] == 'UnpicklingError', steps
    assert steps['mmengine_load'] == 'UntrustedCheckpointError', steps  # an UnpicklingError
    assert steps['train'] == 'OK', log[-4000:]
    assert steps['real_checkpoint'] == 'same' and steps['allowlist_after_load'] == 'clean', steps
    assert steps['torch_load_real'] == 'UnpicklingError', steps  # mmssm's allowlist did not leak
    for step, where in (('load_from', 'meta'), ('resume', 'optimizer'), ('test', 'nested')):
        msg = steps[step]
        assert msg.startswith(REFUSED) and bad[where].name in msg and 'os.makedirs' in msg \
            and f'{TRUST_ENV}=1' in msg, (step, msg)
    assert steps['test_dated'].startswith(REFUSED) and 'datetime.date' in steps['test_dated']
    assert steps['test_dated_trusted'] == 'OK', log[-4000:]
    # validation after training and the trusted test of the same weights agree
    top1 = TOP1.findall(log)
    assert len(top1) == 2 and top1[0] == top1[1], top1


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_result(tiny_env, tmp_path):
    """--resume from iteration 1 through the allowlist loader ends with the weights of
    the uninterrupted run (tests/reliability covers a SIGKILL in the default tier)."""
    opts = ('--cfg-options', 'train_cfg.max_iters=2', 'train_cfg.val_interval=2',
            'default_hooks.checkpoint.interval=1', 'randomness.seed=0',
            'randomness.deterministic=True', 'model.backbone.drop_path_rate=0.3')
    ref, resumed = tmp_path / 'ref', tmp_path / 'resumed'
    rc, log = run_tool(tiny_env, 'tools/train.py', CLS_CONFIG, '--work-dir', str(ref), *opts)
    assert rc == 0, log[-3000:]
    resumed.mkdir()
    rc, log = run_tool(tiny_env, 'tools/train.py', CLS_CONFIG, '--work-dir', str(resumed),
                       '--resume', str(ref / 'iter_1.pth'), *opts)
    assert rc == 0 and 'resumed epoch: 0, iter: 1' in log, log[-3000:]
    got = load_checkpoint_file(str(resumed / 'iter_2.pth'))
    want = torch.load(ref / 'iter_2.pth', weights_only=False)
    assert all(torch.equal(got['state_dict'][k], v) for k, v in want['state_dict'].items())
