"""S4ND: multi-axis global convolution with separable SSM kernels (Nguyen et al., 2022).

One 1-D SSM kernel module per axis (``kernel.{axis}``); the N-D kernel is their outer
product. It is never built in space: the official algorithm multiplies the per-axis spectra
in frequency space (``conv_mode='outer'``); since the kernel is separable, the default
applies one 1-D operator per axis instead (a Toeplitz matmul for short axes, an FFT
convolution for long ones), which gives the same result several times faster on CPU
(``mmssm.ops.fftconv``). State-dict keys and shapes are those of state-spaces/s4
``src/models/sequence/modules/s4nd.py``, so official weights load as they are, including
DPLR ``C~``/``l_kernel`` pairs.
"""
import itertools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmssm.ops.fftconv import (axis_operators, axis_spectra, outer_spectrum,
                               pooled_axis_taps, pooled_separable_conv, prepare_kernels,
                               separable_conv)
from mmssm.ops.ssm_kernels import KERNELS, SSMKernelDPLR

_ACTS = {None: nn.Identity, 'id': nn.Identity, 'identity': nn.Identity, 'linear': nn.Identity,
         'none': nn.Identity, 'gelu': nn.GELU, 'relu': nn.ReLU, 'tanh': nn.Tanh,
         'silu': nn.SiLU, 'swish': nn.SiLU, 'sigmoid': nn.Sigmoid, 'elu': nn.ELU,
         'softplus': nn.Softplus}


def _activation(name: Optional[str], dim: int = 1) -> nn.Module:
    if name == 'glu':
        return nn.GLU(dim=dim)
    if name not in _ACTS:
        raise ValueError(f"activation must be one of {sorted(map(str, _ACTS))} or 'glu', "
                         f'got {name!r}')
    return _ACTS[name]()


class TransposedLinear(nn.Module):
    """Linear map over dim 1 of (B, D, *L): weight (out, in), bias (out,)."""

    def __init__(self, d_input: int, d_output: int, bias: bool = True):
        super().__init__()
        lin = nn.Linear(d_input, d_output, bias=bias)  # nn.Linear's default init
        self.weight = lin.weight
        self.bias = lin.bias

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum('bi...,oi->bo...', x, self.weight)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, *([1] * (x.dim() - 2)))
        return y


