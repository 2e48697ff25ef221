"""One fresh process that goes through every command-line entry point (run by test_tools.py).

Usage: python cli_session.py WORK_DIR BAD_META BAD_OPTIMIZER BAD_NESTED

1. scope: ``import mmssm`` adds nothing of mmssm's allowlist to torch's, and plain
   ``torch.load`` / mmengine's ``CheckpointLoader`` still refuse the malicious file;
2. tools/train.py (1 iteration) writes a real checkpoint, which loads as before;
3. tools/train.py ``load_from`` / ``--resume`` and tools/test.py refuse the malicious files;
4. tools/test.py tests the real weights saved with a ``datetime`` only with
   ``MMSSM_TRUSTED_CHECKPOINTS=1``.
Each step prints ``STEP <name> <result>``.
"""
import datetime
import os
import pickle
import runpy
import sys
import time

import torch

work, bad_meta, bad_opt, bad_nested = sys.argv[1:5]
CONFIG = 'configs/vim/vim_in1k_tiny.py'
OPTS = ['--cfg-options', 'train_cfg.max_iters=1', 'train_cfg.val_interval=1',
        'default_hooks.checkpoint.interval=1', 'randomness.seed=0']


def refuses(load, path):
    try:
        load(path)
    except pickle.UnpicklingError as e:
        return type(e).__name__
    return 'LOADED'


def tool(script, *args):
    """Run tools/<script> as ``python tools/<script> args``; the exception it raised, if any."""
    time.sleep(1.1)  # mmengine names runners, loggers and visualizers by the second
    sys.argv = [f'tools/{script}', *args]
    try:
        runpy.run_path(f'tools/{script}', run_name='__main__')
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f'{type(e).__name__}: {e}'
    return 'OK'


# 1. scope
before = set(torch.serialization.get_safe_globals())
import mmssm  # noqa: E402,F401
from mmengine.runner import CheckpointLoader  # noqa: E402

from mmssm.utils.safe_load import ALLOWED_GLOBALS, load_checkpoint_file  # noqa: E402

ours = set(ALLOWED_GLOBALS.values())
leaked = [g for g in set(torch.serialization.get_safe_globals()) - before
          if (g[0] if isinstance(g, tuple) else g) in ours]
print('STEP import_allowlist', leaked or 'clean', flush=True)
print('STEP torch_load', refuses(torch.load, bad_meta), flush=True)
print('STEP mmengine_load', refuses(CheckpointLoader.load_checkpoint, bad_meta), flush=True)

# 2. a real checkpoint of tools/train.py
print('STEP train', tool('train.py', CONFIG, '--work-dir', work, *OPTS), flush=True)
real = os.path.join(work, 'iter_1.pth')
after = set(torch.serialization.get_safe_globals())
got, full = load_checkpoint_file(real), torch.load(real, weights_only=False)
same = (list(got) == list(full) and got['meta'] == full['meta']
        and all(torch.equal(v, full['state_dict'][k]) for k, v in got['state_dict'].items())
        and all(torch.equal(got['rng_state'][k], full['rng_state'][k]) for k in ('torch', ))
        and (got['rng_state']['numpy'][1] == full['rng_state']['numpy'][1]).all()
        and got['message_hub']['log_scalars'].keys() == full['message_hub']['log_scalars'].keys())
print('STEP real_checkpoint', 'same' if same else 'DIFFERENT', flush=True)
print('STEP allowlist_after_load', 'clean' if set(torch.serialization.get_safe_globals()) == after
      else 'LEFT', flush=True)
print('STEP torch_load_real', refuses(torch.load, real), flush=True)

# 3. malicious files through the tools
print('STEP load_from', tool('train.py', CONFIG, '--work-dir', work + '_lf', *OPTS,
                             f'load_from={bad_meta}'), flush=True)
print('STEP resume', tool('train.py', CONFIG, '--work-dir', work + '_rs', '--resume', bad_opt,
                          *OPTS), flush=True)
print('STEP test', tool('test.py', CONFIG, bad_nested, '--work-dir', work + '_t'), flush=True)

# 4. opt-in
dated = os.path.join(work, 'dated.pth')
torch.save(dict(state_dict=full['state_dict'], meta=dict(saved=datetime.date(2024, 1, 2))), dated)
print('STEP test_dated', tool('test.py', CONFIG, dated, '--work-dir', work + '_d'), flush=True)
os.environ['MMSSM_TRUSTED_CHECKPOINTS'] = '1'
print('STEP test_dated_trusted', tool('test.py', CONFIG, dated, '--work-dir', work + '_d2'),
      flush=True)
