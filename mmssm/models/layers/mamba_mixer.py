"""Mamba (S6) building blocks: one selective-scan pass and Vim's bidirectional mixer.

A *pass* is what mamba_ssm's ``mamba_inner_fn_no_out_proj`` computes on a batch
of 1-D sequences ``x, z`` of shape (n, d_inner, l)::

    x      = silu(causal_depthwise_conv1d(x))           (skipped when d_conv = 0)
    dt, B, C = split(x_proj(x))                         (dt: R, then N for each varying one)
    y      = selective_scan(x, dt_proj.weight @ dt, A=-exp(A_log), B, C, D, z,
                            delta_bias=dt_proj.bias, delta_softplus=True)

``B`` and ``C`` are input-dependent by default; V2M's 2-D SSM makes one of them a
constant ``ones(d_inner, N)`` (see :mod:`.v2m_mixer`). Every scan goes through
:func:`mmssm.ops.selective_scan` so the fast backends apply.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssm import ops


def resolve_dt_rank(dt_rank: Union[int, str], d_model: int) -> int:
    """'auto' -> ceil(d_model / 16), as mamba_ssm."""
    if dt_rank == 'auto':
        return math.ceil(d_model / 16)
    if not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
    return dt_rank


def s4d_real_A_log(d_inner: int, d_state: int) -> nn.Parameter:
    """S4D-real init: A = -[1..N] for every channel, stored as log(-A) in fp32."""
    A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    p = nn.Parameter(torch.log(A))
    p._no_weight_decay = True
    return p


def ones_D(d_inner: int) -> nn.Parameter:
    """The skip parameter D = 1 (fp32, no weight decay)."""
    p = nn.Parameter(torch.ones(d_inner))
    p._no_weight_decay = True
    return p


def make_dt_proj(dt_rank: int, d_inner: int, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 no_reinit: bool = True) -> nn.Linear:
    """Linear(R, d_inner) with mamba's dt init.

    weight ~ U(+-dt_scale / sqrt(R)); bias = softplus^-1(dt) with dt log-uniform
    in [dt_min, dt_max] (clamped below at dt_init_floor). ``no_reinit`` tags the
    bias ``_no_reinit`` so a backbone-wide "zero every Linear bias" init skips it
    (as Vim does for ``dt_proj`` only).
    """
    if not 0 < dt_min <= dt_max:
        raise ValueError(f'need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}')
    proj = nn.Linear(dt_rank, d_inner, bias=True)
    std = dt_rank ** -0.5 * dt_scale
    nn.init.uniform_(proj.weight, -std, std)
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)
    with torch.no_grad():
        proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    if no_reinit:
        proj.bias._no_reinit = True
    return proj


def make_conv1d(d_inner: int, d_conv: int, bias: bool = True) -> Optional[nn.Conv1d]:
    """Depthwise causal conv (left padding d_conv-1, output cut to l); None if d_conv == 0."""
    if d_conv < 0:
        raise ValueError(f'd_conv must be >= 0 (0: no conv), got {d_conv}')
    if d_conv == 0:
        return None
    return nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=bias)


def _state_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def causal_conv1d(x: Tensor, conv1d: nn.Conv1d, reverse: bool = False) -> Tensor:
    """Depthwise causal conv of (n, d, l) sequences (anti-causal when ``reverse``).

    ``reverse`` is the causal conv of the flipped sequence, unflipped:
    y[t] = sum_j w[k-1-j] x[t+j]. A token-major ``x`` (``x.transpose(1, 2)``
    contiguous, e.g. straight from a ``Linear``) runs as a channels-last
    (n, d, 1, l) conv2d: oneDNN's NHWC depthwise kernel reads and writes that
    memory as it is, where a (n, d, l) conv1d reorders input and output to a
    blocked layout on every call (Vim-T at 512^2: 0.3-3 ms per call vs ~0.1).
    The result is token-major then too.
    """
    n, d, l = x.shape
    k = conv1d.kernel_size[0]
    weight = conv1d.weight.flip(-1) if reverse else conv1d.weight              # (d, 1, k)
    if x.transpose(1, 2).is_contiguous() and x.dtype == weight.dtype and not x.is_cuda:
        x4 = x.transpose(1, 2).view(n, 1, l, d).permute(0, 3, 1, 2)          # (n, d, 1, l) NHWC
        y = F.conv2d(x4, weight.unsqueeze(2), conv1d.bias, padding=(0, k - 1),
                     groups=conv1d.groups)                                    # (n, d, 1, l+k-1)
        y = y[..., k - 1:] if reverse else y[..., :l]
        return y.squeeze(2)
    y = F.conv1d(x, weight, conv1d.bias, padding=k - 1, groups=conv1d.groups)
    return y[..., k - 1:] if reverse else y[..., :l]


def in_proj_halves(in_proj: nn.Linear, x: Tensor) -> Tuple[Tensor, Tensor]:
    """The x and z halves of a Mamba ``in_proj`` as two GEMMs: (..., C) -> two (..., d_inner).

    Each half comes out contiguous, i.e. token-major / channels-last memory that a
    following depthwise conv reads as it is; the halves of one GEMM's output would be
    strided views, copied by the conv first.
    """
    w_x, w_z = in_proj.weight.chunk(2, dim=0)
    b_x, b_z = (None, None) if in_proj.bias is None else in_proj.bias.chunk(2)
    return F.linear(x, w_x, b_x), F.linear(x, w_z, b_z)


def pass_inputs(x: Tensor, conv1d: Optional[nn.Conv1d], x_proj: nn.Linear,
                dt_proj: nn.Linear, A_log: Tensor, varying: str = 'BC',
                reverse: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The scan operands of one pass: (x after the conv, dt, B, C), see :func:`ssm_pass`.

    Without a conv they depend on x only, not on the direction, so two passes over the
    same sequences in opposite directions can share them (``ssm_pass(..., inputs=)``).
    ``x`` may be any strided (n, d, l) view; the results are views where possible (a
    token-major ``x``, i.e. ``x.transpose(1, 2)`` contiguous, needs no copy at all).
    """
    if conv1d is not None:
        x = F.silu(causal_conv1d(x, conv1d, reverse))
    R = dt_proj.in_features
    N = A_log.shape[1]
    x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)  # (n, l, R + k*N)
    dt = F.linear(x_dbl[..., :R], dt_proj.weight).transpose(1, 2)  # (n, d, l)
    ones = A_log.new_ones(A_log.shape, dtype=_state_dtype(A_log))  # constant (d, N)
    if varying == 'BC':
        B = x_dbl[..., R:R + N].transpose(1, 2)  # (n, N, l)
        C = x_dbl[..., R + N:].transpose(1, 2)
    elif varying == 'B':
        B, C = x_dbl[..., R:].transpose(1, 2), ones
    elif varying == 'C':
        B, C = ones, x_dbl[..., R:].transpose(1, 2)
    else:
        raise ValueError(f"varying must be 'BC', 'B' or 'C', got {varying!r}")
    return x, dt, B, C


