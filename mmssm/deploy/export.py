"""Export an mmssm model (or any module that contains mmssm layers) to standard ONNX.

What makes the state-space layers exportable:

* selective scans: :func:`mmssm.ops.selective_scan` emits one
  ``torch.ops.mmssm.selective_scan_fwd`` per scan while ``torch.export`` traces, and
  :mod:`mmssm.deploy.onnx_ops` lowers each to one ONNX ``Scan`` (no unrolling);
* scan orders (cross-scan/merge, corner flips, local windows) are traced through their
  autograd Functions' forwards: they become Transpose / Reshape / Slice / Concat nodes;
* S4ND: the SSM kernels depend only on the parameters and the input size, so they are
  computed once in PyTorch for the export size and enter the graph as constants: dense
  Toeplitz matrices (MatMul) for the depthwise layers, frequency-domain kernels with ONNX
  ``DFT`` for the dense stem (its per-axis spectra, applied one input channel at a time
  as in ``S4ND._dense_axes_conv``). The input size of an S4ND model is therefore fixed.

Public entry points: :func:`export_onnx`, :func:`check_onnx`, :func:`run_onnx`,
:func:`compare_outputs`.
"""
import contextlib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

DEFAULT_OPSET = 18
MIN_OPSET = 18  # torch's ONNX exporter emits opset 18 and newer


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f'{module} is needed for ONNX export / inference; install the '
                          "deploy extra: pip install -e .[deploy] (or WITH_DEPLOY=1 make "
                          'setup)') from e


def _s4nd_layers(model: nn.Module) -> list:
    from mmssm.models.layers.s4nd import S4ND
    return [m for m in model.modules() if isinstance(m, S4ND)]


def has_fixed_size_layers(model: nn.Module) -> bool:
    """True if the model holds layers whose export fixes the input's spatial size (S4ND)."""
    return bool(_s4nd_layers(model))


@contextlib.contextmanager
def frozen_s4nd_kernels(model: nn.Module, inputs: Tuple[Tensor, ...]):
    """Inside: every S4ND layer reads kernel operators computed once, here, in PyTorch.

    One eager forward records each layer's input size and rate; the operators for those
    are computed (depthwise layers: dense Toeplitz matrices, so the graph stays real) and
    handed to the traced forward, where they are constants. A different size at trace
    time is an error (the kernels of another size were not computed).
    """
    layers = _s4nd_layers(model)
    if not layers:
        yield
        return
    seen: Dict[nn.Module, set] = {m: set() for m in layers}
    originals = {m: m._cached_operators for m in layers}

    def recorder(m):
        def fn(l_in, rate):
            seen[m].add((tuple(int(s) for s in l_in), float(rate)))
            return originals[m](l_in, rate)
        return fn

    try:
        for m in layers:
            m._cached_operators = recorder(m)
        with torch.no_grad():
            model(*inputs)
        for m in layers:
            ops = {}
            mode = m.conv_mode
            if m._separable:
                m.conv_mode = 'toeplitz'  # real matmuls, no FFT in the graph
            try:
                for key in seen[m]:
                    with torch.no_grad():
                        ops[key] = m.kernel_operators(list(key[0]), key[1])
                    if m._dense_axes:  # complex constants do not export: (c', H, F_i, 2)
                        spectra, sizes = ops[key]
                        ops[key] = [torch.view_as_real(s).contiguous() for s in spectra], sizes
            finally:
                m.conv_mode = mode

            def frozen(l_in, rate, _ops=ops, _m=m):
                key = (tuple(int(s) for s in l_in), float(rate))
                if key not in _ops:
                    raise ValueError(f'{type(_m).__name__}: kernels were computed for input '
                                     f'sizes {sorted(_ops)}, not {key}: S4ND models export '
                                     'at a fixed input size')
                return _ops[key]
            m._cached_operators = frozen
            if not m._separable:
                m._conv = _spectral_conv(m)
        yield
    finally:
        for m in layers:
            m.__dict__.pop('_cached_operators', None)
            m.__dict__.pop('_conv', None)


