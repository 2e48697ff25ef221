"""V2M's 2-D SSM with LocalMamba-style scan directions ("V2M + local window").

LocalVim (Huang et al. 2024) runs, per layer, four 1-D Mamba scans over four
token orders chosen from ``h`` (row-major), ``v`` (column-major), ``w2``/``w7``
(K x K windows, windows row-major, tokens row-major inside) and their
``_flip`` reversals; each direction has its own conv1d / x_proj / dt_proj /
A / D, a shared channel attention (``BiAttn``) re-weights each direction's
output, and the directions are summed before ``out_proj``.

Here each direction is a 2-D SSM instead (row pass then column pass, see
:mod:`.v2m_mixer`). A direction's 1-D order (from :func:`mmssm.ops.local_scan`)
is folded into a grid whose rows are consecutive runs of that order:
``h`` -> (H, W) (the image), ``v`` -> (W, H) (the transposed image), ``wK`` ->
(num_windows * K, K) where each row is one row of one window, so the row pass
stays inside a window and the column pass walks down a window and on into the
next window in window order (carrying state across windows as LocalMamba's
sequence does). ``_flip`` reverses the order, i.e. the scan starts at the
opposite corner. Outputs go back with :func:`mmssm.ops.local_reverse`.
"""
import re
from typing import Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from mmssm.ops import local_reverse, local_scan
from .mamba_mixer import resolve_dt_rank
from .v2m_mixer import SSM2D

_DIR = re.compile(r'^(h|v|w(\d+))(_flip)?$')


def parse_direction(name: str) -> Tuple[int, bool, bool]:
    """'h' | 'v' | 'w<K>' [+ '_flip'] -> (window, flip, column_first)."""
    m = _DIR.match(name) if isinstance(name, str) else None
    if m is None or (m.group(2) is not None and int(m.group(2)) < 2):
        raise ValueError(f'scan direction {name!r} is not valid; use h, v or w<K> (K >= 2, '
                         "e.g. w2, w7), optionally with '_flip'")
    window = int(m.group(2)) if m.group(2) else 1
    return window, m.group(3) is not None, m.group(1) == 'v'


class BiAttn(nn.Module):
    """LocalMamba's channel attention on one direction's output.

    LayerNorm -> mean over tokens -> Linear(C, C*ratio) -> GELU -> Linear -> sigmoid,
    a (B, 1, 1, C) gate that multiplies the (un-normed) input. Input (B, H, W, C).
    """

    def __init__(self, channels: int, ratio: float = 0.125) -> None:
        super().__init__()
        reduced = max(1, int(channels * ratio))
        self.norm = nn.LayerNorm(channels)
        self.global_reduce = nn.Linear(channels, reduced)
        self.channel_select = nn.Linear(reduced, channels)

    def forward(self, x: Tensor) -> Tensor:
        g = self.norm(x).mean(dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        g = self.channel_select(F.gelu(self.global_reduce(g)))
        return x * g.sigmoid()


class LocalV2MMixer(nn.Module):
    """2-D SSM over several (windowed) scan directions, (B, H, W, C) -> (B, H, W, C).

    Args:
        d_model: channels C.
        directions: names from ``h, v, w<K>`` with optional ``_flip``; one
            2-D SSM (own weights, keys ``ssms.k.*``) per entry.
        d_state, expand, d_conv, dt_rank, use_z, gate, conv_bias, bias:
            as :class:`~mmssm.models.layers.V2MMixer2D`.
        attn_ratio: BiAttn reduction ratio (LocalMamba: 1/8).
    """

    def __init__(self, d_model: int, directions: Sequence[str] = ('h', 'h_flip', 'w2', 'w2_flip'),
                 d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: Union[int, str] = 'auto', use_z: bool = True, gate: str = 'both',
                 conv_bias: bool = True, bias: bool = False, attn_ratio: float = 0.125,
                 **dt_kwargs) -> None:
        super().__init__()
        if isinstance(directions, str) or not directions:
            raise ValueError('directions must be a non-empty sequence of names, '
                             f'got {directions!r}')
        self.directions = tuple(directions)
        self._orders = [parse_direction(d) for d in self.directions]
        self.d_model = d_model
        self.d_inner = d_inner = int(expand * d_model)
        R = resolve_dt_rank(dt_rank, d_model)
        self.use_z = use_z
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.ssms = nn.ModuleList([
            SSM2D(d_inner, d_state, d_conv, R, conv_bias, use_z=use_z, gate=gate, **dt_kwargs)
            for _ in self.directions])
        self.attn = BiAttn(d_inner, attn_ratio)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    @staticmethod
    def _row_len(window: int, column_first: bool, h: int, w: int) -> int:
        if window > 1:
            return window
        return h if column_first else w

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, _ = x.shape
        xz = self.in_proj(x).permute(0, 3, 1, 2)  # (B, 2*d_inner, H, W), applied once
        y = 0
        for (window, flip, col_first), ssm in zip(self._orders, self.ssms):
            # 1-D order (B, 2*d_inner, L) folded into rows of `r` tokens
            seq = local_scan(xz, window, flip, col_first)
            r = self._row_len(window, col_first, H, W)
            grid = seq.view(B, seq.shape[1], -1, r)
            xs, z = grid.chunk(2, dim=1)
            out = ssm.scan2d(xs, z if self.use_z else None)  # (B, d_inner, L / r, r)
            out = local_reverse(out.reshape(B, self.d_inner, -1), window, H, W, flip, col_first)
            y = y + self.attn(out.permute(0, 2, 3, 1))  # (B, H, W, d_inner)
        return self.out_proj(y)
