"""ONNX translation of ``torch.ops.mmssm.selective_scan_fwd`` in standard operators.

The scan becomes ONE ONNX ``Scan`` node whose body advances the state by one time step,
so the graph size does not depend on the sequence length l (nothing is unrolled), and the
state never overflows (each step multiplies by ``exp(dt * A) <= 1``, exactly as the
sequential reference). Everything that does not depend on the state is computed for all
steps at once outside the loop (softplus, ``dt * u``, the layout changes, ``D * u``, the
``silu(z)`` gate).

Layouts (b batch, d channels, n state size, g groups of B/C, l time):

    outside: u, delta, z (b, d, l) -> time-major dt, dt*u (l, b, d); B/C (b, g, n, l) ->
             (l, b, g, n), or constant (d, n) handed to the body as a loop-carried value
    body:    h (b, d, n) <- exp(dt_t A) * h + (dt_t u_t) B_t;  y_t = sum_n h * C_t  (b, d)
    Scan:    y (l, b, d) -> (b, d, l); state outputs: h_last (b, d, n)

``reverse`` scans from l-1 down to 0 through the Scan's own input/output directions.
This module imports onnxscript / onnx_ir: it is only loaded when exporting.
"""
import itertools
from typing import Optional

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

_COUNTER = itertools.count()
FLOAT, DOUBLE = ir.DataType.FLOAT, ir.DataType.DOUBLE


def _call_op(op_type: str, *inputs, num_outputs: int = 1, **attrs):
    """Record one node with any number of outputs in the exporter's current graph
    (onnxscript's op.Scan cannot tell how many outputs a variadic Scan has)."""
    from torch.onnx._internal.exporter import _core
    tracer = _core.current_tracer
    if tracer is None:
        raise RuntimeError('mmssm.deploy.onnx_ops functions run only inside torch.onnx.export')
    node = ir.Node('', op_type, list(inputs), attributes=ir.convenience.convert_attributes(attrs),
                   num_outputs=num_outputs, version=tracer.opset.version)
    tracer.nodes.append(node)
    return node.outputs