def _spectral_conv(m: nn.Module):
    """S4ND's frequency-domain convolution (dense or rank > 1 layers) in real arithmetic.

    Same computation as ``S4ND._conv``: ``rfftn`` of the input (ONNX ``DFT``), a product
    with the constant kernel spectrum (per-axis spectra for the dense stem,
    :func:`_dense_axes_conv`), ``irfftn``; the complex products are written on
    (real, imag) pairs because ONNX has no complex tensors.
    """
    def conv(x: Tensor, rate: float) -> Tensor:
        l_in = [int(s) for s in x.shape[2:]]
        ops, sizes = m._cached_operators(l_in, rate)
        if m._dense_axes:  # per-axis spectra (c', H, F_i), see S4ND._dense_axes_conv
            return _dense_axes_conv(m, x, ops, sizes, l_in)
        k_f = ops[0]
        dims = tuple(range(2, 2 + m.dim))
        u_f = torch.view_as_real(torch.fft.rfftn(x, s=sizes, dim=dims))  # (B, H, *F', 2)
        ur, ui = u_f[..., 0], u_f[..., 1]
        kr, ki = k_f.real.contiguous(), k_f.imag.contiguous()
        if m.out_channels is None:  # (B, 1, H, *F') * (c, H, *F')
            ur, ui = ur.unsqueeze(1), ui.unsqueeze(1)
            yr, yi = ur * kr - ui * ki, ur * ki + ui * kr
        else:  # sum over input channels h: (B, H, *F') x (M, c, H, *F') -> (B, c, M, *F')
            shape = (m.out_channels, m.channels, m.h, *k_f.shape[2:])
            kr, ki = kr.reshape(shape), ki.reshape(shape)
            eq = 'bh...,ich...->bci...'
            yr = torch.einsum(eq, ur, kr) - torch.einsum(eq, ui, ki)
            yi = torch.einsum(eq, ur, ki) + torch.einsum(eq, ui, kr)
        y_f = torch.view_as_complex(torch.stack([yr, yi], -1))
        y = torch.fft.irfftn(y_f, s=sizes, dim=tuple(range(-m.dim, 0)))
        y = y[(Ellipsis, *[slice(0, n) for n in l_in])]
        if m.out_channels is None:
            y = y + x.unsqueeze(1) * m.D.to(y.dtype).reshape(m.channels, m.h, *([1] * m.dim))
        return y
    return conv


def _dense_axes_conv(m: nn.Module, x: Tensor, spectra: Sequence[Tensor],
                     sizes: Sequence[int], l_in: Sequence[int]) -> Tensor:
    """``S4ND._dense_axes_conv`` in real arithmetic -> (B, c, M, *L).

    The dense stem's per-axis spectra are export-time constants, stored as (real, imag)
    pairs (c', H, F_i, 2); no (c', H, *F') N-D spectrum enters the graph.
    ``y_f = sum_h u_f[h] * k_0[:, h] (x) .. (x) k_{d-1}[:, h]``, multiplied in the same
    order as in PyTorch."""
    d = m.dim
    u_f = torch.view_as_real(torch.fft.rfftn(x, s=sizes, dim=tuple(range(2, 2 + d))))
    ur, ui = u_f[..., 0], u_f[..., 1]  # (B, H, *F')
    yr = yi = None
    for h in range(m.h):
        tr, ti = ur[:, h].unsqueeze(1), ui[:, h].unsqueeze(1)  # (B, 1, *F')
        for i, s_i in enumerate(spectra):  # s_i (c', H, F_i, 2) -> (c', 1.., F_i, 1..)
            shape = (s_i.shape[0], *([1] * i), s_i.shape[-2], *([1] * (d - 1 - i)))
            kr = s_i[:, h, :, 0].to(x.dtype).reshape(shape)
            ki = s_i[:, h, :, 1].to(x.dtype).reshape(shape)
            tr, ti = tr * kr - ti * ki, tr * ki + ti * kr
        yr, yi = (tr, ti) if yr is None else (yr + tr, yi + ti)  # (B, c', *F')
    y_f = torch.view_as_complex(torch.stack([yr, yi], -1))
    y = torch.fft.irfftn(y_f, s=sizes, dim=tuple(range(-d, 0)))
    y = y[(Ellipsis, *[slice(0, n) for n in l_in])]
    # c' = (out_channels, channels) with out_channels outermost -> (B, channels, M, *L)
    return y.unflatten(1, (m.out_channels, m.channels)).transpose(1, 2)


