"""tools/analysis_tools/benchmark.py on tiny configs (CPU)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))

COLUMNS = ['config', 'task', 'mode', 'batch', 'shape', 'params_M', 'img_per_s', 'ms_per_iter',
           'peak_mem_MB']


def parse_table(log):
    lines = [ln for ln in log.splitlines() if ln.startswith('|')]
    head = [c.strip() for c in lines[0].strip('|').split('|')]
    rows = [dict(zip(head, (c.strip() for c in ln.strip('|').split('|')))) for ln in lines[2:]]
    return head, rows


def test_benchmark_compare_both_modes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    configs = ['configs/vim/vim_in1k_tiny.py', 'configs/v2m/v2m-s-star_in1k_tiny.py']
    out_csv = tmp_path / 'bench.csv'
    out = subprocess.run([sys.executable, 'tools/analysis_tools/benchmark.py', configs[0],
                          '--compare', configs[1], '--batch', '2', '--shape', '32', '48',
                          '--mode', 'both', '--warmup', '1', '--iters', '2', '--device', 'cpu',
                          '--csv', str(out_csv)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    head, rows = parse_table(out.stdout)
    assert head == COLUMNS
    assert [(r['config'], r['mode']) for r in rows] == [
        (c, m) for c in configs for m in ('inference', 'train')]
    for r in rows:
        assert r['task'] == 'cls' and r['batch'] == '2' and r['shape'] == '32x48'
        assert float(r['img_per_s']) > 0 and float(r['ms_per_iter']) > 0
        # img/s and ms/iter describe the same timing
        assert abs(2 * 1000 / float(r['ms_per_iter']) - float(r['img_per_s'])) \
            < 0.02 * float(r['img_per_s']) + 0.02
        assert float(r['peak_mem_MB']) >= 0
    assert float(rows[0]['params_M']) != float(rows[2]['params_M'])
    with open(out_csv) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r['img_per_s'] for r in csv_rows] == [r['img_per_s'] for r in rows]


def test_train_step_updates_gradients_detector():
    """The train mode really runs loss + backward on a detector (random boxes/masks)."""
    import torch
    from _model_utils import build_model, load_config, loss_forward
    model = build_model(load_config(str(REPO / 'configs/mask_rcnn/v2m_s_1x_tiny.py')))
    model.train()
    loss = loss_forward(model, 'det', torch.randn(1, 3, 64, 64), 3)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_benchmark_video_clips():
    """A video recognizer (mmaction2) runs both modes on (T, H, W) clips."""
    import pytest
    pytest.importorskip('mmaction')
    from benchmark import bench_one
    config = str(REPO / 'configs/video/convnext_s4nd_3d_hmdb51_tiny.py')
    from _model_utils import build_model, load_config
    params = sum(p.numel() for p in build_model(load_config(config)).parameters())
    for mode in ('inference', 'train'):
        row = bench_one(config, mode, 2, (4, 32, 32), warmup=1, iters=1, device='cpu')
        assert row['task'] == 'video' and row['shape'] == '4x32x32'
        assert row['params_M'] == round(params / 1e6, 3)
        assert row['img_per_s'] > 0 and row['ms_per_iter'] > 0
        # clips/s and ms/iter describe the same timing (batch 2)
        assert abs(2 * 1000 / row['ms_per_iter'] - row['img_per_s']) \
            < 0.02 * row['img_per_s'] + 0.02
