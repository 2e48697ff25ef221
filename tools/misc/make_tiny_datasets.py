"""Write small datasets in the real formats, offline and deterministically.

Backgrounds are crops of the photographs matplotlib ships (grace_hopper.jpg,
Minduka_Present_Blue_Pack.png); objects are filled shapes (circle, square,
triangle) with exact masks, so detectors and segmentors have something real
to learn. Layouts:

- ``coco/``: ``annotations/instances_{train,val}2017.json`` (polygons for
  circles/triangles, RLE for squares) + ``{train,val}2017/*.jpg``
- ``ade/``: ADE20K layout ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` (0 = unlabelled, 1 = background,
  2.. = shapes; use ``reduce_zero_label=True``)
- ``imagenet/``: ``train/<class>/*.JPEG``, ``val/<class>/*.JPEG`` (+ meta lists)
- ``coco_demo/`` (``--tasks coco_demo``, for ``make demo``): the ``coco/``
  layout with 320 train / 64 val images of 128 px, 1-3 separate shapes each on
  a blurred, low-contrast background.
- ``video/``: rawframes ``rawframes/<video>/img_00001.jpg`` and
  ``{train,val}_list.txt`` (``frame_dir total_frames label``); the class is the
  direction a shape moves in.

Usage: ``python tools/misc/make_tiny_datasets.py --out data/tiny [--tasks coco ade]``
"""
import argparse
import json
import os
import os.path as osp
from typing import List, Tuple

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle')
MOTIONS = ('left', 'right', 'up', 'down')


def _photos() -> List[np.ndarray]:
    import matplotlib
    root = osp.join(osp.dirname(matplotlib.__file__), 'mpl-data', 'sample_data')
    out = []
    for name in ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png'):
        img = cv2.imread(osp.join(root, name), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f'matplotlib sample image {name} not found under {root}')
        out.append(img)
    return out


