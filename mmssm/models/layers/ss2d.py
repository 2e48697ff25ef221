"""SS2D: VMamba's 2-D selective-scan mixer (4-direction cross-scan).

One module covers both released families:

- v2 (``forward_type='v05_noz'``): in_proj -> 3x3 depthwise conv -> SiLU ->
  cross-scan -> S6 (d_state 1, one B/C group per direction) -> cross-merge ->
  out_norm -> out_proj; no z gate; usually channel-first (``ln2d`` build).
- v0 "vanilla" (``forward_type='v0'``): the same core with a SiLU z gate
  applied after out_norm, a biased depthwise conv and d_state 16; channel-last.

Parameters keep the names of the released checkpoints (``x_proj_weight``
(K, R+2N, D), ``dt_projs_weight`` (K, D, R), ``dt_projs_bias`` (K, D),
``A_logs`` (K*D, N), ``Ds`` (K*D)) so they load without renaming. On CPU with the
compiled scan built, the four directions run as one direction-aware kernel on the
token grid (:func:`mmssm.ops.cross_selective_scan`); elsewhere (and while
``torch.export`` traces) as cross_scan -> :func:`mmssm.ops.selective_scan` ->
cross_merge. The official fused kernels are not used.
"""
import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssm.ops import cross_merge, cross_scan, cross_selective_scan, selective_scan
from mmssm.ops import selective_scan_cpp
from mmssm.ops.cross_selective_scan import directions_to_scan_order

# forward types whose SS2D math we implement: they differ in the official code
# only by backend / precision (v02..v05, v2, v3) or by the z gate (``_noz``).
_V2_TYPES = ('v02', 'v03', 'v04', 'v05', 'v2', 'v3')
FORWARD_TYPES = ('v0', ) + _V2_TYPES + tuple(t + '_noz' for t in _V2_TYPES)