class _Body:
    """Builds a Scan body sub-graph; every value gets a model-wide unique name."""

    def __init__(self, prefix: str, dtype: ir.DataType):
        self.prefix, self.dtype = prefix, dtype
        self.nodes, self.inputs = [], []
        self._k = itertools.count()

    def name(self, hint: str) -> str:
        return f'{self.prefix}_{hint}_{next(self._k)}'

    def input(self, hint: str, shape: Optional[list] = None) -> ir.Value:
        v = ir.Value(name=self.name(hint), type=ir.TensorType(self.dtype),
                     shape=None if shape is None else ir.Shape(shape))
        self.inputs.append(v)
        return v

    def const(self, values, dtype=np.int64) -> ir.Value:
        return self.op('Constant', value=ir.tensor(np.asarray(values, dtype=dtype)))

    def op(self, op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
        out = ir.Value(name=self.name(op_type.lower()))
        node = ir.Node('', op_type, list(inputs), attributes=ir.convenience.convert_attributes(
            attrs), outputs=[out])
        self.nodes.append(node)
        return out

    def graph(self, outputs: list) -> ir.Graph:
        return ir.Graph(self.inputs, outputs, nodes=self.nodes, name=self.prefix)


def _rank(v) -> int:
    return len(v.shape)


def _static(v, i: int, what: str) -> int:
    dim = v.shape[i]
    if not isinstance(dim, int):
        raise ValueError(f'selective scan export: {what} must be a static size, got {dim}')
    return dim


def _bc_step(body: _Body, X_t: ir.Value, x: ir.Value, d: int, n: int, g: int) -> ir.Value:
    """x (b, d) or (b, d, n) times one step of B/C (b, g, n) -> (b, d, n) (groups broadcast)."""
    x4 = body.op('Reshape', x, body.const([0, g, d // g, -1]))  # (b, g, d/g, 1|n)
    prod = body.op('Mul', x4, body.op('Unsqueeze', X_t, body.const([2])))  # (b, g, d/g, n)
    return body.op('Reshape', prod, body.const([0, d, n]))


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus: bool = False, out_fp32: bool = False,
                       reverse: bool = False, save_states: bool = False):
    """onnxscript translation (traced by the exporter) of ``mmssm::selective_scan_fwd``.

    Returns ``(out (b, d, l), last_state (b, d, n), chunk_states (0,))``; ``save_states``
    only matters for training and is ignored.
    """
    wd = DOUBLE if u.dtype == DOUBLE else FLOAT
    out_dtype = FLOAT if (out_fp32 and wd == FLOAT) else u.dtype
    d, n = _static(A, 0, 'd (A.shape[0])'), _static(A, 1, 'n (A.shape[1])')

    def cast(v):  # the work dtype (redundant casts are folded away by the optimiser)
        return op.Cast(v, to=wd)

    uu, dt, A_ = cast(u), cast(delta), cast(A)
    if delta_bias is not None:
        dt = op.Add(dt, op.Unsqueeze(cast(delta_bias), op.Constant(value_ints=[1])))
    if delta_softplus:
        dt = op.Softplus(dt)
    perm = [2, 0, 1]  # (b, d, l) -> (l, b, d)
    scan_inputs = [op.Transpose(dt, perm=perm), op.Transpose(op.Mul(dt, uu), perm=perm)]
    states = [op.Expand(op.CastLike(op.Constant(value_float=0.0), A_),
                        op.Concat(op.Shape(u, start=0, end=1), op.Constant(value_ints=[d, n]),
                                  axis=0)),  # h0 = 0 (b, d, n)
              A_]
    prefix = f'mmssm_scan{next(_COUNTER)}'
    body = _Body(prefix, wd)
    h = body.input('h', [None, d, n])
    A_in = body.input('A', [d, n])
    const_in = {}
    for name, X in (('B', B), ('C', C)):  # constants ride along as loop-carried values
        if _rank(X) == 2:
            states.append(cast(X))
            const_in[name] = body.input(name, [d, n])
    dt_t = body.input('dt', [None, d])
    dtu_t = body.input('dtu', [None, d])
    step_in = {}
    for name, X in (('B', B), ('C', C)):
        if _rank(X) == 4:  # (b, g, n, l) -> (l, b, g, n)
            scan_inputs.append(op.Transpose(cast(X), perm=[3, 0, 1, 2]))
            step_in[name] = (body.input(name, [None, X.shape[1], n]), _static(X, 1, 'groups'))
    # one step: h = exp(dt A) h + (dt u) B ; y = sum_n h C
    dA = body.op('Exp', body.op('Mul', body.op('Unsqueeze', dt_t, body.const([2])), A_in))
    if 'B' in const_in:
        bu = body.op('Mul', body.op('Unsqueeze', dtu_t, body.const([2])), const_in['B'])
    else:
        bu = _bc_step(body, step_in['B'][0], dtu_t, d, n, step_in['B'][1])
    h_new = body.op('Add', body.op('Mul', dA, h), bu)
    if 'C' in const_in:
        hc = body.op('Mul', h_new, const_in['C'])
    else:
        hc = _bc_step(body, step_in['C'][0], h_new, d, n, step_in['C'][1])
    y_t = body.op('ReduceSum', hc, body.const([2]), keepdims=0)  # (b, d)
    pass_through = [body.op('Identity', v) for v in [A_in] + list(const_in.values())]
    graph = body.graph([h_new] + pass_through + [y_t])
    n_states = len(states)
    outs = _call_op('Scan', *states, *scan_inputs, num_outputs=n_states + 1, body=graph,
                    num_scan_inputs=len(scan_inputs),
                    scan_input_directions=[int(reverse)] * len(scan_inputs),
                    scan_output_directions=[int(reverse)])
    last, y = outs[0], op.Transpose(outs[-1], perm=[1, 2, 0])  # (b, d, l)
    if D is not None:
        y = op.Add(y, op.Mul(uu, op.Unsqueeze(cast(D), op.Constant(value_ints=[1]))))
    if z is not None:
        zz = cast(z)
        y = op.Mul(y, op.Mul(zz, op.Sigmoid(zz)))
    out = op.Cast(y, to=out_dtype)
    empty = op.ConstantOfShape(op.Constant(value_ints=[0]),
                               value=ir.tensor(np.zeros(1, dtype=np.float64 if wd == DOUBLE
                                                        else np.float32)))
    return out, last, empty


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` covering mmssm's ops."""
    import torch

    from mmssm.ops import selective_scan_cpp  # noqa: F401  (registers the op)
    return {torch.ops.mmssm.selective_scan_fwd.default: selective_scan_fwd}