def _background(rng: np.random.RandomState, photos, h: int, w: int) -> np.ndarray:
    src = photos[rng.randint(len(photos))]
    scale = rng.uniform(0.5, 1.0)
    ch, cw = int(src.shape[0] * scale), int(src.shape[1] * scale)
    y0, x0 = rng.randint(0, src.shape[0] - ch + 1), rng.randint(0, src.shape[1] - cw + 1)
    crop = cv2.resize(src[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
    if rng.rand() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Polygon (k, 2) of x, y vertices for a shape centred at (cx, cy)."""
    if kind == 'circle':
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    if kind == 'square':
        return np.array([[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    if kind == 'triangle':
        return np.array([[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    raise ValueError(kind)


def _draw(img: np.ndarray, mask: np.ndarray, poly: np.ndarray, color, value: int) -> np.ndarray:
    """Fill ``poly`` into img and into a label map; return this object's binary mask."""
    pts = np.round(poly).astype(np.int32)[None]
    obj = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(obj, pts, 1)
    img[obj > 0] = color
    mask[obj > 0] = value
    return obj


def _random_objects(rng, h: int, w: int, n: int) -> List[Tuple[str, float, float, float]]:
    objs = []
    for _ in range(n):
        kind = CLASSES[rng.randint(len(CLASSES))]
        r = rng.uniform(0.08, 0.2) * min(h, w)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        objs.append((kind, cx, cy, r))
    return objs


COLORS = {'circle': (40, 40, 230), 'square': (40, 200, 40), 'triangle': (230, 140, 30)}


def _coco_annotation(kind: str, m: np.ndarray, ann_id: int, img_id: int) -> dict:
    """COCO instance entry for one binary mask (squares as RLE, others as polygons)."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(m))
    x, y, bw, bh = mask_utils.toBbox(rle).tolist()
    if kind == 'square':  # store as RLE (iscrowd 0): both formats get exercised
        rle['counts'] = rle['counts'].decode('ascii')
        seg = rle
    else:
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        seg = [c.flatten().astype(float).tolist() for c in contours if len(c) >= 3]
    return dict(id=ann_id, image_id=img_id, category_id=CLASSES.index(kind) + 1,
                bbox=[x, y, bw, bh], area=float(m.sum()), iscrowd=0, segmentation=seg)


def _write_coco_json(out: str, split: str, images: list, annotations: list) -> None:
    categories = [dict(id=i + 1, name=c, supercategory='shape') for i, c in enumerate(CLASSES)]
    os.makedirs(osp.join(out, 'annotations'), exist_ok=True)
    with open(osp.join(out, 'annotations', f'instances_{split}2017.json'), 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def make_coco(out: str, seed: int = 0, n_train: int = 8, n_val: int = 4) -> None:
    rng, photos = np.random.RandomState(seed), _photos()
    for split, n in (('train', n_train), ('val', n_val)):
        img_dir = osp.join(out, f'{split}2017')
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            h, w = int(rng.choice([160, 192, 224])), int(rng.choice([192, 224, 256]))
            img = _background(rng, photos, h, w)
            label = np.zeros((h, w), np.uint8)
            objs = _random_objects(rng, h, w, rng.randint(1, 4))
            masks = []
            for kind, cx, cy, r in objs:
                poly = _shape_polygon(kind, cx, cy, r)
                m = _draw(img, label, poly, COLORS[kind], 1)
                # later shapes occlude earlier ones: keep the visible part
                masks = [mm & (1 - m) for mm in masks] + [m]
            img_id = len(images) + 1 + (0 if split == 'train' else 1000)
            fname = f'{split}_{i:04d}.jpg'
            cv2.imwrite(osp.join(img_dir, fname), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append(dict(id=img_id, file_name=fname, height=h, width=w))
            for (kind, cx, cy, r), m in zip(objs, masks):
                if m.sum() < 16:
                    continue
                annotations.append(_coco_annotation(
                    kind, m, len(annotations) + 1 + (0 if split == 'train' else 100000), img_id))
        _write_coco_json(out, split, images, annotations)


def _demo_background(rng: np.random.RandomState, photos, h: int, w: int) -> np.ndarray:
    """A photo crop, blurred and at 40% contrast: texture, but no shape-like edges."""
    img = cv2.GaussianBlur(_background(rng, photos, h, w).astype(np.float32), (0, 0), 2.0)
    return (0.4 * img + 0.6 * img.mean()).astype(np.uint8)


def _separate_objects(rng, h: int, w: int, n: int,
                      r_range: Tuple[float, float]) -> List[Tuple[str, float, float, float]]:
    """Up to ``n`` shapes (kind, cx, cy, r) that do not touch (a square's corner
    is r * sqrt(2) from its centre, hence the 1.45 margin)."""
    objs = []
    for _ in range(50 * n):
        if len(objs) == n:
            break
        kind = CLASSES[rng.randint(len(CLASSES))]
        r = rng.uniform(*r_range) * min(h, w)
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if all(np.hypot(cx - ox, cy - oy) > 1.45 * (r + orad) for _, ox, oy, orad in objs):
            objs.append((kind, cx, cy, r))
    return objs


def make_coco_demo(out: str, seed: int = 4, n_train: int = 320, n_val: int = 64,
                   size: int = 128) -> None:
    """The ``make demo`` detection set: ``size`` px square images, 1-3 separate
    shapes (radius 10-24% of the side) in jittered class colours on a blurred,
    low-contrast photo background; train and val drawn independently (no
    validation image is ever trained on). Same COCO layout as ``make_coco``."""
    rng, photos = np.random.RandomState(seed), _photos()
    for split, n in (('train', n_train), ('val', n_val)):
        img_dir = osp.join(out, f'{split}2017')
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img = _demo_background(rng, photos, size, size)
            label = np.zeros((size, size), np.uint8)
            img_id = i + 1 + (0 if split == 'train' else 10000)
            for kind, cx, cy, r in _separate_objects(rng, size, size, rng.randint(1, 4),
                                                     (0.10, 0.24)):
                color = np.clip(np.array(COLORS[kind]) + rng.randint(-30, 31, 3), 0, 255)
                m = _draw(img, label, _shape_polygon(kind, cx, cy, r), color.tolist(), 1)
                annotations.append(_coco_annotation(
                    kind, m, len(annotations) + 1 + (0 if split == 'train' else 1000000), img_id))
            fname = f'{split}_{i:04d}.jpg'
            cv2.imwrite(osp.join(img_dir, fname), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append(dict(id=img_id, file_name=fname, height=size, width=size))
        _write_coco_json(out, split, images, annotations)


def make_ade(out: str, seed: int = 1, n_train: int = 8, n_val: int = 4) -> None:
    rng, photos = np.random.RandomState(seed), _photos()
    for split, n in (('training', n_train), ('validation', n_val)):
        os.makedirs(osp.join(out, 'images', split), exist_ok=True)
        os.makedirs(osp.join(out, 'annotations', split), exist_ok=True)
        for i in range(n):
            h, w = 128, int(rng.choice([128, 160]))
            img = _background(rng, photos, h, w)
            label = np.ones((h, w), np.uint8)  # 1 = background
            label[:2] = 0  # a strip of "unlabelled" (ignored after reduce_zero_label)
            for kind, cx, cy, r in _random_objects(rng, h, w, rng.randint(1, 4)):
                _draw(img, label, _shape_polygon(kind, cx, cy, r), COLORS[kind],
                      2 + CLASSES.index(kind))
            name = f'ADE_{split}_{i:08d}'
            cv2.imwrite(osp.join(out, 'images', split, name + '.jpg'), img)
            cv2.imwrite(osp.join(out, 'annotations', split, name + '.png'), label)


def make_imagenet(out: str, seed: int = 2, n_train: int = 8, n_val: int = 4) -> None:
    rng, photos = np.random.RandomState(seed), _photos()
    os.makedirs(osp.join(out, 'meta'), exist_ok=True)
    for split, n in (('train', n_train), ('val', n_val)):
        lines = []
        for c, kind in enumerate(CLASSES):
            os.makedirs(osp.join(out, split, kind), exist_ok=True)
            for i in range(n):
                img = _background(rng, photos, 64, 64)
                label = np.zeros((64, 64), np.uint8)
                r = rng.uniform(12, 24)
                cx, cy = rng.uniform(r, 64 - r), rng.uniform(r, 64 - r)
                _draw(img, label, _shape_polygon(kind, cx, cy, r), COLORS[kind], 1)
                rel = f'{kind}/{split}_{i:04d}.JPEG'
                cv2.imwrite(osp.join(out, split, rel), img)
                lines.append(f'{rel} {c}')
        with open(osp.join(out, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    with open(osp.join(out, 'meta', 'classes.txt'), 'w') as f:
        f.write('\n'.join(CLASSES) + '\n')


def make_video(out: str, seed: int = 3, n_train: int = 8, n_val: int = 4,
               frames: int = 8, size: int = 48) -> None:
    rng, photos = np.random.RandomState(seed), _photos()
    step = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}
    for split, n in (('train', n_train), ('val', n_val)):
        lines = []
        for i in range(n):
            label = i % len(MOTIONS)
            dx, dy = step[MOTIONS[label]]
            bg = _background(rng, photos, size, size)
            kind = CLASSES[rng.randint(len(CLASSES))]
            r = size * 0.15
            x0, y0 = size / 2 - dx * size * 0.25, size / 2 - dy * size * 0.25
            name = f'{split}_{i:04d}'
            os.makedirs(osp.join(out, 'rawframes', name), exist_ok=True)
            for t in range(frames):
                img, lab = bg.copy(), np.zeros((size, size), np.uint8)
                cx = x0 + dx * size * 0.5 * t / (frames - 1)
                cy = y0 + dy * size * 0.5 * t / (frames - 1)
                _draw(img, lab, _shape_polygon(kind, cx, cy, r), COLORS[kind], 1)
                cv2.imwrite(osp.join(out, 'rawframes', name, f'img_{t + 1:05d}.jpg'), img)
            lines.append(f'{name} {frames} {label}')
        with open(osp.join(out, f'{split}_list.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


# the tiny sets (tests) and the larger ``make demo`` sets
MAKERS = dict(coco=make_coco, ade=make_ade, imagenet=make_imagenet, video=make_video)
DEMO_MAKERS = dict(coco_demo=make_coco_demo)
ALL_MAKERS = {**MAKERS, **DEMO_MAKERS}


def make_all(out: str, tasks=tuple(MAKERS)) -> None:
    for task in tasks:
        if task not in ALL_MAKERS:
            raise ValueError(f'unknown task {task!r}; valid: {list(ALL_MAKERS)}')
        ALL_MAKERS[task](osp.join(out, task))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='data/tiny', help='output root')
    parser.add_argument('--tasks', nargs='+', default=list(MAKERS), choices=list(ALL_MAKERS),
                        help='default: the tiny sets; coco_demo: the make demo set')
    args = parser.parse_args()
    make_all(args.out, args.tasks)
    print(f'tiny datasets written under {args.out}: {", ".join(args.tasks)}')


if __name__ == '__main__':
    main()
