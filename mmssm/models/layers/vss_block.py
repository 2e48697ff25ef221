"""VMamba's VSS block: pre-norm token mixer + optional pre-norm MLP, with drop path.

    x = x + drop_path(mixer(norm(x)))
    x = x + drop_path(mlp(norm2(x)))          # only when mlp_ratio > 0

The mixer is :class:`SS2D` by default; V2MPyramid passes its own. Key names
(``norm``, ``op``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) follow the official code.
"""
from typing import Optional

from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn

from .ss2d import SS2D, make_linear, make_norm


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, on either layout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0,
                 channel_first: bool = True) -> None:
        super().__init__()
        self.fc1 = make_linear(dim, hidden, True, channel_first)
        self.act = nn.GELU()
        self.fc2 = make_linear(hidden, dim, True, channel_first)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class VSSBlock(nn.Module):
    """One VMamba block.

    Args:
        dim: channels.
        drop_path: stochastic depth rate of both residual branches.
        channel_first: (B, C, H, W) layout (``ln2d``) instead of (B, H, W, C).
        mlp_ratio: hidden = int(dim * mlp_ratio); 0 disables the MLP branch (v0).
        mlp_drop: dropout inside the MLP.
        mixer: the token mixer (same layout as the block); default SS2D(dim, **ss2d_kwargs).
        **ss2d_kwargs: passed to :class:`SS2D` when ``mixer`` is None.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, channel_first: bool = True,
                 mlp_ratio: float = 4.0, mlp_drop: float = 0.0,
                 mixer: Optional[nn.Module] = None, **ss2d_kwargs) -> None:
        super().__init__()
        self.norm = make_norm(dim, channel_first)
        self.op = mixer if mixer is not None else SS2D(dim, channel_first=channel_first,
                                                        **ss2d_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.use_mlp = mlp_ratio > 0
        if self.use_mlp:
            self.norm2 = make_norm(dim, channel_first)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_drop, channel_first)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.use_mlp:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x
