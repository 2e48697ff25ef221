"""Vision Mamba (Vim, Zhu et al. 2024): a plain stack of bidirectional Mamba layers.

Layout as the official ``hustvl/Vim`` ``VisionMamba`` (bimamba v2, middle class
token, absolute position embedding, RMSNorm, fp32 residual, no MLP); state-dict
keys equal the official ones minus the classifier ``head.*``.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor, nn

from mmssm.registry import MODELS
from ..layers.blocks import PreNormSSMBlock, rms_norm_any
from ..layers.embed import (PatchEmbed, join_middle_cls, resize_grid_embed,
                            split_middle_cls, to_2tuple)
from ..layers.mamba_mixer import BiMambaMixer
from .base import SSMBackbone, is_int


def lecun_normal_(w: Tensor) -> Tensor:
    """timm's lecun_normal_: truncated normal (+-2 std) with variance 1 / fan_in."""
    fan_in = w[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0,1) cut at +-2
    return trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


@MODELS.register_module()
class Vim(SSMBackbone):
    """Vision Mamba backbone.

    Tokens: patch embedding (conv, kernel ``patch_size``, stride ``stride``),
    a class token inserted in the *middle* of the sequence (index M // 2 for M
    patch tokens), plus a learned absolute position embedding. Each layer is
    ``x + DropPath(BiMambaMixer(RMSNorm(x)))`` with an fp32 residual stream;
    ``norm_f`` (RMSNorm) normalises the last layer.

    Any input size works: the image is zero-padded right/bottom when the patch
    grid does not fit it exactly, and the position embedding is resized on the
    fly (bicubic, class entry kept aside) when the grid differs from the one
    of ``img_size``.

    Args:
        arch: 'tiny' | 'small' | 'base', or a dict with ``embed_dims``,
            ``num_layers`` and optionally ``d_state`` (16), ``expand`` (2),
            ``d_conv`` (4; 0 = no conv1d), ``dt_rank`` ('auto' = ceil(C / 16)).
        img_size: training size; sets the stored position-embedding grid.
        patch_size, stride: patch kernel and stride (Vim: 16 and 16 or 8).
        in_channels: image channels.
        out_indices: layers whose output is returned (negative from the end).
        out_type: per output, 'cls_token' (B, C) normed class token,
            'featmap' (B, C, h, w) patch tokens without the class token
            (stride = ``stride``; the residual stream after the layer, i.e.
            ``x_i + mixer_i(norm(x_i))`` -- the official segmentation code
            reads the mixer output alone by default),
            'avg_featmap' (B, C) mean of the normed patch tokens, or 'raw'
            (B, L, C) every token in sequence order.
        with_cls_token: use the middle class token (official: True).
        final_norm: build ``norm_f`` and apply it to the last layer's output.
        out_norms: add an RMSNorm per output (keys ``out_norms.k``; not in
            official checkpoints); it replaces ``norm_f`` for that output.
        drop_rate: dropout after the position embedding.
        drop_path_rate: stochastic depth; layer i drops its mixer output with
            rate ``linspace(0, drop_path_rate, num_layers)[i]`` (the official
            ``inter_dpr`` schedule, re-indexed onto pre-norm blocks).
        norm_eps: RMSNorm epsilon.
        residual_in_fp32: keep the residual stream in fp32 (official: True).
        interpolate_mode: position-embedding resize mode.
        with_cp: activation checkpointing per layer while training (saves
            memory for dense tasks at high resolution).
        frozen_stages: -1 none; 0 patch embed, cls token and position
            embedding; i > 0 also layers 0..i-1 (and ``norm_f`` when i is
            ``num_layers``).
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint='vim_t_midclstok_76p1acc.pth')``
            (official files load directly: ``model`` entry, ``head.*`` dropped,
            position embedding resized); ``checkpoint_key='model_ema'`` picks EMA.

    Initialisation (official, applied at construction and by ``init_weights``):
    patch conv lecun-normal with zero bias; ``pos_embed``/``cls_token``
    trunc-normal(0.02); every Linear bias zeroed except ``dt_proj.bias`` --
    so ``dt_proj_b.bias`` starts at 0 (softplus 0.69, a quirk of the official
    code); ``out_proj.weight`` re-drawn kaiming-uniform(a=sqrt 5) and divided
    by sqrt(num_layers); A = -[1..N], D = 1, dt log-uniform in [1e-3, 0.1].
    """
    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'ti', 'tiny'], dict(embed_dims=192, num_layers=24)),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=384, num_layers=24)),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=768, num_layers=24)),
    }
    arch_keys = ('embed_dims', 'num_layers')
    arch_optional = ('d_state', 'expand', 'd_conv', 'dt_rank')
    OUT_TYPES = ('cls_token', 'featmap', 'avg_featmap', 'raw')
    INTERPOLATE_MODES = ('nearest', 'bilinear', 'bicubic', 'area', 'nearest-exact')
    checkpoint_ignore_missing = ('out_norms.', )

    def __init__(self, arch: Union[str, dict] = 'tiny', img_size: Union[int, Sequence[int]] = 224,
                 patch_size: int = 16, stride: int = 16, in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = -1, out_type: str = 'cls_token',
                 with_cls_token: bool = True, final_norm: bool = True, out_norms: bool = False,
                 drop_rate: float = 0., drop_path_rate: float = 0., norm_eps: float = 1e-5,
                 residual_in_fp32: bool = True, interpolate_mode: str = 'bicubic',
                 frozen_stages: int = -1, with_cp: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        s = self.arch_settings = self.parse_arch(arch)
        for key in ('embed_dims', 'num_layers', 'd_state', 'expand', 'd_conv'):
            low = 0 if key == 'd_conv' else 1  # the mixer's d_conv 0 means no conv1d
            if key in s and not (isinstance(s[key], int) and not isinstance(s[key], bool)
                                 and s[key] >= low):
                raise ValueError(f'{type(self).__name__}: arch {key}={s[key]!r} must be an '
                                 f'int >= {low}' + (' (0: no conv1d)' if low == 0 else ''))
        dt_rank = s.get('dt_rank', 'auto')
        if dt_rank != 'auto' and not (is_int(dt_rank) and dt_rank >= 1):
            raise ValueError(f"{type(self).__name__}: arch dt_rank={dt_rank!r} must be 'auto' "
                             'or an int >= 1')
        img_size = self.check_ints('img_size', img_size, 2)
        patch_size = self.check_ints('patch_size', patch_size, 2)
        stride = self.check_ints('stride', stride, 2)
        if interpolate_mode not in self.INTERPOLATE_MODES:
            raise ValueError(f'interpolate_mode={interpolate_mode!r}; '
                             f'valid: {self.INTERPOLATE_MODES}')
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f'in_channels={in_channels!r} must be an int >= 1')
        self.check_rate('drop_rate', drop_rate)
        self.check_rate('drop_path_rate', drop_path_rate)
        self.in_channels = in_channels
        self.embed_dims = D = s['embed_dims']
        self.num_layers = s['num_layers']
        self.mixer_cfg = dict(d_state=s.get('d_state', 16), expand=s.get('expand', 2),
                              d_conv=s.get('d_conv', 4), dt_rank=s.get('dt_rank', 'auto'))
        if out_type not in self.OUT_TYPES:
            raise ValueError(f'out_type={out_type!r}; valid: {self.OUT_TYPES}')
        self.out_type = out_type
        self.residual_in_fp32 = residual_in_fp32
        self.interpolate_mode = interpolate_mode
        self.final_norm = final_norm
        self.with_cp = with_cp

        self.img_size = to_2tuple(img_size, 'img_size')
        self.patch_embed = PatchEmbed(in_channels, D, patch_size, stride)
        self.patch_resolution = self.patch_embed.grid_size(self.img_size)
        self._build_tokens(with_cls_token=with_cls_token)
        if out_type == 'cls_token' and not self.has_cls:
            raise ValueError("out_type='cls_token' needs a class token (with_cls_token=True "
                             "or a cls_position other than 'mean'); use 'avg_featmap'")
        self.drop_after_pos = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, self.num_layers).tolist()
        self.layers = nn.ModuleList([
            PreNormSSMBlock(D, self._build_mixer(i), dpr[i], norm_eps)
            for i in range(self.num_layers)])
        self.norm_f = nn.RMSNorm(D, eps=norm_eps) if final_norm else None

        self.out_indices = self.parse_out_indices(out_indices, self.num_layers)
        self.out_norms = (nn.ModuleList([nn.RMSNorm(D, eps=norm_eps) for _ in self.out_indices])
                          if out_norms else None)
        self.frozen_stages = self.check_frozen_stages(frozen_stages, self.num_layers)
        # the dense contract as data: 'featmap' outputs are (B, C, h, w) maps at the patch
        # stride, the other types are vectors / sequences (no stride)
        self.out_channels = (D, ) * len(self.out_indices)
        stride = self._stride_value(self.patch_embed.stride) if out_type == 'featmap' else None
        self.out_strides = (stride, ) * len(self.out_indices)
        self._init_weights()
        self._freeze_stages()

    # ------------------------------------------------------------ hooks
    def _build_mixer(self, i: int) -> nn.Module:
        return BiMambaMixer(self.embed_dims, **self.mixer_cfg)

    def _build_tokens(self, with_cls_token: bool = True) -> None:
        """Class token and position embedding (1, M0 [+1], C), class entry at M0 // 2."""
        self.has_cls = with_cls_token
        h0, w0 = self.patch_resolution
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, self.embed_dims))
                          if with_cls_token else None)
        self.pos_embed = nn.Parameter(torch.zeros(1, h0 * w0 + int(with_cls_token),
                                                  self.embed_dims))

    def _tokens(self, p: Tensor) -> Tensor:
        """(B, h, w, C) patch tokens -> (B, L, C) sequence with cls and positions."""
        B, h, w, C = p.shape
        p = p.reshape(B, h * w, C)
        if not self.has_cls:
            return p + resize_grid_embed(self.pos_embed, self.patch_resolution, (h, w),
                                         self.interpolate_mode)
        grid, cls_pos = split_middle_cls(self.pos_embed)
        grid = resize_grid_embed(grid, self.patch_resolution, (h, w), self.interpolate_mode)
        cls = (self.cls_token + cls_pos).expand(B, -1, -1)
        return join_middle_cls(p + grid, cls)

    def _split(self, x: Tensor, h: int, w: int) -> Tuple[Tensor, Optional[Tensor]]:
        """(B, L, C) -> patch tokens (B, h, w, C) and the class token (B, C) or None."""
        B, _, C = x.shape
        if not self.has_cls:
            return x.reshape(B, h, w, C), None
        m = h * w
        patches = torch.cat([x[:, :m // 2], x[:, m // 2 + 1:]], dim=1)
        return patches.reshape(B, h, w, C), x[:, m // 2]

    # ----------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self.check_input(x, self.in_channels)
        p = self.patch_embed(x)  # (B, h, w, C)
        h, w = p.shape[1:3]
        x = self.drop_after_pos(self._tokens(p))
        del p  # (B, h, w, C) patch map: not alive while the layers run (3 MB at 1024^2)
        if self.residual_in_fp32:
            x = x.float()
        outs = []
        for i, layer in enumerate(self.layers):
            if self.with_cp and self.training and x.requires_grad:
                x = cp.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if i in self.out_indices:
                outs.append(self._format_output(x, self.out_indices.index(i), h, w))
        return tuple(outs)

    def _format_output(self, x: Tensor, k: int, h: int, w: int) -> Tensor:
        i = self.out_indices[k]
        if self.out_norms is not None:
            x = rms_norm_any(self.out_norms[k], x)
        elif self.norm_f is not None and i == self.num_layers - 1:
            x = rms_norm_any(self.norm_f, x)
        if self.out_type == 'raw':
            return x
        patches, cls = self._split(x, h, w)
        if self.out_type == 'cls_token':
            return cls
        if self.out_type == 'avg_featmap':
            return patches.mean(dim=(1, 2))
        return patches.permute(0, 3, 1, 2).contiguous()

    def forward_features(self, x: Tensor) -> Tensor:
        """Official ``VisionMamba.forward_features``: the normed class token (B, C)."""
        out_type, out_indices, out_norms = self.out_type, self.out_indices, self.out_norms
        try:
            self.out_type, self.out_norms = 'cls_token', None
            self.out_indices = [self.num_layers - 1]
            return self(x)[0]
        finally:
            self.out_type, self.out_indices, self.out_norms = out_type, out_indices, out_norms

    # ----------------------------------------------------------- weights
    def _init_weights(self) -> None:
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m.bias is not None \
                    and not getattr(m.bias, '_no_reinit', False):
                nn.init.zeros_(m.bias)
            if name.endswith('mixer'):
                # GPT-2 style: residual-branch output scaled by 1/sqrt(depth)
                nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    m.out_proj.weight.div_(math.sqrt(self.num_layers))

    def convert_checkpoint(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Official Vim state dict -> ours: drop ``head.*``/``rope.*``, fit ``pos_embed``."""
        sd = {k: v for k, v in state_dict.items()
              if not k.startswith(('head.', 'rope.'))}
        if 'pos_embed' in sd:
            sd['pos_embed'] = self._convert_pos_embed(sd['pos_embed'], 'cls_token' in sd)
        if self.cls_token is None:
            sd.pop('cls_token', None)
        return sd

    def _convert_pos_embed(self, pos: Tensor, ckpt_has_cls: bool) -> Tensor:
        """Resize a checkpoint's (1, M [+1], C) embedding (square grid) to ours."""
        if pos.shape == self.pos_embed.shape:
            return pos
        if ckpt_has_cls:
            grid, cls = split_middle_cls(pos)
        else:
            grid, cls = pos, None
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f'pos_embed {tuple(pos.shape)}: its {grid.shape[1]} grid tokens '
                             'are not a square grid, cannot resize it')
        grid = resize_grid_embed(grid, (side, side), self.patch_resolution, self.interpolate_mode)
        if not self.has_cls:
            return grid
        if cls is None:  # checkpoint without a class token: keep our own initial entry
            cls = split_middle_cls(self.pos_embed.detach())[1]
        return join_middle_cls(grid, cls.to(grid.dtype))

    # ------------------------------------------------------ freezing, lr
    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        self.freeze_module(self.patch_embed)
        self.freeze_module(self.pos_embed)
        self.freeze_module(self.cls_token)
        for i in range(self.frozen_stages):
            self.freeze_module(self.layers[i])
            if self.out_norms is not None and i in self.out_indices:
                self.freeze_module(self.out_norms[self.out_indices.index(i)])
        if self.frozen_stages == self.num_layers:
            self.freeze_module(self.norm_f)

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer-wise lr decay depth: stem 0, ``layers.i`` i+1, the rest num_layers+1.

        An output norm ``out_norms.k`` goes with the layer it normalises
        (``out_indices[k] + 1``), so ids never decrease with depth.

        Returns:
            (layer_id, num_layers + 2).
        """
        num = self.num_layers + 2
        if not param_name.startswith(prefix):
            return num - 1, num
        name = param_name[len(prefix):]
        if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
            return 0, num
        if name.startswith('layers.'):
            return int(name.split('.')[1]) + 1, num
        if name.startswith('out_norms.') and self.out_norms is not None:
            return self.out_indices[int(name.split('.')[1])] + 1, num
        return num - 1, num
