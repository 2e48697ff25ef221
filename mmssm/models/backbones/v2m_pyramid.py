"""V2M pyramid (V2M-S*, V2M-B*; Wang et al., arXiv 2410.10382): the VMamba v2
skeleton with V2M's 2-D SSM (row pass then column pass, from the grid corners)
as the token mixer in place of SS2D.

The paper gives only sizes (V2M-S* 30M vs VMamba-T, V2M-B* 50M vs VMamba-S) and
no code or weights, so the block settings are our choice (see ``arch_zoo``):

- skeleton of VMamba v2: two-conv stem, 3x3 stride-2 conv downsampling,
  per-stage output norms ``outnorm{i}``, pre-norm block ``x + mixer(norm(x))``
  then ``x + mlp(norm2(x))``;
- mixer :class:`~mmssm.models.layers.V2MMixer2D` with d_state 1 and dt_rank
  ceil(C/16) (VMamba v2's), a 3x3 depthwise conv2d on the grid before the
  scans (VMamba's SS2D conv, key ``conv2d``) and no per-pass conv1d, V2M's
  silu(z) gate, all 4 corners;
- each block keeps the parameter budget of the VMamba block it replaces, with
  ``expand`` equal to VMamba's ssm_ratio and the MLP ratio lowered to pay for
  the z gate: V2M-S* = VMamba-T s1l8 (depths 2, 2, 8, 2; expand 1: mixer 3C^2
  + MLP ratio 3.5 = 10C^2 like SS2D 2C^2 + MLP 8C^2); V2M-B* = VMamba-S s2l15
  (depths 2, 2, 15, 2; expand 2: mixer 6C^2 + MLP ratio 3 = 12C^2); dims 96.

Counts as classifiers (backbone with the last-stage norm + a 1000-class head,
the way the paper and VMamba count): V2M-S* 29,566,216 (paper 30M),
V2M-B* 48,193,384 (paper 50M), asserted within 5% in the tests. d_state 1
keeps the 8 scans per block (2 passes x 4 corners) cheap, in line with the
paper's small FLOPs increase over VMamba (+0.5G for S*). The layout is
channel-last (``ln``), the mixer's own (B, H, W, C).
"""
from typing import Dict, Optional, Sequence, Union

from mmengine.logging import print_log
from torch import Tensor, nn

from mmssm.registry import MODELS
from ..layers.v2m_mixer import V2MMixer2D, parse_corners
from ..layers.vss_block import VSSBlock
from .vmamba import VMamba

_PYRAMID = dict(d_state=1, expand=1, d_conv=0, d_conv2d=3, dt_rank='auto', corners=4,
                use_z=True, mlp_ratio=4.0, downsample='v3', patch_embed='v2', norm_layer='ln')


@MODELS.register_module()
class V2MPyramid(VMamba):
    """Hierarchical V2M (V2M-S*/B*): VMamba v2 stages of V2M 2-D SSM blocks.

    Args:
        arch: 'small' (V2M-S*, ~30M) / 'base' (V2M-B*, ~50M), or a dict with
            ``depths`` and ``dims`` and optionally any of ``d_state``,
            ``expand``, ``d_conv`` (per-pass causal conv1d, 0 = none),
            ``d_conv2d`` (depthwise conv on the grid, 0 = none), ``dt_rank``,
            ``corners`` (1-4 or names), ``use_z``, ``mlp_ratio``,
            ``downsample`` ('v1'/'v2'/'v3'), ``patch_embed`` ('v1'/'v2'),
            ``drop_path_rate``.
        in_channels, out_indices, drop_path_rate, frozen_stages, norm_eval,
        init_cfg: as :class:`VMamba` (same dense-prediction contract: NCHW
            outputs at strides 4/8/16/32 after ``outnorm{i}``, any input size).
    """
    arch_zoo = {
        'small': dict(_PYRAMID, depths=[2, 2, 8, 2], dims=96, expand=1, mlp_ratio=3.5,
                      drop_path_rate=0.2),
        'base': dict(_PYRAMID, depths=[2, 2, 15, 2], dims=96, expand=2, mlp_ratio=3.0,
                     drop_path_rate=0.3),
    }
    arch_keys = ('depths', 'dims')
    arch_optional = ('drop_path_rate', ) + tuple(_PYRAMID)

    def __init__(self, arch: Union[str, dict] = 'small', in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: Optional[float] = None, frozen_stages: int = -1,
                 norm_eval: bool = False, init_cfg: Optional[dict] = None) -> None:
        super().__init__(arch, in_channels, out_indices, drop_path_rate, frozen_stages,
                         norm_eval, init_cfg)

    @classmethod
    def _settings(cls, arch: Union[str, dict]) -> dict:
        cfg = cls.parse_arch(arch)
        if isinstance(arch, dict):
            cfg = {**_PYRAMID, **cfg}
        if cfg['norm_layer'] != 'ln':
            raise ValueError("V2MPyramid: norm_layer must be 'ln' (the 2-D SSM mixer is channel-last)")
        if cfg['downsample'] not in ('v1', 'v2', 'v3'):
            raise ValueError(f"arch downsample={cfg['downsample']!r}: valid 'v1' (patch merging), "
                             "'v2' (conv k2 s2), 'v3' (conv k3 s2)")
        parse_corners(cfg['corners'])  # clear error for bad corners
        return cfg

    def _make_block(self, dim: int, drop_path: float, cfg: dict) -> nn.Module:
        mixer = V2MMixer2D(dim, d_state=cfg['d_state'], expand=cfg['expand'],
                           d_conv=cfg['d_conv'], dt_rank=cfg['dt_rank'], corners=cfg['corners'],
                           use_z=cfg['use_z'], d_conv2d=cfg['d_conv2d'])
        return VSSBlock(dim, drop_path, channel_first=False, mlp_ratio=cfg['mlp_ratio'],
                        mixer=mixer)

    def _init_weights(self) -> None:
        """VMamba's init (trunc_normal(.02) Linears, zero biases, unit LayerNorms),
        except the delta projections, which keep Mamba's dt init (zeroing their
        bias would start every step at softplus(0) = 0.69)."""
        dt = {m for name, m in self.named_modules() if name.endswith(('dt_proj', 'dt_proj_2'))}
        saved = {m: (m.weight.detach().clone(), m.bias.detach().clone()) for m in dt}
        super()._init_weights()
        for m, (w, b) in saved.items():
            m.weight.data.copy_(w)
            m.bias.data.copy_(b)

    def convert_checkpoint(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """mmssm names are the only ones (no official release): drop a classifier."""
        head = [k for k in state_dict if k.startswith(('classifier.', 'head.'))]
        if head:
            print_log(f'V2MPyramid: dropped classifier key(s) {head}', logger='current')
        return {k: v for k, v in state_dict.items() if k not in head}
