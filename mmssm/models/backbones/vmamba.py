"""VMamba (Liu et al. 2024): hierarchical 4-stage backbone of VSS blocks.

Two families, both with the key names of the released classification
checkpoints (``MzeroMiko/VMamba`` ``classification/models/vmamba.py``):

- v2 (``tiny``/``small``/``base`` = s1l8/s1l20/s1l20, and the ``*-s2l*`` ones):
  two-conv stem, SS2D ``v05_noz`` (d_state 1, no z gate) + MLP ratio 4,
  3x3 stride-2 conv downsampling, channel-first ``ln2d`` layout.
- v0 "vanilla" (``vanilla-tiny``/``-small``/``-base``): 4x4 patch stem, z-gated
  SS2D with d_state 16 and no MLP, Swin patch merging, channel-last ``ln`` layout.

Dense prediction follows the official ``MM_VSSM``: stage i's output is taken
before its downsample and normalised by ``outnorm{i}``. Any input size works:
the v2 stride-2 convs (k3, p1) give ceil(H/2) by themselves; the v0 stem pads
H, W right/bottom to a multiple of 4 and patch merging pads odd sizes by one
(as the official ``PatchMerging2D``), so stage i has ceil(H / 2**(i+2)) rows.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor, nn

from mmssm.registry import MODELS
from ..layers.ss2d import FORWARD_TYPES, LayerNorm2d, make_linear, make_norm
from ..layers.vss_block import VSSBlock
from .base import SSMBackbone, is_int, is_number

_V2 = dict(d_state=1, mlp_ratio=4.0, forward_type='v05_noz', downsample='v3',
           patch_embed='v2', norm_layer='ln2d', conv_bias=False, d_conv=3, dt_rank='auto')
_V0 = dict(d_state=16, ssm_ratio=2.0, mlp_ratio=0.0, forward_type='v0', downsample='v1',
           patch_embed='v1', norm_layer='ln', conv_bias=True, d_conv=3, dt_rank='auto')


def _v2(depths, dims, ssm_ratio, drop_path_rate):
    return dict(_V2, depths=depths, dims=dims, ssm_ratio=ssm_ratio, drop_path_rate=drop_path_rate)


def _v0(depths, dims, drop_path_rate):
    return dict(_V0, depths=depths, dims=dims, drop_path_rate=drop_path_rate)


def check_arch_numbers(cfg: dict) -> None:
    """Sizes in an arch dict must be positive (mlp_ratio 0 means no MLP), state and
    conv sizes ints, dt_rank 'auto' or an int, depths/dims ints."""
    for key in ('ssm_ratio', 'expand', 'mlp_ratio'):
        v = cfg.get(key, 1)
        if not (is_number(v) and (v > 0 or (key == 'mlp_ratio' and v == 0))):
            raise ValueError(f'arch {key}={v!r} must be a number > 0'
                             + (' (or 0: no MLP)' if key == 'mlp_ratio' else ''))
    for key, low in (('d_state', 1), ('d_conv', 0), ('d_conv2d', 0)):
        v = cfg.get(key, low)
        if not (is_int(v) and v >= low):
            raise ValueError(f'arch {key}={v!r} must be an int >= {low}'
                             + (' (0: no conv)' if low == 0 else ''))
    if 'drop_path_rate' in cfg:  # checked even when the drop_path_rate argument overrides it
        SSMBackbone.check_rate('arch drop_path_rate', cfg['drop_path_rate'])
    v = cfg.get('dt_rank', 'auto')
    if v != 'auto' and not (is_int(v) and v >= 1):
        raise ValueError(f"arch dt_rank={v!r} must be 'auto' or an int >= 1")
    depths, dims = cfg['depths'], cfg['dims']
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or not depths \
            or not all(is_int(d) and d >= 0 for d in depths):
        raise ValueError(f'arch depths={depths!r}: need a non-empty list of ints >= 0')
    if not (is_int(dims) or (isinstance(dims, Sequence) and not isinstance(dims, str)
                             and all(is_int(d) for d in dims))):
        raise ValueError(f'arch dims={dims!r}: need an int (doubled per stage) or a list of ints')


class PatchEmbed(nn.Sequential):
    """Stem. 'v1': Conv k4 s4 + norm (keys 0, 2). 'v2': Conv k3 s2, norm, GELU,
    Conv k3 s2, norm (keys 0, 2, 5, 7; the gaps are parameter-free slots kept so
    official keys match). Input (B, 3, H, W); output in the network's layout."""

    def __init__(self, in_channels: int, dim: int, version: str, channel_first: bool) -> None:
        if version == 'v1':
            layers = [nn.Conv2d(in_channels, dim, 4, stride=4), nn.Identity(), LayerNorm2d(dim)]
        elif version == 'v2':
            layers = [nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1), nn.Identity(),
                      LayerNorm2d(dim // 2), nn.Identity(), nn.GELU(),
                      nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.Identity(),
                      LayerNorm2d(dim)]
        else:
            raise ValueError(f"patch_embed={version!r}: valid 'v1' (4x4 patches), 'v2' (two convs)")
        super().__init__(*layers)
        self.version = version
        self.channel_first = channel_first

    def forward(self, x: Tensor) -> Tensor:
        if self.version == 'v1':  # pad right/bottom so no pixel is dropped
            ph, pw = -x.shape[-2] % 4, -x.shape[-1] % 4
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))
        x = super().forward(x)
        return x if self.channel_first else x.permute(0, 2, 3, 1)


