"""Fixtures of the model tests."""
import pytest
import torch

import mmssm.ops
from mmssm.models.layers import V2MMixer2D


@pytest.fixture
def patch_scans(monkeypatch):
    """``patch_scans(scan)`` installs a fake plain scan as ``mmssm.ops.selective_scan`` and
    the two-direction scan (V2M's eager CPU path runs both directions of a pass in one
    call) as two calls of it: layout tests see every direction whichever path runs."""
    def install(scan):
        def bidir(u, delta, A, B, C, sum_directions=False, **kw):
            ys = [scan(u, delta, A, B, C, reverse=r, **kw) for r in (False, True)]
            return ys[0] + ys[1] if sum_directions else torch.stack(ys)

        monkeypatch.setattr(mmssm.ops, 'selective_scan', scan)
        monkeypatch.setattr(mmssm.ops, 'bidir_selective_scan', bidir)
        # the fakes ignore B and D, so V2M's corner mean must not be folded into them
        monkeypatch.setattr(V2MMixer2D, 'fold_corner_mean', False)
        # one column call per latent (the layout tests count the calls; the joint call of
        # both latents has its own test)
        monkeypatch.setattr(V2MMixer2D, 'joint_columns', False)
    return install
