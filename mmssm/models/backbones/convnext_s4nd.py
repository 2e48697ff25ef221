"""ConvNeXt-S4ND backbones (Nguyen et al., NeurIPS 2022): 2-D images and T x H x W video.

ConvNeXt with S4ND in the three places the official model (state-spaces/s4
``src/models/baselines/convnext_timm.py``, ImageNet config
``convnext_timm_tiny_s4nd_imagenet.yaml``) uses it:

* every block's depthwise 7x7 conv is an S4ND layer whose kernel is global over the
  stage's feature map (``l_max = img_size // stride``);
* the ``new_s4nd_patch`` stem: dense S4ND (3 -> 32 channels, ``l_max = stem_l_max``),
  AvgPool(4), linear 32 -> 2*C0, GLU, LayerNorm;
* the downsample layers: LayerNorm, depthwise S4ND (l_max = current size), AvgPool(2),
  linear C -> 2*C', GLU.

State-dict keys are the official ones (``stem.stem.*``, ``stem.post_stem.*``,
``stages.{i}.norm_layer.*``, ``stages.{i}.downsample.{s4conv,fc}.*``,
``stages.{i}.blocks.{j}.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``); the classifier's
``head.norm`` becomes the output norm ``norm3`` and ``head.fc`` is dropped.
Resolution changes go through ``rate`` (the official ``resolution``): an input ``s``
times larger than ``img_size`` wants ``rate = 1/s``; kernels are re-discretised, never resized.
"""
import copy
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor

from mmssm.models.layers.s4nd import S4ND, TransposedLinear, prefetch_kernels
from mmssm.ops import cauchy_cpu
from mmssm.registry import MODELS
from .base import SSMBackbone, is_int, is_number

# the official ImageNet layer config (model.layer), then per-part overrides
S4ND_LAYER_CFG = dict(d_state=64, channels=1, bidirectional=True, activation=None,
                      final_act='none', init='fourier', rank=1, trank=1, dt_min=0.01,
                      dt_max=1.0, lr=0.001, n_ssm=1, linear=True, bandlimit=None,
                      contract_version=0)
STEM_LAYER_CFG = dict(dt_min=0.1, dt_max=1.0, init='fourier')
STAGE_LAYER_CFG = dict(dt_min=0.1, dt_max=1.0)


