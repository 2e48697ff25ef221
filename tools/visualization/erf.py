"""Effective receptive field (ERF) maps of one or several models, side by side.

    # VMamba-T before (init weights) and after training, stage 4 at 224 px
    python tools/visualization/erf.py configs/vmamba/vmamba-tiny_8xb128_in1k.py \\
        --checkpoints none work_dirs/vmamba_t/epoch_300.pth --labels init trained \\
        --images data/imagenet/val --num-images 50 --shape 224 224 --out erf.png
    # several models
    python tools/visualization/erf.py CFG_A CFG_B CFG_C --out erf.png

For every model and image, the input x (normalised like the config's data
preprocessor) gets a gradient: sum_c ReLU(feature) of the chosen backbone stage
at the CENTRE position (h//2, w//2) is back-propagated (ReLU as in RepLKNet /
VMamba's ERF code: without it a LayerNorm-ed output sums to a constant), and
|d out / d x| summed over the 3 input channels is the image's map. Maps are
averaged over the images (a folder, by default the tiny ImageNet val set from
tools/misc/make_tiny_datasets.py, else N(0, 1) noise), normalised by their max
and drawn with a log scale (log10(1 + 1000 m) / 3, as ERF papers do so that weak
long-range contributions stay visible; ``--scale linear`` to turn off).
The printed table gives, per model, the share of the image area that holds
20 / 50 / 99 % of the total gradient mass (RepLKNet's "high-contribution area
ratio": larger = wider ERF).

Stage: ``--stage`` indexes the backbone's output tuple (default -1, the last);
add ``--cfg-options model.backbone.out_indices=...`` to expose other stages.
Plain (Vim/V2M) backbones that return a class token are switched to their
``featmap`` output for the analysis.
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'analysis_tools'))
from _model_utils import (backbone_stage_outputs, build_model, default_image_dir,  # noqa: E402
                          find_images, load_config, load_images, parse_shape)


def erf_map(model, images: torch.Tensor, stage: int = -1, batch: int = 4) -> np.ndarray:
    """Mean |grad| (h, w) of the centre of ``stage`` w.r.t. the input images."""
    bb = model.backbone
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    for i in range(0, len(images), batch):
        x = images[i:i + batch].clone().requires_grad_(True)
        feats = backbone_stage_outputs(model, x)
        try:
            f = feats[stage]
        except IndexError:
            raise ValueError(f'--stage {stage}: the backbone returns {len(feats)} outputs; '
                             'set model.backbone.out_indices to expose more') from None
        if f.dim() != 4 and getattr(bb, 'out_type', None) not in (None, 'featmap'):
            bb.out_type = 'featmap'  # Vim-style class-token output -> token grid
            feats = backbone_stage_outputs(model, x)
            f = feats[stage]
        if f.dim() != 4:
            raise ValueError(f'stage {stage} output has shape {tuple(f.shape)}; an ERF needs a '
                             '(b, c, h, w) feature map')
        h, w = f.shape[-2:]
        # ReLU first (as RepLKNet / VMamba): the plain channel sum of a
        # LayerNorm-ed feature is a constant, whose gradient is zero
        F.relu(f[:, :, h // 2, w // 2]).sum().backward()
        total += x.grad.detach().abs().sum(1).sum(0).double()
    return (total / len(images)).numpy()


def area_ratios(m: np.ndarray, fractions: Sequence[float] = (0.2, 0.5, 0.99)) -> List[float]:
    """Smallest share of pixels holding each fraction of the total mass."""
    v = np.sort(m.ravel())[::-1]
    if not v.sum() > 0:
        return [float('nan')] * len(fractions)
    c = np.cumsum(v) / v.sum()
    return [float(min(np.searchsorted(c, t) + 1, v.size) / v.size) for t in fractions]


def display(m: np.ndarray, scale: str) -> np.ndarray:
    m = m / max(m.max(), 1e-30)
    return np.log10(1 + 1000 * m) / 3 if scale == 'log' else m


def save_figure(maps: Sequence[np.ndarray], labels: Sequence[str], out: str,
                scale: str = 'log', title: Optional[str] = None) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.6, 3.4), squeeze=False)
    for ax, m, label in zip(axes[0], maps, labels):
        im = ax.imshow(display(m, scale), cmap='RdYlGn', vmin=0, vmax=1)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=100, bbox_inches='tight')
    plt.close(fig)


def parse_args():
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Effective receptive field maps (mmssm)')
    parser.add_argument('configs', nargs='+', help='one config per panel (or one for all)')
    parser.add_argument('--checkpoints', nargs='+', default=None,
                        help="one per panel; 'none' = initialised weights (before training)")
    parser.add_argument('--labels', nargs='+', default=None, help='panel titles')
    parser.add_argument('--stage', type=int, default=-1, help='index into the backbone outputs')
    parser.add_argument('--images', default=None,
                        help='image folder (default: the tiny ImageNet val set, else noise)')
    parser.add_argument('--num-images', type=int, default=8)
    parser.add_argument('--shape', type=int, nargs='+', default=[64, 64], help='H W or one size')
    parser.add_argument('--scale', choices=['log', 'linear'], default='log')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides applied to every config')
    parser.add_argument('--out', default='erf.png', help='output PNG')
    return parser.parse_args()


def main():
    args = parse_args()
    shape = parse_shape(args.shape)
    if len(shape) != 2:
        raise SystemExit(f'erf.py: --shape takes H W or one size (image backbones), '
                         f'got {args.shape}')
    configs, ckpts = list(args.configs), args.checkpoints or ['none'] * len(args.configs)
    if len(configs) == 1 and len(ckpts) > 1:
        configs = configs * len(ckpts)
    if len(ckpts) != len(configs):
        raise ValueError(f'--checkpoints: give one per config ({len(configs)}), got {len(ckpts)}')
    labels = args.labels or [
        osp.splitext(osp.basename(c))[0] + ('' if k == 'none' else f'\n{osp.basename(k)}')
        for c, k in zip(configs, ckpts)]
    if len(labels) != len(configs):
        raise ValueError(f'--labels: give one per panel ({len(configs)}), got {len(labels)}')
    folder = args.images if args.images is not None else default_image_dir()
    files = find_images(folder, args.num_images)
    if args.images is not None and not files:
        raise FileNotFoundError(f'--images {args.images}: no .jpg/.png/.bmp/.webp images found')
    maps, rows = [], []
    for cfg_path, ckpt, label in zip(configs, ckpts, labels):
        torch.manual_seed(args.seed)
        cfg = load_config(cfg_path, args.cfg_options)
        model = build_model(cfg, checkpoint=None if ckpt == 'none' else ckpt)
        if files:
            x = load_images(files, *shape, cfg)
        else:
            x = torch.randn(args.num_images, 3, *shape,
                            generator=torch.Generator().manual_seed(args.seed))
        m = erf_map(model, x, args.stage)
        maps.append(m)
        rows.append((label.replace('\n', ' '), *area_ratios(m)))
    short = osp.join(*osp.normpath(folder).split(osp.sep)[-2:])  # e.g. imagenet/val
    src = (f'{len(files)} images from {short}' if files
           else f'{args.num_images} noise inputs')
    save_figure(maps, labels, args.out, args.scale,
                title=f'ERF, backbone output {args.stage}, {shape[0]}x{shape[1]}, {src}')
    print(f'ERF of backbone output {args.stage} at {shape[0]}x{shape[1]} over {src}')
    print('| model | area@20% | area@50% | area@99% |')
    print('|---|---|---|---|')
    for label, *r in rows:
        print(f'| {label} | ' + ' | '.join(f'{v:.4f}' for v in r) + ' |')
    print(f'saved {args.out}')


if __name__ == '__main__':
    main()
