"""The compiled CPU scan (mmssm/ops/csrc) and the custom ops around it.

- the extension, when built, is what CPU tensors get (a broken build must not
  hide behind the chunked fallback);
- every dtype / layout / flag against the float64 reference, chunk boundaries,
  strided inputs, l = 0 and 1, float64 gradcheck of the kernel itself, every
  built SIMD level, deterministic gradients;
- the op exists whether or not the extension is built; torch.compile and
  torch.export see one op per scan.
"""
import os

import pytest
import torch
from scan_cases import NAMES, compare, make_inputs, run_with_grads, simd_namespaces

from mmssm.ops import selective_scan, selective_scan_cpp, selective_scan_ref
from mmssm.ops.selective_scan import resolve_backend

needs_ext = pytest.mark.skipif(not selective_scan_cpp.available(),
                               reason='compiled scan not built (python setup.py build_ext '
                                      '--inplace)')


def ref64(inp, **kw):
    inp64 = {k: (None if v is None else v.double()) for k, v in inp.items()}
    kw = {k: v for k, v in kw.items() if k not in ('backend', 'out_fp32')}
    return run_with_grads(selective_scan_ref, inp64, **kw)


def test_built_extension_is_what_cpu_tensors_get(monkeypatch):
    """Fails when the .so files exist (or CI sets MMSSM_REQUIRE_EXT=1) but CPU
    tensors do not reach the compiled kernel."""
    built = selective_scan_cpp.built_levels()
    if not built and os.environ.get('MMSSM_REQUIRE_EXT', '0') != '1':
        pytest.skip('extension not built and MMSSM_REQUIRE_EXT is not 1')
    assert 'default' in built, f'baseline build missing; found {built}'
    assert selective_scan_cpp.available(), (
        f'extension files {built} exist but none loaded: {selective_scan_cpp.BUILD_HINT}')
    monkeypatch.delenv('MMSSM_SCAN_BACKEND', raising=False)
    inp = make_inputs(b=1, d=4, l=9, n=2)
    assert resolve_backend(inp['u']) == 'cpp'
    ns = f'mmssm_scan_{selective_scan_cpp.LEVEL}::fwd'
    # with a gradient: the public custom op, which calls the compiled kernel
    x = {k: (v.requires_grad_() if k == 'u' else v) for k, v in inp.items()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        selective_scan(**x, delta_softplus=True)
    names = {e.name for e in prof.events()}
    assert 'mmssm::selective_scan_fwd' in names and ns in names, sorted(names)
    # plain inference: the compiled kernel directly (no custom-op overhead), same result
    with torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = selective_scan(**inp, delta_softplus=True)
    names = {e.name for e in prof.events()}
    assert 'mmssm::selective_scan_fwd' not in names and ns in names, sorted(names)
    ref, _, _ = torch.ops.mmssm.selective_scan_fwd(
        inp['u'], inp['delta'], inp['A'], inp['B'].unsqueeze(1) if inp['B'].dim() == 3
        else inp['B'], inp['C'].unsqueeze(1) if inp['C'].dim() == 3 else inp['C'], inp['D'],
        inp['z'], inp['delta_bias'], True, False, False, False)
    assert torch.equal(out, ref)


def test_direct_kernel_only_for_plain_eager():
    """The custom op stays visible to jit tracing (FLOP counter) and dispatch modes."""
    if not selective_scan_cpp.available():
        pytest.skip('extension not built')
    u = torch.zeros(1, 2, 3)
    assert selective_scan_cpp.direct_kernel(u) is not None
    assert selective_scan_cpp.direct_kernel(torch.zeros(1, 2, 0)) is None
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):
        assert selective_scan_cpp.direct_kernel(u) is None
    seen = []

    def probe(x):
        seen.append(selective_scan_cpp.direct_kernel(x))
        return x * 1
    torch.jit.trace(probe, (u,), check_trace=False)
    assert seen == [None]


def test_op_always_registered():
    assert hasattr(torch.ops.mmssm, 'selective_scan_fwd')
    assert hasattr(torch.ops.mmssm, 'selective_scan_bwd')
    inp = make_inputs(b=2, d=4, l=9, n=3, gB=2, gC=None)
    out, last, states = torch.ops.mmssm.selective_scan_fwd(
        inp['u'], inp['delta'], inp['A'], inp['B'], inp['C'], inp['D'], inp['z'],
        inp['delta_bias'], True, False, False, False)
    assert states.numel() == 0
    rout, rlast = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, rlast, rtol=1e-5, atol=1e-5)


