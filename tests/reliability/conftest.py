"""Session fixtures shared by the reliability tests: tiny data, one reference training run."""
import pytest
from rel_common import losses, run_train, tiny_env

# A classification run whose training consumes torch RNG (drop path) and numpy RNG (random
# crops/flips), checkpoints every 4 iterations; long enough to be killed in the middle.
REF_CONFIG = 'configs/vim/vim_in1k_tiny.py'
REF_ITERS = 24
REF_OPTIONS = ('model.backbone.drop_path_rate=0.3', )


@pytest.fixture(scope='session')
def tiny_data_env(tmp_path_factory):
    return tiny_env(tmp_path_factory.mktemp('tiny_data'))


@pytest.fixture(scope='session')
def reference_run(tiny_data_env, tmp_path_factory):
    """An uninterrupted run: (work_dir, {iteration: loss string})."""
    work = tmp_path_factory.mktemp('reference')
    log = run_train(REF_CONFIG, work, tiny_data_env, REF_ITERS, options=REF_OPTIONS, val=False)
    got = losses(log)
    assert sorted(got) == list(range(1, REF_ITERS + 1)), log[-3000:]
    return work, got
