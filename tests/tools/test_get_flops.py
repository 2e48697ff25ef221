"""FLOP handles (selective scan, scan orders, FFT) and tools/analysis_tools/get_flops.py."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmssm.ops import cross_merge, cross_scan, local_reverse, local_scan, selective_scan
from mmssm.utils.flops import count_flops, selective_scan_flops

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))


class Scan(nn.Module):
    def __init__(self, use_D, use_z, use_bias):
        super().__init__()
        self.use = (use_D, use_z, use_bias)

    def forward(self, u, dt, A, B, C, D, z, bias):
        use_D, use_z, use_bias = self.use
        return selective_scan(u, dt, A, B, C, D=D if use_D else None, z=z if use_z else None,
                              delta_bias=bias if use_bias else None, delta_softplus=True)


@pytest.mark.parametrize('use_D,use_z,use_bias', [(True, True, True), (False, True, False),
                                                  (True, False, True), (False, False, False)])
@pytest.mark.parametrize('backend', ['cpu', 'ref'])
def test_scan_handle_matches_formula(use_D, use_z, use_bias, backend, monkeypatch):
    monkeypatch.setenv('MMSSM_SCAN_BACKEND', backend)  # 'ref' is overridden while tracing
    b, d, l, n = 2, 6, 10, 3
    args = (torch.randn(b, d, l), torch.randn(b, d, l), -torch.rand(d, n),
            torch.randn(b, 2, n, l), torch.randn(d, n), torch.randn(d), torch.randn(b, d, l),
            torch.randn(d))
    fa = count_flops(Scan(use_D, use_z, use_bias), args)
    expect = 9 * b * l * d * n + b * d * l * use_D + b * d * l * use_z
    assert expect == selective_scan_flops(b, d, l, n, use_D, use_z)
    assert fa.total() == expect
    assert dict(fa.by_operator()) == {'selective_scan': expect}
    assert not fa.unsupported_ops()
    assert os.environ['MMSSM_SCAN_BACKEND'] == backend  # restored


class Orders(nn.Module):
    def forward(self, x):
        h, w = x.shape[-2:]
        y = cross_merge(cross_scan(x), h, w)
        return local_reverse(local_scan(y.view_as(x), 2), 2, h, w)


def test_scan_order_ops_are_zero_and_supported():
    fa = count_flops(Orders(), (torch.randn(1, 3, 4, 6), ))
    assert fa.total() == 0
    assert not fa.unsupported_ops()


class FFT(nn.Module):
    def forward(self, x):  # x (b, c, 5, 6)
        f = torch.fft.rfftn(x, s=(8, 16), dim=(2, 3))   # real 8x16 transforms
        y = torch.fft.irfftn(f, s=(8, 16), dim=(2, 3))
        g = torch.fft.fft(torch.fft.rfft(x, n=32), n=32)  # 1-d over the last dim
        return y, g


def test_fft_handles():
    b, c = 2, 3
    fa = count_flops(FFT(), (torch.randn(b, c, 5, 6), ))
    ops = fa.by_operator()
    n2 = 8 * 16
    assert ops['fft_rfftn'] == round(b * c * 2.5 * n2 * math.log2(n2))
    assert ops['fft_irfftn'] == round(b * c * 2.5 * n2 * math.log2(n2))
    assert ops['fft_rfft'] == round(b * c * 5 * 2.5 * 32 * 5)
    assert ops['fft_fft'] == round(b * c * 5 * 5 * 32 * 5)
    assert not fa.unsupported_ops()


def test_vim_one_layer_hand_count():
    """A 1-layer Vim at 32 px (patch 16: 4 tokens + cls) counted by hand."""
    from mmssm.models.backbones import Vim
    D, N, p, img = 16, 4, 16, 32
    model = Vim(arch=dict(embed_dims=D, num_layers=1, d_state=N), img_size=img, patch_size=p,
                stride=p).eval()
    fa = count_flops(model, (torch.randn(1, 3, img, img), ))
    P = (img // p) ** 2
    T = P + 1                   # patches + cls token
    E = 2 * D                   # expand 2
    R = math.ceil(D / 16)       # dt_rank 'auto'
    k = 4                       # d_conv; causal conv pads k-1 on both sides, output T+k-1
    patch = P * D * 3 * p * p
    conv1d = 2 * (T + k - 1) * E * k                   # two directions, depthwise
    in_proj = T * D * 2 * E     # x and z halves: two GEMMs over the tokens
    linear = in_proj + 2 * (T * E * (R + 2 * N) + T * R * E) + T * E * D
    scan = 2 * (9 * T * E * N + T * E + T * E)         # D skip and z gate, per direction
    norm = 2 * T * D * 5                               # block RMSNorm + final RMSNorm
    ops = fa.by_operator()
    assert ops['conv'] == patch + conv1d
    assert 'bmm' not in ops
    assert ops['linear'] == linear
    assert ops['selective_scan'] == scan
    assert ops['rms_norm'] == norm
    assert fa.total() == patch + conv1d + linear + scan + norm
    assert not fa.unsupported_ops()


def test_get_flops_cli():
    config, task = 'configs/vmamba/vmamba_in1k_tiny.py', 'cls'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    out = subprocess.run([sys.executable, 'tools/analysis_tools/get_flops.py', config,
                          '--shape', '32', '48'], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout
    assert f'Task:            {task}' in log
    assert 'Input shape:     (1, 3, 32, 48)' in log
    vals = {k: int(float(v)) for k, v in re.findall(
        r'^(FLOPs|Backbone FLOPs|Params|Backbone params):\s+\S+\s+\(([\d.]+)\)', log, re.M)}
    assert set(vals) == {'FLOPs', 'Backbone FLOPs', 'Params', 'Backbone params'}
    assert 0 < vals['Backbone FLOPs'] <= vals['FLOPs']
    assert 0 < vals['Backbone params'] <= vals['Params']
    assert 'selective_scan=' in log

    # parameters agree with the built model
    from _model_utils import build_model, load_config
    model = build_model(load_config(str(REPO / config)))
    assert vals['Params'] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('config,task', [('configs/mask_rcnn/v2m_s_1x_tiny.py', 'det'),
                                         ('configs/upernet/v2m_s_tiny.py', 'seg')])
def test_model_complexity_counts_backbone_and_heads(config, task):
    from get_flops import model_complexity
    from _model_utils import load_config
    res = model_complexity(load_config(str(REPO / config)), (64, 64))
    assert res['task'] == task
    assert not res['unsupported'] or set(res['unsupported']) <= {
        'prim::PythonOp.NMSop', 'prim::PythonOp.RoIAlignFunction'}
    assert res['by_operator']['selective_scan'] > 0
    assert res['flops'] > res['backbone_flops'] > 0


def test_untraced_scan_kernels_same_output():
    from mmssm.utils.flops import untraced_scan_kernels
    torch.manual_seed(0)
    b, d, l, n = 1, 4, 9, 3
    args = (torch.randn(b, d, l), torch.randn(b, d, l), -torch.rand(d, n), torch.randn(b, n, l),
            torch.randn(b, n, l))
    ref = selective_scan(*args, D=torch.ones(d), delta_softplus=True, backend='cpu')
    with untraced_scan_kernels():
        out = selective_scan(*args, D=torch.ones(d), delta_softplus=True, backend='cpu')
    torch.testing.assert_close(out, ref)
    from mmssm.ops import selective_scan_cpu
    assert selective_scan_cpu.selective_scan_chunked.__name__ == 'selective_scan_chunked'


@pytest.mark.slow
def test_vmamba_tiny_matches_paper_flops():
    """VMamba-T (s1l8) at 224: the paper reports 4.9G FLOPs and 30M parameters."""
    from get_flops import model_complexity
    from _model_utils import load_config
    res = model_complexity(load_config(str(REPO / 'configs/vmamba/vmamba-tiny_8xb128_in1k.py')),
                           (224, 224))
    assert round(res['flops'] / 1e9, 1) == 4.9
    assert res['params'] == 30249064  # official state dict: 30,249,064 (shared/research)


def test_s4nd_count_excludes_the_lazy_c_conversion():
    """A fresh S4 (DPLR) kernel converts C -> C~ in its first forward (dense matrix powers);
    the count is that of a steady-state forward: fresh model == already-run model."""
    from mmssm.models.layers.s4nd import S4ND
    torch.manual_seed(0)
    layer = S4ND(8, d_state=16, l_max=[6, 6], dim=2, init='fourier', activation=None,
                 final_act=None)
    x = torch.randn(1, 8, 6, 6)
    fresh = count_flops(layer, (x, ))
    assert int(layer.kernel[0].l_kernel) == 6  # attuned by count_flops, not by the trace
    with torch.no_grad():
        layer(x)
    assert count_flops(layer, (x, )).total() == fresh.total()
    assert 'aten::linalg_solve' not in fresh.unsupported_ops()
    assert not {'aten::unfold', 'aten::index'} & set(fresh.unsupported_ops())


def test_get_flops_cli_video():
    pytest.importorskip('mmaction')
    config = 'configs/video/convnext_s4nd_3d_hmdb51_tiny.py'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    cmd = [sys.executable, 'tools/analysis_tools/get_flops.py', config, '--shape']
    out = subprocess.run(cmd + ['4', '32', '32'], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'Task:            video' in out.stdout
    assert 'Input shape:     (1, 1, 3, 4, 32, 32)' in out.stdout
    flops = int(re.search(r'^FLOPs:\s+\S+\s+\((\d+)\)', out.stdout, re.M).group(1))
    assert flops > 0 and 'einsum=' in out.stdout  # the S4ND (Toeplitz) convolutions
    params = int(re.search(r'^Params:\s+\S+\s+\((\d+)\)', out.stdout, re.M).group(1))
    from _model_utils import build_model, load_config
    model = build_model(load_config(str(REPO / config)))  # the mmaction2 recognizer
    assert type(model).__name__ == 'Recognizer3D'
    assert params == sum(p.numel() for p in model.parameters())
    bad = subprocess.run(cmd + ['32', '32'], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and 'needs --shape T H W' in bad.stderr
