"""Slow tier: the whole property suite again with ten times the examples."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_property_suite_with_the_large_budget():
    """Runs tests/property under HYPOTHESIS_PROFILE=mmssm-slow (fixed seed, 10x budget)."""
    env = dict(os.environ, HYPOTHESIS_PROFILE='mmssm-slow')
    run = subprocess.run([sys.executable, '-m', 'pytest', str(HERE), '-q', '-m', 'not slow',
                          '-p', 'no:cacheprovider', '-x'],
                         cwd=HERE.parents[1], env=env, capture_output=True, text=True,
                         timeout=3600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert ' passed' in run.stdout
