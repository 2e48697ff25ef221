"""What every mmssm backbone shares: arch tables, out_indices, freezing, weights."""
import copy
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

from mmengine.model import BaseModule
from torch import Tensor, nn

from ..utils.checkpoint import load_pretrained


def is_int(v) -> bool:
    """A real int (numpy/torch ints included), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A real number, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class SSMBackbone(BaseModule):
    """Base of mmssm backbones (mmpretrain conventions).

    Subclasses define ``arch_zoo`` (name -> dict of settings), build their
    layers, and may override :meth:`convert_checkpoint` (official key names or
    sizes -> ours), :meth:`_freeze_stages`, :meth:`get_layer_depth` and
    :meth:`_init_weights` (their official initialisation).

    ``init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix=None,
    checkpoint_key=None, min_coverage=0.9, trusted=None)`` loads through
    :func:`mmssm.models.utils.load_pretrained`: official training checkpoints
    (``'model'``/``'model_ema'`` entries), mmssm/mmdet/mmseg checkpoints
    (``backbone.`` prefix) and bare state dicts all work, and a checkpoint that
    covers less than ``min_coverage`` of the keys is an error. ``trusted=True``
    unpickles a file that needs globals outside mmssm's allowlist (it can run code
    from the file; see :mod:`mmssm.utils.safe_load`).
    """
    arch_zoo: Dict[str, dict] = {}
    # keys a subclass expects in a custom arch dict, and the optional ones
    # (None: any extra key is accepted)
    arch_keys: Tuple[str, ...] = ()
    arch_optional: Optional[Tuple[str, ...]] = None
    # substrings of keys that official classification checkpoints lack
    # (e.g. per-output norms) and that must not count as missing
    checkpoint_ignore_missing: Tuple[str, ...] = ()
    # set by each subclass's __init__, one entry per output (order of out_indices):
    # its channels, and its stride w.r.t. the input (an int, a per-axis tuple when the
    # axes differ, or None for outputs that are not maps, e.g. a class token)
    out_channels: Tuple[int, ...] = ()
    out_strides: Tuple[Optional[Union[int, Tuple[int, ...]]], ...] = ()

    def __init__(self, init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)

    @property
    def feature_info(self) -> List[dict]:
        """timm-style description of the outputs: ``num_chs``, ``reduction``, ``index``.

        ``reduction`` is the output's stride (see ``out_strides``); necks and
        heads can be sized from this instead of repeating the backbone's numbers.
        """
        return [dict(num_chs=c, reduction=s, index=i)
                for c, s, i in zip(self.out_channels, self.out_strides, self.out_indices)]

    @staticmethod
    def _stride_value(per_axis: Sequence[int]) -> Union[int, Tuple[int, ...]]:
        """One int when every axis has the same stride, else the per-axis tuple."""
        per_axis = tuple(int(s) for s in per_axis)
        return per_axis[0] if len(set(per_axis)) == 1 else per_axis

    # ----------------------------------------------------------------- arch
    @classmethod
    def parse_arch(cls, arch: Union[str, dict]) -> dict:
        """Return a copy of the settings for ``arch`` (a name or a custom dict)."""
        if isinstance(arch, str):
            key = arch.lower()
            if key not in cls.arch_zoo:
                raise ValueError(f'{cls.__name__}: unknown arch={arch!r}; valid: '
                                 f'{sorted(cls.arch_zoo)} or a dict with keys {list(cls.arch_keys)}')
            return copy.deepcopy(cls.arch_zoo[key])
        if isinstance(arch, dict):
            missing = [k for k in cls.arch_keys if k not in arch]
            if missing:
                raise ValueError(f'{cls.__name__}: custom arch dict lacks {missing}; '
                                 f'it needs {list(cls.arch_keys)}')
            if cls.arch_optional is not None:
                unknown = sorted(set(arch) - set(cls.arch_keys) - set(cls.arch_optional))
                if unknown:
                    raise ValueError(f'{cls.__name__}: unknown arch key(s) {unknown}; valid: '
                                     f'{list(cls.arch_keys) + list(cls.arch_optional)}')
            return copy.deepcopy(arch)
        raise TypeError(f'{cls.__name__}: arch must be a str or dict, got {type(arch).__name__}')

    @staticmethod
    def parse_out_indices(out_indices: Union[int, Sequence[int]], num: int,
                          name: str = 'out_indices') -> List[int]:
        """Normalise out_indices: negative values count from the end, and the result is
        sorted, because the outputs always come in depth order (mmpretrain/mmdet
        convention): output k is layer/stage ``out_indices[k]`` whatever order was given."""
        if is_int(out_indices):
            out_indices = [out_indices]
        if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence) \
                or not all(is_int(i) for i in out_indices):
            raise TypeError(f'{name}={out_indices!r} must be an int or a sequence of ints '
                            f'in {-num}..{num - 1}')
        if len(out_indices) == 0:
            raise ValueError(f'{name} is empty: the backbone would return nothing; '
                             f'give at least one index in {-num}..{num - 1}')
        out = []
        for i in out_indices:
            j = i + num if i < 0 else i
            if not 0 <= j < num:
                raise ValueError(f'{name}={list(out_indices)}: index {i} is out of range '
                                 f'for {num} layers/stages (valid: {-num}..{num - 1})')
            if j in out:
                raise ValueError(f'{name}={list(out_indices)}: index {i} repeats layer/stage {j} '
                                 '(each output is returned once)')
            out.append(j)
        return sorted(out)

    @staticmethod
    def check_frozen_stages(frozen_stages: int, num: int) -> int:
        if not is_int(frozen_stages):
            raise TypeError(f'frozen_stages={frozen_stages!r} must be an int in -1..{num}')
        if not -1 <= frozen_stages <= num:
            raise ValueError(f'frozen_stages={frozen_stages} must be in -1..{num} '
                             f'(-1: none, 0: stem, i: stem and the first i stages/layers)')
        return frozen_stages

    @staticmethod
    def check_rate(name: str, value: float) -> float:
        """A dropout / drop-path probability must lie in [0, 1)."""
        if not is_number(value):
            raise TypeError(f'{name}={value!r} must be a number in [0, 1)')
        if not 0.0 <= value < 1.0:
            raise ValueError(f'{name}={value} must be in [0, 1)')
        return value

    @staticmethod
    def check_int(name: str, value: int, low: int = 1, note: str = '') -> int:
        """An int (not a bool) >= ``low``; ``note`` explains special values."""
        if not is_int(value):
            raise TypeError(f'{name}={value!r} must be an int >= {low}{note}')
        if value < low:
            raise ValueError(f'{name}={value} must be an int >= {low}{note}')
        return value

    @staticmethod
    def check_ints(name: str, value: Union[int, Sequence[int]], n: int,
                   low: int = 1) -> Tuple[int, ...]:
        """An int or ``n`` ints, each >= ``low``: returned as an n-tuple."""
        t = (value, ) * n if is_int(value) else value
        if isinstance(t, (str, bytes)) or not isinstance(t, Sequence) or len(t) != n \
                or not all(is_int(v) for v in t):
            raise TypeError(f'{name}={value!r} must be an int or {n} ints (each >= {low})')
        if min(t) < low:
            raise ValueError(f'{name}={value!r}: every entry must be >= {low}')
        return tuple(t)

    @staticmethod
    def check_input(x: Tensor, in_channels: int, spatial_dims: int = 2) -> None:
        """Clear errors for inputs that would crash deep inside or give a silent wrong result."""
        if not isinstance(x, Tensor) or x.dim() != 2 + spatial_dims:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            layout = '(B, C, H, W) image' if spatial_dims == 2 else '(B, C, T, H, W) video'
            raise ValueError(f'input must be a {layout} batch, got {shape}')
        B, C = x.shape[:2]
        if C != in_channels:
            raise ValueError(f'input has {C} channels but the backbone was built with '
                             f'in_channels={in_channels} (input shape {tuple(x.shape)})')
        if B == 0:
            raise ValueError(f'input batch is empty (shape {tuple(x.shape)})')
        if 0 in x.shape[2:]:
            raise ValueError(f'input image has zero size (shape {tuple(x.shape)})')
        if not x.is_floating_point():
            raise TypeError(f'input must be a floating tensor, got {x.dtype} '
                            '(normalise images with a data_preprocessor first)')

    # -------------------------------------------------------------- weights
    def _init_weights(self) -> None:
        """The family's own initialisation (override)."""

    def convert_checkpoint(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Map an official/foreign state dict onto this module's keys (override)."""
        return state_dict

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            cfg = dict(cfg)
            cfg.pop('type')
            checkpoint = cfg.pop('checkpoint', None)
            if checkpoint is None:
                raise ValueError("init_cfg type='Pretrained' needs checkpoint=PATH")
            self._init_weights()
            load_pretrained(self, checkpoint, prefix=cfg.pop('prefix', None),
                            checkpoint_key=cfg.pop('checkpoint_key', None),
                            min_coverage=cfg.pop('min_coverage', 0.9),
                            convert=self.convert_checkpoint,
                            ignore_missing=self.checkpoint_ignore_missing,
                            map_location=cfg.pop('map_location', 'cpu'),
                            trusted=cfg.pop('trusted', None))
            self._is_init = True
            return
        self._init_weights()
        super().init_weights()

    # ------------------------------------------------------------- freezing
    def _freeze_stages(self) -> None:
        """Put frozen parts in eval mode with requires_grad=False (override)."""

    @staticmethod
    def freeze_module(m: Optional[nn.Module]) -> None:
        if m is None:
            return
        if isinstance(m, nn.Parameter):
            m.requires_grad = False
            return
        m.eval()
        for p in m.parameters():
            p.requires_grad = False

    def train(self, mode: bool = True) -> 'SSMBackbone':
        super().train(mode)
        self._freeze_stages()
        return self
