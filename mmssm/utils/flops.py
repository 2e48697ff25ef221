"""FLOP counting for mmssm models with mmengine's ``FlopAnalyzer``.

mmengine (fvcore) traces the model with ``torch.jit`` and counts each graph
node with a per-op handle. Its convention, kept here: one fused multiply-add
is ONE flop (a ``Linear(c_in, c_out)`` on ``t`` tokens counts ``t*c_in*c_out``),
and element-wise ops (add, mul, activations) are not counted. The handles
below add our own ops, which the tracer sees as single nodes:

* **selective scan** -- on CPU one custom op node ``mmssm::selective_scan_fwd``
  (compiled kernel or chunked scan inside); the forced ``cpu`` / ``triton``
  backends are one autograd Function each (``_ChunkedScanFn``, ``_TritonScanFn``),
  i.e. one ``prim::PythonOp.<Name>`` node. Counted as in mamba / VMamba
  (``flops_selective_scan_ref``/``flops_selective_scan_fn``, mamba issue #110)::

      9 * B * L * D * N          # discretisation, state update, C readout
      + B * D * L                # if the D skip is given
      + B * D * L                # if the z gate is given

  with u (B, D, L) and A (D, N). VMamba's direction-aware scan
  ``mmssm::cross_selective_scan_fwd`` (u (B, H, W, D), A (4D, N)) counts as the
  (B, 4D, H*W) scan it replaces, and the two-direction scan
  ``mmssm::bidir_selective_scan_fwd`` as the two scans it runs. softplus(delta +
  delta_bias) and the group expansion of B/C are not counted (as in VMamba). The ``ref`` backend is a
  python loop of small ops and would be mis-counted: :func:`count_flops`
  clears MMSSM_SCAN_BACKEND while tracing on CPU (so the custom op runs).
* **scan-order ops** (``cross_scan``/``cross_merge``, ``corner_rotate_all``/
  ``corner_merge_all``, ``local_scan``/``local_reverse``) -- index
  permutations (``cross_merge`` / ``corner_merge_all`` also sum the 4 / k
  directions, which element-wise convention leaves out): 0 flops, memory only.
* **FFT** (``torch.fft`` r/ifft(n), used by :mod:`mmssm.ops.fftconv` and the
  S4ND layer) -- the standard split-radix estimate per transform of N points
  (N = product of the transformed sizes): a real transform (rfft/irfft)
  ``2.5 * N * log2(N)``, a complex one ``5 * N * log2(N)``; times the number
  of independent transforms (all non-transformed dims). The spectral product
  is element-wise and, like other element-wise ops, not counted.
* ``aten::rms_norm`` (``torch.nn.RMSNorm``): like mmengine's layer norm handle,
  ``numel * (5 if affine else 4)``.
"""
import math
import os
from collections import Counter
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from mmengine.analysis.jit_handles import get_shape, norm_flop_counter

SCAN_FUNCTIONS = ('_ChunkedScanFn', '_TritonScanFn', 'SelectiveScanUntraced')
SCAN_ORDER_FUNCTIONS = ('_CrossScan', '_CrossMerge', '_RotateAll', '_MergeAll',
                        '_LocalScan', '_LocalReverse')
ELEMENTWISE_OPS = (
    'add', 'add_', 'sub', 'sub_', 'mul', 'mul_', 'div', 'div_', 'neg', 'exp', 'log',
    'sqrt', 'rsqrt', 'pow', 'abs', 'sigmoid', 'silu', 'silu_', 'gelu', 'softplus', 'tanh',
    'hardtanh', 'hardtanh_', 'leaky_relu', 'leaky_relu_', 'flip', 'roll', 'new_ones',
    'ones_like', 'zeros_like', 'zeros', 'rsub', 'mean', 'sum', 'softmax', 'log_softmax',
    'repeat', 'repeat_interleave', 'pad', 'unflatten', 'real', 'imag', 'view_as_real',
    'view_as_complex', 'reciprocal', 'cos', 'sin', 'cumsum', 'stack', 'split',
    'split_with_sizes', 'unbind', 'select', 'slice', 'reshape', 'view', 'transpose',
    'unsqueeze', 'squeeze', 'to', 'type_as', 'max_pool2d', 'topk', 'sort', 'argmax',
    'where', 'lt', 'le', 'ne', 'min', 'minimum', 'maximum', 'logical_and', 'all', 'any',
    'linspace', 'meshgrid', 'scatter', 'scatter_', 'index_select', 'masked_select',
    'embedding', 'dim', 'numel', 'size', 'view_as', 'expand_as', 'log2', 'feature_dropout',
    'dropout_', 'alpha_dropout', '_conj', 'conj', 'complex', 'eye', 'fill_', 'zero_', 'movedim',
    'glu', 'unfold')
