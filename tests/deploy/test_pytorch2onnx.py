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


def test_classifier_dynamic(tmp_path):
    out = tmp_path / 'cls.onnx'
    result = _run([REPO / 'configs/vim/vim_in1k_tiny.py', '--shape', 64, 64, '--dynamic',
                   '--verify', '--out', out])
    assert out.exists() and result['task'] == 'cls'
    assert result['info']['op_types']['Scan'] == 4  # 2 layers x 2 directions
    _assert_verified(result, 2)
    assert result['checks'][1]['shape'] == (2, 3, 96, 128)  # second size: +32, +64 px


@pytest.mark.slow  # ~50 s on 2 shared cores
def test_segmentor(tmp_path):
    result = _run([REPO / 'configs/upernet/vim_t_tiny.py', '--shape', 64, 64, '--verify',
                   '--out', tmp_path / 'seg.onnx'])
    assert result['task'] == 'seg'
    _assert_verified(result, 1)


@pytest.mark.slow  # ~50 s on 2 shared cores
def test_detector_and_backbone_part(tmp_path):
    cfg = REPO / 'configs/mask_rcnn/vmamba_t_1x_tiny.py'
    result = _run([cfg, '--shape', 64, 64, '--verify', '--out', tmp_path / 'det.onnx'])
    assert result['task'] == 'det'
    _assert_verified(result, 1)
    assert result['checks'][0]['outputs'] == 10  # RPN objectness + deltas at 5 FPN levels
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
    assert [r['backend'] for r in rows] == ['pytorch-eager', 'onnxruntime-cpu']
    assert all(r['img_per_s'] > 0 for r in rows)
    out = capsys.readouterr().out
    err = float(out.split('max rel err ')[1].split()[0])
    assert err < TOL
