"""Shared by the analysis / visualization tools: build any MM model from a
config (task library picked from ``default_scope``) and drive it with plain
tensors, without a dataset.

Input convention: the tools feed an already-normalised (b, 3, H, W) tensor to
the model, i.e. what the ``data_preprocessor`` would output; the preprocessor
itself (mean/std, padding) is not run or counted.
"""
import importlib
import os.path as osp
import sys
from functools import partial
from typing import Any, Callable, List, Optional, Sequence

import torch
from mmengine.config import Config
from torch import Tensor, nn

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:  # run as a script from anywhere: import this checkout's mmssm
    sys.path.insert(0, REPO)

import mmssm  # noqa: E402,F401  (registers mmssm modules, checkpoint loading)
from mmssm.utils.config import replace_sync_bn  # noqa: E402

SCOPE_TASKS = {'mmpretrain': 'cls', 'mmdet': 'det', 'mmseg': 'seg', 'mmaction': 'video'}


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """A config file path, or ``mmpretrain::swin_transformer/...py`` style."""
    if '::' in path and not osp.exists(path):
        from mmengine.hub import get_config
        cfg = get_config(path)
    else:
        cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def task_of(cfg: Config) -> str:
    scope = cfg.get('default_scope', None)
    if scope not in SCOPE_TASKS:
        raise ValueError(f'default_scope={scope!r}: the analysis tools support '
                         f'{sorted(SCOPE_TASKS)} (classification, detection, segmentation, '
                         'video recognition)')
    return SCOPE_TASKS[scope]


def parse_shape(values: Sequence[int]) -> tuple:
    """``--shape H W``, ``--shape S`` (square) or, for video, ``--shape T H W``."""
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) in (2, 3):
        return tuple(values)
    raise ValueError(f'--shape takes H W, one size, or T H W (video), got {list(values)}')


def dummy_input(task: str, shape: Sequence[int], batch: int = 1, device: str = 'cpu') -> Tensor:
    """Random preprocessed input: (b, 3, H, W) for images; for video (b, 1, 3, T, H, W),
    one clip per sample as mmaction2's ``format_shape='NCTHW'`` gives it."""
    if task == 'video':
        if len(shape) != 3:
            raise ValueError(f'a video model needs --shape T H W, got {list(shape)}')
        return torch.randn(batch, 1, 3, *shape, device=device)
    if len(shape) != 2:
        raise ValueError(f'an image model needs --shape H W, got {list(shape)}')
    return torch.randn(batch, 3, *shape, device=device)


def build_model(cfg: Config, checkpoint: Optional[str] = None, device: str = 'cpu',
                pretrained: bool = False, init: bool = True) -> nn.Module:
    """Build ``cfg.model`` in its task library, load ``checkpoint`` (else run
    ``init_weights``: the model "before training"), eval mode.

    ``init=False`` skips ``init_weights`` (shapes only: FLOPs / parameters).
    Backbone ``init_cfg`` Pretrained entries are dropped unless ``pretrained``
    (the tools need no weights; they would otherwise fail on a missing file).
    """
    from mmengine.registry import init_default_scope
    scope = cfg.get('default_scope', 'mmpretrain')
    task_of(cfg)
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:  # as mmengine's Runner does
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    if not pretrained and isinstance(model_cfg.get('backbone'), dict):
        init = model_cfg.backbone.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            model_cfg.backbone.init_cfg = None
    if not str(device).startswith('cuda'):
        replace_sync_bn(model_cfg)
    model = registry.build(model_cfg)
    if checkpoint:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, checkpoint, map_location='cpu', logger='silent')
    elif init and hasattr(model, 'init_weights'):
        model.init_weights()
    return model.to(device).eval()


