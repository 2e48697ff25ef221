"""Mixed precision: under CPU bf16 autocast every backbone keeps the SSM state (and the
S4ND FFT convolution) in fp32 and gives finite outputs and gradients; ``tools/train.py
--amp`` (bf16 AmpOptimWrapper on CPU) trains det, seg and cls without a NaN loss."""
import math
import sys

import pytest
import torch
from rel_common import NAMES, build, losses, run_train

import mmssm.ops
from mmssm.models.layers.s4nd import S4ND

ORIGINAL_SCAN = mmssm.ops.selective_scan
ORIGINAL_CROSS_SCAN = mmssm.ops.cross_selective_scan
ORIGINAL_BIDIR_SCAN = mmssm.ops.bidir_selective_scan


@pytest.fixture
def scan_spy(monkeypatch):
    """Replace ``selective_scan``, ``cross_selective_scan`` and ``bidir_selective_scan``
    wherever mmssm imported them; check and record every call."""
    calls = []

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
            return_last_state=False, out_fp32=False, **kw):
        out, last = ORIGINAL_SCAN(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state=True, out_fp32=out_fp32, **kw)
        # the contract: fp32 state and decay, output in u's dtype (or fp32 if asked)
        assert last.dtype == torch.float32, f'scan state in {last.dtype}'
        assert A.dtype == torch.float32, f'A (decay rates) in {A.dtype}'
        assert out.dtype == (torch.float32 if out_fp32 else u.dtype)
        calls.append(dict(u=u.dtype, delta=delta.dtype, state=last.dtype, out=out.dtype))
        return (out, last) if return_last_state else out

    def cross_spy(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
        # VMamba's four-direction scan (SS2D on CPU): no last state to return; the kernel
        # keeps its state in the dtype of the merged output, which must be fp32
        out = ORIGINAL_CROSS_SCAN(u, delta, A, B, C, D, delta_bias, delta_softplus)
        assert A.dtype == torch.float32, f'A (decay rates) in {A.dtype}'
        assert out.dtype == torch.float32, f'cross scan output / state in {out.dtype}'
        calls.append(dict(u=u.dtype, delta=delta.dtype, state=out.dtype, out=out.dtype))
        return out

    def bidir_spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  out_fp32=False, sum_directions=False, **kw):
        # both directions of a pass (V2M on CPU): the state is the kernel's saved chunk
        # states, read from a second (no-grad) run of the op
        out = ORIGINAL_BIDIR_SCAN(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  out_fp32, sum_directions, **kw)
        with torch.no_grad():
            bc = [X.unsqueeze(1) if X.dim() == 3 else X for X in (B, C)]
            states = torch.ops.mmssm.bidir_selective_scan_fwd(
                u, delta, A, *bc, D, z, delta_bias, delta_softplus, out_fp32, sum_directions,
                True)[1]
        assert A.dtype == torch.float32, f'A (decay rates) in {A.dtype}'
        assert out.dtype == (torch.float32 if out_fp32 else u.dtype)
        calls.append(dict(u=u.dtype, delta=delta.dtype, state=states.dtype, out=out.dtype))
        return out

    for mod in list(sys.modules.values()):
        if not getattr(mod, '__name__', '').startswith('mmssm'):
            continue
        if getattr(mod, 'selective_scan', None) is ORIGINAL_SCAN:
            monkeypatch.setattr(mod, 'selective_scan', spy)
        if getattr(mod, 'bidir_selective_scan', None) is ORIGINAL_BIDIR_SCAN:
            monkeypatch.setattr(mod, 'bidir_selective_scan', bidir_spy)
        if getattr(mod, 'cross_selective_scan', None) is ORIGINAL_CROSS_SCAN:
            monkeypatch.setattr(mod, 'cross_selective_scan', cross_spy)
    return calls


@pytest.fixture
def s4nd_spy(monkeypatch):
    calls = []
    conv = S4ND._conv

    def spy(self, x, rate):
        y = conv(self, x, rate)
        calls.append((x.dtype, y.dtype))
        return y

    monkeypatch.setattr(S4ND, '_conv', spy)
    return calls


def _run(m, x, amp):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        outs = m(x)
    loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    return [o.detach().float() for o in outs]


