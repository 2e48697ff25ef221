"""ViTDet/BEiT-style simple pyramid for plain (single-stride) backbones."""
from typing import List, Sequence, Tuple, Union

import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor

from ...registry import MODELS


@MODELS.register_module()
class SimplePyramid(BaseModule):
    """Turn stride-``s`` maps of a plain backbone into a 4-level pyramid.

    Each output level ``i`` rescales its input by ``scale_factors[i]``:
    4 -> two 2x2 transposed convs (norm + GELU between), 2 -> one transposed
    conv, 1 -> identity, 0.5 -> 2x2 max-pool. An h x w map gives levels of
    ``s*h x s*w`` for s >= 1 and ``ceil(h/2) x ceil(w/2)`` for 0.5 (ceil, like
    the padded SSM backbones: a 1 x 1 map from a small image still gives a level). With stride-16 Vim/V2M features
    and the default factors the outputs have strides 4, 8, 16, 32, ready for
    mmdet's FPN or mmseg's UPerHead. mmdet's own SimpleFPN lives only in its
    source tree (projects/), so mmssm ships this one.

    Args:
        in_channels: channels of the backbone maps.
        scale_factors: one factor per output, from {4, 2, 1, 0.5}.
        out_channels: if set, a 1x1 conv + norm maps every level to it;
            otherwise every level keeps ``in_channels``.
        in_index: which backbone output feeds each level; an int uses the same
            map for all (ViTDet uses the last), a sequence gives one per level
            (BEiT/Vim use layers 5, 11, 17, 23).
        norm_cfg: norm inside the 4x branch and after projections; BN (not
            SyncBN) so it builds on CPU; the Runner converts when asked.
    """

    def __init__(self,
                 in_channels: int,
                 scale_factors: Sequence[float] = (4, 2, 1, 0.5),
                 out_channels: Union[int, None] = None,
                 in_index: Union[int, Sequence[int]] = -1,
                 norm_cfg: dict = dict(type='BN'),
                 init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        valid = (4, 2, 1, 0.5)
        bad = [s for s in scale_factors if s not in valid]
        if bad:
            raise ValueError(f'scale_factors={list(scale_factors)}: {bad} not in {valid}')
        if not isinstance(in_index, int) and len(in_index) != len(scale_factors):
            raise ValueError(f'in_index={list(in_index)} must be an int or have one entry per '
                             f'scale factor ({len(scale_factors)})')
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f'in_channels={in_channels!r} must be an int >= 1')
        self.scale_factors = tuple(scale_factors)
        self.in_index = in_index
        self.in_channels = c = in_channels
        self.levels = nn.ModuleList()
        for s in self.scale_factors:
            if s == 4:
                layers = [nn.ConvTranspose2d(c, c, 2, 2), build_norm_layer(norm_cfg, c)[1],
                          nn.GELU(), nn.ConvTranspose2d(c, c, 2, 2)]
            elif s == 2:
                layers = [nn.ConvTranspose2d(c, c, 2, 2)]
            elif s == 1:
                layers = []
            else:
                layers = [nn.MaxPool2d(2, 2, ceil_mode=True)]
            if out_channels is not None:
                layers += [nn.Conv2d(c, out_channels, 1, bias=False),
                           build_norm_layer(norm_cfg, out_channels)[1]]
            self.levels.append(nn.Sequential(*layers))

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        n = len(inputs)
        index = [self.in_index] * len(self.levels) if isinstance(self.in_index, int) \
            else list(self.in_index)
        if any(not -n <= i < n for i in index):
            raise ValueError(f'in_index={self.in_index!r} is out of range for the {n} '
                             'backbone output(s) given (set the backbone out_indices to match)')
        feats: List[Tensor] = [inputs[i] for i in index]
        for i, x in zip(index, feats):
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(f'backbone output {i} has shape {tuple(x.shape)}; expected a '
                                 f'(B, in_channels={self.in_channels}, h, w) map '
                                 "(a plain backbone needs out_type='featmap')")
        return tuple(level(x) for level, x in zip(self.levels, feats))
