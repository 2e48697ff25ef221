"""Determinism on CPU: same seed and config give identical training; the selective scan,
the FFT convolution and every backbone give bitwise-equal outputs and gradients on
repeated calls."""
import pytest
import torch
from conftest import REF_CONFIG, REF_OPTIONS
from rel_common import NAMES, build, losses, run_train, state_dict_of

from mmssm.ops import selective_scan
from mmssm.ops.fftconv import (axis_operators, fftconv_nd, fftconv_separable, separable_conv,
                               toeplitz_conv_separable)


def test_same_seed_same_training(reference_run, tiny_data_env, tmp_path):
    """A second run of the reference config: identical logged losses, bitwise equal weights."""
    ref_dir, ref = reference_run
    log = run_train(REF_CONFIG, tmp_path, tiny_data_env, 12, options=REF_OPTIONS, val=False)
    got = losses(log)
    assert sorted(got) == list(range(1, 13))
    assert {i: got[i] for i in got} == {i: ref[i] for i in got}
    a, b = state_dict_of(tmp_path / 'iter_12.pth'), state_dict_of(ref_dir / 'iter_12.pth')
    # (the schedules differ in length, but the LinearLR warm-up ends at 4 in both)
    assert all(torch.equal(a[k], b[k]) for k in b)


def _twice(fn, inputs):
    """Run fn on fresh leaf copies of ``inputs`` twice; return [(out, grads)] * 2."""
    res = []
    for _ in range(2):
        leaves = {k: (v.detach().clone().requires_grad_(v.is_floating_point())
                      if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        out = fn(**leaves)
        outs = out if isinstance(out, tuple) else (out, )
        torch.manual_seed(7)
        sum((o.float() * torch.randn_like(o.float())).sum() for o in outs).backward()
        grads = {k: v.grad for k, v in leaves.items()
                 if isinstance(v, torch.Tensor) and v.grad is not None}
        res.append(([o.detach() for o in outs], grads))
    return res


def _assert_bitwise(res):
    (o1, g1), (o2, g2) = res
    assert all(torch.equal(a, b) for a, b in zip(o1, o2))
    assert g1 and set(g1) == set(g2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f'grad of {k} differs between two identical calls'


def _scan_inputs(b=2, d=8, l=50, n=4, groups=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (b, groups, n, l) if groups else (d, n)
    return dict(u=r(b, d, l).to(dtype), delta=(r(b, d, l) * 0.5).to(dtype),
                A=-torch.rand(d, n, generator=g) - 0.5, B=r(*bc), C=r(*bc),
                D=r(d), z=r(b, d, l).to(dtype), delta_bias=r(d) * 0.1)


@pytest.mark.parametrize('backend', ['cpu', 'ref'])
@pytest.mark.parametrize('cfg', [dict(), dict(groups=0), dict(l=257, n=1, groups=4),
                                 dict(dtype=torch.bfloat16)])
@pytest.mark.parametrize('reverse', [False, True])
def test_selective_scan_is_deterministic(backend, cfg, reverse):
    inputs = _scan_inputs(**cfg)

    def fn(**x):
        return selective_scan(**x, delta_softplus=True, return_last_state=True,
                              backend=backend, reverse=reverse)
    _assert_bitwise(_twice(fn, inputs))


@pytest.mark.parametrize('impl', [fftconv_nd, fftconv_separable, toeplitz_conv_separable])
@pytest.mark.parametrize('shape,klen', [((37,), (37,)), ((12, 20), (12, 20)),
                                        ((3, 6, 5), (3, 6, 5))])
def test_fftconv_is_deterministic(impl, shape, klen):
    g = torch.Generator().manual_seed(1)
    H = 4
    inputs = dict(u=torch.randn(2, H, *shape, generator=g),
                  kernels=[torch.randn(H, k, generator=g) for k in klen],
                  backward_kernels=[torch.randn(H, k, generator=g) for k in klen],
                  D=torch.randn(H, generator=g))

    def fn(u, kernels, backward_kernels, D):
        return impl(u, kernels, backward_kernels, D)

    # kernels are lists: make them leaves too
    res = []
    for _ in range(2):
        ks = [k.clone().requires_grad_(True) for k in inputs['kernels']]
        kb = [k.clone().requires_grad_(True) for k in inputs['backward_kernels']]
        u = inputs['u'].clone().requires_grad_(True)
        D = inputs['D'].clone().requires_grad_(True)
        y = fn(u, ks, kb, D)
        torch.manual_seed(7)
        (y * torch.randn_like(y)).sum().backward()
        res.append(([y.detach()], dict(u=u.grad, D=D.grad,
                                       **{f'k{i}': k.grad for i, k in enumerate(ks + kb)})))
    _assert_bitwise(res)


def test_separable_conv_operators_are_deterministic():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(2, 3, 24, 300, generator=g)  # one Toeplitz axis, one FFT axis (> 256)
    ks = [torch.randn(3, 24, generator=g), torch.randn(3, 300, generator=g)]
    outs = [separable_conv(u, axis_operators([24, 300], ks), torch.ones(3)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize('name', NAMES)
def test_backbone_forward_backward_is_deterministic(name):
    m = build(name, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))
    res = []
    for _ in range(2):
        m.zero_grad(set_to_none=True)
        outs = m(x)
        sum(o.square().mean() for o in outs).backward()
        res.append(([o.detach() for o in outs],
                    {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    _assert_bitwise(res)