# positions of the scan operands in the autograd Functions' apply(...) call:
# (u, delta, A, B, C, D, z, delta_bias, ...)
_SCAN_ARGS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def selective_scan_flops(batch: int, dim: int, length: int, d_state: int,
                         with_D: bool = True, with_z: bool = False) -> int:
    """FLOPs of one selective scan: 9*B*L*D*N (+B*D*L for D, +B*D*L for z)."""
    flops = 9 * batch * length * dim * d_state
    if with_D:
        flops += batch * dim * length
    if with_z:
        flops += batch * dim * length
    return flops


def _python_op_args(outputs: List[Any]) -> Dict[str, Any]:
    """Map the scan operand names to graph values or None.

    The jit node keeps tensors as inputs and None/bools as ``scalar_args``;
    its calling convention string (``cconv``: 'd' dynamic tensor, 'c' constant) gives
    the position of each. The node itself is reached through its output.
    """
    node = outputs[0].node()
    tensors, scalars = list(node.inputs()), list(node.scalar_args())
    args = []
    for kind in node.cconv():
        args.append(scalars.pop(0) if kind == 'c' else tensors.pop(0))
    return dict(zip(_SCAN_ARGS, args))


def selective_scan_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """Handle for ``prim::PythonOp._ChunkedScanFn`` / ``_TritonScanFn``."""
    args = _python_op_args(outputs)
    b, d, l = get_shape(args['u'])
    n = get_shape(args['A'])[1]
    return Counter(selective_scan=selective_scan_flops(
        b, d, l, n, with_D=args['D'] is not None, with_z=args['z'] is not None))


def _is_none(value: Any) -> bool:
    return value.type().kind() == 'NoneType'


def selective_scan_op_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """Handle for the custom op ``mmssm::selective_scan_fwd`` (u, delta, A, B, C, D, z, ...)."""
    b, d, l = get_shape(inputs[0])
    n = get_shape(inputs[2])[1]
    return Counter(selective_scan=selective_scan_flops(
        b, d, l, n, with_D=not _is_none(inputs[5]), with_z=not _is_none(inputs[6])))


def cross_selective_scan_op_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """Handle for ``mmssm::cross_selective_scan_fwd`` (u (b, h, w, D), delta, A (4 D, N), B,
    C, D, ...): the four directions' scans, counted as the one (b, 4 D, h w) scan of the
    cross_scan -> selective_scan -> cross_merge composition it replaces."""
    b, h, w, _ = get_shape(inputs[0])
    d4, n = get_shape(inputs[2])
    return Counter(selective_scan=selective_scan_flops(b, d4, h * w, n,
                                                       with_D=not _is_none(inputs[5])))


def bidir_selective_scan_op_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """Handle for ``mmssm::bidir_selective_scan_fwd`` (u, delta, A, B, C, D, z, ...): the
    forward and the reverse scan, counted as the two plain scans it replaces (the sum of
    the two outputs is element-wise, not counted)."""
    b, d, l = get_shape(inputs[0])
    n = get_shape(inputs[2])[1]
    return Counter(selective_scan=2 * selective_scan_flops(
        b, d, l, n, with_D=not _is_none(inputs[5]), with_z=not _is_none(inputs[6])))


