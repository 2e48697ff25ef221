"""tools/gpu_check.py (`make gpu-check`): a clear stop without CUDA, and its summary parsers
fed with the formats the tools write (the GPU run itself needs a GPU)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools'))
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))
import gpu_check  # noqa: E402


def test_without_cuda_it_stops_with_a_clear_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, str(REPO / 'tools/gpu_check.py'), '--work-dir',
                           str(tmp_path / 'w')], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == gpu_check.NO_CUDA == 2
    assert 'cannot run: no CUDA device is visible' in proc.stderr
    assert 'CUDA_VISIBLE_DEVICES=' in proc.stderr and 'needs an NVIDIA GPU' in proc.stderr
    assert not (tmp_path / 'w').exists()  # nothing started


def test_make_target_runs_the_script():
    out = subprocess.run(['make', '-n', 'gpu-check'], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and 'tools/gpu_check.py' in out.stdout


def test_pytest_counts_names_failures():
    log = ('....F.s\nFAILED tests/gpu/test_cuda_kernels.py::test_x[3] - AssertionError\n'
           '===== 1 failed, 5 passed, 1 skipped in 12.3s =====\n')
    text = gpu_check.pytest_counts(log)
    assert text.startswith('1 failed, 5 passed, 1 skipped')
    assert 'FAILED tests/gpu/test_cuda_kernels.py::test_x[3]' in text


def test_det_numbers_from_mmengine_lines():
    log = ("optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')\n"
           '11/30 20:28:09 - mmengine - INFO - Iter(train) [ 1/20]  base_lr: 2.0e-05 lr: 2.0e-05'
           '  eta: 0:00:10  time: 0.5000  data_time: 0.0100  memory: 900  loss: 5.7337  '
           'loss_rpn_cls: 0.7110  loss_mask: 3.3204\n'
           '11/30 20:28:19 - mmengine - INFO - Iter(train) [20/20]  base_lr: 2.0e-04 lr: 2.0e-04'
           '  eta: 0:00:00  time: 0.1200  data_time: 0.0100  memory: 900  loss: 2.1000  '
           'loss_rpn_cls: 0.3000\n'
           '11/30 20:28:21 - mmengine - INFO - Iter(val) [4/4]    coco/bbox_mAP: 0.0040  '
           'coco/bbox_mAP_50: 0.0160  coco/segm_mAP: 0.0010  coco/segm_mAP_50: 0.0000\n')
    assert gpu_check.det_numbers(log) == ('iters 20, loss 5.7337 -> 2.1000, 0.1200 s/iter '
                                          '(last), amp on, bbox AP 0.0040, segm AP 0.0010')


def test_model_table_reads_benchmark_csv(tmp_path):
    from benchmark import COLUMNS  # the CSV the benchmark tool writes
    rows = [dict(config=gpu_check.VMAMBA_T, task='cls', mode='inference', batch=64,
                 shape='224x224', params_M=30.2, img_per_s=1500.0, ms_per_iter=42.7,
                 peak_mem_MB=900),
            dict(config=gpu_check.SWIN_T, task='cls', mode='inference', batch=64,
                 shape='224x224', params_M=28.3, img_per_s=1000.0, ms_per_iter=64.0,
                 peak_mem_MB=800)]
    path = tmp_path / 'm.csv'
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = gpu_check.model_table(str(path))
    assert 'VMamba-T  inference batch 64 224x224:   1500.0 img/s' in text
    assert '(1.50x Swin-T)' in text and 'Swin-T    inference' in text


def test_sections_run_in_order_within_the_budget(tmp_path, monkeypatch, capsys):
    """The orchestration as a GPU machine runs it, with CUDA faked and a 1-second budget: every
    section starts, stops at its cap, and the summary lists all four."""
    import torch
    monkeypatch.setattr(gpu_check, 'cuda_problem', lambda: None)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'FakeGPU')
    monkeypatch.setattr(sys, 'argv', ['gpu_check.py', '--budget', '1', '--work-dir',
                                      str(tmp_path)])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    summary = out[out.index('mmssm gpu-check: FakeGPU'):]
    for title in ('Triton scan + scan-order tests (CUDA)', 'scan benchmark (GPU)',
                  'Mask R-CNN V2M-S* --amp, 20 iters', 'VMamba-T vs Swin-T img/s'):
        assert f'[TIMEOUT] {title}' in summary
    for log in ('kernels', 'scan_bench', 'mask_rcnn', 'models'):
        assert 'stopped at the time cap' in (tmp_path / f'{log}.log').read_text()
    assert (tmp_path / 'data' / 'coco' / 'annotations').is_dir()  # the tiny set was written