LAYOUTS = [
    dict(b=1, d=20, l=150, n=16, gB=1, gC=1),      # Vim-like, 3 chunks, d not a multiple of 8
    dict(b=1, d=24, l=130, n=1, gB=4, gC=4),       # VMamba-like (n = 1, 4 groups)
    dict(b=2, d=12, l=65, n=5, gB=None, gC=3),     # V2M pass 2: constant B
    dict(b=2, d=12, l=64, n=5, gB=2, gC=None, z=False, bias=False),  # constant C
    dict(b=1, d=6, l=70, n=3, gB=None, gC=None, D=False),
    dict(b=2, d=12, l=33, n=4, gB=2, gC=3),        # blocks split by both groupings
    dict(b=2, d=4, l=7, n=4, gB=1, gC=1, squeeze_g=True),  # (b, n, l) operands
    dict(b=1, d=3, l=1, n=2, gB=1, gC=1),          # l = 1
]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@needs_ext
@pytest.mark.parametrize('layout', range(len(LAYOUTS)))
@pytest.mark.parametrize('dtype', list(TOL))
@pytest.mark.parametrize('reverse', [False, True])
def test_layouts_dtypes_against_reference(layout, dtype, reverse):
    inp = make_inputs(dtype=dtype, seed=layout, **LAYOUTS[layout])
    kw = dict(delta_softplus=True, return_last_state=True, reverse=reverse)
    got = run_with_grads(selective_scan, inp, backend='cpp', **kw)
    assert got[0].dtype == dtype and got[1].dtype == (torch.float64 if dtype == torch.float64
                                                      else torch.float32)
    assert all(got[2][k].dtype == inp[k].dtype for k in got[2])
    compare(got, ref64(inp, **kw), TOL[dtype], f'{LAYOUTS[layout]} {dtype} reverse={reverse}')


@needs_ext
@pytest.mark.parametrize('flags', [dict(), dict(delta_softplus=True), dict(out_fp32=True),
                                   dict(delta_softplus=True, out_fp32=True, reverse=True)])
@pytest.mark.parametrize('parts', [(True, True, True), (False, False, False),
                                   (True, False, True), (False, True, False)])
def test_flags(flags, parts):
    D, z, bias = parts
    inp = make_inputs(b=2, d=8, l=70, n=4, gB=2, gC=1, D=D, z=z, bias=bias,
                      dtype=torch.bfloat16)
    if not flags.get('delta_softplus'):  # a positive step without softplus (a stable scan)
        inp['delta'] = torch.nn.functional.softplus(inp['delta'].float()).bfloat16()
    got = run_with_grads(selective_scan, inp, backend='cpp', **flags)
    want_dtype = torch.float32 if flags.get('out_fp32') else torch.bfloat16
    assert got[0].dtype == want_dtype
    compare(got, ref64(inp, **flags), 3e-2, f'{flags} {parts}')
    if flags.get('out_fp32'):  # the fp32 result itself, not a rounded one
        torch.testing.assert_close(got[0].double(), ref64(inp, **flags)[0], rtol=1e-4,
                                   atol=1e-4)


@needs_ext
def test_strided_inputs():
    """Non-contiguous u / delta / z (time stride 2, channel-last) and B/C views."""
    base = make_inputs(b=2, d=8, l=67, n=4, gB=2, gC=2)
    x = {}
    for k, v in base.items():
        if v is None or v.dim() < 3:
            x[k] = v
        elif k in ('u', 'z'):
            x[k] = torch.stack([v, torch.full_like(v, 7.0)], -1).flatten(-2)[..., ::2]
        else:
            x[k] = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not x['u'].is_contiguous() and not x['B'].is_contiguous()
    got = run_with_grads(selective_scan, x, backend='cpp', delta_softplus=True, reverse=True)
    compare(got, ref64(base, delta_softplus=True, reverse=True), 2e-5, 'strided')


