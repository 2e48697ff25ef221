"""ONNX export of every backbone family: standard ops only, the scan is one ``Scan`` node
per scan (never unrolled), onnxruntime matches PyTorch, dynamic sizes where allowed."""
import pytest
import torch

pytest.importorskip('onnx', reason='onnx not installed (pip install -e .[deploy])')
pytest.importorskip('onnxscript', reason='onnxscript not installed (pip install -e .[deploy])')
pytest.importorskip('onnxruntime', reason='onnxruntime not installed (pip install -e .[deploy])')

import mmssm.models  # noqa: E402,F401
from mmssm.deploy.export import (check_onnx, compare_outputs, export_onnx,  # noqa: E402
                                 run_onnx)
from mmssm.ops import selective_scan  # noqa: E402
from mmssm.registry import MODELS  # noqa: E402

TOL = 1e-4  # max error relative to the output scale
# Tiny configs, one block per family: the export time (torch.export tracing and its
# decomposition pass, both per traced op with symbolic sizes) grows with the number of
# ops, not with the widths. Every code path is still there: all 4 V2M corners, the local
# windows, VMamba's 4-way cross-scan, a downsampling (padding) step in every pyramid,
# S4ND's dense stem (DFT), a depthwise S4ND block and the downsampling S4ND layers.
PLAIN = dict(embed_dims=16, num_layers=1, d_state=4)
PYRAMID = dict(depths=[1, 1], dims=8)  # 2 stages (total stride 8)
S4ND = dict(depths=[1, 0, 0, 0], dims=[8, 16, 32, 64])
V0 = dict(PYRAMID, d_state=4, ssm_ratio=2.0, mlp_ratio=0.0, forward_type='v0',
          downsample='v1', patch_embed='v1', norm_layer='ln')

# name: (backbone cfg, export input size, second size or None for a fixed-size model)
FAMILIES = {
    'vim': (dict(type='mmssm.Vim', arch=PLAIN, img_size=32, out_type='featmap'),
            (32, 32), (48, 64)),
    'v2m_middle': (dict(type='mmssm.V2M', arch=PLAIN, img_size=32, cls_position='middle'),
                   (32, 32), (48, 64)),
    'v2m_edge': (dict(type='mmssm.V2M', arch=PLAIN, img_size=32, cls_position='edge'),
                 (32, 32), (64, 48)),
    'v2m_mean': (dict(type='mmssm.V2M', arch=PLAIN, img_size=32, cls_position='mean',
                      out_type='featmap'), (32, 32), (48, 48)),
    'v2m_local': (dict(type='mmssm.V2M', arch=PLAIN, img_size=32, local_window=True),
                  (32, 32), (48, 64)),
    'vmamba_v2': (dict(type='mmssm.VMamba', arch=PYRAMID, out_indices=(0, 1)),
                  (32, 32), (40, 48)),
    'vmamba_v0': (dict(type='mmssm.VMamba', arch=V0, out_indices=(1, )), (32, 32), (48, 32)),
    'v2m_pyramid': (dict(type='mmssm.V2MPyramid', arch=PYRAMID, out_indices=(0, 1)),
                    (32, 32), (32, 48)),
    's4nd_2d': (dict(type='mmssm.ConvNeXtS4ND', arch=S4ND, img_size=64), (64, 64), None),
    's4nd_3d': (dict(type='mmssm.ConvNeXtS4ND3D', arch=S4ND, img_size=(4, 32, 32)),
                (4, 32, 32), None),
}
# slow tier: the 4-stage pyramids and S4ND models (every stage transition, 4 outputs)
PYRAMID4 = dict(depths=[1, 1, 1, 1], dims=8)
S4ND4 = dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64])
FAMILIES_4STAGE = {
    'vmamba_v2_4stage': (dict(type='mmssm.VMamba', arch=PYRAMID4, out_indices=(0, 3)),
                         (64, 64), (96, 128)),
    'vmamba_v0_4stage': (dict(type='mmssm.VMamba', arch=dict(V0, depths=[1, 1, 1, 1]),
                              out_indices=(1, 3)), (64, 64), (96, 64)),
    'v2m_pyramid_4stage': (dict(type='mmssm.V2MPyramid', arch=PYRAMID4, out_indices=(2, 3)),
                           (64, 64), (64, 96)),
    's4nd_2d_4stage': (dict(type='mmssm.ConvNeXtS4ND', arch=S4ND4, img_size=64), (64, 64),
                       None),
    's4nd_3d_4stage': (dict(type='mmssm.ConvNeXtS4ND3D', arch=S4ND4, img_size=(4, 32, 32)),
                       (4, 32, 32), None),
}
ALL = {**FAMILIES, **FAMILIES_4STAGE}