class S4ND(nn.Module):
    """S4ND layer: separable N-D SSM convolution + D skip (+ optional output mixing).

    Args:
        d_model: H, channels of the input (B, H, *L).
        d_state: N, SSM state size per axis kernel.
        l_max: kernel length per axis at rate 1 (int, list, or None = input length).
        dim: number of convolved axes (1, 2 or 3).
        out_channels: None for a depthwise layer; M turns it into a dense conv
            H -> M with one separable kernel per (input, output) pair (the ConvNeXt stem).
            No D skip in that mode.
        channels: kernel "heads" per input channel (output has channels*H channels
            before ``output_linear``).
        bidirectional: two-sided kernels (causal half + flipped anti-causal half).
        activation: applied after the convolution when ``linear=False``.
        final_act: activation of ``output_linear`` (e.g. 'glu'); None = bare linear.
        dropout: dropout after ``activation`` when ``linear=False``.
        transposed: input layout (B, H, *L) if True, else (B, *L, H).
        trank: tensor rank of the kernel: each output kernel is the mean of ``trank``
            separable terms. (The official ``contract_version=1`` path drops this mean;
            here both contract versions compute it.)
        linear: if True, return the convolution output (channels*H) directly.
        return_state: return ``(y, None)`` like the official module.
        contract_version: accepted for config compatibility; 0 and 1 compute the same.
        conv_mode: how the separable convolution is evaluated (same result up to float
            round-off): 'outer' = one N-D FFT with the outer-product spectrum (the
            official algorithm); 'axes' = one 1-D FFT convolution per axis; 'toeplitz' =
            one dense Toeplitz matmul per axis (O(L) per output, but BLAS: several times
            faster than FFTs on CPU for L up to a few hundred); 'auto' = per axis
            'toeplitz' if L <= ``toeplitz_max`` else 'axes', when ``trank == 1`` and
            depthwise; otherwise 'outer'.
        toeplitz_max: longest axis evaluated by matmul in 'auto' mode.
        mode / kernel: 'dplr' (S4, official default) or 'diag' (S4D).
        **kernel_args: passed to the kernel modules (init, rank, n_ssm, dt_min, dt_max,
            dt_tie, dt_transform, lr, wd, bandlimit, disc, real_transform, imag_transform).
    """

    def __init__(self, d_model: int, d_state: int = 64,
                 l_max: Union[None, int, Sequence[Optional[int]]] = None, dim: int = 2,
                 out_channels: Optional[int] = None, channels: int = 1,
                 bidirectional: bool = True, activation: Optional[str] = 'gelu',
                 final_act: Optional[str] = None, dropout: float = 0.0,
                 transposed: bool = True, trank: int = 1, linear: bool = True,
                 return_state: bool = False, contract_version: int = 0,
                 kernel: Optional[str] = None, mode: str = 'dplr', conv_mode: str = 'auto',
                 toeplitz_max: int = 256, **kernel_args):
        super().__init__()
        kernel = kernel or mode
        if kernel not in KERNELS:
            raise ValueError(f'kernel/mode must be one of {sorted(KERNELS)}, got {kernel!r}')
        if conv_mode not in ('auto', 'axes', 'toeplitz', 'outer'):
            raise ValueError(f"conv_mode must be 'auto', 'axes', 'toeplitz' or 'outer', "
                             f'got {conv_mode!r}')
        if conv_mode in ('axes', 'toeplitz') and (trank != 1 or out_channels is not None):
            raise ValueError(f"conv_mode={conv_mode!r} needs trank=1 and out_channels=None")
        if contract_version not in (0, 1):
            raise ValueError(f'contract_version must be 0 or 1, got {contract_version}')
        if isinstance(l_max, (list, tuple)):
            l_max = list(l_max)
            if dim is not None and len(l_max) != dim:
                raise ValueError(f'l_max has {len(l_max)} entries but dim={dim}')
        else:
            if dim is None:
                raise ValueError('dim must be given unless l_max is a list')
            l_max = [l_max] * dim
        if not 1 <= len(l_max) <= 3:
            raise ValueError(f'S4ND supports dim 1, 2 or 3, got {len(l_max)}')
        if out_channels is not None and not linear:
            raise ValueError('out_channels (dense mode) requires linear=True')
        self.h, self.n, self.l_max, self.dim = d_model, d_state, l_max, len(l_max)
        self.channels, self.out_channels, self.trank = channels, out_channels, trank
        self.bidirectional, self.transposed = bidirectional, transposed
        self.linear, self.return_state = linear, return_state
        self.conv_mode, self.toeplitz_max = conv_mode, toeplitz_max

        self.D = nn.Parameter(torch.randn(channels, d_model))
        if out_channels is not None:
            # The dense mode has no skip term (official), but keeps D for its key layout;
            # without grad, DDP does not wait for a gradient that never comes.
            self.D.requires_grad_(False)
        k_channels = channels * (out_channels or 1) * trank * (2 if bidirectional else 1)
        self.kernel = nn.ModuleList([
            KERNELS[kernel](d_model=d_model, d_state=d_state, l_max=L, channels=k_channels,
                            **kernel_args) for L in l_max])
        if not linear:
            self.activation = _activation(activation)
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            d_out = 2 * d_model if final_act == 'glu' else d_model
            lin = TransposedLinear(d_model * channels, d_out)
            # official key layout: bare linear without final_act, else Sequential(linear, act)
            self.output_linear = lin if final_act is None else nn.Sequential(
                lin, _activation(final_act))

    # ------------------------------------------------------------------------ conv
    def kernel_lengths(self, l_in: Sequence[int], rate: float) -> list:
        """Official rule: ``min(L_in, round(l_max / rate))`` per axis (L_in if l_max is None),
        at least 1 tap (a short axis at a high rate rounded to a length-0 kernel)."""
        return [l if lm is None else min(l, max(1, int(round(lm / rate))))
                for l, lm in zip(l_in, self.l_max)]

    def kernel_operators(self, l_in: Sequence[int], rate: float = 1.0,
                         compact: bool = False) -> Tuple[list, list]:
        """Batch-independent convolution operators for an input of size ``l_in``.

        Separable path (``trank == 1``, depthwise): per-axis operators (dense Toeplitz
        matrices or rfft spectra, see :func:`mmssm.ops.fftconv.axis_operators`).
        Otherwise: one N-D spectrum (c', H, F_0, .., F_last//2+1) in a 1-list, the outer
        product of the per-axis spectra averaged over the ``trank`` rank-1 terms
        (c' = out_channels*channels), and the FFT sizes. ``compact``: Toeplitz axes as
        their two-sided kernels (expanded when applied; what the inference cache keeps).
        """
        l_k = self.kernel_lengths(l_in, rate)
        ks = self._take_prefetched(l_k, rate)  # from prefetch_kernels (training), or None
        if ks is None and all(isinstance(k, SSMKernelDPLR) for k in self.kernel):
            ks = SSMKernelDPLR.batched(self.kernel, l_k, rate)  # axes stacked along H
        elif ks is None:
            ks = [kern(L=l, rate=rate) for kern, l in zip(self.kernel, l_k)]
        fwd, bwd = ks, None
        if self.bidirectional:  # first half causal, second half anti-causal
            fwd, bwd = zip(*[k.chunk(2, dim=0) for k in ks])
        if self._separable:
            limit = {'toeplitz': 1 << 30, 'axes': 0}.get(self.conv_mode, self.toeplitz_max)
            return axis_operators(l_in, fwd, bwd, toeplitz_max=limit, compact=compact), []
        fwd, bwd, sizes = prepare_kernels(l_in, fwd, bwd)
        if self._dense_axes:  # per-axis spectra (c', H, F_i): no N-D spectrum is stored
            return axis_spectra(fwd, sizes, bwd), sizes
        k_f = outer_spectrum(axis_spectra(fwd, sizes, bwd))  # (r*c', H, *F')
        if self.trank > 1:  # mean over the rank-1 terms ('(r c)' with r outermost)
            k_f = k_f.reshape(self.trank, -1, *k_f.shape[1:]).mean(0)
        return [k_f], sizes

    def _kernel_key(self, l_k: Sequence[int], rate: float) -> tuple:
        """Identifies the kernels of ``l_k`` at ``rate`` from the current parameters (their
        storage and in-place version: an optimizer step or a weight load changes it)."""
        return (tuple(l_k), float(rate), self._kernel_state())

    def _kernel_state(self) -> tuple:
        """Storage and in-place version of every kernel parameter and buffer: changes with
        an optimizer step, a weight load, ``.to()`` or the lazy C~ conversion."""
        return tuple((t.data_ptr(), t._version)
                     for t in itertools.chain(self.kernel.parameters(), self.kernel.buffers()))

    def _take_prefetched(self, l_k: Sequence[int], rate: float) -> Optional[list]:
        """Kernels left by :func:`prefetch_kernels` for exactly these lengths, rate and
        parameters (used once, and only with autograd on), else None."""
        pre = self.__dict__.pop('_prefetched', None)
        if pre is None or not torch.is_grad_enabled() or pre[0] != self._kernel_key(l_k, rate):
            return None
        return pre[1]

    @property
    def _dense_axes(self) -> bool:
        """Dense rank-1 layer with few input channels (the ConvNeXt-S4ND stem, H = 3): the
        per-axis spectra are applied to each input channel's spectrum and summed, instead
        of storing (and re-laying out on every call) the (c', H, *F') N-D spectrum."""
        return (self.conv_mode == 'auto' and self.out_channels is not None
                and self.trank == 1 and self.h <= 16)

    @property
    def _separable(self) -> bool:
        return self.conv_mode in ('axes', 'toeplitz') or (
            self.conv_mode == 'auto' and self.trank == 1 and self.out_channels is None)

    def _cached_operators(self, l_in: Sequence[int], rate: float):
        """Kernel operators, cached while no autograd graph is needed (inference)."""
        # the cache keeps two-sided kernels, not the dense Toeplitz matrices they expand to
        # (L times smaller: ~20 MB less resident for ConvNeXt-S4ND-T at 224^2); with
        # autograd (rebuilt every call) the matrices are built from the kernel halves
        # directly (toeplitz_matrix: one node per axis, backward without (L, L) flips)
        compact = not self._builds_graph()
        return self._cached(('ops', tuple(l_in), float(rate), self._separable),
                            lambda: self.kernel_operators(l_in, rate, compact=compact))

    def _builds_graph(self) -> bool:
        """Whether a forward now records an autograd graph through the kernel parameters."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _cached(self, tag: tuple, build):
        """``build()``, cached under ``tag`` while no autograd graph is needed (inference).

        The key holds every parameter's storage and in-place version counter, so loading
        weights, optimizer steps, ``.to()`` or the lazy C~ conversion invalidate it.
        """
        if self._builds_graph():
            self.clear_kernel_cache()
            return build()
        key = tag + (self._kernel_state(),)
        cache = getattr(self, '_spec_cache', None)
        if cache is None or cache[0] != key:
            self._spec_cache = None  # free the old operators before building new ones
            spec = build()
            key = tag + (self._kernel_state(),)  # after a possible lazy C~ conversion
            self._spec_cache = cache = (key, spec)
        return cache[1]

    def clear_kernel_cache(self) -> None:
        """Drop the inference cache of kernel operators (rebuilt on the next forward)."""
        self._spec_cache = None

    def _conv(self, x: Tensor, rate: float) -> Tensor:
        """Separable SSM convolution (+ D skip) of fp32/fp64 x (B, H, *L) -> (B, c, H|M, *L)."""
        l_in = [int(s) for s in x.shape[2:]]  # int(): jit tracing (get_flops) sees tensors
        ops, sizes = self._cached_operators(l_in, rate)
        if self._separable:
            return separable_conv(x, ops, self.D)  # D skip included
        if self._dense_axes:
            return self._dense_axes_conv(x, ops, sizes, l_in)
        k_f = ops[0]
        if x.dtype == torch.float64:
            k_f = k_f.to(torch.complex128)
        u_f = torch.fft.rfftn(x, s=sizes, dim=tuple(range(2, 2 + self.dim)))  # (B, H, *F')
        if self.out_channels is None:
            y_f = u_f.unsqueeze(1) * k_f  # (B, c, H, *F')
        else:  # dense: sum over input channels; '(i c)' with i = out_channels outermost
            k_f = k_f.reshape(self.out_channels, self.channels, self.h, *k_f.shape[2:])
            y_f = torch.einsum('bh...,ich...->bci...', u_f, k_f)  # (B, c, M, *F')
        y = torch.fft.irfftn(y_f, s=sizes, dim=tuple(range(-self.dim, 0)))
        y = y[(Ellipsis, *[slice(0, n) for n in l_in])]
        if self.out_channels is None:
            y = y + x.unsqueeze(1) * self.D.to(y.dtype).reshape(
                self.channels, self.h, *([1] * self.dim))
        return y

    def _dense_axes_conv(self, x: Tensor, spectra: Sequence[Tensor], sizes: Sequence[int],
                         l_in: Sequence[int]) -> Tensor:
        """Dense separable convolution, one input channel at a time in frequency space:
        ``y_f = sum_h u_f[h] * k_0[:, h] (x) .. (x) k_{d-1}[:, h]`` -> (B, c, M, *L)."""
        d = self.dim
        cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        u_f = torch.fft.rfftn(x, s=sizes, dim=tuple(range(2, 2 + d)))  # (B, H, *F')
        ys = []
        # blocks of 8 output kernels: the padded (B, c', *F) spectra and inverse FFTs of a
        # full-resolution stem are its largest temporaries
        for c0 in range(0, spectra[0].shape[0], 8):
            y_f = None
            for h in range(self.h):
                t = u_f[:, h].unsqueeze(1)  # (B, 1, *F')
                for i, s_i in enumerate(spectra):  # s_i (c', H, F_i) -> (c'', 1.., F_i, 1..)
                    k = s_i[c0:c0 + 8, h].to(cdtype)
                    k = k.reshape(k.shape[0], *([1] * i), k.shape[-1], *([1] * (d - 1 - i)))
                    t = t * k if i == 0 else t.mul_(k)
                y_f = t if y_f is None else y_f.add_(t)  # (B, c'', *F')
            y = torch.fft.irfftn(y_f, s=sizes, dim=tuple(range(-d, 0)))
            ys.append(y[(Ellipsis, *[slice(0, n) for n in l_in])])
        y = torch.cat(ys, 1) if len(ys) > 1 else ys[0]
        # c' = (out_channels, channels) with out_channels outermost -> (B, channels, M, *L)
        return y.unflatten(1, (self.out_channels, self.channels)).transpose(1, 2)

    # largest per-axis tap count (kernel + pooling window) that :meth:`pooled` evaluates
    # as a direct strided conv; longer kernels go through the FFT path, then the pooling
    pool_taps_max = 128

    def pooled(self, u: Tensor, pool: Sequence[int], rate: float = 1.0) -> Tensor:
        """``avg_pool(self(u, rate), pool)`` (kernel = stride = ``pool``, floor), the
        ConvNeXt-S4ND stem's S4ND + AvgPool.

        A dense layer (``out_channels``) with short kernels computes it directly: the pooling
        window is folded into each axis' kernel (:func:`mmssm.ops.fftconv.pooled_axis_taps`)
        and applied as one strided conv per axis, so the full-resolution (B, M, *L) output
        and its padded spectra are never built. Same values up to float round-off; every
        other layer (and an export that substitutes the operators) runs ``forward`` first.
        """
        pool = [int(p) for p in pool]
        if len(pool) != self.dim:
            raise ValueError(f'pool needs {self.dim} sizes, got {pool}')
        x = u if self.transposed else u.movedim(-1, 1)
        l_in = [int(n) for n in x.shape[2:]]
        taps = None
        if self._pool_direct(x, pool, rate):
            taps = self._cached(('pool', tuple(l_in), float(rate), tuple(pool)),
                                lambda: self._pool_taps(l_in, rate, pool))
        if taps is None:
            pool_fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.dim - 1]
            y = self(u, rate)
            if not self.transposed:
                return pool_fn(y.movedim(-1, 1), pool).movedim(1, -1)
            return pool_fn(y, pool)
        dtype = x.dtype
        xw = x if dtype == torch.float64 else x.float()
        with torch.autocast(device_type=xw.device.type, enabled=False):
            y = pooled_separable_conv(xw, *taps, pool)  # (B, c', *Lo), c' = (M, channels)
        y = y.unflatten(1, (self.out_channels, self.channels)).transpose(1, 2)
        y = y.flatten(1, 2).to(dtype)  # (B, channels*M, *Lo), as forward's channel order
        return y if self.transposed else y.movedim(1, -1)

    def _pool_direct(self, x: Tensor, pool: Sequence[int], rate: float) -> bool:
        """Whether :meth:`pooled` can fold the pooling into per-axis strided convs."""
        if (self.out_channels is None or self.trank != 1 or self.conv_mode != 'auto'
                or x.dim() != self.dim + 2 or x.shape[1] != self.h
                # an exporter that substitutes the operators or the conv keeps its own path
                or '_cached_operators' in vars(self) or '_conv' in vars(self)):
            return False
        l_k = self.kernel_lengths([int(n) for n in x.shape[2:]], rate)
        reach = [2 * k if self.bidirectional else k for k in l_k]
        return all(n // p > 0 and r + p - 1 <= self.pool_taps_max
                   for n, p, r in zip(x.shape[2:], pool, reach))

    def _pool_taps(self, l_in: Sequence[int], rate: float, pool: Sequence[int]):
        """Per-axis strided-conv taps (c', H, K_i) and left offsets for :meth:`pooled`."""
        l_k = self.kernel_lengths(l_in, rate)
        if all(isinstance(k, SSMKernelDPLR) for k in self.kernel):
            ks = SSMKernelDPLR.batched(self.kernel, l_k, rate)  # (k_ch, H, l) each
        else:
            ks = [kern(L=l, rate=rate) for kern, l in zip(self.kernel, l_k)]
        fwd, bwd = ks, None
        if self.bidirectional:
            fwd, bwd = zip(*[k.chunk(2, dim=0) for k in ks])
        fwd, bwd, _ = prepare_kernels(l_in, fwd, bwd)  # drop taps that reach no output
        taps = [pooled_axis_taps(f, None if bwd is None else bwd[i], p)
                for i, (f, p) in enumerate(zip(fwd, pool))]
        return taps, [f.shape[-1] - 1 for f in fwd]

    def forward(self, u: Tensor, rate: float = 1.0, state=None):
        """u: (B, H, *L) (or (B, *L, H) if not transposed). ``rate`` = training res / input res."""
        if state is not None:
            raise ValueError('S4ND.forward does not take a state; use step() for 1-D recurrence')
        if not self.transposed:
            u = u.movedim(-1, 1)
        if u.dim() != self.dim + 2 or u.shape[1] != self.h:
            raise ValueError(f'expected input (B, {self.h}, *L) with {self.dim} axes, '
                             f'got {tuple(u.shape)}')
        dtype = u.dtype
        x = u if dtype == torch.float64 else u.float()  # fp16/bf16: computed in fp32
        # the convolution stays in fp32 under autocast too (FFTs have no bf16; long
        # kernels summed in half precision lose accuracy)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = self._conv(x, rate)  # (B, c, H|M, *L)
        y = y.flatten(1, 2).to(dtype)  # (B, c*H or c*M, *L)
        if not self.linear:
            y = self.output_linear(self.dropout(self.activation(y)))
        if not self.transposed:
            y = y.movedim(1, -1)
        return (y, None) if self.return_state else y

    # ------------------------------------------------------------------------ recurrence
    def _check_recurrent(self) -> None:
        if self.dim != 1 or self.bidirectional or self.out_channels is not None or self.trank != 1:
            raise ValueError('step() needs a causal 1-D layer: dim=1, bidirectional=False, '
                             'out_channels=None, trank=1')

    def setup_step(self) -> None:
        """Prepare the discrete recurrence (rate 1) of the 1-D causal layer."""
        self._check_recurrent()
        kern = self.kernel[0]
        if hasattr(kern, 'l_kernel') and int(kern.l_kernel.item()) == 0 and kern.l_max:
            kern._setup_C(kern.l_max)  # same lazy C~ conversion as the first forward
        kern.setup_step()

    def default_state(self, batch: int) -> Tensor:
        self._check_recurrent()
        return self.kernel[0].default_state(batch)

    def step(self, u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One time step of the 1-D causal layer: u (B, H) -> y (B, H_out), new state."""
        y, state = self.kernel[0].step(u, state)  # (B, c, H)
        y = (y + u.unsqueeze(1) * self.D).flatten(1, 2).to(u.dtype)
        if not self.linear:
            y = self.output_linear(self.dropout(self.activation(y)))
        return y, state


def prefetch_kernels(layers: Sequence[Tuple[S4ND, Sequence[int]]], rate: float = 1.0) -> None:
    """Generate the SSM kernels of several S4ND layers in one batched call, for their next
    forward with autograd (a training step).

    Each layer's :meth:`S4ND.kernel_operators` then takes its kernels from this call
    instead of generating them (once, and only if the lengths, rate and parameters still
    match). The kernels of layers of one configuration (e.g. the blocks of a ConvNeXt-S4ND
    stage and the downsample layer of the next) share their parameter transforms, Cauchy
    product, Woodbury step and inverse FFT (:meth:`SSMKernelDPLR.batched`): ~3x fewer
    small float64 ops and backward nodes, which pays where each op costs an OpenMP region
    (several threads) and wherever the compiled spectrum op generates the kernels
    (ConvNeXtS4ND calls it then). Same values as per-layer generation (float64 round-off).
    Does nothing without autograd or for layers whose kernels need no gradient (they use
    the inference cache).

    Args:
        layers: (layer, input size per axis) pairs, in any order.
        rate: sampling rate, as given to the layers' forward.
    """
    if not torch.is_grad_enabled():
        return
    members = [(layer, layer.kernel_lengths([int(n) for n in l_in], rate))
               for layer, l_in in layers
               if layer._separable and len(l_in) == layer.dim
               and all(isinstance(k, SSMKernelDPLR) for k in layer.kernel)
               and any(p.requires_grad for p in layer.parameters())]
    if len(members) < 2:
        return
    kernels = [k for layer, _ in members for k in layer.kernel]
    ks = SSMKernelDPLR.batched(kernels, [n for _, l_k in members for n in l_k], rate,
                               max_elements=1 << 62)  # group sizes are not capped here
    i = 0
    for layer, l_k in members:
        layer._prefetched = (layer._kernel_key(l_k, rate), ks[i:i + layer.dim])
        i += layer.dim