def ssm_pass(x: Tensor, z: Optional[Tensor], conv1d: Optional[nn.Conv1d],
             x_proj: nn.Linear, dt_proj: nn.Linear, A_log: Tensor, D: Tensor,
             varying: str = 'BC', reverse: bool = False,
             inputs: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
             out: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
    """One Mamba pass over sequences (no out_proj).

    Args:
        x: (n, d, l) scan input (before the causal conv); any strides.
        z: (n, d, l) gate or None (no silu gate).
        conv1d: depthwise causal conv, or None (then no conv and no silu).
        x_proj: Linear(d, R + k*N) with k = len(varying).
        dt_proj: Linear(R, d); its bias is the delta bias.
        A_log, D: (d, N) and (d,).
        varying: which of B and C come from ``x_proj`` ('BC', 'B' or 'C'); the
            other is the constant ones(d, N).
        reverse: the pass runs from the last token to the first; equals flipping x and z
            along l, a forward pass and flipping the output back, without the three
            flipped copies (the conv becomes anti-causal, the scan runs ``reverse``).
        inputs: :func:`pass_inputs` of this pass, when already computed (shared by the
            two directions of a pass without conv).
        out, accumulate: the scan's ``out`` / ``accumulate`` (see
            :func:`mmssm.ops.selective_scan`): write, or add, the pass into a given tensor.

    Returns:
        (n, d, l) in x's dtype (``out`` when given).
    """
    if inputs is None:
        inputs = pass_inputs(x, conv1d, x_proj, dt_proj, A_log, varying, reverse)
    x, dt, B, C = inputs
    f = _state_dtype(A_log)  # fp32 (fp64 models stay fp64)
    A = -torch.exp(A_log.to(f))
    return ops.selective_scan(x, dt, A, B, C, D.to(f), z,
                              delta_bias=dt_proj.bias.to(f), delta_softplus=True,
                              reverse=reverse, out=out, accumulate=accumulate)


class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer ("bimamba v2"), (B, L, C) -> (B, L, C).

    ``in_proj`` (x and gate z) and ``out_proj`` are shared; the forward and the
    backward (sequence-reversed) directions each own conv1d / x_proj / dt_proj /
    A / D (the ``_b`` keys). The two outputs are averaged before ``out_proj``
    (Vim's ``if_divide_out``). State-dict keys equal the official Vim mixer's.

    Args:
        d_model: channels C.
        d_state: SSM state size N.
        expand: d_inner = expand * d_model.
        d_conv: causal conv kernel (0: no conv).
        dt_rank: rank R of delta ('auto' = ceil(C / 16)).
        dt_min, dt_max, dt_init_floor, dt_scale: dt init (see :func:`make_dt_proj`).
        conv_bias: bias of the conv1d layers.
        bias: bias of in_proj / out_proj (Vim: False).
        divide_out: average (True, Vim) or sum the two directions.
    """
    # apply the silu(z) gate once to the direction sum (see :meth:`_forward_gate_sum`);
    # False: gate each scan as the official code does (a class switch for tests / A/B)
    gate_sum: bool = True

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: Union[int, str] = 'auto', dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 conv_bias: bool = True, bias: bool = False, divide_out: bool = True) -> None:
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = d_inner = int(expand * d_model)
        self.dt_rank = R = resolve_dt_rank(dt_rank, d_model)
        self.divide_out = divide_out
        dt_kw = dict(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, dt_scale=dt_scale)
        # registration order follows the official module (state_dict order)
        self.A_log = s4d_real_A_log(d_inner, d_state)
        self.D = ones_D(d_inner)
        self.A_b_log = s4d_real_A_log(d_inner, d_state)
        self.D_b = ones_D(d_inner)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = make_conv1d(d_inner, d_conv, conv_bias)
        self.x_proj = nn.Linear(d_inner, R + 2 * d_state, bias=False)
        self.dt_proj = make_dt_proj(R, d_inner, **dt_kw)
        self.conv1d_b = make_conv1d(d_inner, d_conv, conv_bias)
        self.x_proj_b = nn.Linear(d_inner, R + 2 * d_state, bias=False)
        # official quirk: only dt_proj.bias is tagged _no_reinit, so Vim's
        # backbone init zeroes dt_proj_b.bias (see mmssm.Vim._init_weights)
        self.dt_proj_b = make_dt_proj(R, d_inner, no_reinit=False, **dt_kw)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, C) -> (B, L, C)."""
        # token-major in_proj, x and z halves as two GEMMs: xs is a contiguous
        # (B, L, d_inner) that the convs (channels-last, see causal_conv1d) and
        # x_proj read as it is; the scans read xs and z through (B, d_inner, L)
        # views. (One GEMM into the channel-major layout was ~1.4x slower.)
        traced = torch.compiler.is_exporting() or torch.jit.is_tracing()
        if self.gate_sum and not traced:
            return self._forward_gate_sum(x)
        xs, z = in_proj_halves(self.in_proj, x)
        xs, z = xs.transpose(1, 2), z.transpose(1, 2)                         # (B, d, L) views
        y_f = ssm_pass(xs, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        # the backward direction on the unflipped tokens (reverse scan, anti-causal conv)
        y_b = ssm_pass(xs, z, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                       self.D_b, reverse=True)
        return self._out_proj((y_f + y_b).transpose(1, 2))

    def _forward_gate_sum(self, x: Tensor) -> Tensor:
        """:meth:`forward` with the silu(z) gate applied once, to the direction sum.

        silu(z) y_f + silu(z) y_b = silu(z) (y_f + y_b): the scans run without z, and
        the z half of in_proj is computed only after them, so no (B, L, d_inner) z is
        alive while they run, nor xs while the backward scan runs (two of the ~7 such
        maps of a layer's peak: Vim-T at 1024^2 46 -> 35 MB) and the gate costs one
        silu per element instead of two.
        The same maths up to fp32 rounding; traced / exported graphs (FLOP counting,
        ONNX) keep the official per-scan gate of :meth:`forward`. Inference with convs
        also runs the scans in place (:meth:`_direction_sum_inplace`: one map fewer).
        """
        w_x, w_z = self.in_proj.weight.chunk(2, dim=0)
        b_x, b_z = (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2)
        inference = not torch.is_grad_enabled()
        if inference and self.conv1d is not None and self.conv1d_b is not None:
            y = self._direction_sum_inplace(x, w_x, b_x)
        else:
            y = self._direction_sum(x, w_x, b_x)
        y = y.transpose(1, 2)                                                 # (B, L, d)
        g = F.silu(F.linear(x, w_z, b_z), inplace=inference)                 # (B, L, d)
        return self._out_proj(g.mul_(y) if inference else g * y)

    def _direction_sum(self, x: Tensor, w_x: Tensor, b_x: Optional[Tensor]) -> Tensor:
        """y_f + y_b (B, d_inner, L) of the ungated scans, autograd-safe."""
        xs = F.linear(x, w_x, b_x).transpose(1, 2)                            # (B, d, L) view
        y = ssm_pass(xs, None, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        # xs feeds only the convs: gone before the backward scan runs (with a conv)
        inputs = pass_inputs(xs, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                             reverse=True)
        del xs
        y_b = ssm_pass(None, None, self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                       self.A_b_log, self.D_b, reverse=True, inputs=inputs)
        del inputs
        return y.add_(y_b) if not torch.is_grad_enabled() else y + y_b

    def _direction_sum_inplace(self, x: Tensor, w_x: Tensor, b_x: Optional[Tensor]) -> Tensor:
        """:meth:`_direction_sum` for inference with convs, in place: at most three
        (B, L, d_inner) maps are alive (Vim-T at 1024^2: 6.3 MB each), not four.

        Each direction's conv output is its own buffer: silu runs in place on it, the
        forward scan overwrites its own input with y_f (each step's input is read
        before its output is written), the backward scan adds y_b into that buffer
        (``accumulate``, at the same token positions), so neither y_f nor y_b gets a map
        of its own, and xs is dropped before the backward direction's dt is computed.
        The same values as :meth:`_direction_sum` (fp32 addition commutes).
        """
        xs = F.linear(x, w_x, b_x).transpose(1, 2)                            # (B, d, L) view
        u = F.silu(causal_conv1d(xs, self.conv1d), inplace=True)             # (B, d, L) view
        inputs = pass_inputs(u, None, self.x_proj, self.dt_proj, self.A_log)  # conv done
        y = ssm_pass(None, None, None, self.x_proj, self.dt_proj, self.A_log, self.D,
                     inputs=inputs, out=u)                                    # y_f, in u
        del inputs, u
        u = F.silu(causal_conv1d(xs, self.conv1d_b, reverse=True), inplace=True)
        del xs
        inputs = pass_inputs(u, None, self.x_proj_b, self.dt_proj_b, self.A_b_log)
        del u
        return ssm_pass(None, None, None, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                        self.D_b, reverse=True, inputs=inputs, out=y, accumulate=True)

    def _out_proj(self, y: Tensor) -> Tensor:
        """out_proj of the direction sum y (B, L, d_inner); the mean when ``divide_out``."""
        w = self.out_proj.weight  # (C, d_inner)
        if self.divide_out:  # (y / 2) W^T == y (W / 2)^T exactly (a power of two), on a
            w = w * 0.5      # (C, d_inner) weight instead of the (B, d_inner, L) activations
        return F.linear(y, w, self.out_proj.bias)
