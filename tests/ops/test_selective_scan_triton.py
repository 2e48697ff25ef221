"""Triton scan kernels (fwd + bwd) and the Triton cross-scan/merge in
interpreter mode on tiny CPU shapes, plus ahead-of-time sm_90 compiles.

TRITON_INTERPRET=1 must be set before triton is imported, so the kernels run
in one subprocess (triton_interp_worker.py) and each case is reported here.
GPU timing lives in benchmarks/bench_selective_scan.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASE_IDS = ['g1_sp_last', 'L1_n16_g3', 'n1_g2_multichunk', 'n16_noDz_rev_chunks', 'constB_v2m',
            'constC_v2m_rev_chunks', 'constBC', 'bnl_mixed_groups', 'n3_padded_state_8ch',
            'fp16', 'bf16_chunks', 'nan_propagates', 'noncontiguous', 'mixed_dtypes',
            'cross_scan_merge']

triton = pytest.importorskip('triton')


@pytest.fixture(scope='module')
def interp_results():
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, str(HERE / 'triton_interp_worker.py'), *CASE_IDS],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT')]
    assert lines, f'worker failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}'
    return json.loads(lines[-1][len('RESULT'):])


@pytest.mark.parametrize('case', CASE_IDS)
def test_triton_interpreter_matches_reference(interp_results, case):
    assert interp_results.get(case) == 'ok', interp_results.get(case, 'case did not run')


def test_tile_heuristic():
    """Vision shapes: several channels per program at short L, one group per program."""
    from mmssm.ops.selective_scan_triton import tile_sizes
    bd, bl, bn = tile_sizes(384, 14, 16, 384, 384)  # V2M rows: L = 14
    assert (bl, bn) == (16, 16) and bd == 8
    bd, bl, bn = tile_sizes(384, 3136, 1, 96, 96)  # VMamba-T stage 1, g = 4
    assert bn == 1 and bl == 256 and 96 % bd == 0 and bd > 1
    bd, bl, bn = tile_sizes(6, 10, 4, 3, 6)  # odd group size: one channel per program
    assert bd == 1


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'),
                    reason='needs TRITON_INTERPRET unset')
def test_triton_backend_on_cpu_tensors_is_a_clear_error():
    from mmssm.ops import selective_scan
    u = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match='needs CUDA tensors'):
        selective_scan(u, u, -torch.ones(2, 1), torch.ones(2, 1), torch.ones(2, 1),
                       backend='triton')


SCAN_IO = ('u_ptr', 'dt_ptr', 'z_ptr', 'out_ptr', 'dout_ptr', 'du_ptr', 'ddt_ptr', 'dz_ptr',
           'B_ptr', 'C_ptr')


def _aot_compile(kernel, constexprs, io_dtype, num_warps, capability=90, io=SCAN_IO):
    """Compile a kernel to a cubin for an NVIDIA target without a GPU (the
    interpreter never runs the real code generator, so this catches what it misses)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = 'constexpr'
        elif name.endswith('_ptr'):
            sig[name] = '*' + (io_dtype if name in io else 'fp32')
        else:
            sig[name] = 'i32'
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget('cuda', capability, 32),
                          options=dict(num_warps=num_warps))


@pytest.mark.parametrize('name,shape,flags,io_dtype', [
    ('vim_t', (384, 197, 16, 384, 384), dict(B_CONST=False, C_CONST=False, HAS_Z=True), 'bf16'),
    ('vmamba_t', (384, 3136, 1, 96, 96), dict(B_CONST=False, C_CONST=False, HAS_Z=False), 'fp32'),
    ('v2m_constC_rev', (384, 14, 16, 384, 384),
     dict(B_CONST=False, C_CONST=True, HAS_Z=True, REVERSE=True), 'fp16'),
])
def test_kernels_compile_for_sm90(name, shape, flags, io_dtype):
    pytest.importorskip('triton.backends.nvidia')
    from mmssm.ops import selective_scan_triton as sst
    d, l, n, dgB, dgC = shape
    base = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, B_CONST=False,
                C_CONST=False, REVERSE=False)
    for kernel, budget in ((sst._fwd_kernel, sst.TILE_BUDGET),
                           (sst._bwd_kernel, sst.TILE_BUDGET_BWD)):
        bd, bl, bn = sst.tile_sizes(d, l, n, dgB, dgC, budget)
        consts = dict(base, **flags, BLOCK_D=bd, BLOCK_L=bl, BLOCK_N=bn)
        compiled = _aot_compile(kernel, consts, io_dtype, num_warps=8)
        assert compiled.asm.get('cubin'), f'{name}: no cubin for {kernel.fn.__name__}'


@pytest.mark.parametrize('io_dtype', ['fp32', 'bf16'])
def test_cross_scan_kernels_compile_for_sm90(io_dtype):
    pytest.importorskip('triton.backends.nvidia')
    from mmssm.ops import scan_order_triton as sot
    for kernel in (sot._cross_scan_kernel, sot._cross_merge_kernel):
        consts = dict(BLOCK_H=sot.BH, BLOCK_W=sot.BW)
        compiled = _aot_compile(kernel, consts, io_dtype, num_warps=4, io=('x_ptr', 'y_ptr'))
        assert compiled.asm.get('cubin')


def test_scan_order_triton_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    from mmssm.ops import cross_scan
    with pytest.raises(RuntimeError, match='needs CUDA tensors'):
        cross_scan(torch.zeros(1, 2, 3, 4), backend='triton')