def _dims(dynamic: Union[bool, Sequence[str]], spatial: int,
          fixed_size: bool) -> Dict[int, object]:
    """Dynamic axes of a (B, C, *spatial) input: {axis: Dim}."""
    if not dynamic:
        return {}
    names = ['batch'] + (['height', 'width'] if spatial == 2 else ['time', 'height', 'width'])
    wanted = names if dynamic is True else list(dynamic)
    bad = [a for a in wanted if a not in names]
    if bad:
        raise ValueError(f'dynamic axes {bad} are not valid; choose from {names}')
    if fixed_size and any(a != 'batch' for a in wanted):
        raise ValueError('this model cannot export dynamic height/width: its S4ND kernels are '
                         'computed once, at export, for the export size (and the S4ND rate); '
                         "export one file per input size, or dynamic=['batch'] only")
    axis = {'batch': 0, 'time': 2, 'height': spatial, 'width': spatial + 1}
    return {axis[a]: torch.export.Dim.DYNAMIC for a in wanted}


def export_onnx(model: nn.Module, inputs: Union[Tensor, Tuple[Tensor, ...]], path: str,
                dynamic: Union[bool, Sequence[str]] = False, opset: int = DEFAULT_OPSET,
                input_names: Sequence[str] = ('input', ),
                output_names: Optional[Sequence[str]] = None, optimize: bool = True) -> str:
    """Export ``model(*inputs)`` to an ONNX file in standard operators only.

    Args:
        model: a module in eval mode whose forward takes image/video tensors and returns a
            tensor or a (nested) tuple/list of tensors.
        inputs: example input(s), (B, C, H, W) or (B, C, T, H, W).
        path: where to write the ``.onnx`` file.
        dynamic: False, True (batch and every spatial axis) or a list of axis names from
            ``batch``, ``time``, ``height``, ``width``.
        opset: ONNX opset (>= 18).
        input_names, output_names: graph input / output names.
        optimize: run the exporter's graph optimiser (constant folding etc.).

    Returns:
        ``path``.
    """
    _require('onnx')
    _require('onnxscript')
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f'opset must be an int >= {MIN_OPSET} (the ONNX Scan/DFT forms and '
                         f"torch's exporter need it), got {opset!r}")
    from .onnx_ops import translation_table
    inputs = (inputs, ) if isinstance(inputs, Tensor) else tuple(inputs)
    model = model.eval()
    fixed = has_fixed_size_layers(model)
    shapes = None
    if dynamic:
        shapes = tuple(_dims(dynamic, x.dim() - 2, fixed) for x in inputs)
        # torch.export treats a size-1 axis as the constant 1 in places (e.g. reshapes
        # after S4ND's FFTs): trace a dynamic batch with two samples
        inputs = tuple(torch.cat([x, x]) if 0 in dims and x.shape[0] == 1 else x
                       for x, dims in zip(inputs, shapes))
    table = translation_table()
    with frozen_s4nd_kernels(model, inputs), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            program = torch.onnx.export(
                model, inputs, dynamo=True, custom_translation_table=table,
                dynamic_shapes=shapes, opset_version=opset, input_names=list(input_names),
                output_names=None if output_names is None else list(output_names),
                optimize=False, verbose=False, report=False)
        except Exception as e:  # name the axis that could not stay dynamic
            msg = str(e)
            if dynamic and ('Constraints violated' in msg or 'specializ' in msg
                            or 'guard' in msg.lower()):
                raise ValueError(
                    f'{type(model).__name__} cannot be exported with dynamic axes {dynamic}: '
                    'the model fixes some of them (e.g. a spatial size that must stay a '
                    f'multiple of the patch size or window). Exporter said:\n{msg[:2000]}') from e
            raise
    if optimize:
        _optimize(program)
    program.save(path)
    if shapes:
        _check_dynamic_inputs(path, shapes, dynamic, type(model).__name__)
    return path


