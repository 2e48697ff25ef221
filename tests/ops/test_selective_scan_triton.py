"""Triton scan kernels (fwd + bwd) in interpreter mode on tiny CPU shapes.

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
            'fp16', 'bf16_chunks', 'nan_propagates', 'noncontiguous']

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
