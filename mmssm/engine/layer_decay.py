"""Layer-wise lr decay for any model whose backbone has ``get_layer_depth``."""
from collections import defaultdict
from typing import Callable, List, Optional, Tuple

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..registry import OPTIM_WRAPPER_CONSTRUCTORS

NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Scale each parameter's lr by ``layer_decay_rate ** (max_id - 1 - layer_id)``.

    The layer id comes from ``backbone.get_layer_depth(name)`` (mmpretrain's
    convention: ``(layer_id, max_id)``), so it works for classifiers,
    detectors and segmentors alike; parameters outside the backbone (neck,
    heads) take the top id (scale 1). mmdet's and mmseg's constructors only
    recognise ConvNeXt/BEiT class names, and the official Vim/LocalMamba
    constructors match ``blocks.*`` where their parameters are ``layers.*``.

    ``paramwise_cfg`` keys: ``layer_decay_rate`` (default 1.0),
    ``norm_decay_mult``, ``bias_decay_mult``, ``flat_decay_mult`` and
    ``custom_keys`` (``{substring: dict(decay_mult=..., lr_mult=...)}``, the
    longest matching key wins). A parameter carrying ``_optim`` (S4 kernels
    ask for their own ``lr``/``weight_decay``) gets those values, scaled by
    its layer's lr factor.
    """

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   **kwargs) -> None:
        get_depth = self._depth_fn(module)
        decay_rate = self.paramwise_cfg.get('layer_decay_rate', 1.0)
        custom_keys = self.paramwise_cfg.get('custom_keys', {})
        keys = sorted(custom_keys, key=len, reverse=True)
        norm_mult = self.paramwise_cfg.get('norm_decay_mult', None)
        bias_mult = self.paramwise_cfg.get('bias_decay_mult', None)
        flat_mult = self.paramwise_cfg.get('flat_decay_mult', None)
        norm_params = {id(p) for m in module.modules() if isinstance(m, NORMS)
                       for p in m.parameters(recurse=False)}
        base_wd = self.base_wd if self.base_wd is not None else 0.0
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer_id, max_id = get_depth(name)
            scale = decay_rate ** (max_id - 1 - layer_id)
            lr, wd = self.base_lr * scale, base_wd
            key = next((k for k in keys if k in name), None)
            if key is not None:
                wd = base_wd * custom_keys[key].get('decay_mult', 1.0)
                lr = lr * custom_keys[key].get('lr_mult', 1.0)
            elif id(param) in norm_params and norm_mult is not None:
                wd = base_wd * norm_mult
            elif name.endswith('.bias') and bias_mult is not None:
                wd = base_wd * bias_mult
            elif param.ndim == 1 and flat_mult is not None:
                wd = base_wd * flat_mult
            special = getattr(param, '_optim', None)
            if special:
                lr = special.get('lr', self.base_lr) * scale
                wd = special.get('weight_decay', wd)
            params.append(dict(params=[param], lr=lr, weight_decay=wd, lr_scale=scale,
                               layer_id=layer_id, param_name=name))
        self._log(params)

    @staticmethod
    def _depth_fn(model: nn.Module) -> Callable[[str], Tuple[int, int]]:
        """Map a parameter name of ``model`` to (layer_id, max_id)."""
        backbone: Optional[nn.Module] = getattr(model, 'backbone', None)
        if backbone is None:  # a bare backbone
            backbone, prefix = model, ''
        else:
            prefix = 'backbone.'
        if not hasattr(backbone, 'get_layer_depth'):
            raise NotImplementedError(
                f'LayerDecayOptimWrapperConstructor needs the backbone '
                f'({type(backbone).__name__}) to define get_layer_depth(param_name)')
        _, max_id = backbone.get_layer_depth('__head__')

        def depth(name: str) -> Tuple[int, int]:
            if prefix and not name.startswith(prefix):
                return max_id - 1, max_id
            return backbone.get_layer_depth(name[len(prefix):])

        return depth

    @staticmethod
    def _log(params: List[dict]) -> None:
        by_layer = defaultdict(list)
        for g in params:
            by_layer[g['layer_id']].append(g)
        lines = [f'layer {lid}: lr scale {gs[0]["lr_scale"]:.4g}, {len(gs)} tensors'
                 for lid, gs in sorted(by_layer.items())]
        print_log('layer-wise lr decay:\n  ' + '\n  '.join(lines), logger='current')
