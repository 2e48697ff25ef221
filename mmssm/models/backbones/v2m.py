"""V2M (Wang et al., arXiv 2410.10382): Vim's plain skeleton with a 2-D selective SSM.

Each layer is ``x + DropPath(V2MMixer2D(RMSNorm(x)))`` on the token *grid*
(B, H, W, C): the 2-D SSM scans every row, then every column of that result,
from up to four image corners (see :mod:`mmssm.models.layers.v2m_mixer`).
The "+ local window" variant swaps in LocalMamba-style windowed directions
(:mod:`mmssm.models.layers.local_v2m_mixer`).
"""
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from mmssm.registry import MODELS
from ..layers.embed import resize_grid_embed, resize_line_embed
from ..layers.local_v2m_mixer import LocalV2MMixer, parse_direction
from ..layers.v2m_mixer import V2MMixer2D, parse_corners
from .vim import Vim


def split_cross(t: Tensor, r: int, c: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, H+1, W+1, C) with an extra row r and column c -> grid, row, column, crossing.

    Returns grid (B, H, W, C), row (B, W, C), column (B, H, C), crossing (B, C).
    """
    rows = [i for i in range(t.shape[1]) if i != r]
    cols = [j for j in range(t.shape[2]) if j != c]
    grid = t[:, rows][:, :, cols]
    return grid, t[:, r, cols], t[:, rows, c], t[:, r, c]


def join_cross(grid: Tensor, row: Tensor, col: Tensor, cross: Tensor, r: int, c: int) -> Tensor:
    """Inverse of :func:`split_cross`: insert row ``r`` and column ``c``."""
    x = torch.cat([grid[:, :r], row[:, None], grid[:, r:]], dim=1)  # (B, H+1, W, C)
    col = torch.cat([col[:, :r], cross[:, None], col[:, r:]], dim=1)  # (B, H+1, C)
    return torch.cat([x[:, :, :c], col[:, :, None], x[:, :, c:]], dim=2)


@MODELS.register_module()
class V2M(Vim):
    """V2M backbone (plain, Vim-based).

    Args:
        arch: 'tiny' (C 192) | 'small' (C 384), or a dict with ``embed_dims``,
            ``num_layers`` and optionally ``d_state``/``expand``/``d_conv``/``dt_rank``.
            Depth 24, or 17 with ``local_window`` (chosen so the parameter counts
            match the paper: V2M-T 7M, -S 26M, -T+local 8M, -S+local 28M).
        cls_position: how the image-level token is made.
            'mean': no extra token; the mean of the normed tokens (official code).
            'edge': an extra row at the bottom and column at the right, all
            initialised from one learned class vector; the bottom-right corner
            token is read out.
            'middle' (paper default): the extra row and column go through the
            centre (before patch row h // 2 and column w // 2); the crossing
            token is read out.
            The position embedding covers the extra tokens; dense maps never
            include them.
        corners: 1-4 (first k of 'ul', 'lr', 'ur', 'll') or names; the corners
            each 2-D scan starts from (not used with ``local_window``).
        gate: 'both' (official: silu(z) after each pass) or 'last'.
        local_window: build the "+ local window" variant.
        directions: with ``local_window``, the scan directions: one tuple for
            every layer, or one tuple per layer (names ``h``, ``v``, ``w<K>``,
            each optionally ``_flip``). Default: layers alternate
            ('h', 'h_flip', 'w2', 'w2_flip') and ('v', 'v_flip', 'w7', 'w7_flip').
        **kwargs: as :class:`Vim` (img_size, patch_size, stride, out_indices,
            out_type, final_norm, out_norms, drop_path_rate, frozen_stages, ...).
            With ``out_type='cls_token'`` the class feature is the read-out
            token ('edge'/'middle') or the token mean ('mean'); ``out_type='raw'``
            gives the whole (B, h [+1], w [+1], C) token grid, extra row/column
            included (a grid, not Vim's (B, L, C) sequence).

    The official initialisation of Vim is used (the V2M release shares it):
    Linear biases zeroed except ``dt_proj.bias`` (so ``dt_proj_2.bias`` starts
    at 0), ``out_proj`` scaled by 1/sqrt(num_layers).
    """
    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'ti', 'tiny'], dict(embed_dims=192, num_layers=24)),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=384, num_layers=24)),
    }
    local_arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(['t', 'ti', 'tiny'], dict(embed_dims=192, num_layers=17)),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=384, num_layers=17)),
    }
    CLS_POSITIONS = ('mean', 'edge', 'middle')
    DEFAULT_DIRECTIONS = (('h', 'h_flip', 'w2', 'w2_flip'), ('v', 'v_flip', 'w7', 'w7_flip'))

    def __init__(self, arch: Union[str, dict] = 'tiny', cls_position: str = 'middle',
                 corners: Union[int, Sequence[str]] = 4, gate: str = 'both',
                 local_window: bool = False,
                 directions: Optional[Sequence] = None, **kwargs) -> None:
        if 'with_cls_token' in kwargs:
            raise TypeError("V2M has no with_cls_token; use cls_position='mean'|'edge'|'middle'")
        if cls_position not in self.CLS_POSITIONS:
            raise ValueError(f'cls_position={cls_position!r}; valid: {self.CLS_POSITIONS}')
        if local_window and isinstance(arch, str):
            key = arch.lower()
            if key not in self.local_arch_zoo:
                raise ValueError(f'V2M: unknown arch={arch!r}; valid: '
                                 f'{sorted(self.local_arch_zoo)} or a dict with keys '
                                 f'{list(self.arch_keys)}')
            arch = dict(self.local_arch_zoo[key])
        if isinstance(directions, str):
            raise TypeError(f'directions={directions!r} must be a tuple of direction names '
                            "(e.g. ('h', 'v_flip', 'w2')) or one such tuple per layer")
        if not local_window and directions is not None:
            raise ValueError('directions applies to local_window=True only')
        if local_window and corners != 4:
            raise ValueError('corners applies to the global 2-D scan; with local_window=True '
                             'choose the scan directions instead')
        # read by _build_tokens/_build_mixer during Vim.__init__
        self.cls_position = cls_position
        self.corners = parse_corners(corners)
        self.gate = gate
        self.local_window = local_window
        self._directions = directions
        super().__init__(arch, **kwargs)

    # ------------------------------------------------------------ mixer
    def _layer_directions(self, i: int) -> Tuple[str, ...]:
        d = self._directions
        if d is None:
            return self.DEFAULT_DIRECTIONS[i % 2]
        if all(isinstance(n, str) for n in d):
            return tuple(d)
        if len(d) != self.num_layers:
            raise ValueError(f'directions has {len(d)} entries; give one tuple for every layer '
                             f'or one per layer ({self.num_layers})')
        return tuple(d[i])

    def _build_mixer(self, i: int) -> nn.Module:
        if self.local_window:
            dirs = self._layer_directions(i)
            for name in dirs:
                parse_direction(name)
            return LocalV2MMixer(self.embed_dims, dirs, gate=self.gate, **self.mixer_cfg)
        return V2MMixer2D(self.embed_dims, corners=self.corners, gate=self.gate,
                          **self.mixer_cfg)

    # ----------------------------------------------------------- tokens
    def _cross_index(self, n: int) -> int:
        """Where the extra row (of an n-row grid) / column goes."""
        return n if self.cls_position == 'edge' else n // 2

    def _build_tokens(self, with_cls_token: bool = True) -> None:
        self.has_cls = True  # a class feature always exists (the mean for 'mean')
        h0, w0 = self.patch_resolution
        e = int(self.cls_position != 'mean')
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims)) if e else None
        self.pos_embed = nn.Parameter(torch.zeros(1, (h0 + e) * (w0 + e), self.embed_dims))

    def _pos_parts(self, hw: Sequence[int]):
        """Position embedding for grid hw: grid (1,h,w,C) [, row (1,w,C), col (1,h,C), cross]."""
        h0, w0 = self.patch_resolution
        C = self.embed_dims
        mode = self.interpolate_mode
        if self.cls_position == 'mean':
            return resize_grid_embed(self.pos_embed, (h0, w0), hw, mode).view(1, *hw, C), None
        full = self.pos_embed.view(1, h0 + 1, w0 + 1, C)
        grid, row, col, cross = split_cross(full, self._cross_index(h0), self._cross_index(w0))
        grid = resize_grid_embed(grid.reshape(1, h0 * w0, C), (h0, w0), hw, mode)
        return grid.view(1, *hw, C), (resize_line_embed(row, hw[1]),
                                      resize_line_embed(col, hw[0]), cross)

    def _tokens(self, p: Tensor) -> Tensor:
        """(B, h, w, C) patches -> (B, h [+1], w [+1], C) token grid."""
        B, h, w, C = p.shape
        grid, extra = self._pos_parts((h, w))
        p = p + grid
        if extra is None:
            return p
        row, col, cross = extra
        cls = self.cls_token  # (1, 1, C)
        return join_cross(p, (cls + row).expand(B, -1, -1), (cls + col).expand(B, -1, -1),
                          (cls[:, 0] + cross).expand(B, -1), self._cross_index(h),
                          self._cross_index(w))

    def _split(self, x: Tensor, h: int, w: int) -> Tuple[Tensor, Tensor]:
        if self.cls_position == 'mean':
            return x, x.mean(dim=(1, 2))
        grid, _, _, cross = split_cross(x, self._cross_index(h), self._cross_index(w))
        return grid, cross

    # ----------------------------------------------------------- weights
    def convert_checkpoint(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Drop ``head.*``; fit ``pos_embed`` (official V2M: patch grid only) to ours.

        A checkpoint with ``cls_token`` is read as an mmssm V2M of the same
        ``cls_position``; one without (official V2M, mean pooling) gives the
        patch grid, and extra-token entries keep their current values.
        """
        sd = {k: v for k, v in state_dict.items() if not k.startswith(('head.', 'rope.'))}
        pos = sd.get('pos_embed')
        if pos is not None and pos.shape != self.pos_embed.shape:
            sd['pos_embed'] = self._convert_pos(pos, 'cls_token' in sd)
        if self.cls_token is None:
            sd.pop('cls_token', None)
        return sd

    def _convert_pos(self, pos: Tensor, has_extra: bool) -> Tensor:
        C = pos.shape[-1]
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise ValueError(f'pos_embed {tuple(pos.shape)} is not a square token grid')
        h0, w0 = self.patch_resolution
        if has_extra:  # mmssm layout of another size: (s+1)^2 tokens
            s = side - 1
            grid, row, col, cross = split_cross(pos.view(1, side, side, C),
                                                self._cross_index(s), self._cross_index(s))
            grid = grid.reshape(1, s * s, C)
        else:
            s, grid, row = side, pos, None
        grid = resize_grid_embed(grid, (s, s), (h0, w0), self.interpolate_mode)
        if self.cls_position == 'mean':
            return grid
        grid = grid.view(1, h0, w0, C)
        if row is None:  # keep our own extra-token entries
            full = self.pos_embed.detach().view(1, h0 + 1, w0 + 1, C)
            _, row, col, cross = split_cross(full, self._cross_index(h0), self._cross_index(w0))
        else:
            row, col = resize_line_embed(row, w0), resize_line_embed(col, h0)
        out = join_cross(grid, row.to(grid.dtype), col.to(grid.dtype), cross.to(grid.dtype),
                         self._cross_index(h0), self._cross_index(w0))
        return out.reshape(1, -1, C)