class LayerNormCF(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first (B, C, *spatial) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.movedim(-1, 1)


class Mlp(nn.Module):
    """Channels-last MLP (timm key names ``fc1``/``fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtS4NDBlock(nn.Module):
    """ConvNeXt block with a global S4ND token mixer instead of the 7x7 depthwise conv."""

    def __init__(self, dim: int, l_max: Sequence[int], layer_cfg: dict, drop_path: float = 0.,
                 ls_init_value: float = 1e-6, mlp_ratio: float = 4.):
        super().__init__()
        self.conv_dw = S4ND(dim, l_max=list(l_max), dim=len(l_max), **layer_cfg)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, rate: float = 1.0) -> Tensor:
        y = self.mlp(self.norm(self.conv_dw(x, rate).movedim(1, -1)))  # channels-last MLP
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.movedim(-1, 1))


class S4DownSample(nn.Module):
    """Depthwise S4ND over the current map, (GELU), AvgPool(stride), linear C -> (2x)C', (GLU)."""

    def __init__(self, in_ch: int, out_ch: int, l_max: Sequence[int], stride: Sequence[int],
                 layer_cfg: dict, act: bool = False, glu: bool = True):
        super().__init__()
        self.s4conv = S4ND(in_ch, l_max=list(l_max), dim=len(l_max), **layer_cfg)
        self.act = nn.GELU() if act else nn.Identity()
        pool = nn.AvgPool2d if len(l_max) == 2 else nn.AvgPool3d
        self.avgpool = pool(kernel_size=tuple(stride), stride=tuple(stride))
        self.glu = glu
        self.fc = TransposedLinear(in_ch, 2 * out_ch if glu else out_ch)

    def forward(self, x: Tensor, rate: float = 1.0) -> Tensor:
        x = self.fc(self.avgpool(self.act(self.s4conv(x, rate))))
        return F.glu(x, dim=1) if self.glu else x


class ConvDownSample(nn.Module):
    """Strided conv downsample (official ``Conv2dWrapper``; key ``conv``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: Sequence[int]):
        super().__init__()
        conv = nn.Conv2d if len(stride) == 2 else nn.Conv3d
        self.conv = conv(in_ch, out_ch, kernel_size=tuple(stride), stride=tuple(stride))

    def forward(self, x: Tensor, rate: float = 1.0) -> Tensor:
        return self.conv(x)


class ConvNeXtS4NDStage(nn.Module):
    """(LayerNorm + downsample) then blocks; the first stage does not downsample."""

    def __init__(self, in_ch: int, out_ch: int, in_size: Sequence[int], stride: Sequence[int],
                 depth: int, dp_rates: Sequence[float], layer_cfg: dict, downsample_type: str,
                 downsample_act: bool, downsample_glu: bool, ls_init_value: float):
        super().__init__()
        self.downsampling = in_ch != out_ch or any(s > 1 for s in stride)
        if self.downsampling:
            self.norm_layer = LayerNormCF(in_ch)
            if downsample_type == 's4nd':
                self.downsample = S4DownSample(in_ch, out_ch, in_size, stride, layer_cfg,
                                               downsample_act, downsample_glu)
            else:
                self.downsample = ConvDownSample(in_ch, out_ch, stride)
        self.out_size = [n // s for n, s in zip(in_size, stride)]
        self.blocks = nn.ModuleList([
            ConvNeXtS4NDBlock(out_ch, self.out_size, layer_cfg, dp_rates[j], ls_init_value)
            for j in range(depth)])

    def forward(self, x: Tensor, rate: float = 1.0) -> Tensor:
        if self.downsampling:
            x = self.downsample(self.norm_layer(x), rate)
        for block in self.blocks:
            x = block(x, rate)
        return x


class S4NDPatchStem(nn.Module):
    """Official 2-D ``new_s4nd_patch`` stem: ``stem`` (dense S4ND) + ``post_stem``."""

    def __init__(self, in_ch: int, out_ch: int, stem_channels: int, l_max: Sequence[int],
                 patch: Sequence[int], layer_cfg: dict):
        super().__init__()
        self.stem = S4ND(in_ch, l_max=list(l_max), dim=len(l_max), out_channels=stem_channels,
                         **layer_cfg)
        self.post_stem = nn.Sequential(
            nn.AvgPool2d(kernel_size=tuple(patch), stride=tuple(patch)),
            TransposedLinear(stem_channels, 2 * out_ch), nn.GLU(dim=1), LayerNormCF(out_ch))

    def forward(self, x: Tensor, rate: float = 1.0) -> Tensor:
        # S4ND + AvgPool in one pass (S4ND.pooled): the full-resolution stem output is
        # never built
        x = self.stem.pooled(x, self.post_stem[0].kernel_size, rate)
        for m in self.post_stem[1:]:
            x = m(x)
        return x


class S4NDPatchStem3D(nn.Module):
    """Official 3-D ``new_s4nd_patch`` stem, one Sequential ``stem.{0..4}`` (whose official
    forward crashes; this one passes ``rate`` to the S4ND member)."""

    def __init__(self, in_ch: int, out_ch: int, stem_channels: int, l_max: Sequence[int],
                 patch: Sequence[int], layer_cfg: dict):
        super().__init__()
        self.stem = nn.Sequential(
            S4ND(in_ch, l_max=list(l_max), dim=3, out_channels=stem_channels, **layer_cfg),
            nn.AvgPool3d(kernel_size=tuple(patch), stride=tuple(patch)),
            TransposedLinear(stem_channels, 2 * out_ch), nn.GLU(dim=1), LayerNormCF(out_ch))

    def forward(self, x: Tensor, rate: float = 1.0) -> Tensor:
        x = self.stem[0].pooled(x, self.stem[1].kernel_size, rate)  # S4ND + AvgPool3d
        for m in self.stem[2:]:
            x = m(x)
        return x


class PatchStem(nn.Module):
    """Plain ConvNeXt patchify stem: conv k=stride=patch + LayerNorm (keys ``stem.{0,1}``)."""

    def __init__(self, in_ch: int, out_ch: int, patch: Sequence[int]):
        super().__init__()
        conv = nn.Conv2d if len(patch) == 2 else nn.Conv3d
        self.stem = nn.Sequential(conv(in_ch, out_ch, kernel_size=tuple(patch),
                                       stride=tuple(patch)), LayerNormCF(out_ch))

    def forward(self, x: Tensor, rate: float = 1.0) -> Tensor:
        return self.stem(x)


@MODELS.register_module()
class ConvNeXtS4ND(SSMBackbone):
    """ConvNeXt-S4ND backbone (2-D).

    Args:
        arch: 'micro', 'tiny', 'small', 'base' or a dict with ``depths`` and ``dims``.
        in_channels: input image channels.
        img_size: training resolution (int or (H, W)); sets every S4ND ``l_max``.
        patch_size: stem stride.
        stem_type: 'new_s4nd_patch' (official S4ND config) or 'patch' (conv stem).
        stem_channels: channels of the stem S4ND.
        stem_l_max: stem kernel length per axis (official: 16).
        downsample_type: 's4nd' (official S4ND config) or 'conv' (strided conv).
        downsample_act, downsample_glu: GELU after the downsample S4ND / GLU after its linear.
        layer_cfg: overrides of the shared S4ND kwargs (:data:`S4ND_LAYER_CFG`).
        stem_layer_cfg, stage_layer_cfg: overrides for the stem / stage layers on top of
            layer_cfg (official: dt in [0.1, 1] for both, init 'fourier').
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        ls_init_value: layer-scale init.
        out_indices: stages whose outputs are returned (each through its own LayerNorm
            ``norm{i}``; ``norm3`` takes the official ``head.norm``).
        frozen_stages: -1 none, 0 the stem, i the stem and stages 0..i-1.
        gap_before_final_norm: average-pool before the output norms (official head order:
            pool -> norm); outputs are then (B, C, 1, 1).
        rate: default sampling rate (training resolution / input resolution).
        init_cfg: mmengine init config; ``Pretrained`` loads official checkpoints.
    """
    arch_zoo = {
        'micro': dict(depths=[3, 3, 3, 3], dims=[64, 128, 256, 512]),
        'tiny': dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768]),
        'small': dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768]),
        'base': dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024]),
    }
    arch_keys = ('depths', 'dims')
    arch_optional = ()
    checkpoint_ignore_missing = ('norm0.', 'norm1.', 'norm2.')
    spatial_dims = 2

    def __init__(self, arch: Union[str, dict] = 'tiny', in_channels: int = 3,
                 img_size: Union[int, Sequence[int]] = 224, patch_size: int = 4,
                 stem_type: str = 'new_s4nd_patch', stem_channels: int = 32,
                 stem_l_max: Union[int, Sequence[int]] = 16, downsample_type: str = 's4nd',
                 downsample_act: bool = False, downsample_glu: bool = True,
                 layer_cfg: Optional[dict] = None, stem_layer_cfg: Optional[dict] = None,
                 stage_layer_cfg: Optional[dict] = None, drop_path_rate: float = 0.,
                 ls_init_value: float = 1e-6, out_indices: Union[int, Sequence[int]] = -1,
                 frozen_stages: int = -1, gap_before_final_norm: bool = False,
                 rate: float = 1.0, init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self._check_options(arch, in_channels, img_size, patch_size, stem_channels, stem_l_max,
                            dict(layer_cfg=layer_cfg, stem_layer_cfg=stem_layer_cfg,
                                 stage_layer_cfg=stage_layer_cfg), drop_path_rate,
                            ls_init_value, rate)
        settings = self.parse_arch(arch)
        self.depths, self.dims = list(settings['depths']), list(settings['dims'])
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f'arch needs 4 depths and 4 dims, got {self.depths}, {self.dims}')
        if stem_type not in ('new_s4nd_patch', 'patch'):
            raise ValueError(f"stem_type must be 'new_s4nd_patch' or 'patch', got {stem_type!r}")
        if downsample_type not in ('s4nd', 'conv'):
            raise ValueError(f"downsample_type must be 's4nd' or 'conv', got {downsample_type!r}")
        nd = self.spatial_dims
        self.in_channels = in_channels
        self.img_size = self._tuple(img_size, 'img_size')
        patch = self._tuple(patch_size, 'patch_size')
        self.patch = patch
        # later dicts override earlier ones (a user override may restate a default key)
        base = {**S4ND_LAYER_CFG, **self._cfg(layer_cfg, 'layer_cfg')}
        stem_cfg = {**base, **STEM_LAYER_CFG, **self._cfg(stem_layer_cfg, 'stem_layer_cfg')}
        stage_cfg = {**base, **STAGE_LAYER_CFG, **self._cfg(stage_layer_cfg, 'stage_layer_cfg')}
        self.rate = rate

        if stem_type == 'patch':
            self.stem = PatchStem(in_channels, self.dims[0], patch)
        else:
            stem_cls = S4NDPatchStem if nd == 2 else S4NDPatchStem3D
            self.stem = stem_cls(in_channels, self.dims[0], stem_channels,
                                 self._tuple(stem_l_max, 'stem_l_max'), patch, stem_cfg)
        size = [n // p for n, p in zip(self.img_size, patch)]
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.stages = nn.ModuleList()
        prev = self.dims[0]
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            stride = [1] * nd if i == 0 else self._stage_stride(i)
            stage = ConvNeXtS4NDStage(prev, dim, size, stride, depth,
                                      dpr[sum(self.depths[:i]):sum(self.depths[:i + 1])],
                                      copy.deepcopy(stage_cfg), downsample_type, downsample_act,
                                      downsample_glu, ls_init_value)
            self.stages.append(stage)
            size, prev = stage.out_size, dim
        # every pooling floors: inputs below the total stride would give empty stages
        self.total_stride = tuple(p * int(torch.tensor([self._stage_stride(i)[a]
                                                         for i in range(1, 4)]).prod())
                                  for a, p in enumerate(patch))
        self.out_indices = self.parse_out_indices(out_indices, 4)
        self.frozen_stages = self.check_frozen_stages(frozen_stages, 4)
        self.gap_before_final_norm = gap_before_final_norm
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNormCF(self.dims[i]))
        # the dense contract as data: stage i's stride per axis is the stem's times the
        # stage strides up to i (each pooling floors, see forward)
        cum = [list(patch)]
        for i in range(1, 4):
            cum.append([c * s for c, s in zip(cum[-1], self._stage_stride(i))])
        self.out_channels = tuple(self.dims[i] for i in self.out_indices)
        self.out_strides = tuple(None if gap_before_final_norm else self._stride_value(cum[i])
                                 for i in self.out_indices)  # pooled (B, C, 1..): no stride
        self._freeze_stages()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _cfg(cfg: Optional[dict], name: str) -> dict:
        if cfg is None:
            return {}
        if not isinstance(cfg, dict):
            raise TypeError(f'{name} must be a dict of S4ND kwargs or None, '
                            f'got {type(cfg).__name__}')
        return dict(cfg)

    def _check_options(self, arch, in_channels, img_size, patch_size, stem_channels, stem_l_max,
                       layer_cfgs: dict, drop_path_rate, ls_init_value, rate) -> None:
        """ValueError/TypeError naming the argument for values that would fail deep inside."""
        settings = self.parse_arch(arch)
        for key, low in (('depths', 0), ('dims', 1)):
            v = settings[key]
            if not (isinstance(v, (list, tuple)) and all(is_int(d) and d >= low for d in v)):
                raise ValueError(f'arch {key}={v!r} must be a list of 4 ints >= {low}')
        nd = self.spatial_dims
        self.check_int('in_channels', in_channels)
        self.check_int('stem_channels', stem_channels)
        img = self.check_ints('img_size', img_size, nd)
        total = list(self.check_ints('patch_size', patch_size, nd))
        for i in range(1, 4):
            total = [t * s for t, s in zip(total, self._stage_stride(i))]
        if any(n < t for n, t in zip(img, total)):
            # every pooling floors: a stage of size 0 would get length-0 S4ND kernels
            raise ValueError(f'img_size={img_size!r} is smaller than the total stride '
                             f'{tuple(total)} (patch_size x the stage strides): the last '
                             'stage would be empty')
        self.check_ints('stem_l_max', stem_l_max, nd)
        self.check_rate('drop_path_rate', drop_path_rate)
        if not is_number(ls_init_value):
            raise TypeError(f'ls_init_value={ls_init_value!r} must be a number (0: no layer scale)')
        if not is_number(rate) or rate <= 0:
            raise ValueError(f'rate={rate!r} must be a number > 0 (training / input resolution)')
        for name, cfg in layer_cfgs.items():
            if cfg is not None and not isinstance(cfg, dict):
                raise TypeError(f'{name} must be a dict of S4ND arguments or None, got {cfg!r}')
            d_state = (cfg or {}).get('d_state', 1)
            if not (is_int(d_state) and d_state >= 1):
                raise ValueError(f'{name} d_state={d_state!r} must be an int >= 1')

    def _tuple(self, v: Union[int, Sequence[int]], name: str) -> Tuple[int, ...]:
        nd = self.spatial_dims
        t = (int(v),) * nd if isinstance(v, int) else tuple(int(x) for x in v)
        if len(t) != nd:
            raise ValueError(f'{name} must be an int or {nd} ints, got {v!r}')
        return t

    def _stage_stride(self, i: int) -> list:
        return [2] * self.spatial_dims

    def _init_weights(self) -> None:
        """Official init: trunc_normal(0.02) for conv/linear weights, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def convert_checkpoint(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Official ConvNeXt-S4ND keys -> ours: ``head.norm`` -> ``norm3``, drop ``head.fc``.

        DPLR ``C`` and ``l_kernel`` load together (``C`` is C~ tied to ``l_kernel``)."""
        out = {}
        last = len(self.dims) - 1
        for k, v in state_dict.items():
            if k.startswith('head.norm.'):
                out[f'norm{last}.' + k[len('head.norm.'):]] = v
            elif not k.startswith('head.'):
                out[k] = v
        return out

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            self.freeze_module(self.stem)
        for i in range(max(self.frozen_stages, 0)):
            self.freeze_module(self.stages[i])
            if i in self.out_indices:
                self.freeze_module(getattr(self, f'norm{i}'))

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer-wise lr decay id (official/mmpretrain ConvNeXt grouping into 6 or 12 groups)."""
        max_layer_id = 12 if self.depths[-2] > 9 else 6
        if not param_name.startswith(prefix):
            return max_layer_id + 1, max_layer_id + 2
        name = param_name[len(prefix):]
        parts = name.split('.')
        if name.startswith('stem'):
            layer_id = 0
        elif name.startswith('stages'):
            stage_id = int(parts[1])
            if parts[2] == 'blocks':
                block_id = int(parts[3])
                if stage_id in (0, 1):
                    layer_id = stage_id + 1
                elif stage_id == 2:  # groups of 3 blocks (a deeper custom stage shares the last)
                    layer_id = min(3 + block_id // 3, max_layer_id - 1)
                else:
                    layer_id = max_layer_id
            else:  # norm_layer / downsample belong with their stage's first group
                layer_id = stage_id + 1 if stage_id in (1, 2) else max_layer_id
        elif name.startswith('norm') and parts[0][4:].isdigit() and int(parts[0][4:]) < 3:
            # output norm of stage 0-2: with its stage's last group (norm3 is the official
            # head.norm: max_layer_id + 1), so ids never decrease with depth
            i = int(parts[0][4:])
            last_block = max(self.depths[i] - 1, 0)
            layer_id = (i + 1 if i < 2 else min(3 + last_block // 3, max_layer_id - 1))
        else:
            layer_id = max_layer_id + 1
        return layer_id, max_layer_id + 2

    def _s4nd_layers(self, in_size: Sequence[int]) -> list:
        """(depthwise S4ND layer, its input size) of every downsample and block layer for
        an input of ``in_size`` (each pooling floors, as in forward)."""
        size = [int(n) // p for n, p in zip(in_size, self.patch)]
        out = []
        for i, stage in enumerate(self.stages):
            if stage.downsampling and isinstance(stage.downsample, S4DownSample):
                out.append((stage.downsample.s4conv, size))
            if i > 0:
                size = [n // s for n, s in zip(size, self._stage_stride(i))]
            out += [(block.conv_dw, size) for block in stage.blocks]
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, rate: Optional[float] = None) -> Tuple[Tensor, ...]:
        """x: (B, C, H, W). ``rate`` = training resolution / input resolution (default
        ``self.rate``); e.g. a 2x larger input with kernels that should cover it uses 0.5."""
        self.check_input(x, self.in_channels, self.spatial_dims)
        if any(n < s for n, s in zip(x.shape[2:], self.total_stride)):
            raise ValueError(f'input size {tuple(x.shape[2:])} is smaller than the total stride '
                             f'{self.total_stride} of {type(self).__name__}: the last stage '
                             'would be empty (sizes are floored at each pooling, as ConvNeXt)')
        rate = self.rate if rate is None else rate
        if torch.is_grad_enabled() and (torch.get_num_threads() > 1
                                        or cauchy_cpu.dplr_available()):
            # training: the kernels of all depthwise layers in one batched call per shape
            # (~8k instead of ~24k small ops for ConvNeXt-S4ND-T). With several threads
            # every op is an OpenMP region: kernel generation f+b 475 -> 401 ms (2 threads,
            # wall). At 1 thread it pays only with the compiled spectrum op (train step
            # -3-5%); the PyTorch path's stacked passes, whose working set outgrows the
            # cache, are ~5% slower than per-layer calls there
            prefetch_kernels(self._s4nd_layers(x.shape[2:]), rate)
        x = self.stem(x, rate)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x, rate)
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                if self.gap_before_final_norm:
                    outs.append(norm(x.mean(dim=tuple(range(2, x.dim())), keepdim=True)))
                else:
                    outs.append(norm(x))
        return tuple(outs)


@MODELS.register_module()
class ConvNeXtS4ND3D(ConvNeXtS4ND):
    """ConvNeXt-S4ND for video (B, C, T, H, W): every S4ND has a temporal axis 0.

    Same arguments as :class:`ConvNeXtS4ND` with ``img_size`` = video size (T, H, W),
    ``patch_size`` = (temporal, spatial, spatial) stem stride (official: (2, 4, 4)),
    ``stem_l_max`` per axis (official: (4, 16, 16)), and ``temporal_strides`` for stages 1-3
    (official HMDB config: 1, i.e. no temporal downsampling). The official video S4ND layers
    use ``contract_version=1`` (same numbers here).

    A 2-D ConvNeXt-S4ND checkpoint loads through :meth:`inflate_2d_state_dict` (also done
    automatically by ``init_cfg=dict(type='Pretrained', ...)``).
    """
    spatial_dims = 3

    def __init__(self, arch: Union[str, dict] = 'tiny',
                 img_size: Union[int, Sequence[int]] = (30, 224, 224),
                 patch_size: Union[int, Sequence[int]] = (2, 4, 4),
                 stem_l_max: Union[int, Sequence[int]] = (4, 16, 16),
                 temporal_strides: Sequence[int] = (1, 1, 1), layer_cfg: Optional[dict] = None,
                 **kwargs):
        if is_int(temporal_strides) or len(temporal_strides) != 3:
            raise ValueError('temporal_strides needs 3 values (stages 1-3), '
                             f'got {temporal_strides}')
        self.temporal_strides = list(self.check_ints('temporal_strides', temporal_strides, 3))
        layer_cfg = {'contract_version': 1, **self._cfg(layer_cfg, 'layer_cfg')}
        super().__init__(arch=arch, img_size=img_size, patch_size=patch_size,
                         stem_l_max=stem_l_max, layer_cfg=layer_cfg, **kwargs)

    def _stage_stride(self, i: int) -> list:
        return [self.temporal_strides[i - 1], 2, 2]

    def inflate_2d_state_dict(self, state_dict_2d: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Inflate a 2-D ConvNeXt-S4ND state dict to this video model.

        * S4ND spatial kernels move up one axis: 2-D ``kernel.0`` (H) -> ``kernel.1``,
          ``kernel.1`` (W) -> ``kernel.2`` (C~ together with its ``l_kernel``);
        * the temporal ``kernel.0`` keeps this model's fresh initialisation;
        * the 2-D stem ``stem.stem`` / ``stem.post_stem.{1,3}`` go to ``stem.stem.0`` /
          ``stem.stem.{2,4}``; conv weights (patch stem, conv downsample) are repeated
          along T (value preserved for a constant-in-time input: divided by T);
        * ``head.norm`` -> ``norm3``; ``head.fc`` is dropped.
        """
        sd2 = ConvNeXtS4ND.convert_checkpoint(self, state_dict_2d)
        own = self.state_dict()
        out = {}
        for k, v in sd2.items():
            k3 = k
            if k.startswith('stem.post_stem.'):
                idx, rest = k[len('stem.post_stem.'):].split('.', 1)
                k3 = f'stem.stem.{int(idx) + 1}.{rest}'
            elif k.startswith('stem.stem.') and '.kernel.' in k or k.startswith('stem.stem.D'):
                k3 = 'stem.stem.0.' + k[len('stem.stem.'):]
            if '.kernel.' in k3:
                head, rest = k3.split('.kernel.', 1)
                axis, tail = rest.split('.', 1)
                k3 = f'{head}.kernel.{int(axis) + 1}.{tail}'
            if k3 not in own:
                continue
            if v.dim() + 1 == own[k3].dim() and v.dim() >= 4:  # conv weight: repeat along T
                T = own[k3].shape[2]
                v = v.unsqueeze(2).repeat(1, 1, T, *([1] * (v.dim() - 2))) / T
            out[k3] = v
        for k, v in own.items():  # fresh temporal kernels (and anything 2-D lacks)
            out.setdefault(k, v)
        return out

    def convert_checkpoint(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        is_2d = any('.kernel.1.' in k for k in state_dict) and not any(
            '.kernel.2.' in k for k in state_dict)
        if is_2d:
            return self.inflate_2d_state_dict(state_dict)
        return super().convert_checkpoint(state_dict)