@needs_ext
def test_zero_length_and_chunk_edges():
    inp = make_inputs(b=2, d=4, l=0, n=3, gB=2, gC=2)
    x = {k: (None if v is None else v.requires_grad_()) for k, v in inp.items()}
    out, last = selective_scan(**x, return_last_state=True, backend='cpp')
    assert out.shape == (2, 4, 0) and last.shape == (2, 4, 3) and (last == 0).all()
    for l in (63, 64, 65, 128, 129):  # around the 64-step chunk of the saved states
        inp = make_inputs(b=1, d=5, l=l, n=2, gB=1, gC=1, seed=l)
        kw = dict(delta_softplus=True, return_last_state=True)
        compare(run_with_grads(selective_scan, inp, backend='cpp', **kw), ref64(inp, **kw),
                2e-5, f'l={l}')


@needs_ext
@pytest.mark.parametrize('cfg,reverse', [(dict(gB=1, gC=1, l=70), False),
                                         (dict(gB=2, gC=None, l=9), True),
                                         (dict(gB=None, gC=2, l=9), False),
                                         (dict(gB=None, gC=None, l=5), True)])
def test_gradcheck_compiled_kernel(cfg, reverse):
    """float64 gradcheck of the C++ forward/backward (incl. the last state)."""
    inp = make_inputs(b=2 if cfg['l'] < 20 else 1, d=4, n=2, dtype=torch.float64, **cfg)
    names = [k for k in NAMES if inp[k] is not None]
    x = [inp[k].requires_grad_() for k in names]

    def fn(*args):
        return selective_scan(**dict(zip(names, args)), delta_softplus=True, reverse=reverse,
                              return_last_state=True, backend='cpp')

    assert torch.autograd.gradcheck(fn, x, eps=1e-6, atol=1e-7, rtol=1e-6)


@needs_ext
def test_gradients_are_deterministic():
    """dB/dC are reduced per group in a fixed order: identical bits run to run."""
    inp = make_inputs(b=3, d=64, l=150, n=8, gB=2, gC=1)
    first = run_with_grads(selective_scan, inp, backend='cpp', delta_softplus=True)[2]
    for _ in range(2):
        again = run_with_grads(selective_scan, inp, backend='cpp', delta_softplus=True)[2]
        for k in first:
            assert torch.equal(first[k], again[k]), k


@needs_ext
def test_every_built_simd_level():
    """Each SIMD build the CPU can run gives the reference result (they are
    separate compilations of one source)."""
    inp = make_inputs(b=2, d=20, l=70, n=5, gB=2, gC=None)
    rout, rlast = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True)
    tested = []
    for level, ns in simd_namespaces():
        Bk = inp['B']
        out, last, states = ns.fwd(inp['u'], inp['delta'], inp['A'], Bk, inp['C'], inp['D'],
                                   inp['z'], inp['delta_bias'], True, False, False, True)
        torch.testing.assert_close(out, rout, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(last, rlast, rtol=2e-5, atol=2e-5)
        assert states.shape == (2, 20, 2, 5) and ns.capability() != ''
        grads = ns.bwd(torch.ones_like(out), None, inp['u'], inp['delta'], inp['A'], Bk,
                       inp['C'], inp['D'], inp['z'], inp['delta_bias'], states, True, False)
        assert all(torch.isfinite(g).all() for g in grads)
        # l = 0 straight into the kernel (the op's Python side routes it elsewhere)
        e = make_inputs(b=2, d=4, l=0, n=3, gB=2, gC=None)
        out, last, states = ns.fwd(e['u'], e['delta'], e['A'], e['B'], e['C'], e['D'], e['z'],
                                   e['delta_bias'], True, False, False, True)
        assert out.shape == (2, 4, 0) and (last == 0).all() and states.shape == (2, 4, 0, 3)
        grads = ns.bwd(out, None, e['u'], e['delta'], e['A'], e['B'], e['C'], e['D'], e['z'],
                       e['delta_bias'], states, True, False)
        assert grads[3].shape == (2, 2, 3, 0) and (grads[4] == 0).all()
        tested.append(level)
    assert tested and 'default' in tested


@needs_ext
def test_backend_cpp_errors(monkeypatch):
    monkeypatch.setattr(selective_scan_cpp, '_EXT', None)
    with pytest.raises(RuntimeError, match='not built.*build_ext --inplace'):
        resolve_backend(torch.zeros(1, 2, 3), 'cpp')


def test_backward_needs_saved_states():
    inp = make_inputs(b=1, d=4, l=9, n=2)
    x = {k: (None if v is None else v.requires_grad_()) for k, v in inp.items()}
    out, _, _ = torch.ops.mmssm.selective_scan_fwd(
        x['u'], x['delta'], x['A'], x['B'], x['C'], x['D'], x['z'], x['delta_bias'], True,
        False, False, False)
    with pytest.raises(RuntimeError, match='save_states=False'):
        out.sum().backward()


class _TinyScan(torch.nn.Module):
    """A projection, one scan and a gate: the shape of a Mamba mixer."""

    def __init__(self, d=6, n=3):
        super().__init__()
        self.proj = torch.nn.Linear(d, 2 * n + d)
        self.A_log = torch.nn.Parameter(torch.zeros(d, n))
        self.n = n

    def forward(self, u):  # (b, d, l)
        dbc = self.proj(u.transpose(1, 2)).transpose(1, 2)
        dt, B, C = dbc.split([u.shape[1], self.n, self.n], dim=1)
        return selective_scan(u, dt, -torch.exp(self.A_log), B, C, delta_softplus=True)


def _scan_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == 'call_function' and 'selective_scan' in str(n.target)]