def _check_match(model, path, x):
    args = x if isinstance(x, tuple) else (x, )
    with torch.no_grad():
        err = compare_outputs(model(*args), run_onnx(path, args))
    assert err['max_rel'] < TOL, (tuple(args[0].shape), err)
    return err


@pytest.mark.parametrize('name', list(FAMILIES) + [
    pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES_4STAGE])
def test_backbone_exports_and_matches(name, tmp_path):
    cfg, size, size2 = ALL[name]
    torch.manual_seed(0)
    model = MODELS.build(cfg).eval()
    x = torch.randn(1, 3, *size)
    path = str(tmp_path / f'{name}.onnx')
    # fixed-size models (S4ND: kernels are export-time constants) keep a dynamic batch
    export_onnx(model, x, path, dynamic=True if size2 else ['batch'])
    info = check_onnx(path)  # raises on custom domains / local functions
    scans = info['op_types'].get('Scan', 0)
    if name.startswith('s4nd'):
        assert scans == 0 and info['op_types'].get('DFT', 0) > 0  # dense stem through DFT
    else:
        assert scans > 0
    _check_match(model, path, x)
    x2 = torch.randn(2, 3, *(size2 or size))  # second batch (and size when dynamic)
    _check_match(model, path, x2)


# one representative per scan-order kind, exported at two fixed sizes (4x the tokens):
# the node count must not change, so no flip (Vim), cross-scan (VMamba), corner scan
# (V2M) or local window (V2M local) was unrolled per token or per window
@pytest.mark.parametrize('name', ['vim', 'vmamba_v2', 'v2m_middle', 'v2m_local'])
def test_node_count_does_not_grow_with_the_sequence(name, tmp_path):
    cfg, size, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = MODELS.build(cfg).eval()
    counts = []
    for scale in (1, 2):
        x = torch.randn(1, 3, *(s * scale for s in size))
        path = str(tmp_path / f'{name}{scale}.onnx')
        export_onnx(model, x, path)  # static: sizes are constants in the graph
        counts.append(check_onnx(path)['total_nodes'])
        _check_match(model, path, x)
    assert counts[0] == counts[1], counts


def test_s4nd_dynamic_spatial_is_a_clear_error(tmp_path):
    cfg, size, _ = FAMILIES['s4nd_2d']
    model = MODELS.build(cfg).eval()
    with pytest.raises(ValueError, match='height/width.*S4ND'):
        export_onnx(model, torch.randn(1, 3, *size), str(tmp_path / 'x.onnx'), dynamic=True)


class _Scan(torch.nn.Module):
    """Input-dependent B and C (one group), D, z gate, softplus delta: Vim's scan."""

    def __init__(self, d=8, n=4):
        super().__init__()
        self.A = torch.nn.Parameter(-torch.rand(d, n) - 0.5)
        self.D = torch.nn.Parameter(torch.randn(d))
        self.bias = torch.nn.Parameter(torch.randn(d))

    def forward(self, u, delta, z, B, C):
        return selective_scan(u, delta, self.A, B, C, self.D, z, self.bias, True, reverse=True)


def test_scan_is_not_unrolled_and_standard(tmp_path):
    """Node count is independent of the sequence length; long sequences stay finite."""
    torch.manual_seed(0)
    m, counts = _Scan().eval(), []
    for l in (16, 256):
        args = (torch.randn(2, 8, l), torch.randn(2, 8, l), torch.randn(2, 8, l),
                torch.randn(2, 4, l), torch.randn(2, 4, l))
        path = str(tmp_path / f'scan{l}.onnx')
        export_onnx(m, args, path, input_names=('u', 'delta', 'z', 'B', 'C'))
        info = check_onnx(path)
        counts.append(info['total_nodes'])
        assert info['op_types']['Scan'] == 1
        _check_match(m, path, args)
    assert counts[0] == counts[1]
    # exported once, run at l = 4096 with large steps: no overflow, same as PyTorch
    l = 4096
    args = (torch.randn(1, 8, l), torch.randn(1, 8, l) + 3, torch.randn(1, 8, l),
            torch.randn(1, 4, l), torch.randn(1, 4, l))
    path = str(tmp_path / 'scan_dyn.onnx')
    export_onnx(m, args[:1] + args[1:], path, dynamic=['batch'])
    out = run_onnx(path, args)[0]
    assert torch.isfinite(out).all()
    _check_match(m, path, args)


def test_bad_options_name_themselves(tmp_path):
    model = MODELS.build(FAMILIES['vim'][0]).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match='opset'):
        export_onnx(model, x, str(tmp_path / 'a.onnx'), opset=11)
    with pytest.raises(ValueError, match="dynamic axes \\['depth'\\]"):
        export_onnx(model, x, str(tmp_path / 'a.onnx'), dynamic=['depth'])
