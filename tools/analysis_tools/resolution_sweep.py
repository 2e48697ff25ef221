"""Behaviour of a classifier across test resolutions: a CSV and a PNG curve.

    python tools/analysis_tools/resolution_sweep.py configs/vim/vim-tiny_8xb128_in1k.py \\
        work_dirs/vim_t/epoch_300.pth --sizes 160 192 224 256 288 320 384 --out-dir sweep/

Two measures (``--mode auto`` picks ``accuracy`` when the config's val set
can be built, else ``stability``):

* ``accuracy``: top-1 (%) on the config's ``val_dataloader`` set (``--split
  test`` for the test set) with its test pipeline re-targeted to each size S:
  the short-edge resize keeps the config's resize/crop ratio (256/224 -> S*256/224)
  and the centre crop becomes S x S. Run through ``model.test_step`` (i.e. the
  data preprocessor and the head's prediction).
* ``stability`` (no labels needed): images from ``--images`` (default: the
  tiny ImageNet val folder; N(0, 1) noise when there is none) resized to each
  S, the backbone's last output globally average-pooled (a class token is used
  as is), and per image the cosine similarity to its features at
  ``--train-size`` (default: the val pipeline's crop size); mean and std over
  the images. 1.0 = the representation does not move with the resolution.

CHECKPOINT may be ``none`` (initialised weights). Output: ``<out-dir>/
resolution_sweep.csv`` (size + the measure's columns) and ``resolution_sweep.png``.
"""
import argparse
import copy
import csv
import os
import os.path as osp
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _model_utils import (backbone_stage_outputs, build_model, default_image_dir,  # noqa: E402
                          find_images, load_config, load_images, task_of)


def _pipeline_sizes(pipeline: List[dict]):
    """(resize short edge, crop size) of a test pipeline, or (None, None)."""
    resize = crop = None
    for t in pipeline:
        if t.get('type') in ('ResizeEdge', 'Resize') and isinstance(t.get('scale'), int):
            resize = t['scale']
        if t.get('type') == 'CenterCrop':
            c = t.get('crop_size')
            crop = c if isinstance(c, int) else c[0]
    return resize, crop


def retarget_pipeline(pipeline: List[dict], size: int) -> List[dict]:
    """The test pipeline with its resize / crop scaled to a ``size`` crop."""
    resize, crop = _pipeline_sizes(pipeline)
    ratio = resize / crop if resize and crop else 1.0
    out = []
    for t in copy.deepcopy(pipeline):
        if t.get('type') in ('ResizeEdge', 'Resize') and isinstance(t.get('scale'), int):
            t['scale'] = int(round(size * ratio))
        elif t.get('type') in ('ResizeEdge', 'Resize'):
            t = dict(type='Resize', scale=(size, size))
        if t.get('type') == 'CenterCrop':
            t['crop_size'] = size
        out.append(t)
    if not crop:  # no crop in the pipeline: make sure the output is size x size
        pack = [i for i, t in enumerate(out) if t.get('type') == 'PackInputs']
        out.insert(pack[0] if pack else len(out), dict(type='CenterCrop', crop_size=size))
    return out


def build_eval_dataset(cfg, split: str):
    """The labelled val/test dataset of the config, or None if it cannot be built."""
    from mmpretrain.registry import DATASETS
    loader = cfg.get(f'{split}_dataloader')
    if not loader or 'dataset' not in loader:
        return None
    try:
        ds = DATASETS.build(copy.deepcopy(loader.dataset))
        return ds if len(ds) else None
    except (FileNotFoundError, OSError, RuntimeError, ValueError, KeyError) as e:
        print(f'no {split} set ({type(e).__name__}: {e}); using feature stability')
        return None


@torch.no_grad()
def top1_at(model, ds_cfg: dict, size: int, batch: int) -> Dict[str, float]:
    from mmengine.dataset import pseudo_collate
    from mmpretrain.registry import DATASETS
    cfg = copy.deepcopy(ds_cfg)
    cfg['pipeline'] = retarget_pipeline(cfg['pipeline'], size)
    ds = DATASETS.build(cfg)
    correct = 0
    for i in range(0, len(ds), batch):
        data = pseudo_collate([ds[j] for j in range(i, min(i + batch, len(ds)))])
        for s in model.test_step(data):
            correct += int(s.pred_label.item() == s.gt_label.item())
    return dict(top1=100.0 * correct / len(ds), n_images=len(ds))


