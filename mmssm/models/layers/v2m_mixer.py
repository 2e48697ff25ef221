"""V2M's 2-D selective SSM (Wang et al., arXiv 2410.10382, sec. 3.2-3.3).

The paper's 2-D state space model (a Roesser-type recurrence where a token's
state mixes the state to its left and the state above it) is simplified into
two 1-D selective scans over the token grid:

1. **row pass**: along every row, Mamba with input-dependent B and constant
   C = ones(d_inner, N): the state is summed over N, i.e. each row emits one
   d_inner-vector per token (own conv1d / x_proj (R+N) / dt_proj / A / D);
2. **column pass**: along every column of that latent, Mamba with constant
   B = ones and input-dependent C (own conv1d_2 / x_proj_2 / dt_proj_2 / A_2 / D_2).

Output (i, j) therefore depends on the tokens (i' <= i, j' <= j): the quadrant
behind the scan corner. The grid is seen from up to four corners (flip-based
re-orientation, so any h x w works); all corners share every weight and are
batched along the batch axis; each result is re-oriented back exactly, the
corners are averaged, and ``out_proj`` is applied.

Differences from the released V2M code (wangck20/V2M ``bimamba_type='2d'``),
which scans from only three corners and writes its outputs to transposed /
mirrored grid positions: here every corner's output lands on its own token,
``in_proj`` runs once instead of on four re-arranged copies, and the corners
are averaged (the release sums its four scans and divides by 2, i.e. 2x the
mean -- a scale ``out_proj`` absorbs). As in the release, the silu(z) gate is
applied after both passes (``gate='both'``); ``gate='last'`` gates once.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssm import ops
from mmssm.ops import CORNERS
from mmssm.ops.selective_scan import resolve_backend
from .mamba_mixer import (_state_dtype, in_proj_halves, make_conv1d, make_dt_proj, ones_D,
                          pass_inputs, resolve_dt_rank, s4d_real_A_log, ssm_pass)

CornerSpec = Union[int, Sequence[str]]
# corner -> (row pass reversed, column pass reversed): the scan directions that start
# the 2-D recurrence at that corner (ul: left to right, top down; lr: both reversed)
_CORNER_DIRS = {'ul': (False, False), 'ur': (True, False), 'll': (False, True),
                'lr': (True, True)}


def parse_corners(corners: CornerSpec) -> Tuple[str, ...]:
    """1-4 -> the first k of ('ul', 'lr', 'ur', 'll') (paper Table 4), or names."""
    if isinstance(corners, bool):
        raise TypeError(f'corners must be an int 1-4 or a tuple of {CORNERS}, got {corners!r}')
    if isinstance(corners, int):
        if not 1 <= corners <= 4:
            raise ValueError(f'corners={corners}: must be 1-4 (first k of {CORNERS}) '
                             f'or a tuple of names from {CORNERS}')
        return CORNERS[:corners]
    if isinstance(corners, str):
        corners = (corners, )
    corners = tuple(corners)
    bad = [c for c in corners if c not in CORNERS]
    if bad or not corners or len(set(corners)) != len(corners):
        raise ValueError(f'corners={corners!r}: give 1-4 distinct names from {CORNERS} '
                         'or an int 1-4')
    return corners


class SSM2D(nn.Module):
    """The parameters and the two passes of V2M's 2-D SSM (no projections).

    ``scan2d(x, z)`` maps grids (n, d_inner, h, w) -> (n, d_inner, h, w) with a
    row pass then a column pass, both starting at grid position (0, 0).
    The local-window V2M mixer calls it once per scan direction; :class:`V2MMixer2D`
    shares these parameters but runs its corners as scan directions (see its
    ``forward``). Key names follow the official V2M mixer.
    """

    def __init__(self, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 1,
                 conv_bias: bool = True, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, use_z: bool = True,
                 gate: str = 'both') -> None:
        super().__init__()
        if gate not in ('both', 'last'):
            raise ValueError(f"gate must be 'both' (official: silu(z) after each pass) "
                             f"or 'last', got {gate!r}")
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.use_z, self.gate = use_z, gate
        dt_kw = dict(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, dt_scale=dt_scale)
        # pass 1 (rows): input-dependent B, C = ones
        self.A_log = s4d_real_A_log(d_inner, d_state)
        self.D = ones_D(d_inner)
        # pass 2 (columns): B = ones, input-dependent C
        self.A_2_log = s4d_real_A_log(d_inner, d_state)
        self.D_2 = ones_D(d_inner)
        self.conv1d = make_conv1d(d_inner, d_conv, conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + d_state, bias=False)
        self.dt_proj = make_dt_proj(dt_rank, d_inner, **dt_kw)
        self.conv1d_2 = make_conv1d(d_inner, d_conv, conv_bias)
        self.x_proj_2 = nn.Linear(d_inner, dt_rank + d_state, bias=False)
        # official: dt_proj_2.bias is not tagged _no_reinit (a Vim-style
        # backbone init that zeroes Linear biases resets it)
        self.dt_proj_2 = make_dt_proj(dt_rank, d_inner, no_reinit=False, **dt_kw)

    def scan2d(self, x: Tensor, z: Optional[Tensor]) -> Tensor:
        """x, z: (n, d, h, w) -> (n, d, h, w); z None = no gate."""
        n, d, h, w = x.shape
        if not self.use_z:
            z = None
        # rows: (n, d, h, w) -> (n*h, d, w)
        x_r = x.permute(0, 2, 1, 3).reshape(n * h, d, w)
        z_r = None
        if z is not None and self.gate == 'both':
            z_r = z.permute(0, 2, 1, 3).reshape(n * h, d, w)
        y = ssm_pass(x_r, z_r, self.conv1d, self.x_proj, self.dt_proj,
                     self.A_log, self.D, varying='B')
        # columns of the latent: (n*h, d, w) -> (n, h, d, w) -> (n*w, d, h)
        y = y.view(n, h, d, w).permute(0, 3, 2, 1).reshape(n * w, d, h)
        z_c = None if z is None else z.permute(0, 3, 1, 2).reshape(n * w, d, h)
        y = ssm_pass(y, z_c, self.conv1d_2, self.x_proj_2, self.dt_proj_2,
                     self.A_2_log, self.D_2, varying='C')
        return y.view(n, w, d, h).permute(0, 2, 3, 1)  # (n, d, h, w)


class V2MMixer2D(SSM2D):
    """V2M's 2-D SSM token mixer over a grid, (B, H, W, C) -> (B, H, W, C).

    ``in_proj`` (x and gate z, applied once) -> optional depthwise conv2d + silu
    -> row passes (forward and/or reverse, one per row direction the corners need)
    -> column passes (top-down or bottom-up per corner) -> mean over corners ->
    ``out_proj``. Equal to re-orienting the grid per corner and running
    ``scan2d`` (the paper's aligned version), without the re-oriented copies.

    Args:
        d_model: channels C.
        d_state: SSM state size N.
        expand: d_inner = expand * d_model.
        d_conv: kernel of each pass's causal conv1d (0: no conv1d, no silu).
        dt_rank: 'auto' (ceil(C / 16)) or an int.
        corners: int 1-4 (first k of 'ul', 'lr', 'ur', 'll', paper Table 4
            order) or a tuple of those names.
        use_z: silu(z) gate (see ``gate``).
        gate: 'both' (official: gate after each pass) or 'last'.
        conv_bias: bias of the conv layers.
        bias: bias of in_proj / out_proj.
        d_conv2d: 0, or the kernel of a depthwise 2-D conv (+ silu) applied once
            on the grid before the scans (VMamba-style stems; key ``conv2d``).
        dt_min, dt_max, dt_init_floor, dt_scale: dt init.
    """
    # mixers without a per-pass conv1d run :meth:`_forward_noconv`; False forces the
    # general path (the two are equal; a class switch for tests and A/B timing)
    fast_path: bool = True
    # the conv-free path gates the column passes' corner sum once (False: each column
    # scan gates its corner, as traced graphs do; equal to fp32 rounding; for tests / A/B)
    gate_corner_sum: bool = True
    # the conv-free path runs both directions of a pass as one two-direction scan
    # (:func:`mmssm.ops.bidir_selective_scan`: decay and input terms computed once) in
    # eager CPU code (False: one scan per direction, as traced graphs; for tests / A/B)
    two_direction_scan: bool = True
    # the conv-free path's eager code folds the mean over 2 or 4 corners into the column
    # passes' constant B and their D (a power-of-two scale: exact, outputs bit-identical)
    # instead of a division of the corner sum (False: divide, as traced graphs; for A/B)
    fold_corner_mean: bool = True
    # in eager inference the conv-free path keeps its scan parameters (-exp(A_log), the
    # constant B / C, D, delta bias, per pass) between calls, recomputed when a parameter
    # changes (False: recompute every call; for A/B)
    cache_scan_params: bool = True
    # eager inference of the conv-free path: the second row latent's column passes add
    # into the first latent's column sum and gate it inside the compiled two-direction
    # kernel (:func:`mmssm.ops.bidir_selective_scan_sum_into`) instead of an add, a silu
    # and a multiply afterwards (fp32 rounding apart; False: the separate ops, for A/B)
    fuse_column_sum: bool = True
    # autograd (training) code of the conv-free path with all 4 corners: both latents'
    # column passes as one two-direction scan call over (2B, W*d, H) views of the latents,
    # summed over the latents by one reduction (False: one call per latent and an add,
    # whose per-latent slices cost the backward two zero-filled (2, B, H, W, d) gradient
    # buffers and adds; for A/B); x_proj outputs split with torch.split (one gradient
    # concatenation instead of a zero fill per slice)
    joint_columns: bool = True
    # autograd code on small maps: in_proj as one GEMM, x half copied (see _in_proj_halves)
    one_gemm_in_proj: bool = True

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: Union[int, str] = 'auto', corners: CornerSpec = 4,
                 use_z: bool = True, gate: str = 'both', conv_bias: bool = True,
                 bias: bool = False, d_conv2d: int = 0, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_scale: float = 1.0) -> None:
        d_inner = int(expand * d_model)
        super().__init__(d_inner, d_state, d_conv, resolve_dt_rank(dt_rank, d_model),
                         conv_bias, dt_min, dt_max, dt_init_floor, dt_scale, use_z, gate)
        self.d_model = d_model
        self.corners = parse_corners(corners)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        if d_conv2d < 0 or (d_conv2d and d_conv2d % 2 == 0):
            raise ValueError(f'd_conv2d must be 0 (none) or an odd kernel size, got {d_conv2d}')
        self.conv2d = (nn.Conv2d(d_inner, d_inner, d_conv2d, padding=(d_conv2d - 1) // 2,
                                 groups=d_inner, bias=conv_bias) if d_conv2d else None)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C).

        Corners by scan directions instead of re-oriented copies: a corner's row pass
        runs left to right (ul, ll) or right to left (ur, lr) along every row, the rows
        being independent, so the four corners need only two row passes (forward and
        ``reverse`` scans of the same rows); the column pass then runs top-down (ul, ur)
        or bottom-up (ll, lr) over the latent of its row direction. Every output already
        sits on its own token: no rotation, no un-rotation, and without a conv1d the
        projections of a pass are shared by its two directions. Same maths as rotating
        the grid per corner (``SSM2D.scan2d``), up to fp32 rounding. Mixers without a
        per-pass conv1d (V2M-S*/B*) take :meth:`_forward_noconv`, the same computation
        with fewer copies.
        """
        if x.dim() != 4:
            raise ValueError(f'V2MMixer2D expects (B, H, W, C), got {tuple(x.shape)}')
        b, h, w, _ = x.shape
        d = self.d_inner
        fast = self.fast_path and self.conv1d is None and self.conv1d_2 is None
        if self.conv2d is not None or fast:
            # xs: a contiguous (B, H, W, d), the channels-last map the NHWC
            # depthwise kernel takes as it is
            xs, z = self._in_proj_halves(x)
            if self.conv2d is not None:  # silu in place on the fresh conv output in inference
                xs = F.silu(self.conv2d(xs.permute(0, 3, 1, 2)),
                            inplace=not torch.is_grad_enabled()).permute(0, 2, 3, 1)
        else:
            xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, d_inner) views of one tensor
        if not self.use_z:
            z = None

        def rows(t: Tensor) -> Tensor:  # tokens (B, H, W, d) -> rows (B*H, d, W), a view
            return t.reshape(b * h, w, d).transpose(1, 2)

        def cols(t: Tensor) -> Tensor:  # rows (B*H, d, W) -> columns (B*W, d, H)
            return t.view(b, h, d, w).permute(0, 3, 2, 1).reshape(b * w, d, h)

        if fast:
            return self._forward_noconv(xs, z)
        x_r = rows(xs)
        z_r = rows(z) if z is not None and self.gate == 'both' else None
        z_c = None if z is None else z.permute(0, 2, 3, 1).reshape(b * w, d, h)
        # sum / mean over corners in place when nothing needs the per-corner outputs
        inplace = not torch.is_grad_enabled() and not torch.jit.is_tracing()
        shared = None
        if self.conv1d is None:  # no conv: dt, B of the rows are direction-independent
            shared = pass_inputs(x_r, None, self.x_proj, self.dt_proj, self.A_log, 'B')
        latent = {}  # row direction (reverse?) -> (B*H, d, W)
        for rev in sorted({_CORNER_DIRS[c][0] for c in self.corners}):
            latent[rev] = ssm_pass(x_r, z_r, self.conv1d, self.x_proj, self.dt_proj,
                                   self.A_log, self.D, varying='B', reverse=rev, inputs=shared)
        y = None
        for rev in sorted(latent):
            x_c = cols(latent[rev])
            shared = None
            if self.conv1d_2 is None:
                shared = pass_inputs(x_c, None, self.x_proj_2, self.dt_proj_2, self.A_2_log,
                                     'C')
            for c in self.corners:
                if _CORNER_DIRS[c][0] != rev:
                    continue
                y_c = ssm_pass(x_c, z_c, self.conv1d_2, self.x_proj_2, self.dt_proj_2,
                               self.A_2_log, self.D_2, varying='C',
                               reverse=_CORNER_DIRS[c][1], inputs=shared)  # (B*W, d, H)
                if y is None:
                    y = y_c
                elif inplace:  # y is a scan output of this call: no new (B*W, d, H) buffer
                    y.add_(y_c)
                else:
                    y = y + y_c
        if len(self.corners) > 1:
            y = y.div_(len(self.corners)) if inplace else y / len(self.corners)
        return self.out_proj(y.view(b, w, d, h).permute(0, 3, 1, 2))  # tokens (B, H, W, d)

    def _in_proj_halves(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """in_proj's x half (contiguous tokens, the map the NHWC conv reads) and z half.

        Two GEMMs (:func:`in_proj_halves`), except in autograd code on maps with fewer
        tokens T than channels (``one_gemm_in_proj``; V2M-S* stages 3-4 at 224^2): there
        the backward of the two GEMMs concatenates the halves' weight gradients, a
        (2d, C) copy, and adds two (T, C) input gradients, against one GEMM's (T, d) copy
        of the x half and (T, 2d) concatenation of the halves' gradients: one GEMM, whose
        x half is copied, moves less memory (stage 4: ~0.4 ms less per block, fwd + bwd,
        1 thread). Same products (fp32 rounding apart in the input gradient). Traced /
        exported graphs keep the two GEMMs.
        """
        T, C, d = x.shape[:-1].numel(), self.d_model, self.d_inner
        if (self.one_gemm_in_proj and torch.is_grad_enabled() and 3 * T * d < 2 * d * C + T * C
                and not torch.jit.is_tracing() and not torch.compiler.is_exporting()):
            xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, d) views
            return xs.contiguous(), z
        return in_proj_halves(self.in_proj, x)

    def _forward_noconv(self, xs: Tensor, z: Optional[Tensor]) -> Tensor:
        """The corners of a mixer without per-pass conv1d (V2M-S*/B*), copy-light layouts.

        xs, z: contiguous tokens (B, H, W, d) -> (B, H, W, C); in inference z (the
        caller's fresh in_proj output) is overwritten. Same maths as the general path of
        :meth:`forward` (outputs equal to fp32 rounding); the operand layouts differ:

        - the row passes read xs, their dt / B and z as (B*H, d, W) views of tokens
          (lane-contiguous, no copy), with one x_proj / dt_proj for both directions;
        - each row-pass latent (a scan output, (B*H, d, W)) is made token-major
          (B, H, W, d), no copy when the scan wrote it in u's token-major layout (the
          compiled kernel does): x_proj_2 reads it as it is and the column passes
          read it, their dt and z through views (the general path copies the latent to
          (B*W, d, H) and x_proj_2 copies it again to tokens);
        - the column passes see tokens as (B*W, d, H) views when B = 1, else as
          (B, W*d, H) with the W columns as W channel groups (A, D and the delta bias
          tiled W times, tiny (W*d, N) / (W*d,) tensors): no reshape copy for any B
          (B = 1 keeps one column per batch row: the kernel ran it ~15% faster than
          one (1, W*d, H) row at 14 x 14 x 384; an ONNX export takes it for any B);
        - exp(A_log) and the constant ones(B or C) are made once per call, and the
          corner sum goes to contiguous tokens before ``out_proj`` (a permuted view
          there made matmul fall back to a batched GEMM plus a copy; the compiled scan
          gives token-major views a token-major output, so this is no copy there);
        - the column passes' silu(z) gate multiplies the corner sum once instead of
          each corner's output (sum_c y_c * g = g * sum_c y_c: fp32 rounding apart, the
          same maths): the column scans run without z (the gate costs each scan a
          load, a sigmoid and a multiply per element, ~10-30% of its time) and one
          silu + multiply follow. A traced or exported graph (FLOP counting, ONNX)
          keeps the per-pass gate, the official formulation whose counted FLOPs
          include it;
        - in eager CPU code both directions of a pass run as one two-direction scan
          (:func:`mmssm.ops.bidir_selective_scan`, ``two_direction_scan``): the row pass
          gives both latents in one (2, B*H, d, W) tensor (x_proj_2 / dt_proj_2 then run
          once for both), each latent's column pass the sum of its two directions. The
          decay and input terms of a token are computed once for both directions; each
          direction's values are the plain scan's (bit-identical), the column sum is
          fp32 rounding apart. Traced / exported graphs keep one scan per direction;
        - eager code only (``fold_corner_mean``, ``cache_scan_params``,
          ``fuse_column_sum``): the mean over 2 / 4 corners is a power-of-two scale of the
          column passes' constant B and D (bit-identical), inference keeps the scan
          parameters between calls, and the second latent's column passes add into the
          first's sum and gate it inside the kernel (fp32 rounding);
        - eager autograd code with 4 corners (``joint_columns``): both latents' column
          passes are one two-direction call (:meth:`_joint_columns`), bit-identical
          outputs and input gradients.
        """
        b, h, w, d = xs.shape
        R = self.dt_rank
        f = _state_dtype(self.A_log)
        gated_rows = z is not None and self.gate == 'both'
        # column batch rows x column groups per row: (B*W, 1) when B = 1 (views) or while
        # exporting (the ONNX scan needs a static channel count: reshape copies there),
        # else (B, W)
        exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
        nb, nw = (b * w, 1) if exporting or b == 1 else (b, w)
        # gate the corner sum, not each corner (traced graphs keep the per-pass gate)
        gate_sum = z is not None and self.gate_corner_sum and not exporting

        def rows(t: Tensor) -> Tensor:  # tokens (B, H, W, c) -> (B*H, c, W), a view
            return t.reshape(b * h, w, t.shape[-1]).transpose(1, 2)

        def cols(t: Tensor) -> Tensor:  # tokens (B, H, W, c) -> (nb, nw*c, H), a view
            return t.permute(0, 2, 3, 1).reshape(nb, nw * t.shape[-1], h)

        inplace = not torch.is_grad_enabled() and not torch.jit.is_tracing()
        # the mean over corners as a scale of the column passes (see fold_corner_mean)
        k = len(self.corners)
        scale = 1.0 / k if self.fold_corner_mean and not exporting and k in (2, 4) else 1.0
        # both directions of a pass in one two-direction scan call (eager, compiled CPU
        # scan); traced / exported graphs keep one plain scan per direction (FLOP counts,
        # ONNX)
        bidir = self.two_direction_scan and not exporting and resolve_backend(xs) == 'cpp'
        # autograd code, 4 corners: both latents' 4 column passes in one call, each of its
        # 2B batch rows W column groups of d channels (see joint_columns)
        joint = (bidir and self.joint_columns and not inplace and k == 4 and
                 (z is None or gate_sum))
        A_r, C_r, D_r, bias_r, A_c, B_c, D_c, bias_c = self._scan_params(
            f, w if joint else nw, scale,
            cache=(inplace and self.cache_scan_params and not exporting
                   and not torch.compiler.is_compiling()))
        # row passes (B varying, C = ones): operands shared by both directions
        x_dbl = F.linear(xs, self.x_proj.weight)                      # (B, H, W, R+N)
        N = A_c.shape[1]
        # views of x_dbl; split's backward concatenates their gradients (slicing would
        # zero-fill an x_dbl-sized gradient per slice and add)
        dt_in, B_in = (x_dbl.split([R, N], dim=-1) if joint
                       else (x_dbl[..., :R], x_dbl[..., R:]))
        dt = F.linear(dt_in, self.dt_proj.weight)                     # (B, H, W, d)
        # B, C: (b, N, L) views of (b, L, N) contiguous memory, the layout the compiled scan
        # reads (it would copy a strided view once per scan; here once per pass group)
        B_r = B_in.reshape(b * h, w, -1).contiguous().transpose(1, 2)  # (B*H, N, W)
        row_args = dict(A=A_r, B=B_r, C=C_r, D=D_r, z=rows(z) if gated_rows else None,
                        delta_bias=bias_r, delta_softplus=True)
        # column passes (B constant, C varying), nw groups of d channels per batch row
        col_args = dict(A=A_c, B=B_c, D=D_c, z=None if z is None or gate_sum else cols(z),
                        delta_bias=bias_c, delta_softplus=True)
        revs = sorted({_CORNER_DIRS[c][0] for c in self.corners})
        x_r, dt_r = rows(xs), rows(dt)
        if bidir and len(revs) == 2:  # (2, B*H, d, W): the two latents, token-major
            lat = ops.bidir_selective_scan(x_r, dt_r, **row_args)
        else:
            lat = [ops.selective_scan(x_r, dt_r, reverse=rev, **row_args)
                   for rev in revs]                                    # (B*H, d, W) each
        if joint:  # (2, B*H, d, W) latents -> (B, H, W, d) column sum of the 4 corners
            return self._gate_mean_out(self._joint_columns(lat, b, h, col_args), z, gate_sum,
                                       k, scale, inplace)
        # latents as tokens (k, B, H, W, d), no-op copies (the scan wrote them token-major);
        # one x_proj_2 / dt_proj_2 GEMM for all of them when they come from one call
        toks = ([lat.view(2, b, h, d, w).transpose(3, 4).contiguous()] if torch.is_tensor(lat)
                else [t.view(1, b, h, d, w).transpose(3, 4).contiguous() for t in lat])
        passes = []  # (x_c, dt_c, C) per latent, in the order of revs
        for tok in toks:
            x_dbl2 = F.linear(tok, self.x_proj_2.weight)               # (k, B, H, W, R+N)
            dt2 = F.linear(x_dbl2[..., :R], self.dt_proj_2.weight)     # (k, B, H, W, d)
            Cs = x_dbl2[..., R:].transpose(2, 3).contiguous().transpose(3, 4)  # (k, B, W, N, H)
            for i in range(tok.shape[0]):
                C = Cs[i].reshape(nb, N, h) if nw == 1 else Cs[i]      # (nb, [nw,] N, H) view
                passes.append((cols(tok[i]), cols(dt2[i]), C))
        y, gated = None, False
        for i, (rev, (x_c, dt_c, C)) in enumerate(zip(revs, passes)):
            col_revs = [_CORNER_DIRS[c][1] for c in self.corners if _CORNER_DIRS[c][0] == rev]
            if (bidir and len(col_revs) == 2 and y is not None and inplace and
                    self.fuse_column_sum and col_args['z'] is None):
                # y += both column directions (then y *= silu(z) after the last latent)
                g = cols(z) if gate_sum and i == len(passes) - 1 else None
                if ops.bidir_selective_scan_sum_into(y, x_c, dt_c, C=C, gate=g,
                                                     **{k_: v for k_, v in col_args.items()
                                                        if k_ != 'z'}):
                    gated = g is not None
                    continue
            if bidir and len(col_revs) == 2:  # both column directions, summed in the kernel
                ys = [ops.bidir_selective_scan(x_c, dt_c, C=C, sum_directions=True,
                                               **col_args)]
            else:
                ys = [ops.selective_scan(x_c, dt_c, C=C, reverse=r, **col_args)
                      for r in col_revs]                               # (nb, nw*d, H) each
            for y_c in ys:
                if y is None:
                    y = y_c
                elif inplace:  # y is a scan output of this call: no new buffer
                    y.add_(y_c)
                else:
                    y = y + y_c
        y = y.view(b, w, d, h).permute(0, 3, 1, 2)  # tokens (B, H, W, d)
        # (gated: the kernel gated the corner sum)
        return self._gate_mean_out(y, z, gate_sum and not gated, k, scale, inplace)

    def _gate_mean_out(self, y: Tensor, z: Optional[Tensor], gate: bool, k: int, scale: float,
                       inplace: bool) -> Tensor:
        """The corner sum y (B, H, W, d) -> silu(z) gate (``gate``), mean over the k
        corners (unless the column passes scaled by ``scale`` = 1 / k), ``out_proj``."""
        if gate:
            # inplace: z (this call's in_proj output) is free after the scans; the product
            # is contiguous tokens whatever y's layout
            y = F.silu(z, inplace=True).mul_(y) if inplace else y * F.silu(z)
        if k > 1 and scale == 1.0:  # the mean, unless the column passes scaled by 1 / k
            y = y.div_(k) if inplace else y / k
        return self.out_proj(y.contiguous())  # one 2-D GEMM (no copy if already tokens)

    def _joint_columns(self, lat: Tensor, b: int, h: int, col_args: dict) -> Tensor:
        """Both row latents' column passes (4 corners) as one two-direction scan, summed.

        lat: (2, B*H, d, W), the two row directions' latents in token-major memory (the
        two-direction row scan's output). Returns the corner sum as contiguous tokens
        (B, H, W, d). Each latent's token map (B, H, W, d) is seen as B rows of W column
        groups of d channels, (B, W*d, H), so both latents are one (2B, W*d, H) view and
        one call scans every column of both, top-down and bottom-up (``col_args``: the
        column parameters tiled W times). The latents are then summed by one reduction
        over the latent axis, whose backward hands the kernel a stride-0 cotangent that it
        reads as it is (B = 1). The values are those of one call per latent and an add
        (each direction is the plain scan, (0 + y0) + y1 = y0 + y1, bit-identical); the
        tiled parameters' gradients are summed over the W groups in another order (fp32
        rounding).
        """
        _, _, d, w = lat.shape
        R, N = self.dt_rank, self.A_2_log.shape[1]
        tok = lat.view(2, b, h, d, w).transpose(3, 4)  # (2, B, H, W, d), contiguous memory

        def cols2(t: Tensor) -> Tensor:  # (2, B, H, W, c) contiguous -> (2B, W*c, H), a view
            return t.permute(0, 1, 3, 4, 2).reshape(2 * b, w * t.shape[-1], h)

        x_dbl2 = F.linear(tok, self.x_proj_2.weight)                    # (2, B, H, W, R+N)
        dt_in, C_in = x_dbl2.split([R, N], dim=-1)
        dt2 = F.linear(dt_in, self.dt_proj_2.weight)                   # (2, B, H, W, d)
        # C: (2B, W, N, H) view of (2B, W, H, N) memory, the layout the kernel reads
        C = C_in.transpose(2, 3).contiguous().view(2 * b, w, h, N).transpose(2, 3)
        ys = ops.bidir_selective_scan(cols2(tok), cols2(dt2), C=C, sum_directions=True,
                                      **col_args)                      # (2B, W*d, H)
        # the kernel wrote ys in u's layout: (2, B, H, W, d) tokens, contiguous
        return ys.view(2, b, w, d, h).permute(0, 1, 4, 2, 3).sum(0)    # (B, H, W, d)

    def _scan_params(self, f: torch.dtype, nw: int, scale: float,
                     cache: bool) -> Tuple[Tensor, ...]:
        """The scan parameters of ``_forward_noconv``'s row and column passes.

        Returns (A, C, D, delta_bias) of the row passes ((d, N), (d, N) ones, (d,), (d,))
        and (A, B, D, delta_bias) of the column passes, tiled ``nw`` times ((nw*d, N),
        (nw*d,)), with the column passes' constant B and D multiplied by ``scale`` (the
        mean over corners: the column output is linear in B and D together, and a
        power-of-two scale is exact, so the outputs equal the unscaled ones divided by
        1 / scale bit for bit). All in dtype ``f``. With ``cache`` (eager inference) the
        tensors are kept on the module and reused while every parameter they come from is
        the same tensor at the same version (``load_state_dict``, optimiser steps and
        in-place edits bump it): ~8 small ops per call less.
        """
        srcs = (self.A_log, self.D, self.dt_proj.bias, self.A_2_log, self.D_2,
                self.dt_proj_2.bias)
        key = (f, nw, scale) + tuple((id(p), p.data_ptr(), p._version) for p in srcs)
        hit = self.__dict__.get('_scan_param_cache')
        if cache and hit is not None and hit[0] == key:
            return hit[1]
        A_r = -torch.exp(self.A_log.to(f))
        A_c, D_c, bias_c = -torch.exp(self.A_2_log.to(f)), self.D_2.to(f), self.dt_proj_2.bias.to(f)
        if scale != 1.0:
            D_c = D_c * scale
        if nw > 1:  # per-channel parameters of nw groups: (nw*d, N) / (nw*d,)
            # expand + reshape: the copies Tensor.repeat makes, in 2 ops instead of ~8
            A_c, D_c, bias_c = (t.expand(nw, *t.shape).reshape(nw * t.shape[0], *t.shape[1:])
                                for t in (A_c, D_c, bias_c))
        B_c = A_c.new_full(A_c.shape, scale)  # the constant B (scale: the corner mean)
        res = (A_r, torch.ones_like(A_r), self.D.to(f), self.dt_proj.bias.to(f), A_c, B_c, D_c,
               bias_c)
        # a plain attribute (no buffer: not in the state dict), dropped when not caching
        self.__dict__['_scan_param_cache'] = (key, res) if cache else None
        return res