def _optimize(program) -> None:
    """Constant folding and clean-up (onnxscript's optimiser), kept only if it succeeds:
    with dynamic shapes it can fail on nodes it cannot fold (e.g. a ``SplitToSequence`` of
    a symbolic batch in onnxscript 0.7); the unoptimised graph is then kept (same result,
    a few more nodes)."""
    import onnx_ir as ir
    backup = ir.serde.serialize_model(program.model)
    try:
        program.optimize()
    except Exception as e:  # noqa: BLE001 - any optimiser failure: keep the exact graph
        warnings.warn(f'ONNX graph optimisation failed ({type(e).__name__}); the '
                      'unoptimised graph is saved')
        program.model = ir.serde.deserialize_model(backup)


def _check_dynamic_inputs(path: str, shapes: tuple, dynamic, name: str) -> None:
    """The exporter may silently fix an axis it was asked to keep dynamic (a Python
    branch on the size, a size baked into a constant): name that axis."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    names = {0: 'batch', 1: 'channels'}
    for inp, dims in zip(graph.input, shapes):
        tdims = inp.type.tensor_type.shape.dim
        spatial = len(tdims) - 2
        labels = {**names, **({2: 'height', 3: 'width'} if spatial == 2 else
                              {2: 'time', 3: 'height', 4: 'width'})}
        fixed = [labels[a] for a in dims if tdims[a].HasField('dim_value')]
        if fixed:
            raise ValueError(f'{name} cannot be exported with dynamic {fixed} (asked: '
                             f'dynamic={dynamic}): the model fixes these axes while tracing; '
                             'export without --dynamic (one file per input size)')


def check_onnx(path: str) -> dict:
    """Structural facts: node count (top level and inside sub-graphs), op types, domains.

    Raises ValueError if the graph uses a non-standard domain (a custom op).
    """
    onnx = _require('onnx')
    model = onnx.load(path)
    types, domains, total = {}, set(), 0

    def walk(graph):
        nonlocal total
        for node in graph.node:
            total += 1
            types[node.op_type] = types.get(node.op_type, 0) + 1
            domains.add(node.domain or 'ai.onnx')
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    local = {f.domain for f in model.functions}
    custom = sorted(d for d in domains if d not in ('ai.onnx', 'ai.onnx.ml') and d not in local)
    if model.functions:
        custom += sorted(f'{f.domain}::{f.name} (local function)' for f in model.functions)
    if custom:
        raise ValueError(f'{path} uses non-standard ops/domains {custom}')
    onnx.checker.check_model(model)
    return dict(nodes=len(model.graph.node), total_nodes=total, op_types=types,
                opset=max(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')))


def run_onnx(path: str, inputs: Union[Tensor, Tuple[Tensor, ...]], threads: int = 0,
             session=None) -> List[Tensor]:
    """Run ``path`` with onnxruntime's CPU provider; returns the outputs as tensors."""
    inputs = (inputs, ) if isinstance(inputs, Tensor) else tuple(inputs)
    if session is None:
        session = make_session(path, threads)
    names = [i.name for i in session.get_inputs()]
    feed = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def make_session(path: str, threads: int = 0):
    """onnxruntime CPU session (``threads`` intra-op threads, 0: onnxruntime's default)."""
    ort = _require('onnxruntime')
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])


def flatten_outputs(out) -> List[Tensor]:
    """Tensors of a (nested) tuple/list/dict output in the exporter's order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    flat = []
    for o in out:
        flat += flatten_outputs(o)
    return flat


def compare_outputs(ref, got: Sequence[Tensor]) -> dict:
    """Max abs error and error relative to the output scale (max |ref|), over all outputs."""
    ref = flatten_outputs(ref)
    if len(ref) != len(got):
        raise ValueError(f'output count differs: PyTorch {len(ref)}, ONNX {len(got)}')
    abs_err, rel_err = 0.0, 0.0
    for r, g in zip(ref, got):
        if tuple(r.shape) != tuple(g.shape):
            raise ValueError(f'output shape differs: PyTorch {tuple(r.shape)}, '
                             f'ONNX {tuple(g.shape)}')
        r, g = r.detach().double(), g.double()
        err = (r - g).abs().max().item() if r.numel() else 0.0
        scale = max(r.abs().max().item() if r.numel() else 0.0, 1e-12)
        abs_err, rel_err = max(abs_err, err), max(rel_err, err / scale)
    return dict(max_abs=abs_err, max_rel=rel_err, outputs=len(ref))