@pytest.mark.parametrize('name', NAMES)
def test_bf16_autocast_forward_backward(name, scan_spy, s4nd_spy):
    m = build(name, drop_path_rate=0.0).train()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 40)
    ref = _run(m, x, amp=False)
    used = {n for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    scan_spy.clear()
    s4nd_spy.clear()
    xa = x.clone().requires_grad_(True)
    outs = _run(m, xa, amp=True)

    if name == 'convnext_s4nd':  # the FFT convolution runs in fp32 whatever autocast does
        assert s4nd_spy and all(d == (torch.float32, torch.float32) for d in s4nd_spy)
    else:  # the scans really ran on bf16 activations, with an fp32 state
        assert scan_spy and any(c['u'] == torch.bfloat16 for c in scan_spy), scan_spy[:3]
        assert all(c['state'] == torch.float32 for c in scan_spy)
    for o, r in zip(outs, ref):
        assert torch.isfinite(o).all()
        # bf16 has ~3 significant digits: the result stays close to the fp32 one
        assert (o - r).norm() <= 0.05 * r.norm() + 1e-3, (o - r).norm() / r.norm()
    assert torch.isfinite(xa.grad).all() and xa.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(grads) == used  # the same parameters learn as in fp32
    assert all(torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert all(p.dtype == torch.float32 for p in m.parameters())  # autocast never casts weights


@pytest.mark.parametrize('groups', [0, 1, 4])
def test_scan_ignores_an_enclosing_autocast(groups):
    """The scan's fp32 maths (the C read-out of the state is a matmul/einsum) must not be
    pushed to bf16 by autocast: out_fp32 output in fp32, identical with and without it."""
    torch.manual_seed(0)
    b, d, l, n = 2, 8, 40, 4
    u = torch.randn(b, d, l).bfloat16()
    dt = torch.rand(b, d, l).bfloat16()
    A = -torch.rand(d, n) - 0.5
    shape = (d, n) if groups == 0 else (b, groups, n, l)
    B, C = torch.randn(shape), torch.randn(shape).bfloat16()
    kw = dict(D=torch.ones(d), delta_bias=torch.zeros(d), delta_softplus=True, out_fp32=True,
              return_last_state=True)
    ref, ref_last = ORIGINAL_SCAN(u, dt, A, B, C, **kw)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, last = ORIGINAL_SCAN(u, dt, A, B, C, **kw)
    assert out.dtype == last.dtype == torch.float32
    assert torch.equal(out, ref) and torch.equal(last, ref_last)


# ---------------------------------------------------------------- --amp tool runs
AMP_CONFIGS = {
    'cls': 'configs/vim/vim_in1k_tiny.py',
    'det': 'configs/mask_rcnn/vmamba_t_1x_tiny.py',
    'seg': 'configs/upernet/v2m_s_tiny.py',
    'video': 'configs/video/convnext_s4nd_3d_hmdb51_tiny.py',  # mmaction2 (optional extra)
}


def _amp_run(task, env, work_dir, iters):
    if task == 'video':
        pytest.importorskip('mmaction')
    # the short runs skip validation; 200 bf16 Mask R-CNN steps take ~25 min on 2 cores
    log = run_train(AMP_CONFIGS[task], work_dir, env, iters, '--amp', ckpt_interval=iters,
                    val=iters > 10, timeout=600 if iters <= 10 else 3600)
    got = losses(log)
    assert sorted(got) == list(range(1, iters + 1)), log[-3000:]
    bad = {i: v for i, v in got.items() if not math.isfinite(float(v))}
    assert not bad, f'non-finite losses {bad}'
    dumped = (work_dir / (AMP_CONFIGS[task].split('/')[-1])).read_text()
    assert "type='mmssm.CPUAmpOptimWrapper'" in dumped and "dtype='bfloat16'" in dumped
    return got


@pytest.mark.parametrize('task', list(AMP_CONFIGS))
def test_amp_tool_run_short(task, tiny_data_env, tmp_path):
    _amp_run(task, tiny_data_env, tmp_path, 2)  # bf16 is slow on CPU: ~7 s a det step


@pytest.mark.slow
@pytest.mark.parametrize('task', list(AMP_CONFIGS))
def test_amp_tool_run_200_iterations(task, tiny_data_env, tmp_path):
    got = _amp_run(task, tiny_data_env, tmp_path, 200)
    first = sum(float(got[i]) for i in range(1, 11)) / 10
    last = sum(float(got[i]) for i in range(191, 201)) / 10
    assert last < first, (first, last)  # it also learns something


def test_bf16_autocast_forward_backward_s4nd_3d(s4nd_spy):
    """The video backbone (T x H x W S4ND in every block) under CPU bf16 autocast: the
    convolutions run in fp32, outputs and gradients are finite and close to fp32."""
    from mmssm.models.backbones import ConvNeXtS4ND3D
    torch.manual_seed(0)
    m = ConvNeXtS4ND3D(arch=dict(depths=[1, 1, 1, 1], dims=[8, 16, 16, 16]),
                       img_size=(4, 32, 32), stem_channels=8, layer_cfg=dict(d_state=8),
                       out_indices=(0, 1, 2, 3)).train()
    x = torch.randn(2, 3, 4, 32, 32)
    ref = _run(m, x, amp=False)
    m.zero_grad(set_to_none=True)
    s4nd_spy.clear()
    xa = x.clone().requires_grad_(True)
    outs = _run(m, xa, amp=True)
    assert s4nd_spy and all(d == (torch.float32, torch.float32) for d in s4nd_spy)
    for o, r in zip(outs, ref):
        assert torch.isfinite(o).all() and (o - r).norm() <= 0.05 * r.norm() + 1e-3
    assert torch.isfinite(xa.grad).all() and xa.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