class ConvDownsample(nn.Sequential):
    """'v3': Conv k3 s2 p1 + norm; 'v2': Conv k2 s2 + norm (keys 1 and 3)."""

    def __init__(self, dim: int, out_dim: int, version: str, channel_first: bool) -> None:
        conv = (nn.Conv2d(dim, out_dim, 3, stride=2, padding=1) if version == 'v3'
                else nn.Conv2d(dim, out_dim, 2, stride=2))
        super().__init__(nn.Identity(), conv, nn.Identity(), LayerNorm2d(out_dim))
        self.pad_odd = version == 'v2'
        self.channel_first = channel_first

    def forward(self, x: Tensor) -> Tensor:
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2)
        if self.pad_odd and (x.shape[-2] % 2 or x.shape[-1] % 2):
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        x = super().forward(x)
        return x if self.channel_first else x.permute(0, 2, 3, 1)


class PatchMerging2D(nn.Module):
    """Swin patch merging: 2x2 gather (0,0),(1,0),(0,1),(1,1) -> norm(4C) -> Linear(4C, out)."""

    def __init__(self, dim: int, out_dim: int, channel_first: bool) -> None:
        super().__init__()
        self.channel_first = channel_first
        self.reduction = make_linear(4 * dim, out_dim, False, channel_first)
        self.norm = make_norm(4 * dim, channel_first)

    def forward(self, x: Tensor) -> Tensor:
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2],
                       x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        if not self.channel_first:
            x = x.permute(0, 2, 3, 1)
        return self.reduction(self.norm(x))