@torch.no_grad()
def pooled_features(model, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    feats = []
    for i in range(0, len(x), batch):
        f = backbone_stage_outputs(model, x[i:i + batch])[-1]
        feats.append(f.flatten(2).mean(-1) if f.dim() == 4 else f.flatten(1))
    return torch.cat(feats)


def save_curve(sizes, values, ylabel: str, out: str, ref: Optional[int], title: str,
               err=None) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.errorbar(sizes, values, yerr=err, marker='o', capsize=3)
    if ref is not None:
        ax.axvline(ref, color='gray', linestyle='--', linewidth=1, label=f'reference size {ref}')
        ax.legend(fontsize=8)
    ax.set_xlabel('test resolution (px)')
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100, bbox_inches='tight')
    plt.close(fig)


def parse_args():
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Classifier across test resolutions (mmssm)')
    parser.add_argument('config')
    parser.add_argument('checkpoint', help="checkpoint file, or 'none' for initialised weights")
    parser.add_argument('--sizes', type=int, nargs='+', required=True)
    parser.add_argument('--mode', choices=['auto', 'accuracy', 'stability'], default='auto')
    parser.add_argument('--split', choices=['val', 'test'], default='val')
    parser.add_argument('--train-size', type=int, default=None,
                        help='reference size for stability (default: the val crop size)')
    parser.add_argument('--images', default=None, help='image folder for stability')
    parser.add_argument('--num-images', type=int, default=16)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument('--out-dir', default='.', help='where the CSV and PNG go')
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    if task_of(cfg) != 'cls':
        raise ValueError(f'{args.config}: resolution_sweep needs a classifier '
                         f'(default_scope mmpretrain), got {cfg.default_scope}')
    if min(args.sizes) < 1:
        raise ValueError(f'--sizes must be positive, got {args.sizes}')
    sizes = sorted(set(args.sizes))
    torch.manual_seed(0)
    model = build_model(cfg, checkpoint=None if args.checkpoint == 'none' else args.checkpoint)
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = osp.join(args.out_dir, 'resolution_sweep.csv')
    png_path = osp.join(args.out_dir, 'resolution_sweep.png')
    split_cfg = cfg.get(f'{args.split}_dataloader') or {}
    _, crop = _pipeline_sizes(split_cfg.get('dataset', {}).get('pipeline', []))
    name = osp.splitext(osp.basename(args.config))[0]

    ds = build_eval_dataset(cfg, args.split) if args.mode in ('auto', 'accuracy') else None
    if args.mode == 'accuracy' and ds is None:
        raise RuntimeError(f'--mode accuracy: the {args.split} set of {args.config} '
                           'could not be built (see above)')
    rows = []
    if ds is not None:
        for s in sizes:
            rows.append(dict(size=s, **top1_at(model, split_cfg['dataset'], s, args.batch)))
            print(f"size {s}: top-1 {rows[-1]['top1']:.2f}%", flush=True)
        fields = ['size', 'top1', 'n_images']
        save_curve(sizes, [r['top1'] for r in rows], 'top-1 (%)', png_path, crop,
                   f'{name}: top-1 on {rows[0]["n_images"]} {args.split} images')
    else:
        ref = args.train_size or crop or 224
        folder = args.images if args.images is not None else default_image_dir()
        files = find_images(folder, args.num_images)
        if args.images is not None and not files:
            raise FileNotFoundError(f'--images {args.images}: no images found')

        def inputs(s):
            if files:
                return load_images(files, s, s, cfg)
            # the same noise seen at every size: one fixed field, resized
            base = torch.randn(args.num_images, 3, 256, 256,
                               generator=torch.Generator().manual_seed(0))
            return F.interpolate(base, size=(s, s), mode='bilinear', align_corners=False)

        f_ref = pooled_features(model, inputs(ref), args.batch)
        for s in sizes:
            cos = F.cosine_similarity(pooled_features(model, inputs(s), args.batch), f_ref, dim=1)
            rows.append(dict(size=s, cos_sim_mean=float(cos.mean()),
                             cos_sim_std=float(cos.std(unbiased=False)), ref_size=ref,
                             n_images=len(cos)))
            print(f'size {s}: cosine similarity to {ref} px {cos.mean():.4f}', flush=True)
        fields = ['size', 'cos_sim_mean', 'cos_sim_std', 'ref_size', 'n_images']
        src = f'{len(files)} images' if files else f'{args.num_images} noise inputs'
        save_curve(sizes, [r['cos_sim_mean'] for r in rows], 'cosine sim. of pooled features',
                   png_path, ref, f'{name}: feature stability vs {ref} px ({src})',
                   err=[r['cos_sim_std'] for r in rows])
    with open(csv_path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in r.items()})
    print(f'saved {csv_path} and {png_path}')


if __name__ == '__main__':
    main()
