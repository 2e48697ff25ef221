"""Mamba pass helpers: the reverse pass equals flip -> forward pass -> flip."""
import pytest
import torch
from torch import nn

from mmssm.models.layers.mamba_mixer import BiMambaMixer, make_conv1d, make_dt_proj, ssm_pass


@pytest.mark.parametrize('varying,d_conv', [('BC', 4), ('B', 3), ('C', 0)])
def test_reverse_pass_equals_flipped_pass(varying, d_conv):
    torch.manual_seed(0)
    d, N, R, l = 6, 4, 2, 11
    k = len(varying)
    conv = make_conv1d(d, d_conv)
    x_proj = nn.Linear(d, R + k * N, bias=False)
    dt_proj = make_dt_proj(R, d)
    A_log, D = torch.randn(d, N).abs().log(), torch.randn(d)
    x = torch.randn(2, d, l, requires_grad=True)
    z = torch.randn(2, d, l, requires_grad=True)
    args = (conv, x_proj, dt_proj, A_log, D, varying)
    y = ssm_pass(x, z, *args, reverse=True)
    ref = ssm_pass(x.flip(-1), z.flip(-1), *args).flip(-1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.square().sum(), (x, z, x_proj.weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, z, x_proj.weight))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bimamba_mixer_backward_direction():
    """Vim's mixer = mean of a forward pass and a flipped pass (the official algorithm)."""
    torch.manual_seed(0)
    m = BiMambaMixer(8, d_state=4)
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        xs, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        y_f = ssm_pass(xs, z, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
        y_b = ssm_pass(xs.flip(-1), z.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b,
                       m.A_b_log, m.D_b).flip(-1)
        ref = m.out_proj(((y_f + y_b) / 2).transpose(1, 2))
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('d_conv', [4, 0])
@pytest.mark.parametrize('bias', [False, True])
def test_bimamba_gate_sum_equals_per_scan_gate(monkeypatch, d_conv, bias):
    """silu(z) (y_f + y_b) (default, z computed after the scans) against the official
    per-scan gate silu(z) y_f + silu(z) y_b: outputs (with and without grad) and every
    gradient equal to fp32 rounding; a swapped direction would not be."""
    torch.manual_seed(0)
    m = BiMambaMixer(16, d_state=4, d_conv=d_conv, bias=bias)
    x = torch.randn(2, 11, 16)

    def run(gate_sum):
        monkeypatch.setattr(BiMambaMixer, 'gate_sum', gate_sum)
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.square().sum().backward()
        with torch.no_grad():  # the in-place inference path
            y_inf = m(x)
        return y.detach(), y_inf, xg.grad, {n: p.grad for n, p in m.named_parameters()}

    y0, yi0, gx0, gp0 = run(False)
    y1, yi1, gx1, gp1 = run(True)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(yi1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert gp1.keys() == gp0.keys() and all(g is not None for g in gp1.values())
    for n in gp0:
        torch.testing.assert_close(gp1[n], gp0[n], rtol=1e-4, atol=1e-6, msg=n)
    # traced graphs keep the per-scan gate (FLOP counts, ONNX): same outputs
    traced = torch.jit.trace(m.eval(), x, check_trace=False)
    torch.testing.assert_close(traced(x), yi1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('b,l', [(1, 9), (2, 70)])
def test_bimamba_inplace_inference_equals_allocating(monkeypatch, b, l):
    """The in-place inference path (silu on the conv outputs, the forward scan into its
    own input, the backward scan added into it) gives the allocating path's output bit
    for bit, leaves the mixer input alone, and is what no_grad with convs runs."""
    torch.manual_seed(1)
    m = BiMambaMixer(16, d_state=16)  # Vim's n = 16
    x = torch.randn(b, l, 16)
    x0 = x.clone()
    calls = []
    inplace = BiMambaMixer._direction_sum_inplace
    monkeypatch.setattr(BiMambaMixer, '_direction_sum_inplace',
                        lambda self, *a: calls.append(1) or inplace(self, *a))
    with torch.no_grad():
        y_inplace = m(x)
        assert calls and torch.equal(x, x0)
        monkeypatch.setattr(BiMambaMixer, '_direction_sum_inplace', BiMambaMixer._direction_sum)
        y_alloc = m(x)
    assert torch.equal(y_inplace, y_alloc)


def test_bimamba_inplace_inference_under_torch_compile():
    """torch.compile (functionalized, aot_eager) of the in-place inference path: the
    scan into its own input and the accumulate become the public op plus copy / add,
    one graph, eager's output."""
    torch.manual_seed(0)
    m = BiMambaMixer(16, d_state=16).eval()
    x = torch.randn(2, 37, 16)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, backend='aot_eager', fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
