"""Residual blocks shared by the plain SSM backbones."""
import torch
from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn


class PreNormSSMBlock(nn.Module):
    """``x + DropPath(mixer(RMSNorm(x)))`` with the residual stream kept as given.

    This is Vim's "Add -> Norm -> Mixer" block rewritten as a plain pre-norm
    residual block (identical maths; official: the add of layer i happens at
    the start of layer i+1 and after the loop). Keys: ``norm.weight``,
    ``mixer.*``. The mixer works on the token layout it is given: (B, L, C)
    for Vim, (B, H, W, C) for V2M.

    The residual ``x`` may be fp32 while the mixer runs in a lower precision
    (``residual_in_fp32``): the norm sees ``x`` cast to its weight's dtype and
    the sum keeps ``x``'s dtype.
    """

    def __init__(self, embed_dims: int, mixer: nn.Module, drop_path: float = 0.,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = nn.RMSNorm(embed_dims, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.mixer(self.norm(x.to(self.norm.weight.dtype)))
        out = x + self.drop_path(h)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def rms_norm_any(norm: nn.Module, x: Tensor) -> Tensor:
    """Apply a norm to ``x`` cast to the norm's parameter dtype (fp32 residuals)."""
    w = getattr(norm, 'weight', None)
    return norm(x.to(w.dtype) if isinstance(w, torch.Tensor) else x)
