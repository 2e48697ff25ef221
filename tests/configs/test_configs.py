"""Every config under configs/ builds its model and its dataloaders (on the tiny data)."""
import copy
import importlib
import os
import os.path as osp
from pathlib import Path

import pytest
from mmengine.config import Config

import mmssm  # noqa: F401  (its mmaction2 1.2.0 fix must precede `import mmaction.models`)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / 'configs').rglob('*.py')
                 if '_base_' not in p.parts)
SCOPE_PKG = {'mmdet': 'mmdet', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain',
             'mmaction': 'mmaction'}


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    import sys
    sys.path.insert(0, str(REPO / 'tools' / 'misc'))
    from make_tiny_datasets import make_all
    root = tmp_path_factory.mktemp('tiny')
    make_all(str(root), ('coco', 'ade', 'imagenet', 'video'))
    return root


def load(path, tiny_root):
    os.environ['MMSSM_TINY_DATA'] = str(tiny_root)
    return Config.fromfile(str(REPO / path))


def point_at_tiny(cfg, root):
    """Re-target a full-size config's data at the tiny sets (same layouts)."""
    scope = cfg.default_scope
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        ds = cfg[name].dataset
        if scope == 'mmdet':
            ds.data_root = f'{root}/coco/'
            ds.metainfo = dict(classes=('circle', 'square', 'triangle'))
        elif scope == 'mmseg':
            ds.data_root = f'{root}/ade/'
            ds.img_suffix, ds.seg_map_suffix = '.jpg', '.png'
        elif scope == 'mmaction':
            ds.ann_file = f'{root}/video/' + ('train_list.txt' if name == 'train_dataloader'
                                             else 'val_list.txt')
            ds.data_prefix = dict(img=f'{root}/video/rawframes')
        elif scope == 'mmpretrain':
            split = ds.pop('split', 'train' if name == 'train_dataloader' else 'val')
            ds.type, ds.data_root, ds.data_prefix, ds.ann_file = (
                'CustomDataset', f'{root}/imagenet/', split, '')
        cfg[name].num_workers = 0
        cfg[name].persistent_workers = False


def build_model(cfg):
    scope = cfg.default_scope
    registry = importlib.import_module(f'{SCOPE_PKG[scope]}.registry')
    importlib.import_module(f'{SCOPE_PKG[scope]}.models')
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        return registry.MODELS.build(copy.deepcopy(cfg.model))


def build_loaders(cfg):
    scope = cfg.default_scope
    importlib.import_module(f'{SCOPE_PKG[scope]}.datasets')
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner
    with DefaultScope.overwrite_default_scope(scope):
        return [Runner.build_dataloader(copy.deepcopy(cfg[k]))
                for k in ('train_dataloader', 'val_dataloader')]


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds(path, tiny_root):
    if path.startswith('configs/video/'):  # their `mmaction::` bases need mmaction2 to even load
        pytest.importorskip('mmaction', reason='video configs need mmaction2 (WITH_VIDEO=0 set-up)')
    cfg = load(path, tiny_root)
    if not path.endswith('_tiny.py'):
        point_at_tiny(cfg, tiny_root)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    for loader in build_loaders(cfg):
        assert len(loader.dataset) > 0, f'{path}: empty dataset on the tiny data'


@pytest.mark.parametrize('path,expected', [
    ('configs/mask_rcnn/v2m_s_1x.py', 50e6),  # V2M paper Table 2
    ('configs/upernet/v2m_s_160k_ade20k.py', 62e6),  # V2M paper Table 3
])
def test_paper_model_sizes(path, expected, tiny_root):
    cfg = load(path, tiny_root)
    n = sum(p.numel() for p in build_model(cfg).parameters())
    assert abs(n - expected) / expected < 0.05, f'{path}: {n / 1e6:.2f}M params'