def zero_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Handle for pure re-indexing ops (scan orders): 0 flops."""
    return 0


def _const(value: Any) -> Any:
    """A constant graph value (int, list of ints or None)."""
    node = value.node()
    if node.kind() == 'prim::ListConstruct':
        return [_const(v) for v in node.inputs()]
    return value.toIValue()


def fft_flop_counter(kind: str, n_dims: bool):
    """Handle for torch.fft transforms (aten args: self, n|s, dim, norm).

    Args:
        kind: 'rfft' (real input: 2.5 N log2 N), 'irfft' (real output:
            2.5 N log2 N) or 'fft' (complex: 5 N log2 N).
        n_dims: the n-d variant (``s``/``dim`` lists) rather than 1-d.
    """
    def fft_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
        in_shape, out_shape = get_shape(inputs[0]), get_shape(outputs[0])
        ndim = len(out_shape)
        dim = _const(inputs[2])
        if dim is None:
            dim = list(range(ndim)) if n_dims else [ndim - 1]
        dims = [x % ndim for x in ([dim] if isinstance(dim, int) else dim)]
        if kind == 'rfft':  # real signal size: n / s if given, else the input's
            sizes = _const(inputs[1])
            sizes = [sizes] if isinstance(sizes, int) else sizes
            if sizes is None or None in sizes:
                sizes = [in_shape[x] for x in dims]
        else:  # irfft: the real output; complex: output size == signal size
            sizes = [out_shape[x] for x in dims]
        size = math.prod(sizes)
        count = math.prod(s for i, s in enumerate(out_shape) if i not in dims)
        if size <= 1:
            return 0
        per = (5.0 if kind == 'fft' else 2.5) * size * math.log2(size)
        return int(round(count * per))

    return fft_flop_jit


def op_handles() -> Dict[str, Any]:
    """All handles to pass to ``FlopAnalyzer.set_op_handle(**handles)``."""
    handles = {f'prim::PythonOp.{n}': selective_scan_flop_jit for n in SCAN_FUNCTIONS}
    handles['mmssm::selective_scan_fwd'] = selective_scan_op_flop_jit
    handles['mmssm::cross_selective_scan_fwd'] = cross_selective_scan_op_flop_jit
    handles['mmssm::bidir_selective_scan_fwd'] = bidir_selective_scan_op_flop_jit
    handles.update({f'prim::PythonOp.{n}': zero_flop_jit for n in SCAN_ORDER_FUNCTIONS})
    for kind in ('rfft', 'irfft', 'fft'):
        for suffix, nd in (('', False), ('n', True), ('2', True)):
            handles[f'aten::fft_{kind}{suffix}'] = fft_flop_counter(kind, nd)
            if kind == 'fft':
                handles[f'aten::fft_ifft{suffix}'] = fft_flop_counter(kind, nd)
    handles['aten::rms_norm'] = norm_flop_counter(2)
    # element-wise / memory ops: not counted by convention (None = ignore), so
    # that ``unsupported_ops()`` lists only ops that would really be missed
    handles.update({f'aten::{n}': None for n in ELEMENTWISE_OPS})
    return handles


@contextmanager
def scan_backend(name: Optional[str]) -> Iterator[None]:
    """Temporarily set MMSSM_SCAN_BACKEND (None: leave it as is; '': unset it)."""
    old = os.environ.get('MMSSM_SCAN_BACKEND')
    if name == '':
        os.environ.pop('MMSSM_SCAN_BACKEND', None)
    elif name is not None:
        os.environ['MMSSM_SCAN_BACKEND'] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop('MMSSM_SCAN_BACKEND', None)
        else:
            os.environ['MMSSM_SCAN_BACKEND'] = old


class SelectiveScanUntraced(torch.autograd.Function):
    """One traced node for a whole scan, with the real kernel run untraced.

    The tracer records every op inside an autograd Function's forward into
    a sub-graph; the chunked CPU scan is hundreds of small ops, which made
    tracing ~7x slower than the forward pass. Here the real backend runs with
    the tracing state switched off: same outputs, one ``prim::PythonOp`` node.
    Only used while counting (no backward).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32, reverse, fn):
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return fn(u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32, reverse)
        finally:
            torch._C._set_tracing_state(state)


@contextmanager
def untraced_scan_kernels() -> Iterator[None]:
    """Route the cpu / triton scan backends through :class:`SelectiveScanUntraced`."""
    from mmssm.ops import selective_scan_cpu
    targets = [(selective_scan_cpu, 'selective_scan_chunked')]
    try:
        from mmssm.ops import selective_scan_triton
        targets.append((selective_scan_triton, 'selective_scan_triton'))
    except ImportError:
        pass
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets]
    for mod, name, real in saved:
        def wrapped(u, delta, A, B, C, D, z, delta_bias, softplus, out_fp32, reverse,
                    _real=real):
            return SelectiveScanUntraced.apply(u, delta, A, B, C, D, z, delta_bias, softplus,
                                               out_fp32, reverse, _real)
        setattr(mod, name, wrapped)
    try:
        yield
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)


def flop_analyzer(model, inputs):
    """A ``FlopAnalyzer`` with the mmssm handles registered (not yet run)."""
    from mmengine.analysis import FlopAnalyzer
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle(**op_handles())
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


def count_flops(model, inputs):
    """Run the analysis; returns the analyzer (``.total()``, ``.by_module()``).

    The model is traced with a scan backend that is a single graph node
    (``triton`` on CUDA when available, else the custom op ``mmssm::selective_scan_fwd``
    that CPU tensors get by default): the ``ref`` loop would be
    counted op by op. Fresh S4 (DPLR) kernels are attuned first, so their one-time
    C -> C~ conversion is not counted as part of the forward; S4ND kernel caches are
    dropped, so the count always includes one kernel generation (as a training step
    or the first inference at a new input size runs it).
    """
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    backend = ''  # unset: CPU tensors get the custom op (one node)
    if getattr(first, 'is_cuda', False):
        try:
            import triton  # noqa: F401
            backend = 'triton'
        except ImportError:
            pass
    from mmssm.ops.ssm_kernels import attune_kernels
    attune_kernels(model)  # one-time C -> C~ conversion: not part of a forward's cost
    for m in model.modules():  # count one S4ND kernel generation, cached or not
        if hasattr(m, 'clear_kernel_cache'):
            m.clear_kernel_cache()
    analyzer = flop_analyzer(model, inputs)
    with scan_backend(backend), untraced_scan_kernels(), torch.no_grad():
        analyzer.total()  # runs the trace once; later queries reuse it
    return analyzer
