"""tools/deployment/pytorch2onnx.py end to end: a classifier, a segmentor and a detector
export and match PyTorch in onnxruntime; bad input gets clear errors."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip('onnx', reason='onnx not installed (pip install -e .[deploy])')
pytest.importorskip('onnxscript', reason='onnxscript not installed (pip install -e .[deploy])')
pytest.importorskip('onnxruntime', reason='onnxruntime not installed (pip install -e .[deploy])')

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4


def _tool():
    spec = importlib.util.spec_from_file_location(
        'pytorch2onnx', REPO / 'tools' / 'deployment' / 'pytorch2onnx.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args):
    torch.manual_seed(0)
    return _tool().main([str(a) for a in args])


def _assert_verified(result, n_checks):
    assert len(result['checks']) == n_checks
    for c in result['checks']:
        assert c['max_rel'] < TOL, c


def _tiny(tmp_path, base: str, body: str) -> Path:
    """A config inheriting ``configs/<base>`` with a one-block backbone: the export time
    grows with the number of traced ops, not with the widths."""
    cfg = tmp_path / ('tiny_' + Path(base).name)
    cfg.write_text(f"_base_ = '{REPO / 'configs' / base}'\n{body}")
    return cfg


# Vim classifier, 1 layer (a bidirectional scan): dynamic batch, height and width
CLS = ("model = dict(backbone=dict(arch=dict(embed_dims=16, num_layers=1, d_state=4)), "
       "head=dict(in_channels=16))\n")
# UPerNet on a 1-layer Vim (its one feature map feeds the 4 SimplePyramid levels)
SEG = ("model = dict(backbone=dict(arch=dict(embed_dims=16, num_layers=1, d_state=4), "
       "out_indices=(0, )), neck=dict(in_channels=16, in_index=0), "
       "decode_head=dict(in_channels=[16] * 4), auxiliary_head=dict(in_channels=16))\n")
# Mask R-CNN on a VMamba with one block (4 stages for the 4 FPN inputs)
DET = ("model = dict(backbone=dict(arch=dict(depths=[1, 0, 0, 0], dims=8)), "
       "neck=dict(in_channels=[8, 16, 32, 64]))\n")


def test_classifier_dynamic(tmp_path):
    out = tmp_path / 'cls.onnx'
    cfg = _tiny(tmp_path, 'vim/vim_in1k_tiny.py', CLS)
    result = _run([cfg, '--shape', 64, 64, '--dynamic', '--verify', '--out', out])
    assert out.exists() and result['task'] == 'cls'
    assert result['info']['op_types']['Scan'] == 2  # 1 layer x 2 directions
    _assert_verified(result, 2)
    assert result['checks'][1]['shape'] == (2, 3, 96, 128)  # second size: +32, +64 px


def test_segmentor(tmp_path):
    cfg = _tiny(tmp_path, 'upernet/vim_t_tiny.py', SEG)
    result = _run([cfg, '--shape', 64, 64, '--verify', '--out', tmp_path / 'seg.onnx'])
    assert result['task'] == 'seg'
    _assert_verified(result, 1)
    assert result['checks'][0]['outputs'] == 1  # the decode head's logits


def test_detector(tmp_path):
    cfg = _tiny(tmp_path, 'mask_rcnn/vmamba_t_1x_tiny.py', DET)
    result = _run([cfg, '--shape', 64, 64, '--verify', '--out', tmp_path / 'det.onnx'])
    assert result['task'] == 'det'
    _assert_verified(result, 1)
    assert result['checks'][0]['outputs'] == 10  # RPN objectness + deltas at 5 FPN levels


@pytest.mark.slow  # the configs as shipped (2-4 blocks), and the backbone part alone
def test_shipped_configs_and_backbone_part(tmp_path):
    result = _run([REPO / 'configs/vim/vim_in1k_tiny.py', '--shape', 64, 64, '--dynamic',
                   '--verify', '--out', tmp_path / 'cls.onnx'])
    assert result['info']['op_types']['Scan'] == 4  # 2 layers x 2 directions
    _assert_verified(result, 2)
    result = _run([REPO / 'configs/upernet/vim_t_tiny.py', '--shape', 64, 64, '--verify',
                   '--out', tmp_path / 'seg.onnx'])
    _assert_verified(result, 1)
    cfg = REPO / 'configs/mask_rcnn/vmamba_t_1x_tiny.py'
    result = _run([cfg, '--shape', 64, 64, '--verify', '--out', tmp_path / 'det.onnx'])
    _assert_verified(result, 1)
    assert result['checks'][0]['outputs'] == 10
    result = _run([cfg, '--shape', 64, 64, '--part', 'backbone', '--verify',
                   '--out', tmp_path / 'bb.onnx'])
    _assert_verified(result, 1)
    assert result['checks'][0]['outputs'] == 4


def test_bad_input(tmp_path, capsys):
    cfg = REPO / 'configs/vim/vim_in1k_tiny.py'
    with pytest.raises(SystemExit):
        _tool().main([str(cfg), '--shape', '64', '--half'])
    assert '--half' in capsys.readouterr().err  # the unsupported option names itself
    with pytest.raises(FileNotFoundError, match='checkpoint.*missing.pth'):
        _tool().main([str(cfg), str(tmp_path / 'missing.pth'), '--shape', '64'])
    with pytest.raises(FileNotFoundError, match='config'):
        _tool().main([str(tmp_path / 'nope.py'), '--shape', '64'])
    other = tmp_path / 'other_task.py'  # a config of a task library the tool does not know
    other.write_text("default_scope = 'mmocr'\nmodel = dict(type='DBNet')\n")
    with pytest.raises(ValueError, match="default_scope='mmocr'"):
        _tool().main([str(other), '--shape', '64'])
    with pytest.raises(ValueError, match='opset'):
        _tool().main([str(cfg), '--shape', '64', '--opset', '11', '--out',
                      str(tmp_path / 'x.onnx')])
    with pytest.raises(ValueError, match='--shape'):
        _tool().main([str(cfg), '--shape', '8', '64', '64'])


@pytest.mark.slow  # one export and two timed backends
def test_benchmark_onnx_side_by_side(capsys):
    spec = importlib.util.spec_from_file_location(
        'benchmark_onnx', REPO / 'tools' / 'deployment' / 'benchmark_onnx.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run([str(REPO / 'configs/vim/vim_in1k_tiny.py'), '--shape', '64', '64',
                    '--batch', '2', '--warmup', '1', '--iters', '2'])
    from mmssm.ops import selective_scan_cpp
    compiled = ['pytorch-cpp'] if selective_scan_cpp.available() else []
    assert [r['backend'] for r in rows] == ['pytorch-eager', *compiled, 'onnxruntime-cpu']
    assert all(r['img_per_s'] > 0 for r in rows)
    out = capsys.readouterr().out
    err = float(out.split('max rel err ')[1].split()[0])
    assert err < TOL