class VMambaStage(nn.Module):
    """``blocks`` (Sequential of VSS blocks) then ``downsample`` (Identity in the last stage)."""

    def __init__(self, blocks: List[nn.Module], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample if downsample is not None else nn.Identity()


@MODELS.register_module()
class VMamba(SSMBackbone):
    """VMamba backbone (v2 and vanilla v0 families).

    Args:
        arch: a name from ``arch_zoo`` or a dict with at least ``depths`` and
            ``dims`` (int d -> [d, 2d, 4d, 8d], or a list); missing settings
            take the v2 defaults (``d_state`` 1, ``ssm_ratio`` 1.0 unless given,
            ``mlp_ratio`` 4, ``forward_type`` 'v05_noz', ``downsample`` 'v3',
            ``patch_embed`` 'v2', ``norm_layer`` 'ln2d', ``conv_bias`` False,
            ``d_conv`` 3, ``dt_rank`` 'auto'). ``forward_type='v0'`` needs
            ``norm_layer='ln'``.
        in_channels: image channels.
        out_indices: stages whose (normed) outputs are returned, NCHW.
        drop_path_rate: stochastic depth, linear over all blocks; None = the
            arch's official value.
        frozen_stages: -1 none; 0 the stem; i the stem and stages 0..i-1
            (with their downsample and output norm).
        norm_eval: unused by VMamba (no BatchNorm); accepted for config parity.
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint=PATH)``; official
            classification (``'model'``, or ``checkpoint_key='model_ema'``),
            MM_VSSM det/seg and mmssm checkpoints all load.
    """
    arch_zoo = {
        'tiny': _v2([2, 2, 8, 2], 96, 1.0, 0.2),        # s1l8
        'small': _v2([2, 2, 20, 2], 96, 1.0, 0.3),      # s1l20
        'base': _v2([2, 2, 20, 2], 128, 1.0, 0.5),      # s1l20
        'tiny-s2l5': _v2([2, 2, 5, 2], 96, 2.0, 0.2),
        'small-s2l15': _v2([2, 2, 15, 2], 96, 2.0, 0.3),
        'base-s2l15': _v2([2, 2, 15, 2], 128, 2.0, 0.6),
        'vanilla-tiny': _v0([2, 2, 9, 2], 96, 0.2),
        'vanilla-small': _v0([2, 2, 27, 2], 96, 0.3),
        'vanilla-base': _v0([2, 2, 27, 2], 128, 0.5),
    }
    for _name in ('tiny', 'small', 'base'):
        arch_zoo[_name + '-s1l' + ('8' if _name == 'tiny' else '20')] = arch_zoo[_name]
    del _name
    arch_keys = ('depths', 'dims')
    arch_optional = ('ssm_ratio', 'drop_path_rate') + tuple(_V2)
    checkpoint_ignore_missing = ('outnorm', )

    def __init__(self, arch: Union[str, dict] = 'tiny', in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: Optional[float] = None, frozen_stages: int = -1,
                 norm_eval: bool = False, init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        cfg = self._settings(arch)
        depths = list(cfg['depths'])
        dims = cfg['dims']
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(len(depths))]
        dims = list(dims)
        if len(dims) != len(depths):
            raise ValueError(f'arch: dims {dims} and depths {depths} differ in length')
        if not depths or not all(isinstance(d, int) and d >= 0 for d in depths):
            raise ValueError(f'arch depths={depths}: need a non-empty list of ints >= 0')
        if not all(isinstance(d, int) and d >= 1 for d in dims):
            raise ValueError(f'arch dims={dims}: need ints >= 1')
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f'in_channels={in_channels!r} must be an int >= 1')
        self.in_channels = in_channels
        self.arch_settings = cfg
        self.depths, self.dims = depths, dims
        self.num_stages = len(depths)
        self.channel_first = cfg['norm_layer'] == 'ln2d'
        self.out_indices = self.parse_out_indices(out_indices, self.num_stages)
        self.frozen_stages = self.check_frozen_stages(frozen_stages, self.num_stages)
        self.norm_eval = norm_eval
        if drop_path_rate is None:
            drop_path_rate = cfg.get('drop_path_rate', 0.0)
        self.check_rate('drop_path_rate', drop_path_rate)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # == torch.linspace

        self.patch_embed = PatchEmbed(in_channels, dims[0], cfg['patch_embed'], self.channel_first)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            blocks = [self._make_block(dims[i], dpr[sum(depths[:i]) + j], cfg)
                      for j in range(depth)]
            down = (self._make_downsample(dims[i], dims[i + 1], cfg['downsample'])
                    if i < self.num_stages - 1 else None)
            self.layers.append(VMambaStage(blocks, down))
        for i in self.out_indices:
            self.add_module(f'outnorm{i}', make_norm(dims[i], self.channel_first))
        # the dense contract as data: stage i is (B, dims[i], ceil(H / 2^(i+2)), ...)
        self.out_channels = tuple(dims[i] for i in self.out_indices)
        self.out_strides = tuple(4 * 2 ** i for i in self.out_indices)
        self._freeze_stages()
        # The convs see channels-last maps (see forward); with NCHW-strided weights
        # oneDNN copies each weight to channels-last on every call (10.6 MB, a fresh
        # allocation and its page faults, for the last (768, 384, 3, 3) downsample
        # of VMamba-T). Same shapes and keys; in-place inits and load_state_dict
        # keep these strides.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)

    # ------------------------------------------------------------ building
    @classmethod
    def _settings(cls, arch: Union[str, dict]) -> dict:
        cfg = cls.parse_arch(arch)
        if isinstance(arch, dict):
            cfg = {**_V2, 'ssm_ratio': 1.0, **cfg}
        if cfg['norm_layer'] not in ('ln', 'ln2d'):
            raise ValueError(f"arch norm_layer={cfg['norm_layer']!r}: valid 'ln' (channel-last) "
                             "or 'ln2d' (channel-first)")
        check_arch_numbers(cfg)
        if cfg['forward_type'] not in FORWARD_TYPES:
            raise ValueError(f"arch forward_type={cfg['forward_type']!r}: valid {list(FORWARD_TYPES)}")
        if cfg['forward_type'] == 'v0' and cfg['norm_layer'] != 'ln':
            raise ValueError("arch forward_type='v0' needs norm_layer='ln' (channel-last)")
        if cfg['downsample'] not in ('v1', 'v2', 'v3'):
            raise ValueError(f"arch downsample={cfg['downsample']!r}: valid 'v1' (patch merging), "
                             "'v2' (conv k2 s2), 'v3' (conv k3 s2)")
        if cfg['d_conv'] > 1 and cfg['d_conv'] % 2 == 0 and cfg['forward_type'] != 'v0':
            # SS2D's depthwise conv pads (k - 1) // 2: an even kernel would shrink the map
            raise ValueError(f"arch d_conv={cfg['d_conv']}: the SS2D depthwise conv needs an "
                             'odd kernel (or 0/1: no conv)')
        return cfg

    def _make_block(self, dim: int, drop_path: float, cfg: dict) -> nn.Module:
        return VSSBlock(dim, drop_path, self.channel_first, mlp_ratio=cfg['mlp_ratio'],
                        d_state=cfg['d_state'], ssm_ratio=cfg['ssm_ratio'],
                        dt_rank=cfg['dt_rank'], d_conv=cfg['d_conv'],
                        conv_bias=cfg['conv_bias'], forward_type=cfg['forward_type'])

    def _make_downsample(self, dim: int, out_dim: int, version: str) -> nn.Module:
        if version == 'v1':
            return PatchMerging2D(dim, out_dim, self.channel_first)
        return ConvDownsample(dim, out_dim, version, self.channel_first)

    # ------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """(B, C_in, H, W) -> tuple of (B, dims[i], ceil(H/2^(i+2)), ceil(W/2^(i+2)))."""
        self.check_input(x, self.in_channels)
        # (B, C, H, W) maps stored channels-last from the stem on: the 1x1
        # projections run as GEMMs over tokens, LayerNorm2d needs no permute
        # copies, the convs take oneDNN's NHWC kernels (outputs below: NCHW).
        # The channel-last families ('ln') get (B, H, W, C) tokens from the stem
        # without a copy the same way.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer.blocks(x)
            if i in self.out_indices:
                out = getattr(self, f'outnorm{i}')(x)
                if not self.channel_first:
                    out = out.permute(0, 3, 1, 2)
                outs.append(out.contiguous())
            x = layer.downsample(x)
        return tuple(outs)

    # ------------------------------------------------------------- weights
    def _init_weights(self) -> None:
        """Official VSSM init: trunc_normal(.02) Linears with zero bias, unit LayerNorms.

        Convs keep PyTorch's default; SS2D's x_proj/dt/A/D keep their Mamba init.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def convert_checkpoint(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Official VMamba -> ours: same names, plus the legacy renames the
        official ``_load_from_state_dict`` hooks do, and the classifier dropped."""
        out = convert_vmamba_state_dict(state_dict, self.state_dict())
        new = [f'outnorm{i}' for i in self.out_indices if f'outnorm{i}.weight' not in out]
        if new:
            print_log(f'VMamba: {new} are not in the checkpoint (a classification checkpoint '
                      'has no per-stage output norms); they keep their init', logger='current')
        return out

    # ------------------------------------------------------------- training
    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            self.freeze_module(self.patch_embed)
        for i in range(self.frozen_stages):
            self.freeze_module(self.layers[i])
            self.freeze_module(getattr(self, f'outnorm{i}', None))

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Stage-wise depth for layer-wise lr decay.

        stem -> 0; stage i blocks and outnorm{i} -> i + 1; the downsample at the
        end of stage i feeds stage i + 1 -> i + 2; anything else (e.g. a head) ->
        num_stages + 1. Returns (layer_id, num_stages + 2).
        """
        num_layers = self.num_stages + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix):]
        if name.startswith('patch_embed'):
            return 0, num_layers
        m = re.match(r'layers\.(\d+)\.(blocks|downsample)', name)
        if m:
            i = int(m.group(1))
            return (i + 1 if m.group(2) == 'blocks' else i + 2), num_layers
        m = re.match(r'outnorm(\d+)', name)
        if m:
            return int(m.group(1)) + 1, num_layers
        return num_layers - 1, num_layers


_LEGACY = [(r'^patch_embed\.proj\.', 'patch_embed.0.'), (r'^patch_embed\.norm\.', 'patch_embed.2.'),
           (r'\.ln_1\.', '.norm.'), (r'\.self_attention\.', '.op.')]


def convert_vmamba_state_dict(sd: Dict[str, Tensor], own: Dict[str, Tensor],
                              verbose: bool = True) -> Dict[str, Tensor]:
    """Map an official VMamba state dict (classification ``VSSM``, ``MM_VSSM``
    backbone, root ``vmamba.py`` or pre-2024 names) onto mmssm's ``VMamba`` keys.

    Args:
        sd: the official state dict (prefixes already stripped).
        own: the target model's state dict (names and shapes).
    """
    out = OrderedDict()
    dropped = []
    for k, v in sd.items():
        for pat, rep in _LEGACY:
            k = re.sub(pat, rep, k)
        # root vmamba.py stores the grouped projections as conv weights
        if k.endswith('.op.x_proj.weight'):
            k = k.replace('.op.x_proj.weight', '.op.x_proj_weight')
        elif k.endswith('.op.dt_projs.weight'):
            k = k.replace('.op.dt_projs.weight', '.op.dt_projs_weight')
        # root vmamba.py's v1 downsample is Sequential(merge, norm, reduction)
        m = re.match(r'(layers\.\d+\.downsample)\.([12])\.(weight|bias)$', k)
        if m and m.group(1) + '.reduction.weight' in own:
            k = f"{m.group(1)}.{'norm' if m.group(2) == '1' else 'reduction'}.{m.group(3)}"
        if k.startswith(('classifier.', 'head.')) or k in ('norm.weight', 'norm.bias'):
            dropped.append(k)
            continue
        if k in own and v.numel() == own[k].numel() and v.shape != own[k].shape:
            v = v.reshape(own[k].shape)  # Linear2d / grouped-conv layouts
        out[k] = v
    if dropped and verbose:
        print_log(f'VMamba: dropped {len(dropped)} classifier key(s) {dropped} '
                  '(the backbone has no head)', logger='current')
    return out
