"""Run the Triton scan kernels under TRITON_INTERPRET=1 and compare with the
float64 reference. Executed in a subprocess by test_selective_scan_triton.py
(TRITON_INTERPRET must be set before triton is imported). Prints one JSON
object {case_id: 'ok' | error text}."""
import json
import os
import sys
import traceback

os.environ['TRITON_INTERPRET'] = '1'
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from scan_cases import CASES, compare, make_inputs, run_with_grads  # noqa: E402

from mmssm.ops import selective_scan, selective_scan_ref  # noqa: E402
from mmssm.ops import selective_scan_triton as sst  # noqa: E402

F32 = torch.float32
# id -> (input kwargs, scan flags, max BLOCK_L or None, tolerance)
TRITON_CASES = {
    'g1_sp_last': (CASES[0], dict(delta_softplus=True, return_last_state=True), None, 2e-5),
    'L1_n16_g3': (CASES[1], dict(delta_softplus=True, reverse=True), None, 2e-5),
    'n1_g2_multichunk': (CASES[2], dict(delta_softplus=True, return_last_state=True), 8, 2e-5),
    'n16_noDz_rev_chunks': (CASES[3], dict(reverse=True, return_last_state=True), 8, 2e-5),
    'constB_v2m': (CASES[4], dict(delta_softplus=True), None, 2e-5),
    'constC_v2m_rev_chunks': (CASES[5], dict(delta_softplus=True, reverse=True,
                                             return_last_state=True), 4, 2e-5),
    'constBC': (CASES[6], dict(delta_softplus=False), None, 2e-5),
    'bnl_mixed_groups': (CASES[7], dict(delta_softplus=True), None, 2e-5),
    'n3_padded_state_8ch': (dict(b=1, d=8, l=20, n=3, gB=1, gC=1), dict(delta_softplus=True),
                            8, 2e-5),
    'fp16': (dict(b=1, d=4, l=12, n=4, gB=2, gC=2, dtype=torch.float16),
             dict(delta_softplus=True), None, 1e-2),
    'bf16_chunks': (dict(b=1, d=4, l=12, n=4, gB=1, gC=None, dtype=torch.bfloat16),
                    dict(delta_softplus=True, reverse=True), 4, 3e-2),
}


def ref64(inp, **kw):
    inp64 = {k: (None if v is None else v.double()) for k, v in inp.items()}
    return run_with_grads(selective_scan_ref, inp64, **kw)


def check(cid):
    cfg, flags, max_bl, tol = TRITON_CASES[cid]
    sst.MAX_BLOCK_L = max_bl or 256
    inp = make_inputs(**cfg)
    got = run_with_grads(selective_scan, inp, backend='triton', **flags)
    assert got[0].dtype == inp['u'].dtype, got[0].dtype
    for k, g in got[2].items():
        assert g.dtype == inp[k].dtype, (k, g.dtype)
    compare(got, ref64(inp, **flags), tol, cid)
    if inp['u'].dtype != F32:  # oflex: fp32 output from half inputs
        out32 = selective_scan(**inp, backend='triton', out_fp32=True, **flags)
        assert out32.dtype == F32
        want = selective_scan(**inp, backend='cpu', out_fp32=True, **flags)
        torch.testing.assert_close(out32, want, rtol=1e-5, atol=1e-5)


def check_nan():
    inp = make_inputs(b=1, d=2, l=12, n=2, gB=1, gC=1, z=False, D=False)
    inp['u'][0, 0, 5] = float('nan')
    out = selective_scan(**inp, backend='triton')
    assert torch.isfinite(out[0, 0, :5]).all() and torch.isnan(out[0, 0, 5:]).all()
    assert torch.isfinite(out[0, 1]).all()


def check_mixed_dtypes():
    """Autocast-style mixed inputs: bf16 u, fp32 delta/B, fp16 C."""
    inp = make_inputs(b=1, d=4, l=10, n=4, gB=2, gC=2)
    inp = dict(inp, u=inp['u'].bfloat16(), C=inp['C'].half())
    got = run_with_grads(selective_scan, inp, backend='triton', delta_softplus=True)
    assert got[0].dtype == torch.bfloat16
    for k, g in got[2].items():
        assert g.dtype == inp[k].dtype, (k, g.dtype)
    compare(got, ref64(inp, delta_softplus=True), 3e-2, 'mixed')


def check_cross_scan_merge():
    """Triton cross-scan/merge == the torch versions, values and gradients."""
    from mmssm.ops import cross_merge, cross_scan
    for (h, w), dtype in [((3, 5), F32), ((6, 1), F32), ((33, 35), F32),
                          ((4, 7), torch.bfloat16)]:
        x = torch.randn(2, 3, h, w).to(dtype)
        x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous view
        outs, grads = [], []
        for backend in ('triton', 'torch'):
            xi = x_nc.clone().requires_grad_()
            y = cross_scan(xi, backend=backend)
            yi = (y.detach().float() * 0.5).to(dtype).requires_grad_()
            m = cross_merge(yi, h, w, backend=backend)
            (y.float() * torch.arange(y.numel()).view(y.shape).float().sin()).sum().backward()
            (m.float() * torch.arange(m.numel()).view(m.shape).float().cos()).sum().backward()
            outs.append((y.detach(), m.detach()))
            grads.append((xi.grad, yi.grad))
        assert torch.equal(outs[0][0], outs[1][0]), (h, w, dtype)
        tol = 1e-6 if dtype == F32 else 1e-2
        for a, b in zip(outs[0][1:] + grads[0], outs[1][1:] + grads[1]):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def check_noncontiguous():
    inp = make_inputs(b=2, d=4, l=9, n=4, gB=2, gC=2)
    nc = {k: (None if v is None else v.transpose(0, -1).contiguous().transpose(0, -1))
          for k, v in inp.items()}
    compare(run_with_grads(selective_scan, nc, backend='triton', delta_softplus=True),
            ref64(inp, delta_softplus=True), 2e-5, 'noncontiguous')


def main(ids):
    res = {}
    extra = {'nan_propagates': check_nan, 'noncontiguous': check_noncontiguous,
             'mixed_dtypes': check_mixed_dtypes, 'cross_scan_merge': check_cross_scan_merge}
    for cid in ids:
        try:
            extra[cid]() if cid in extra else check(cid)
            res[cid] = 'ok'
        except Exception:  # report, keep going
            res[cid] = traceback.format_exc(limit=3)
    print('RESULT' + json.dumps(res))


if __name__ == '__main__':
    main(sys.argv[1:] or list(TRITON_CASES) + ['nan_propagates', 'noncontiguous',
                                               'mixed_dtypes', 'cross_scan_merge'])
