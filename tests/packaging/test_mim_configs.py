"""mmssm's configs used from another project: `_base_ = 'mmssm::...'` (issue 16, part 4).

The package ships configs/, tools/ and model-index.yml at mmssm/.mim/ (setup.py), and
`import mmssm` registers the package with mmengine's config loader (mmssm/utils/mim.py).
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A user's config in their own repository: mmssm's headline detector on their 3-class data.
CHILD = '''
_base_ = 'mmssm::mask_rcnn/v2m_s_1x.py'

data_root = '{root}/coco/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
model = dict(
    backbone=dict(init_cfg=None),  # no ImageNet checkpoint in this project: from scratch
    roi_head=dict(bbox_head=dict(num_classes=3), mask_head=dict(num_classes=3)))
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs')]
train_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=pipeline,
                 ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/')))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=1)
val_cfg = val_dataloader = val_evaluator = None
param_scheduler = []
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=1))
log_processor = dict(by_epoch=False)
'''


def run(args, cwd, env=None, timeout=900):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


def results(log):
    """The lines a `-c` snippet printed with a leading '= ' (warnings go to the same log)."""
    return [ln[2:] for ln in log.splitlines() if ln.startswith('= ')]


def test_source_tree_links_the_mim_folder():
    """An editable install and a checkout see configs/ and tools/ through mmssm/.mim links."""
    mim = REPO / 'mmssm' / '.mim'
    for name in ('configs', 'tools', 'model-index.yml'):
        assert (mim / name).resolve() == (REPO / name).resolve(), name


def test_child_config_in_another_folder_trains_through_train_py(tmp_path):
    user = tmp_path / 'user_project'  # nothing of mmssm's in here
    user.mkdir()
    run([sys.executable, str(REPO / 'tools/misc/make_tiny_datasets.py'), '--out',
         str(tmp_path / 'data'), '--tasks', 'coco'], cwd=user)
    (user / 'my_mask_rcnn.py').write_text(CHILD.format(root=tmp_path / 'data'))
    env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    log = run([sys.executable, str(REPO / 'tools/train.py'), 'my_mask_rcnn.py',
               '--work-dir', 'work'], cwd=user, env=env)
    assert 'Iter(train) [1/1]' in log and 'loss_mask' in log
    assert (user / 'work' / 'iter_1.pth').exists()
    dumped = (user / 'work' / 'my_mask_rcnn.py').read_text()  # the merged config mmengine used
    assert "type='mmssm.V2MPyramid'" in dumped and "arch='small'" in dumped
    assert 'num_classes=3' in dumped


def test_wheel_ships_configs_and_resolves_mmssm_bases(tmp_path):
    src = tmp_path / 'src'  # a copy: a wheel build writes build/ and *.egg-info in its tree
    src.mkdir()
    for name in ('setup.py', 'MANIFEST.in', 'README.md', 'model-index.yml'):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns('__pycache__', '*.pyc', '*.so', '.mim')
    for name in ('mmssm', 'configs', 'tools', 'requirements'):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    env = dict(os.environ, MMSSM_BUILD_EXT='0')  # the C++ scan extension is not the point here
    run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '.',
         '-w', str(tmp_path / 'dist')], cwd=src, env=env)
    (whl,) = (tmp_path / 'dist').glob('mmssm-*.whl')
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
    shipped = {n[len('mmssm/.mim/'):] for n in names if n.startswith('mmssm/.mim/')}
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / 'configs').rglob('*')
                if p.suffix in ('.py', '.yml') and '__pycache__' not in p.parts}
    assert expected and expected <= shipped
    assert {'model-index.yml', 'tools/train.py', 'tools/test.py', 'tools/dist_train.sh',
            'tools/_runner_utils.py'} <= shipped

    # Installed from the wheel (not editable), the base resolves inside the installed package.
    target = tmp_path / 'site'
    run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(target),
         str(whl)], cwd=tmp_path)
    (tmp_path / 'child.py').write_text("_base_ = 'mmssm::mask_rcnn/v2m_s_1x.py'\n")
    code = ('import mmssm; from mmengine.config import Config; '
            "c = Config.fromfile('child.py'); "
            "print('=', mmssm.__file__); print('=', c.model.backbone.type); "
            "print('=', Config._get_cfg_path('mmssm::mask_rcnn/v2m_s_1x.py', 'child.py')[0])")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = results(run([sys.executable, '-c', code], cwd=tmp_path, env=env))
    assert out == [str(target / 'mmssm' / '__init__.py'), 'mmssm.V2MPyramid',
                   str(target / 'mmssm/.mim/configs/mask_rcnn/v2m_s_1x.py')]


def test_mmengine_without_import_names_the_limitation():
    """Documented limitation: before `import mmssm`, mmengine refuses `mmssm::` bases."""
    code = ('from mmengine.config.utils import _get_package_and_cfg_path as f\n'
            'try:\n    f("mmssm::mask_rcnn/v2m_s_1x.py")\nexcept AssertionError as e:\n'
            '    print("=", e)\n'
            'import mmssm\nprint("=", f("mmssm::mask_rcnn/v2m_s_1x.py"))\n')
    out = results(run([sys.executable, '-c', code], cwd=REPO))
    assert out == ['mmengine does not support to load mmssm config.',
                   "('mmssm', 'mask_rcnn/v2m_s_1x.py')"]