def test_export_sees_one_op():
    m, u = _TinyScan(), torch.randn(2, 6, 11)
    ep = torch.export.export(m, (u,))
    nodes = _scan_nodes(ep.graph_module)
    assert len(nodes) == 1 and nodes[0].target == torch.ops.mmssm.selective_scan_fwd.default
    torch.testing.assert_close(ep.module()(u), m(u))


def test_compile_sees_one_op():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m, u = _TinyScan(), torch.randn(2, 6, 11)
    with torch.no_grad():
        out = torch.compile(m, backend=backend, fullgraph=True)(u)
    torch.testing.assert_close(out, m(u))
    assert sum(len(_scan_nodes(g)) for g in graphs) == 1


def _token_major(shape_bld, layout, seed):
    """A (b, d, l) view of a token-major tensor: 'rows' (b, l, d) memory (V2M's row
    passes), 'cols' (l, b, d) memory (its column passes: time steps b d apart)."""
    b, d, l = shape_bld
    g = torch.Generator().manual_seed(seed)
    if layout == 'rows':
        return torch.randn(b, l, d, generator=g).transpose(1, 2)
    return torch.randn(l, b, d, generator=g).permute(1, 2, 0)


@needs_ext
@pytest.mark.parametrize('layout', ['rows', 'cols'])
@pytest.mark.parametrize('b,d,l', [(1, 33, 70), (3, 20, 9)])
@pytest.mark.parametrize('varying', ['B', 'C'])
@pytest.mark.parametrize('gate', [False, True])
@pytest.mark.parametrize('reverse', [False, True])
def test_one_pass_n1_token_major(layout, b, d, l, varying, gate, reverse, monkeypatch):
    """V2M's scans: n = 1, u / delta / z lane-contiguous views of tokens, B or C
    input-dependent and the other constant ones. Full channel blocks take the one-pass
    loop, the last (partial) block and MMSSM_SCAN_TILED_ONLY=1 the tiled path: outputs,
    last and chunk states bit-identical between the two, close to the float64
    reference, and the output laid out like u (token-major)."""
    u = _token_major((b, d, l), layout, 0)
    delta = _token_major((b, d, l), layout, 1) * 0.5
    z = _token_major((b, d, l), layout, 2) if gate else None
    torch.manual_seed(3)
    A = -torch.rand(d, 1) * 2 - 0.1
    var, ones = torch.randn(b, 1, 1, l), torch.ones(d, 1)
    B, C = (var, ones) if varying == 'B' else (ones, var)
    D, bias = torch.randn(d), torch.randn(d) * 0.1
    args = (u, delta, A, B, C, D, z, bias, True, False, reverse, True)
    ext = selective_scan_cpp._EXT
    monkeypatch.setenv('MMSSM_SCAN_TILED_ONLY', '0')
    one_pass = ext.fwd(*args)
    monkeypatch.setenv('MMSSM_SCAN_TILED_ONLY', '1')
    tiled = ext.fwd(*args)
    for got, want in zip(one_pass, tiled):
        assert torch.equal(got, want)
    out = one_pass[0]
    assert out.stride() == u.stride(), (out.stride(), u.stride())
    ref = selective_scan_ref(u.double(), delta.double(), A.double(), B.squeeze(1).double()
                             if B.dim() == 4 else B.double(),
                             C.squeeze(1).double() if C.dim() == 4 else C.double(), D.double(),
                             None if z is None else z.double(), bias.double(),
                             delta_softplus=True, reverse=reverse)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