def fake_data_samples(task: str, batch: int, h: int, w: int, with_gt: bool = False,
                      num_classes: int = 3, device: str = 'cpu') -> Optional[List[Any]]:
    """Data samples with the meta information the models read; optional
    random ground truth (for training-mode forward passes)."""
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                batch_input_shape=(h, w), scale_factor=(1.0, 1.0), flip=False)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(batch):
        if task == 'cls':
            from mmpretrain.structures import DataSample
            s = DataSample(metainfo=meta)
            if with_gt:
                s.set_gt_label(int(torch.randint(num_classes, (1, ), generator=g)))
        elif task == 'video':
            from mmaction.structures import ActionDataSample
            s = ActionDataSample(metainfo=meta)
            if with_gt:
                s.set_gt_label(int(torch.randint(num_classes, (1, ), generator=g)))
        elif task == 'seg':
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            s = SegDataSample(metainfo=meta)
            if with_gt:
                s.gt_sem_seg = PixelData(data=torch.randint(
                    num_classes, (1, h, w), generator=g).to(device))
        else:
            from mmdet.structures import DetDataSample
            from mmdet.structures.mask import BitmapMasks
            from mmengine.structures import InstanceData
            s = DetDataSample(metainfo=meta)
            if with_gt:
                n = 3
                xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.5
                wh = (torch.rand(n, 2, generator=g) * 0.4 + 0.1) * torch.tensor([w, h])
                boxes = torch.cat([xy, xy + wh], 1)
                masks = torch.zeros(n, h, w, dtype=torch.uint8)
                for j, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                    masks[j, y0:y1, x0:x1] = 1
                inst = InstanceData(bboxes=boxes.to(device),
                                    labels=torch.randint(num_classes, (n, ), generator=g).to(device),
                                    masks=BitmapMasks(masks.numpy(), h, w))
                s.gt_instances = inst
        samples.append(s)
    return samples


def tensor_forward(model: nn.Module, task: str, batch: int, h: int, w: int) -> Callable:
    """``f(inputs) -> tensors``: the model's ``mode='tensor'`` path
    (classifier: backbone+neck+head scores; detector: ``_forward`` with RPN
    proposals and RoI heads; segmentor: ``_forward``, the decode head logits;
    video recognizer: backbone, neck and ``cls_head`` scores)."""
    if task == 'video':
        return partial(model.forward, mode='tensor', stage='head')
    samples = fake_data_samples(task, batch, h, w)
    return partial(model.forward, data_samples=samples, mode='tensor')


def loss_forward(model: nn.Module, task: str, inputs: Tensor, num_classes: int = 3) -> Tensor:
    """One training forward pass on random ground truth; returns the summed loss."""
    b, (h, w) = inputs.shape[0], inputs.shape[-2:]
    samples = fake_data_samples(task, b, h, w, with_gt=True, num_classes=num_classes,
                                device=str(inputs.device))
    losses = model(inputs, samples, mode='loss')
    loss, _ = model.parse_losses(losses)
    return loss


def num_classes_of(cfg: Config) -> int:
    """Best guess of the class count (for random labels)."""
    m = cfg.model
    for key in ('head', 'decode_head', 'cls_head'):
        if isinstance(m.get(key), dict) and 'num_classes' in m[key]:
            return int(m[key]['num_classes'])
    try:
        return int(m.roi_head.bbox_head.num_classes)
    except (AttributeError, KeyError, TypeError):
        return 3


def find_images(folder: Optional[str], limit: int) -> List[str]:
    """Up to ``limit`` image files under ``folder`` (recursive, sorted)."""
    import glob
    if not folder or not osp.isdir(folder):
        return []
    exts = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
    files = sorted(f for f in glob.glob(osp.join(folder, '**', '*'), recursive=True)
                   if f.lower().endswith(exts))
    return files[:limit]


def default_image_dir() -> str:
    """The tiny ImageNet-style val folder (tools/misc/make_tiny_datasets.py)."""
    import os
    root = os.environ.get('MMSSM_TINY_DATA', osp.join(REPO, 'data', 'tiny'))
    return osp.join(root, 'imagenet', 'val')


def load_images(files: Sequence[str], h: int, w: int, cfg: Optional[Config] = None) -> Tensor:
    """Resize to (h, w) and normalise like the config's data preprocessor
    (ImageNet mean/std, RGB by default) -> (n, 3, h, w)."""
    import numpy as np
    from PIL import Image
    pre = (cfg.get('data_preprocessor') or cfg.model.get('data_preprocessor') or {}) if cfg else {}
    mean = torch.tensor(pre.get('mean', [123.675, 116.28, 103.53])).view(1, 3, 1, 1)
    std = torch.tensor(pre.get('std', [58.395, 57.12, 57.375])).view(1, 3, 1, 1)
    imgs = [np.asarray(Image.open(f).convert('RGB').resize((w, h), Image.BILINEAR))
            for f in files]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return (x - mean) / std


def backbone_stage_outputs(model: nn.Module, inputs: Tensor) -> Sequence[Tensor]:
    """The backbone's tuple of feature maps (all ``out_indices``)."""
    out = model.backbone(inputs)
    return out if isinstance(out, (tuple, list)) else (out, )
