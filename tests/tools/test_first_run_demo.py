"""`make demo`: its generated set is deterministic and well formed (default tier),
and the whole demo learns, AP >= 0.30 on held-out images (slow tier)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools' / 'misc'))
from make_tiny_datasets import CLASSES, make_all, make_coco_demo  # noqa: E402


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def test_demo_set_is_deterministic(tmp_path):
    make_coco_demo(str(tmp_path / 'a'), n_train=12, n_val=6)
    make_coco_demo(str(tmp_path / 'b'), n_train=12, n_val=6)
    a, b = digest(tmp_path / 'a'), digest(tmp_path / 'b')
    assert len(a) == 12 + 6 + 2 and a == b
    make_coco_demo(str(tmp_path / 'c'), seed=5, n_train=12, n_val=6)
    assert digest(tmp_path / 'c') != a


def test_demo_set_is_well_formed(tmp_path):
    from pycocotools.coco import COCO
    make_all(str(tmp_path), ('coco_demo', ))  # the set make demo trains on
    root = tmp_path / 'coco_demo'
    pixels = {}
    for split, n in (('train', 320), ('val', 64)):
        coco = COCO(str(root / 'annotations' / f'instances_{split}2017.json'))
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        assert len(coco.getImgIds()) == n
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            img = (root / f'{split}2017' / info['file_name'])
            assert img.exists() and (info['height'], info['width']) == (128, 128)
            pixels.setdefault(split, set()).add(hashlib.sha256(img.read_bytes()).hexdigest())
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert 1 <= len(anns) <= 3
            union = np.zeros((128, 128), np.int32)
            for ann in anns:
                mask = coco.annToMask(ann)
                union += mask
                assert ann['area'] >= 0.1 * 128 * 0.1 * 128  # radius >= 10% of the side
                # squares are RLE (exact); polygons (contours) re-rasterise within a border
                exact = isinstance(ann['segmentation'], dict)
                assert abs(mask.sum() - ann['area']) <= (0 if exact else 0.1 * ann['area'])
                ys, xs = np.nonzero(mask)
                x, y, w, h = ann['bbox']  # the box is the mask's extent
                np.testing.assert_allclose(
                    (x, y, x + w, y + h), (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),
                    atol=0 if exact else 1.5)
            assert union.max() == 1  # shapes never overlap: every mask is whole
    # no validation image is a training image
    assert len(pixels['val']) == 64 and not pixels['val'] & pixels['train']


def test_demo_config_reads_the_demo_set(tmp_path):
    from mmengine.config import Config
    os.environ['MMSSM_TINY_DATA'] = str(tmp_path)
    cfg = Config.fromfile(str(REPO / 'configs/demo/mask_rcnn_v2m_s.py'))
    assert cfg.train_dataloader.dataset.data_root == f'{tmp_path}/coco_demo/'
    assert cfg.test_dataloader.dataset.ann_file == 'annotations/instances_val2017.json'
    assert cfg.test_evaluator.ann_file == f'{tmp_path}/coco_demo/annotations/instances_val2017.json'
    assert cfg.model.backbone.type == 'mmssm.V2MPyramid'
    # validation is not run inside training; tools/test.py evaluates once
    assert cfg.train_cfg.val_begin > cfg.train_cfg.max_iters


@pytest.mark.slow
def test_make_demo_learns(tmp_path):
    """`make demo` as a user runs it (its PY, DATA and WORK pointed here)."""
    env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    out = subprocess.run(['make', '-C', str(REPO), 'demo', f'PY={sys.executable}',
                          f'DATA={tmp_path}/data', f'WORK={tmp_path}/work'],
                         env=env, capture_output=True, text=True, timeout=1800)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert '[demo] summary' in log
    test_log = sorted((tmp_path / 'work' / 'test').glob('2*/2*.json'))[-1]
    metrics = json.loads(test_log.read_text().strip().splitlines()[-1])
    assert metrics['coco/bbox_mAP'] >= 0.30, metrics
    assert metrics['coco/segm_mAP'] > 0, metrics
    scalars = sorted((tmp_path / 'work' / 'train').glob('*/vis_data/scalars.json'))[-1]
    losses = [json.loads(line)['loss'] for line in scalars.read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0], losses  # clearly falling
    assert (tmp_path / 'work' / 'demo.png').stat().st_size > 10_000
