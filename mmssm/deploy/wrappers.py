"""Plain ``forward(x) -> tensors`` views of OpenMMLab models, for export.

What each task exports (the input is the data preprocessor's output: normalised images
(B, 3, H, W), or clips (B, 3, T, H, W) for video):

* ``cls`` (mmpretrain classifier): the head's class scores (B, K), ``mode='tensor'``;
* ``seg`` (mmseg segmentor): the decode head's logits (B, K, H/s, W/s), ``mode='tensor'``;
* ``det`` (mmdet detector): backbone, neck and the dense head's raw outputs per level
  (two-stage: the RPN head's objectness and box deltas; one-stage: the bbox head's).
  Proposal selection, NMS and the RoI heads are data-dependent post-processing, left to
  the runtime side;
* ``video`` (mmaction2 recognizer): the classification head's scores (B, K);
* part ``backbone``: the backbone's feature maps; ``neck``: backbone + neck.
"""
from typing import Tuple

from torch import Tensor, nn

TASKS = ('cls', 'seg', 'det', 'video')
PARTS = ('model', 'backbone', 'neck')


class ExportModule(nn.Module):
    """Wrap ``model`` so that ``forward(x)`` returns a tuple of tensors.

    Args:
        model: an mmpretrain / mmseg / mmdet / mmaction2 model (eval mode).
        task: one of ``cls``, ``seg``, ``det``, ``video``.
        part: ``model`` (task outputs, see module docstring), ``backbone`` or ``neck``.
    """

    def __init__(self, model: nn.Module, task: str, part: str = 'model') -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f'task must be one of {TASKS}, got {task!r}')
        if part not in PARTS:
            raise ValueError(f'part must be one of {PARTS}, got {part!r}')
        if not isinstance(getattr(model, 'backbone', None), nn.Module):
            raise ValueError(f'{type(model).__name__} has no backbone: export supports '
                             'OpenMMLab classifiers, segmentors, detectors and recognizers')
        if part == 'neck' and getattr(model, 'neck', None) is None:
            raise ValueError(f'part=neck: {type(model).__name__} has no neck; use part=backbone')
        if task == 'det' and part == 'model':
            head = getattr(model, 'rpn_head', None) or getattr(model, 'bbox_head', None)
            if head is None:
                raise ValueError(f'{type(model).__name__}: no rpn_head or bbox_head to export; '
                                 'use part=backbone or part=neck')
        self.model, self.task, self.part = model.eval(), task, part

    def _features(self, x: Tensor) -> Tuple[Tensor, ...]:
        feats = self.model.backbone(x)
        feats = tuple(feats) if isinstance(feats, (tuple, list)) else (feats, )
        if self.part != 'backbone' and getattr(self.model, 'neck', None) is not None:
            feats = self.model.neck(feats)
            feats = tuple(feats) if isinstance(feats, (tuple, list)) else (feats, )
        return feats

    def forward(self, x: Tensor):
        if self.part != 'model':
            return self._features(x)
        if self.task == 'cls':
            return self.model(x, mode='tensor')
        if self.task == 'seg':
            return self.model(x, mode='tensor')
        if self.task == 'video':  # (B, C, T, H, W) -> one clip per sample
            return self.model(x.unsqueeze(1), mode='tensor', stage='head')
        feats = self._features(x)
        head = getattr(self.model, 'rpn_head', None) or self.model.bbox_head
        return head(feats)
