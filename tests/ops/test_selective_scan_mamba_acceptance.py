"""The peer's acceptance test, on CPU: state-spaces/mamba ``tests/ops/test_selective_scan.py``
(``test_selective_scan``), re-written for our op (not copied).

Same parametrisation: weights fp32; inputs fp32 / fp16 / bf16; seqlen 128 ... 4096;
B and C input-dependent with 1 or 2 groups; D, z, delta_bias, softplus and the last
state on; batch 2, dim 4, dstate 8; A = -0.5 U(0, 1), delta = 0.5 U(0, 1),
delta_bias = 0.5 U(0, 1). Same tolerances: out / state rtol, atol = (6e-4, 2e-3) fp32,
(3e-3, 5e-3) fp16, (3e-2, 5e-2) bf16; the gradients with mamba's own gradient
tolerances (rtol x2 / atol x2 for du, x5 / x10 for ddelta, rtolw / 5 atolw for dA, ...;
the peer's current file only prints the gradient differences, we assert them).

Adapted for CPU: the device is the CPU and the kernel under test is our public
``selective_scan`` (the compiled kernel when built, else the chunked scan behind
the same op); the reference is our ``selective_scan_ref`` (fp32 math like the peer's,
output cast to the input dtype). seqlen >= 1024 runs in the slow tier.
"""
import pytest
import torch

from mmssm.ops import selective_scan, selective_scan_ref

SEQLENS = [128, 256, 512] + [pytest.param(s, marks=pytest.mark.slow) for s in (1024, 2048, 4096)]


@pytest.mark.parametrize('itype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('seqlen', SEQLENS)
@pytest.mark.parametrize('varBC_groups', [1, 2])
def test_selective_scan_mamba_acceptance(varBC_groups, seqlen, itype):
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-3, 5e-3)
    if itype == torch.bfloat16:
        rtol, atol = 3e-2, 5e-2
    rtolw, atolw = max(1e-3, rtol), max(1e-3, atol)  # with z: weights use the larger ones
    torch.random.manual_seed(0)
    batch, dim, dstate = 2, 4, 8
    bc_shape = ((batch, dstate, seqlen) if varBC_groups == 1
                else (batch, varBC_groups, dstate, seqlen))
    inp = dict(
        u=torch.randn(batch, dim, seqlen, dtype=itype),
        delta=0.5 * torch.rand(batch, dim, seqlen, dtype=itype),
        A=-0.5 * torch.rand(dim, dstate),
        B=torch.randn(*bc_shape, dtype=itype), C=torch.randn(*bc_shape, dtype=itype),
        D=torch.randn(dim), z=torch.randn(batch, dim, seqlen, dtype=itype),
        delta_bias=0.5 * torch.rand(dim))
    mine = {k: v.clone().requires_grad_() for k, v in inp.items()}
    ref = {k: v.clone().requires_grad_() for k, v in inp.items()}
    out, state = selective_scan(**mine, delta_softplus=True, return_last_state=True)
    out_ref, state_ref = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True)
    assert out.dtype == itype
    assert torch.allclose(out, out_ref, rtol=rtol, atol=atol)
    assert torch.allclose(state, state_ref, rtol=rtol, atol=atol)

    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    tols = dict(u=(rtol * 2, atol * 2), delta=(rtol * 5, atol * 10), A=(rtolw, atolw * 5),
                B=(rtol, atol), C=(rtol, atol), D=(rtolw, atolw), z=(rtolw, atolw),
                delta_bias=(rtolw, atolw))
    for k, (rt, at) in tols.items():
        got, want = mine[k].grad, ref[k].grad.to(mine[k].grad.dtype)
        assert torch.allclose(got, want, rtol=rt, atol=at), (
            f'd{k}: max diff {(got.float() - want.float()).abs().max().item():.3g}')
