"""Pick one backbone output for mmaction2 heads (which take a single tensor)."""
from typing import Dict, Sequence, Tuple

from mmengine.model import BaseModule
from torch import Tensor

from ...registry import MODELS


@MODELS.register_module()
class SelectFeature(BaseModule):
    """Return ``feats[index]`` in mmaction2's neck protocol ``(feature, aux_losses)``.

    mmssm backbones return a tuple of maps (mmpretrain convention) while
    mmaction2's recognizers hand the backbone output straight to heads such as
    ``I3DHead`` that expect one (N, C, T, H, W) tensor; with a neck they call
    ``feat, loss_aux = neck(feat, data_samples=...)``.

    Args:
        index: which backbone output to keep (default: the last).
    """

    def __init__(self, index: int = -1, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.index = index

    def forward(self, feats: Sequence[Tensor], data_samples=None) -> Tuple[Tensor, Dict]:
        return feats[self.index], dict()
