"""A user's first run: tools/train.py and tools/test.py stop with one clear
message when data or checkpoints are missing (tools/_preflight.py), and refuse a
UPerNet/PSP BatchNorm batch of 1 before training starts."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools'))
sys.path.insert(0, str(REPO / 'tools' / 'misc'))
from _preflight import PreflightError, preflight  # noqa: E402
from make_tiny_datasets import make_all  # noqa: E402


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    make_all(str(root), ('coco', 'ade'))
    return root


_LOADED = {}


def load(path, tiny_root=None, **options):
    """A fresh copy of a config (parsed once per test module: mmdet bases are slow)."""
    if tiny_root is not None:
        os.environ['MMSSM_TINY_DATA'] = str(tiny_root)
    key = (path, str(tiny_root))
    if key not in _LOADED:
        _LOADED[key] = Config.fromfile(str(REPO / path))
    cfg = copy.deepcopy(_LOADED[key])
    cfg.merge_from_dict(options)
    return cfg


def problems(cfg, mode='train', world_size=1):
    with pytest.raises(PreflightError) as err:
        preflight(cfg, mode, world_size)
    return str(err.value)


def run_tool(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    return out.returncode, out.stdout + out.stderr


def test_headline_command_without_coco_or_checkpoint(tmp_path):
    """`python tools/train.py configs/mask_rcnn/v2m_s_1x.py` on a machine with
    neither COCO nor the ImageNet checkpoint: one message, no traceback."""
    rc, log = run_tool(str(REPO / 'tools/train.py'), str(REPO / 'configs/mask_rcnn/v2m_s_1x.py'),
                       '--work-dir', str(tmp_path), cwd=tmp_path)
    assert rc != 0
    assert 'Traceback' not in log, log[-3000:]
    assert 'cannot start (' in log and log.count('cannot start') == 1
    # the dataset: what, where it was looked for, the layout, what to do
    assert 'train_dataloader.dataset (CocoDataset)' in log
    assert f'looked for {tmp_path}/data/coco/annotations/instances_train2017.json' in log
    assert 'data/coco/train2017/' in log and 'cocodataset.org' in log and 'make demo' in log
    assert 'val_evaluator.ann_file' in log
    # the ImageNet checkpoint: the three ways out
    assert 'model.backbone.init_cfg.checkpoint = checkpoints/v2m_s_in1k.pth' in log
    assert f'looked for {tmp_path}/checkpoints/v2m_s_in1k.pth' in log
    assert 'python tools/train.py configs/v2m/v2m-s-star_8xb128_in1k.py' in log
    assert 'tools/model_converters/' in log
    assert '--cfg-options model.backbone.init_cfg=None' in log
    assert not (tmp_path / 'work_dirs').exists() and not list(tmp_path.iterdir())


def test_test_tool_missing_checkpoint_and_data(tmp_path):
    rc, log = run_tool(str(REPO / 'tools/test.py'), str(REPO / 'configs/mask_rcnn/v2m_s_1x.py'),
                       'nowhere/mask_rcnn.pth', '--work-dir', str(tmp_path), cwd=tmp_path)
    assert rc != 0 and 'Traceback' not in log, log[-3000:]
    assert 'test_dataloader.dataset (CocoDataset)' in log
    assert 'load_from = nowhere/mask_rcnn.pth (the checkpoint to evaluate)' in log
    assert f'looked for {tmp_path}/nowhere/mask_rcnn.pth' in log
    # evaluating a detector checkpoint does not need the backbone's ImageNet file
    assert 'v2m_s_in1k' not in log


def test_missing_annotation_file_only(tiny_root, tmp_path):
    cfg = load('configs/mask_rcnn/v2m_s_1x_tiny.py', tiny_root)
    cfg.train_dataloader.dataset.ann_file = 'annotations/missing.json'
    msg = problems(cfg)
    assert msg.startswith('cannot start (1 problem):')
    assert f'ann_file = {tiny_root}/coco/annotations/missing.json' in msg
    assert 'data_root' not in msg.split('expected layout')[0]  # the root exists


def test_missing_data_root_is_named(tiny_root):
    cfg = load('configs/upernet/v2m_s_tiny.py', tiny_root)
    for name in ('train_dataloader', 'val_dataloader'):
        cfg[name].dataset.data_root = '/nonexistent/ade/'
    msg = problems(cfg)
    assert 'train_dataloader.dataset (BaseSegDataset)' in msg
    assert 'val_dataloader.dataset (BaseSegDataset)' in msg
    assert 'data_root = /nonexistent/ade/' in msg
    assert '/nonexistent/ade/images/training/' in msg


def test_wrapped_datasets_are_walked(tiny_root):
    cfg = load('configs/mask_rcnn/v2m_s_1x_tiny.py', tiny_root)
    inner = cfg.train_dataloader.dataset
    bad = dict(inner, data_root='/nonexistent/coco/')
    cfg.train_dataloader.dataset = dict(
        type='RepeatDataset', times=2,
        dataset=dict(type='ConcatDataset', datasets=[inner, bad]))
    msg = problems(cfg)
    assert 'train_dataloader.dataset.dataset.datasets[1] (CocoDataset)' in msg
    assert 'datasets[0]' not in msg


def test_missing_init_cfg_checkpoint_any_module(tiny_root, tmp_path):
    cfg = load('configs/mask_rcnn/v2m_s_1x_tiny.py', tiny_root)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(tmp_path / 'bb.pth'))
    cfg.model.neck.init_cfg = [dict(type='Xavier', layer='Conv2d'),
                               dict(type='Pretrained', checkpoint=str(tmp_path / 'neck.pth'))]
    msg = problems(cfg)
    assert msg.startswith('cannot start (2 problems):')
    assert f'model.backbone.init_cfg.checkpoint = {tmp_path}/bb.pth' in msg
    assert 'ImageNet-1k checkpoint the V2MPyramid backbone' in msg
    assert f'model.neck.init_cfg[1].checkpoint = {tmp_path}/neck.pth' in msg
    # with the file in place, or training from scratch, the run may start
    torch.save({}, tmp_path / 'bb.pth')
    cfg.model.neck.init_cfg = None
    preflight(cfg, 'train')
    cfg.model.backbone.init_cfg = None
    preflight(cfg, 'train')
    # testing never initialises from init_cfg: a missing file there is not a problem
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint='gone.pth')
    cfg.load_from = str(tmp_path / 'bb.pth')
    preflight(cfg, 'test')


def test_converter_named_for_families_with_official_weights(tiny_root):
    cfg = load('configs/mask_rcnn/vmamba_t_1x.py', tiny_root)
    msg = problems(cfg)
    assert 'tools/model_converters/vmamba2mmssm.py' in msg
    assert 'configs/vmamba/vmamba-tiny_8xb128_in1k.py' in msg


def test_load_from_and_remote_paths(tiny_root):
    cfg = load('configs/mask_rcnn/v2m_s_1x_tiny.py', tiny_root, load_from='missing/start.pth')
    msg = problems(cfg)
    assert 'load_from = missing/start.pth (the checkpoint the whole model starts from)' in msg
    assert '--cfg-options load_from=None' in msg
    cfg.load_from = 'https://example.com/start.pth'  # left to mmengine's loader
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint='open-mmlab://x')
    preflight(cfg, 'train')


def test_tiny_configs_pass(tiny_root):
    for path in ('configs/mask_rcnn/v2m_s_1x_tiny.py', 'configs/upernet/v2m_s_tiny.py'):
        preflight(load(path, tiny_root), 'train')
        preflight(load(path, tiny_root, load_from=__file__), 'test')


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be 'train' or 'test'"):
        preflight(Config(), 'eval')


# ---------------------------------------------------- UPerNet with batch size 1
def test_upernet_batch1_refused_with_cause_and_fix(tiny_root):
    cfg = load('configs/upernet/v2m_s_tiny.py', tiny_root)
    cfg.train_dataloader.batch_size = 1
    msg = problems(cfg)
    assert 'model.decode_head (UPerHead) pools features to 1x1' in msg
    assert 'train_dataloader.batch_size=1' in msg and 'BatchNorm' in msg
    assert '--cfg-options train_dataloader.batch_size=2' in msg
    assert 'SyncBN over >= 2 processes' in msg
    assert 'model.decode_head.norm_cfg.type=GN model.decode_head.norm_cfg.num_groups=32' in msg
    assert 'auxiliary_head' not in msg  # an FCN head normalises full maps: fine
    # batch 1 is fine at test time (BN uses running statistics)
    cfg.load_from = __file__
    preflight(cfg, 'test')


@pytest.mark.parametrize('change,world_size', [
    (dict(train_dataloader=dict(batch_size=2)), 1),
    (dict(model=dict(decode_head=dict(norm_cfg=dict(type='SyncBN')))), 2),
    (dict(model=dict(decode_head=dict(norm_cfg=dict(type='GN', num_groups=32)))), 1),
])
def test_upernet_batch1_fixes_accepted(tiny_root, change, world_size):
    cfg = load('configs/upernet/v2m_s_tiny.py', tiny_root, train_dataloader=dict(batch_size=1))
    cfg.merge_from_dict(change)
    preflight(cfg, 'train', world_size)


def test_upernet_batch1_rule_matches_the_real_failure(tiny_root):
    """The rule is the library's behaviour: the PPM's 1x1 BN branch fails on a
    batch of 1 in training, and the GN fix the message proposes trains."""
    import mmseg.models  # noqa: F401
    from mmseg.registry import MODELS
    cfg = load('configs/upernet/v2m_s_tiny.py', tiny_root)
    feats = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([16, 32, 64, 128])]
    head = MODELS.build(cfg.model.decode_head).train()
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        head(feats)
    cfg.model.decode_head.norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
    out = MODELS.build(cfg.model.decode_head).train()(feats)
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()