def is_channels_last(x: Tensor) -> bool:
    """(B, C, H, W) stored as (B, H, W, C): its ``permute(0, 2, 3, 1)`` is contiguous."""
    return x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (VMamba's ``ln2d``).

    The result is channels-last in memory (a (B, H, W, C) tensor seen as
    (B, C, H, W)); on a channels-last input the norm runs without a copy.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape,
                         self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A ``nn.Linear`` (same weight shape/keys) applied over dim 1 of (B, C, H, W).

    On a channels-last map (what VMamba's v2 blocks pass around) this is one
    GEMM over the (B*H*W, C) tokens and the output stays channels-last; a
    1x1 convolution there costs ~2x (oneDNN reorders the map and the weight to
    its blocked layout on every call). A plain NCHW map keeps the 1x1 conv
    (the GEMM would first need a transposed copy).
    """

    def forward(self, x: Tensor) -> Tensor:
        if is_channels_last(x):
            return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


def make_norm(dim: int, channel_first: bool) -> nn.Module:
    return LayerNorm2d(dim) if channel_first else nn.LayerNorm(dim)


def make_linear(d_in: int, d_out: int, bias: bool, channel_first: bool) -> nn.Module:
    return Linear2d(d_in, d_out, bias=bias) if channel_first else nn.Linear(d_in, d_out, bias=bias)


class SS2D(nn.Module):
    """VMamba's SS2D mixer.

    Args:
        d_model: channels C in and out.
        d_state: SSM state size N (v2: 1, v0: 16).
        ssm_ratio: d_inner = int(ssm_ratio * d_model).
        dt_rank: rank R of the delta projection; ``'auto'`` = ceil(d_model / 16).
        d_conv: depthwise conv kernel (< 2: no conv).
        conv_bias: bias of the depthwise conv (v0 always uses one).
        forward_type: ``'v0'`` or a v2 type such as ``'v05_noz'`` (see ``FORWARD_TYPES``).
        channel_first: input/output (B, C, H, W) instead of (B, H, W, C).
        dropout: dropout after out_proj.
        dt_min, dt_max, dt_init_floor: the Mamba dt initialisation range.
    """
    K = 4  # scan directions
    # CPU tensors with the compiled scan built: one direction-aware kernel that reads
    # the grid in the four orders and merges in-kernel (:func:`cross_selective_scan`)
    # instead of cross_scan -> selective_scan -> cross_merge. False: the composition
    # (benchmarks A/B it; ``torch.export`` always takes the composition, which has an
    # ONNX translation).
    use_cross_kernel: bool = True

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 1.0,
                 dt_rank: Union[int, str] = 'auto', d_conv: int = 3,
                 conv_bias: bool = False, forward_type: str = 'v05_noz',
                 channel_first: bool = True, dropout: float = 0.0,
                 dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        if forward_type not in FORWARD_TYPES:
            raise ValueError(f'SS2D: forward_type={forward_type!r} is not supported; '
                             f'valid: {list(FORWARD_TYPES)}')
        if forward_type == 'v0':
            if channel_first:
                raise ValueError("SS2D: forward_type='v0' is channel-last only "
                                 "(norm_layer='ln'), as in the official SS2Dv0")
            d_conv, conv_bias = 3, True  # SS2Dv0 hard-codes both
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.dt_rank = R = math.ceil(d_model / 16) if dt_rank == 'auto' else int(dt_rank)
        self.use_z = not forward_type.endswith('_noz')
        self.channel_first = channel_first
        K, N = self.K, d_state

        self.in_proj = make_linear(d_model, d_inner * (2 if self.use_z else 1), False, channel_first)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias) if d_conv > 1 else None
        # per direction k: x -> (dt_in (R), B (N), C (N)); nn.Linear default init each
        self.x_proj_weight = nn.Parameter(torch.stack(
            [nn.Linear(d_inner, R + 2 * N, bias=False).weight for _ in range(K)]))
        # per direction k: dt_in (R) -> delta (d_inner); bias is the scan's delta_bias
        std = R ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, R).uniform_(-std, std))
        dt = torch.exp(torch.rand(K, d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        # S4D-real A = -(1..N), one copy per (direction, channel)
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(K * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(A))
        self.Ds = nn.Parameter(torch.ones(K * d_inner))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

        self.out_norm = make_norm(d_inner, channel_first)
        self.out_proj = make_linear(d_inner, d_model, False, channel_first)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def x_proj_scan_order(self, x: Tensor) -> Tensor:
        """x_proj of every direction, in that direction's scan order: (b, K, R+2N, L).

        The projection is per token, so it is one GEMM over the tokens in grid
        order, (K*(R+2N), D) @ (D, L), and only its small result (R+2N = 8..50
        rows per direction, against D = 96..768 of ``xs``) is put into the four
        scan orders, instead of a per-direction ``einsum`` on the cross-scanned
        ``xs`` (4 batched GEMMs with only R+2N output rows each; x_proj + dt_proj
        of a VMamba-T forward: 15.0 -> 13.3 ms, 1 thread). Same sums, fp32 rounding.
        """
        b, d, h, w = x.shape
        K, C, L = self.K, self.x_proj_weight.shape[1], h * w
        weight = self.x_proj_weight.view(K * C, d)
        if x.is_contiguous():                                                 # (b, D, h, w)
            xd = torch.matmul(weight, x.view(b, d, L))                        # (b, K*C, L)
        else:                                            # channels-last: tokens (b, L, D)
            xd = torch.matmul(x.permute(0, 2, 3, 1).reshape(b, L, d), weight.t()).transpose(1, 2)
        return directions_to_scan_order(xd.view(b, K, C, h, w))

    def forward_core(self, x: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, D, H, W): cross-scan, S6 per direction, cross-merge.

        The result is fp32; channels-last in memory when the direction-aware
        kernel runs (then ``out_norm`` reads it without a copy).
        """
        if (self.use_cross_kernel and x.device.type == 'cpu' and selective_scan_cpp.available()
                and not torch.compiler.is_exporting()):
            return self.forward_core_grid(x)
        b, d, h, w = x.shape
        K, N, R, L = self.K, self.d_state, self.dt_rank, h * w
        xs = cross_scan(x)                                                    # (b, K, D, L)
        x_dbl = self.x_proj_scan_order(x)                                     # (b, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)                         # (b, K, D, L)
        # B/C as (b, K, N, L): channel k*D + c reads group k, i.e. its own direction
        ys = selective_scan(xs.view(b, K * d, L), dts.view(b, K * d, L),
                            -torch.exp(self.A_logs.float()), Bs, Cs,
                            D=self.Ds.float(), delta_bias=self.dt_projs_bias.float().view(-1),
                            delta_softplus=True, out_fp32=True)             # (b, K*D, L) fp32
        y = cross_merge(ys.view(b, K, d, L), h, w)                           # (b, D, L)
        return y.view(b, d, h, w)

    def forward_core_grid(self, x: Tensor) -> Tensor:
        """:meth:`forward_core` by the direction-aware kernel, all in grid order.

        x_proj is one GEMM over the tokens (b h w, D) -> (b, h, w, K, R+2N); B / C
        are views of it, and the dt projection is one batched GEMM per direction,
        (K, b h w, R) @ (K, R, D) -> delta (K, b, h, w, D). No operand is put into
        the scan orders: the kernel reads each direction's order itself. Same sums
        as the composition (fp32 rounding: the merge adds the directions in
        another order).
        """
        b, d, h, w = x.shape
        K, N, R = self.K, self.d_state, self.dt_rank
        xt = x.permute(0, 2, 3, 1)                          # (b, h, w, D); a view if channels-last
        xd = torch.matmul(xt.reshape(b * h * w, d),
                          self.x_proj_weight.view(-1, d).t()).view(b, h, w, K, R + 2 * N)
        dts, Bs, Cs = torch.split(xd, [R, N, N], dim=-1)    # (b, h, w, K, R|N|N) views
        dts = torch.matmul(dts.permute(3, 0, 1, 2, 4).reshape(K, b * h * w, R),
                           self.dt_projs_weight.transpose(1, 2))          # (K, b h w, D)
        y = cross_selective_scan(xt, dts.view(K, b, h, w, d), -torch.exp(self.A_logs.float()),
                                 Bs, Cs, D=self.Ds.float(),
                                 delta_bias=self.dt_projs_bias.float().view(-1),
                                 delta_softplus=True)                     # (b, h, w, D) fp32
        return y.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) if channel_first else (B, H, W, C); same layout out."""
        cdim = 1 if self.channel_first else -1
        x = self.in_proj(x)
        z = None
        if self.use_z:
            x, z = x.chunk(2, dim=cdim)
            z = self.act(z)
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            # depthwise conv on the (B, H, W, D) memory as it is: oneDNN's
            # channels-last depthwise kernel, no NCHW copy (copies only the z-split view)
            x = self.conv2d(x.contiguous(memory_format=torch.channels_last))
        y = self.forward_core(self.act(x))                                   # (B, D, H, W) fp32
        if not self.channel_first:
            y = y.permute(0, 2, 3, 1)
        y = self.out_norm(y).to(x.dtype)
        if z is not None:
            y = y * z
        return self.dropout(self.out_proj(y))
