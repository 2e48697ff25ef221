"""``make demo``: train and evaluate a Mask R-CNN with a V2M-S* (pyramid) backbone on
CPU, end to end with the real tools, and show that it learned.

1. ``tools/misc/make_tiny_datasets.py --tasks coco_demo``: 320 train and 64
   held-out val images (128 px, 3 shape classes, COCO format);
2. ``tools/train.py configs/demo/mask_rcnn_v2m_s.py`` (300 iterations from scratch);
3. ``tools/test.py`` on the last checkpoint: pycocotools bbox/segm AP on the val
   images, predictions dumped to ``test/preds.pkl``;
4. a summary (iterations, time, loss, AP) and ``WORK_DIR/demo.png``: the loss
   curve and val images with the predicted masks and boxes drawn by mmdet's
   ``DetLocalVisualizer``.

Usage: ``python tools/misc/demo.py [--data data/tiny] [--work-dir work_dirs/demo_mask_rcnn]``
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Tuple

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))
CONFIG = 'configs/demo/mask_rcnn_v2m_s.py'
DRAW_PALETTE = [(255, 230, 0), (255, 0, 255), (0, 255, 255)]


def run_tool(args: List[str], env: dict, log_path: str) -> float:
    """Run a tool, echo its progress lines, keep its full output in ``log_path``."""
    print(f'[demo] {" ".join(args)}   (log: {log_path})', flush=True)
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            log.write(line)
            if 'Iter(train)' in line or 'mAP_copypaste' in line or line.startswith('tools/'):
                print('  ' + line.rstrip()[line.find('Iter('):] if 'Iter(' in line
                      else '  ' + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        with open(log_path) as f:
            sys.stderr.write(''.join(f.readlines()[-40:]))
        raise SystemExit(f'[demo] {args[0]} failed (exit {rc}); full log: {log_path}')
    return time.perf_counter() - start


def latest_json_lines(pattern: str) -> List[dict]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f'no log found at {pattern}')
    with open(paths[-1]) as f:
        return [json.loads(line) for line in f if line.strip()]


def draw_predictions(preds: List[dict], classes: Tuple[str, ...], palette, n: int,
                     score_thr: float, scale: int = 3) -> List:
    """Val images (upscaled x ``scale`` so labels stay legible) with predictions drawn."""
    import mmcv
    import numpy as np
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.structures import InstanceData
    from pycocotools import mask as mask_utils
    vis = DetLocalVisualizer(name='mmssm_demo', alpha=0.5)
    vis.dataset_meta = dict(classes=classes, palette=palette)
    images = []
    for pred in sorted(preds, key=lambda p: p['img_path'])[:n]:
        img = mmcv.imread(pred['img_path'], channel_order='rgb')
        img = mmcv.imresize(img, (img.shape[1] * scale, img.shape[0] * scale))
        p = pred['pred_instances']
        keep = p['scores'] >= score_thr
        inst = InstanceData()
        inst.bboxes = p['bboxes'][keep] * scale
        inst.labels, inst.scores = p['labels'][keep], p['scores'][keep]
        masks = [mask_utils.decode(m) for m, k in zip(p['masks'], keep.tolist()) if k]
        masks = [mmcv.imresize(m, (img.shape[1], img.shape[0]), interpolation='nearest')
                 for m in masks]
        inst.masks = torch.from_numpy(np.stack(masks).astype(bool)) if masks else \
            torch.zeros((0, ) + img.shape[:2], dtype=torch.bool)
        sample = DetDataSample()
        sample.pred_instances = inst
        with warnings.catch_warnings():  # boxes touching the border are drawn clipped
            warnings.simplefilter('ignore', UserWarning)
            vis.add_datasample('val', img, sample, draw_gt=False, show=False,
                               pred_score_thr=score_thr)
        images.append((osp.basename(pred['img_path']), vis.get_image()))
    return images


def write_picture(path: str, losses: List[dict], images: List, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = max(1, (len(images) + 1) // 2)
    fig = plt.figure(figsize=(3 * cols, 8.4))
    grid = fig.add_gridspec(3, cols, height_ratios=[1, 1.1, 1.1])
    ax = fig.add_subplot(grid[0, :])
    iters = [r['iter'] for r in losses]
    for key, style in (('loss', 'k-'), ('loss_cls', '--'), ('loss_bbox', '--'),
                       ('loss_mask', '--'), ('loss_rpn_cls', ':')):
        ax.plot(iters, [r[key] for r in losses], style, label=key, lw=2 if key == 'loss' else 1)
    ax.set_xlabel('iteration')
    ax.set_ylabel('training loss')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(ncol=5, fontsize=8)
    ax.set_title(title, fontsize=10)
    for i, (name, img) in enumerate(images):
        a = fig.add_subplot(grid[1 + i // cols, i % cols])
        a.imshow(img)
        a.set_title(name, fontsize=8)
        a.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default='data/tiny', help='root of the generated sets')
    parser.add_argument('--work-dir', default='work_dirs/demo_mask_rcnn')
    parser.add_argument('--show', type=int, default=8, help='val images drawn in demo.png')
    parser.add_argument('--score-thr', type=float, default=0.5)
    args = parser.parse_args()
    data, work = osp.abspath(args.data), osp.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, MMSSM_TINY_DATA=data)
    # one thread: this model's ops are too small to gain from more, and torch's
    # OpenMP workers spin-wait when other work shares the cores (measured under
    # load: 2 min 46 s of CPU for the whole demo with 1 thread, 10 min 35 s with 2)
    env.setdefault('OMP_NUM_THREADS', '1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
    total = time.perf_counter()

    start = time.perf_counter()
    sys.path.insert(0, HERE)
    from make_tiny_datasets import make_all
    make_all(data, ('coco_demo', ))
    t_data = time.perf_counter() - start
    print(f'[demo] wrote {data}/coco_demo (320 train / 64 val images) in {t_data:.1f} s')

    train_dir, test_dir = osp.join(work, 'train'), osp.join(work, 'test')
    t_train = run_tool(['tools/train.py', CONFIG, '--work-dir', train_dir], env,
                       osp.join(work, 'train.log'))
    losses = [r for r in latest_json_lines(osp.join(train_dir, '*', 'vis_data', 'scalars.json'))
              if 'loss' in r]
    iters = losses[-1]['iter']
    preds_path = osp.join(test_dir, 'preds.pkl')
    t_test = run_tool(['tools/test.py', CONFIG, osp.join(train_dir, f'iter_{iters}.pth'),
                       '--work-dir', test_dir, '--out', preds_path], env,
                      osp.join(work, 'test.log'))
    metrics = latest_json_lines(osp.join(test_dir, '2*', '2*.json'))[-1]

    start = time.perf_counter()
    import pickle

    from mmengine.config import Config
    meta = Config.fromfile(osp.join(REPO, CONFIG)).test_dataloader.dataset.metainfo
    with open(preds_path, 'rb') as f:  # written by tools/test.py --out just above
        preds = pickle.load(f)
    # mask colours that stand out against the shapes' own (red, green, blue)
    images = draw_predictions(preds, tuple(meta['classes']), DRAW_PALETTE, args.show,
                              args.score_thr)
    bbox, segm = metrics['coco/bbox_mAP'], metrics['coco/segm_mAP']
    picture = osp.join(work, 'demo.png')
    write_picture(picture, losses, images,
                  f'Mask R-CNN, V2M-S* (pyramid) backbone, {iters} iterations on CPU: '
                  f'held-out bbox AP {bbox:.3f}, segm AP {segm:.3f} '
                  f'(predictions with score >= {args.score_thr})')
    t_pic = time.perf_counter() - start
    elapsed = time.perf_counter() - total
    rows = [
        ('data', f'320 train / 64 held-out val images, 128 px', t_data),
        ('train', f'{iters} iterations, loss {losses[0]["loss"]:.3f} (iter {losses[0]["iter"]}) '
                  f'-> {losses[-1]["loss"]:.3f} (iter {iters})', t_train),
        ('test', f'bbox AP {bbox:.3f} (AP50 {metrics["coco/bbox_mAP_50"]:.3f}), segm AP '
                 f'{segm:.3f} (AP50 {metrics["coco/segm_mAP_50"]:.3f})', t_test),
        ('picture', picture, t_pic),
    ]
    print('\n[demo] summary: Mask R-CNN with a V2M-S* (pyramid) backbone, CPU, real tools')
    for name, text, seconds in rows:
        print(f'  {name:8s} {text:62s} {seconds:6.1f} s')
    print(f'  {"total":8s} {"":62s} {elapsed:6.1f} s', flush=True)
    return dict(bbox_mAP=bbox, segm_mAP=segm, first_loss=losses[0]['loss'],
                last_loss=losses[-1]['loss'], iters=iters, seconds=elapsed)


if __name__ == '__main__':
    main()
