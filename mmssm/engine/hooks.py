"""Training hooks."""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook

from ..registry import HOOKS


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Resume with the torch RNG state of the checkpoint, so a resumed run draws the same
    random numbers (drop path, dropout, RPN/RoI samplers) as an uninterrupted one.

    mmengine 0.10.7 re-seeds at start-up and fast-forwards the dataloader on resume,
    which reproduces the sampler order and the data-pipeline randomness (numpy /
    ``random``, consumed while the skipped batches are re-loaded), but not the torch
    RNG that the skipped training steps consumed. This hook stores the torch CPU and
    CUDA states, plus numpy's and ``random``'s for reference, in every checkpoint
    (``checkpoint['rng_state']``) and, when training resumes, restores the torch ones
    just before the first resumed step (after the dataloader fast-forward).
    ``tools/train.py`` adds it to every config.
    """
    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['rng_state'] = dict(
            torch=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            numpy=np.random.get_state(), python=random.getstate())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if getattr(runner, '_resume', False):  # not for load_from (fine-tuning)
            self._pending = checkpoint.get('rng_state')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state['torch'])
        if state.get('cuda') and torch.cuda.is_available() \
                and len(state['cuda']) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state['cuda'])