@needs_ext
def test_token_major_output_gradients_and_layout():
    """Through the public op with autograd: a token-major u gives a token-major output
    (the fake kernel agrees), and the gradients match the contiguous-input run."""
    b, d, l = 2, 24, 11
    u0 = _token_major((b, d, l), 'rows', 0)
    dl0 = _token_major((b, d, l), 'rows', 1) * 0.5
    A = -torch.rand(d, 1) - 0.1
    Bv, C1, D = torch.randn(b, 1, l), torch.ones(d, 1), torch.randn(d)
    outs, grads = [], []
    for make in (lambda t: t, lambda t: t.contiguous()):
        u = make(u0.clone()).requires_grad_(True)
        dl = make(dl0.clone()).requires_grad_(True)
        y = selective_scan(u, dl, A, Bv, C1, D, delta_softplus=True, backend='cpp')
        outs.append(y)
        y.square().sum().backward()
        grads.append((u.grad, dl.grad))
    assert outs[0].stride() == u0.stride() and outs[1].is_contiguous()
    assert torch.equal(outs[0], outs[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-6)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.mmssm.selective_scan_fwd(mode.from_tensor(u0), mode.from_tensor(dl0),
                                                  A, Bv.unsqueeze(1), C1, D, None, None, True,
                                                  False, False, False)[0]
    assert fake.stride() == u0.stride()


def _accumulate_operands(b, d, l, n, gB, gC, layout, seed, dtype=torch.float32):
    """Scan operands with u / delta / z laid out as 'contig' (b, d, l), 'tokens' (views of
    (b, l, d) memory: Vim's and V2M's passes) or 'strided' (time stride 2)."""
    inp = make_inputs(b=b, d=d, l=l, n=n, gB=gB, gC=gC, seed=seed, dtype=dtype)
    for k in ('u', 'delta', 'z'):
        v = inp[k]
        if layout == 'tokens':
            inp[k] = v.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == 'strided':
            inp[k] = torch.stack([v, torch.full_like(v, 9.0)], -1).flatten(-2)[..., ::2]
    return inp


def _fresh_out(u, layout, seed):
    """A (b, d, l) output buffer with prior values, in the given layout."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(u.shape, generator=g, dtype=torch.float64).to(u.dtype)
    if layout == 'tokens':
        return base.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == 'strided':
        return torch.stack([base, torch.zeros_like(base)], -1).flatten(-2)[..., ::2]
    return base


@needs_ext
@pytest.mark.parametrize('layout', ['contig', 'tokens', 'strided'])
@pytest.mark.parametrize('b,d,l,n,gB,gC', [
    (2, 20, 67, 4, 2, 1),       # odd length over a 64-step tile, partial channel blocks
    (1, 32, 9, 16, 1, 1),       # Vim's n = 16, full blocks
    (2, 33, 70, 1, 1, None),    # n = 1: the one-pass loop on full token-major blocks
    (1, 16, 1, 3, None, 4),     # l = 1, groups of C
])
@pytest.mark.parametrize('reverse', [False, True])
def test_scan_into_out_and_accumulate(layout, b, d, l, n, gB, gC, reverse, monkeypatch):
    """out= / accumulate=True of the eager inference path (the kernel stores into out)
    against the float64 reference: out = scan, out = prior + scan, at the right token
    positions in both directions, any out layout; bit-identical to the allocating scan
    (+ an fp32 add), also on the tiled path (MMSSM_SCAN_TILED_ONLY=1); the last state
    too."""
    inp = _accumulate_operands(b, d, l, n, gB, gC, layout, seed=l + n)
    kw = dict(delta_softplus=True, reverse=reverse, return_last_state=True)
    ref, ref_last = selective_scan_ref(**{k: (None if v is None else v.double())
                                          for k, v in inp.items()}, **kw)
    with torch.no_grad():
        plain, plain_last = selective_scan(**inp, **kw)
        for tiled in ('0', '1'):
            monkeypatch.setenv('MMSSM_SCAN_TILED_ONLY', tiled)
            out = _fresh_out(inp['u'], layout, seed=5)
            ptr = out.data_ptr()
            res, last = selective_scan(**inp, **kw, out=out)
            assert res is out and out.data_ptr() == ptr
            assert torch.equal(out, plain) and torch.equal(last, plain_last)
            prior = _fresh_out(inp['u'], layout, seed=6)
            acc = prior.clone()
            res, last = selective_scan(**inp, **kw, out=acc, accumulate=True)
            assert res is acc and torch.equal(acc, prior + plain)
            torch.testing.assert_close(acc.double(), prior.double() + ref, rtol=2e-5,
                                       atol=2e-5)
            torch.testing.assert_close(last.double(), ref_last, rtol=2e-5, atol=2e-5)


@needs_ext
@pytest.mark.parametrize('n', [1, 16])
@pytest.mark.parametrize('alias', ['u', 'delta', 'z'])
def test_scan_into_its_own_input(n, alias):
    """out may be u, delta or z itself (every step reads its inputs before its output
    is stored): the result equals the allocating scan bit for bit, and a backward
    direction accumulated into it gives forward + backward (Vim's in-place mixer)."""
    b, d, l = 1, 32, 75
    inp = _accumulate_operands(b, d, l, n, 1, 1, 'tokens', seed=n)
    if n == 1:  # V2M-like: constant C
        inp['C'] = torch.ones(d, 1)
    kw = dict(delta_softplus=True)
    with torch.no_grad():
        fwd = selective_scan(**inp, **kw)
        inp2 = {k: (v.clone() if k == alias else v) for k, v in inp.items()}
        res = selective_scan(**inp2, **kw, out=inp2[alias])
        assert res is inp2[alias] and torch.equal(res, fwd)
        bwd = selective_scan(**inp, **kw, reverse=True)
        res = selective_scan(**inp, **kw, reverse=True, out=res, accumulate=True)
        assert torch.equal(res, fwd + bwd)


@needs_ext
@pytest.mark.parametrize('dtype,out_fp32', [(torch.bfloat16, False), (torch.bfloat16, True),
                                            (torch.float64, False)])
def test_scan_into_out_dtypes(dtype, out_fp32):
    """bf16 out (added in fp32, rounded once), fp32 out of a bf16 scan (out_fp32) and
    fp64: the reference within the dtype's tolerance; mixed activation dtypes (autocast)
    go through a temporary and agree too."""
    inp = make_inputs(b=2, d=12, l=37, n=4, gB=2, gC=1, dtype=dtype, seed=2)
    ref = selective_scan_ref(**{k: (None if v is None else v.double())
                                for k, v in inp.items()}, delta_softplus=True)
    want = torch.float32 if out_fp32 else dtype
    tol = 1e-11 if dtype == torch.float64 else (1e-4 if out_fp32 else 3e-2)
    prior = torch.randn(2, 12, 37, dtype=torch.float64).to(want)
    with torch.no_grad():
        acc = prior.clone()
        selective_scan(**inp, delta_softplus=True, out_fp32=out_fp32, out=acc, accumulate=True)
        torch.testing.assert_close(acc.double(), prior.double() + ref, rtol=tol, atol=tol)
        if dtype == torch.bfloat16:  # delta in fp32: activations mixed
            mixed = dict(inp, delta=inp['delta'].float())
            acc = prior.clone()
            selective_scan(**mixed, delta_softplus=True, out_fp32=out_fp32, out=acc,
                           accumulate=True)
            torch.testing.assert_close(acc.double(), prior.double() + ref, rtol=tol, atol=tol)


def test_scan_into_out_with_autograd_and_other_backends():
    """With autograd (custom op, then out.add_) and on the reference / chunked backends
    out= and accumulate= give out + scan, and gradients flow through both terms."""
    inp = make_inputs(b=2, d=8, l=21, n=4, gB=1, gC=2, seed=4)
    kw = dict(delta_softplus=True, reverse=True)
    want = selective_scan_ref(**inp, **kw)
    backends = ['ref', 'cpu'] + (['cpp'] if selective_scan_cpp.available() else [])
    for backend in backends:
        u = inp['u'].clone().requires_grad_()
        prior = torch.randn(2, 8, 21, requires_grad=True)
        acc = prior * 1.0  # a non-leaf that autograd tracks
        res = selective_scan(**dict(inp, u=u), **kw, backend=backend, out=acc, accumulate=True)
        assert res is acc
        torch.testing.assert_close(res, prior.detach() + want, rtol=2e-5, atol=2e-5)
        res.sum().backward()
        assert torch.equal(prior.grad, torch.ones_like(prior))
        u_ref = inp['u'].clone().requires_grad_()
        selective_scan_ref(**dict(inp, u=u_ref), **kw).sum().backward()
        torch.testing.assert_close(u.grad, u_ref.grad, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            out = torch.empty(2, 8, 21)
            selective_scan(**inp, **kw, backend=backend, out=out)
            torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


def test_scan_into_out_errors():
    inp = make_inputs(b=1, d=4, l=5, n=2)
    with pytest.raises(ValueError, match='accumulate=True.*out='):
        selective_scan(**inp, accumulate=True)
    with pytest.raises(ValueError, match="out must be a tensor of u's shape"):
        selective_scan(**inp, out=torch.zeros(1, 4, 6))
    with pytest.raises(TypeError, match="out must have the result's dtype torch.float32"):
        selective_scan(**inp, out=torch.zeros(1, 4, 5, dtype=torch.float64))
    if selective_scan_cpp.available():  # the private op refuses overlapping operands
        buf = torch.randn(21)
        u, out = buf[:20].view(1, 4, 5), buf[1:].view(1, 4, 5)  # shifted by one element
        args = (inp['delta'], inp['A'], inp['B'], inp['C'], inp['D'], inp['z'],
                inp['delta_bias'], True, False, False)
        with pytest.raises(RuntimeError, match='refer to a single memory location'):
            selective_scan_cpp._EXT.fwd_out(u, *args, out)
        with pytest.raises(RuntimeError, match="out must be a CPU tensor of u's shape"):
            selective_scan_cpp._EXT.fwd_out(u, *args, torch.zeros(1, 4, 4))


@needs_ext
@pytest.mark.parametrize('reverse', [False, True])
def test_scan_into_out_every_simd_level(reverse):
    """fwd_out of every SIMD build the CPU runs (AVX2 stores contiguous rows through 8 x 8
    register transposes, a path of its own): out + scan at the right positions."""
    inp = make_inputs(b=2, d=16, l=70, n=4, gB=1, gC=2, seed=7)
    ref = selective_scan_ref(**inp, delta_softplus=True, reverse=reverse)
    tested = []
    for level, ns in simd_namespaces():
        prior = torch.randn(2, 16, 70)
        for acc in (False, True):
            out = prior.clone()
            ns.fwd_out(inp['u'], inp['delta'], inp['A'], inp['B'], inp['C'], inp['D'],
                       inp['z'], inp['delta_bias'], True, reverse, acc, out)
            torch.testing.assert_close(out, prior * acc + ref, rtol=2e-5, atol=2e-5)
        tested.append(level)
    assert tested


def test_compile_and_export_with_accumulate():
    """Under torch.compile / torch.export accumulate=True is the public op plus an add
    (the op itself mutates nothing): one scan node, eager's result."""
    class TwoDirections(_TinyScan):
        def forward(self, u):
            dbc = self.proj(u.transpose(1, 2)).transpose(1, 2)
            dt, B, C = dbc.split([u.shape[1], self.n, self.n], dim=1)
            A = -torch.exp(self.A_log)
            y = selective_scan(u, dt, A, B, C, delta_softplus=True)
            return selective_scan(u, dt, A, B, C, delta_softplus=True, reverse=True, out=y,
                                  accumulate=True)

    m, u = TwoDirections(), torch.randn(2, 6, 11)
    with torch.no_grad():
        want = m(u)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        got = torch.compile(m, backend=backend, fullgraph=True)(u)
    torch.testing.assert_close(got, want)
    assert sum(len(_scan_nodes(g)) for g in graphs) == 2
    ep = torch.export.export(m, (u,))
    assert len(_scan_nodes(ep.graph_module)) == 2
    torch.testing.assert_close(ep.module()(u), want)
