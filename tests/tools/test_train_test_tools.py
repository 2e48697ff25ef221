"""tools/train.py, tools/test.py and tools/dist_train.sh on the tiny datasets (CPU)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def tiny_env(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    subprocess.run([sys.executable, str(REPO / 'tools/misc/make_tiny_datasets.py'), '--out',
                    str(root), '--tasks', 'coco', 'ade', 'imagenet', 'video'], check=True)
    env = dict(os.environ, MMSSM_TINY_DATA=str(root), PYTHON=sys.executable)
    env['PYTHONPATH'] = f'{REPO}{os.pathsep}{env.get("PYTHONPATH", "")}'
    return env


def run(args, env, timeout=900):
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


def train(config, work_dir, env, iters, *extra):
    return run([sys.executable, 'tools/train.py', config, '--work-dir', str(work_dir),
                '--cfg-options', f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
                'default_hooks.checkpoint.interval=2', *extra], env)


@pytest.mark.parametrize('config,metric', [
    ('configs/mask_rcnn/v2m_s_1x_tiny.py', r'coco/bbox_mAP: [\d.]+ .*coco/segm_mAP: [\d.]+'),
    ('configs/mask_rcnn/vim_t_1x_tiny.py', r'coco/bbox_mAP: [\d.]+ .*coco/segm_mAP: [\d.]+'),
    ('configs/upernet/v2m_s_tiny.py', r'mIoU: [\d.]+'),
    ('configs/vim/vim_in1k_tiny.py', r'accuracy/top1: [\d.]+'),
    ('configs/video/convnext_s4nd_3d_hmdb51_tiny.py', r'acc/top1: [\d.]+'),
])
def test_train_then_test(config, metric, tiny_env, tmp_path):
    if 'video' in config:
        pytest.importorskip('mmaction', reason='video configs need mmaction2 (WITH_VIDEO=0 set-up)')
    log = train(config, tmp_path, tiny_env, 2)
    assert re.search(r'Iter\(train\) \[2/2\]', log)
    assert (tmp_path / 'iter_2.pth').exists()
    # save, resume, evaluate: one more iteration from the saved one
    log = train(config, tmp_path, tiny_env, 3, '--resume')
    assert 'resumed epoch: 0, iter: 2' in log and re.search(r'Iter\(train\) \[3/3\]', log)
    log = run([sys.executable, 'tools/test.py', config, str(tmp_path / 'iter_3.pth'),
               '--work-dir', str(tmp_path), '--out', str(tmp_path / 'preds.pkl')], tiny_env)
    assert re.search(metric, log), log[-3000:]
    assert (tmp_path / 'preds.pkl').stat().st_size > 0


def test_resume_continues_from_saved_iteration(tiny_env, tmp_path):
    config = 'configs/vim/vim_in1k_tiny.py'
    train(config, tmp_path, tiny_env, 2)
    log = train(config, tmp_path, tiny_env, 4, '--resume')
    assert 'resumed epoch: 0, iter: 2' in log
    assert re.search(r'Iter\(train\) \[3/4\]', log) and re.search(r'Iter\(train\) \[4/4\]', log)
    assert not re.search(r'Iter\(train\) \[1/4\]', log)
    # an explicit path resumes too
    log = train(config, tmp_path, tiny_env, 4, '--resume', str(tmp_path / 'iter_2.pth'))
    assert 'resumed epoch: 0, iter: 2' in log


def test_dist_train_two_gloo_processes(tiny_env, tmp_path):
    env = dict(tiny_env, PORT='29517')
    log = run(['bash', 'tools/dist_train.sh', 'configs/vim/vim_in1k_tiny.py', '2', '--work-dir',
               str(tmp_path), '--cfg-options', 'train_cfg.max_iters=2',
               'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2'], env)
    assert 'Distributed launcher: pytorch' in log or 'launcher: pytorch' in log
    assert re.search(r'Iter\(train\) \[2/2\]', log)
    assert re.search(r'accuracy/top1: [\d.]+', log)
    assert (tmp_path / 'iter_2.pth').exists()
    log = run(['bash', 'tools/dist_test.sh', 'configs/vim/vim_in1k_tiny.py',
               str(tmp_path / 'iter_2.pth'), '2', '--work-dir', str(tmp_path)], env)
    assert re.search(r'Iter\(test\).*accuracy/top1: [\d.]+', log)
