"""Test-suite-wide fixtures."""
import pytest
from mmengine.registry import DefaultScope


@pytest.fixture(autouse=True)
def _restore_default_scope():
    """Undo any mmengine default scope a test creates (init_default_scope, in-process tools).

    The current scope is process-global (the last DefaultScope instance); one left at
    'mmpretrain' or 'mmaction' makes later, unrelated tests look up unscoped types such as
    'FPN' or 'Vim' in the wrong registry.
    """
    saved = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
