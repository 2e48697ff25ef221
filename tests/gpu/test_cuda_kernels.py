"""The Triton scan and scan-order kernels on a real CUDA device against the references.

Skipped without CUDA (CI is CPU-only; the CPU test tier runs the same kernels under the Triton
interpreter, tests/ops/test_selective_scan_triton.py). `make gpu-check` (tools/gpu_check.py)
runs this module on a GPU: every scan flag combination for every input layout in fp32, and in
fp16/bf16 on a subset, output, last state and all input gradients vs the float64 reference.
"""
import itertools
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA device (run `make gpu-check` on a GPU)')

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'ops'))
from scan_cases import CASES, compare, make_inputs, run_with_grads  # noqa: E402

from mmssm.ops import selective_scan, selective_scan_ref  # noqa: E402
from mmssm.ops.scan_order import cross_merge, cross_scan  # noqa: E402

FLAGS = [dict(delta_softplus=sp, reverse=rev, return_last_state=last)
         for sp, rev, last in itertools.product((False, True), repeat=3)]
FLAG_IDS = ['sp{:d}_rev{:d}_last{:d}'.format(*f.values()) for f in FLAGS]
# relative to the largest reference magnitude (scan_cases.assert_close); half-precision inputs
# are rounded before the fp32 scan, so their error is the input rounding carried through.
TOL = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
LARGE = [dict(b=2, d=96, l=600, n=16, gB=1, gC=1),  # several L chunks, several D tiles
         dict(b=2, d=64, l=3136, n=1, gB=4, gC=4, D=False, z=False)]  # VMamba stage-1 like


def to_cuda(inp):
    return {k: (None if v is None else v.cuda()) for k, v in inp.items()}


def ref64(inp, flags):
    inp64 = {k: (None if v is None else v.detach().cpu().double()) for k, v in inp.items()}
    return run_with_grads(selective_scan_ref, inp64, **flags)


def check(cfg, flags, dtype):
    inp = to_cuda(make_inputs(**cfg, dtype=dtype))
    got = run_with_grads(selective_scan, inp, backend='triton', **flags)
    assert got[0].is_cuda and got[0].dtype == dtype
    for name, grad in got[2].items():
        assert grad.dtype == inp[name].dtype, name
    got = (got[0].cpu(), None if got[1] is None else got[1].cpu(),
           {k: v.cpu() for k, v in got[2].items()})
    compare(got, ref64(inp, flags), TOL[dtype], f'{cfg} {flags} {dtype}')


@pytest.mark.parametrize('flags', FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize('case', range(len(CASES)))
def test_triton_scan_fp32_every_flag_and_layout(case, flags):
    check(CASES[case], flags, torch.float32)


# delta_softplus=False on these inputs (negative delta) makes the state grow past fp16's range;
# every model runs the scan with softplus.
@pytest.mark.parametrize('flags', FLAGS[4:], ids=FLAG_IDS[4:])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('case', [0, 4, 5])  # grouped, constant B (V2M pass 2), constant C
def test_triton_scan_half_inputs(case, dtype, flags):
    check(CASES[case], flags, dtype)


@pytest.mark.parametrize('cfg', LARGE, ids=['chunks_tiles', 'vmamba_s1'])
@pytest.mark.parametrize('rev', [False, True])
def test_triton_scan_long_sequences(cfg, rev):
    check(cfg, dict(delta_softplus=True, reverse=rev, return_last_state=True), torch.float32)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_triton_scan_fp32_output_from_half_inputs(dtype):
    inp = to_cuda(make_inputs(**CASES[0], dtype=dtype))
    out = selective_scan(**inp, backend='triton', out_fp32=True, delta_softplus=True)
    want = selective_scan(**{k: (None if v is None else v.cpu()) for k, v in inp.items()},
                          backend='cpu', out_fp32=True, delta_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('h,w', [(3, 5), (4, 4), (1, 7), (6, 1), (56, 56), (14, 20)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_triton_cross_scan_and_merge_match_torch(h, w, dtype):
    """Forward and backward of the Triton scan-order kernels vs the PyTorch path in fp32.

    A permutation is exact; a merge sums four directions, which the kernel does in fp32 and
    rounds once, so half precision is compared to the fp32 result within one rounding.
    """
    x = torch.randn(2, 24, h, w, device='cuda').to(dtype)
    y = torch.randn(2, 4, 24, h * w, device='cuda').to(dtype)
    res = {}
    for backend, cast in (('triton', dtype), ('torch', torch.float32)):
        xi = x.to(cast, copy=True).requires_grad_(True)
        yi = y.to(cast, copy=True).requires_grad_(True)
        scanned, merged = cross_scan(xi, backend=backend), cross_merge(yi, h, w, backend=backend)
        assert scanned.dtype == merged.dtype == cast
        (scanned.float().square().sum() + merged.float().square().sum()).backward()
        res[backend] = [t.detach().float() for t in (scanned, merged, xi.grad, yi.grad)]
    tol = {torch.float32: dict(rtol=0, atol=0), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]
    for name, got, want in zip(('scan', 'merge', 'grad x', 'grad y'), res['triton'],
                               res['torch']):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f'{name}: {m}')
