"""One GPU check for the day a CUDA machine is available: `make gpu-check`.

    python tools/gpu_check.py [--budget 450] [--work-dir work_dirs/gpu_check]

Runs four sections, each with its own time cap inside the overall budget (under 8 minutes), and
prints one summary:

1. kernels: pytest of the Triton scan and scan-order kernels on CUDA against the references
   (tests/gpu/, every scan flag and dtype) plus tests/ops/test_selective_scan_triton.py and
   tests/ops/test_scan_order.py;
2. scan benchmark: the GPU section of benchmarks/bench_selective_scan.py (ms, speed-up over the
   materialised reference and mamba_ssm when importable, GB/s against the roofline);
3. Mask R-CNN: 20 iterations of configs/mask_rcnn/v2m_s_1x_tiny.py (V2M-S* pyramid) with --amp
   on the tiny COCO-format set, through tools/train.py;
4. models: VMamba-T vs Swin-T images/s, batch 64 at 224x224, inference and train
   (tools/analysis_tools/benchmark.py --compare).

Nothing is downloaded: the tiny data are generated, Swin-T is mmpretrain's own config. Logs go
to the work dir. Without CUDA it stops at once with exit status 2 and says why.
"""
import argparse
import csv
import os
import os.path as osp
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
NO_CUDA = 2  # exit status when there is no usable GPU

VMAMBA_T = 'configs/vmamba/vmamba-tiny_8xb128_in1k.py'
SWIN_T = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'
DET_CONFIG = 'configs/mask_rcnn/v2m_s_1x_tiny.py'
DET_ITERS = 20


def cuda_problem() -> Optional[str]:
    """Why this machine cannot run the check, or None when it can."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the set-up installs torch
        return f'torch is not importable ({e}); run `make setup` first'
    if not torch.cuda.is_available():
        return (f'no CUDA device is visible (torch {torch.__version__}, built for CUDA '
                f'{torch.version.cuda}, CUDA_VISIBLE_DEVICES='
                f'{os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")}). This check needs an '
                'NVIDIA GPU; the CPU test tier is `make test`.')
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f'triton is not importable ({e}); the CUDA build of torch ships it'
    return None


def run_section(name: str, cmd: List[str], log_path: str, timeout: float,
                env: Optional[Dict[str, str]] = None) -> Tuple[str, float, str, str]:
    """Run one command with a time cap; returns (status, seconds, stdout, stdout + stderr)."""
    print(f'[gpu-check] {name}: {" ".join(cmd)} (cap {timeout:.0f} s)', flush=True)
    start = time.time()
    full_env = dict(os.environ, **(env or {}))
    full_env['PYTHONPATH'] = REPO + os.pathsep + full_env.get('PYTHONPATH', '')
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                              timeout=max(timeout, 1))
        stdout, out = proc.stdout, proc.stdout + proc.stderr
        status = 'PASS' if proc.returncode == 0 else 'FAIL'
    except subprocess.TimeoutExpired as e:
        def text(b):  # the exception carries bytes even with text=True
            return b.decode(errors='replace') if isinstance(b, bytes) else (b or '')
        stdout = text(e.stdout)
        out = stdout + text(e.stderr) + '\n[gpu-check] stopped at the time cap'
        status = 'TIMEOUT'
    seconds = time.time() - start
    with open(log_path, 'w') as f:
        f.write(out)
    print(f'[gpu-check] {name}: {status} in {seconds:.0f} s (log {log_path})', flush=True)
    return status, seconds, stdout, out


def pytest_counts(log: str) -> str:
    """'12 passed, 1 failed ...' from pytest's last summary line, with the failures' names."""
    lines = [ln.strip('= ') for ln in log.splitlines() if re.search(r'\d+ (passed|failed)', ln)]
    failed = re.findall(r'^FAILED (\S+)', log, re.M)
    text = lines[-1] if lines else 'no pytest summary'
    return text + ''.join(f'\n      FAILED {f}' for f in failed[:10])


def bench_table(stdout: str) -> str:
    """The scan benchmark's tables and notes: its stdout (warnings go to stderr)."""
    keep = [ln for ln in stdout.splitlines() if ln.strip()]
    return '\n'.join('      ' + ln for ln in keep) or '      (no table printed)'


def det_numbers(log: str) -> str:
    """First/last training loss, seconds per iteration, and the COCO AP of the final val."""
    losses = re.findall(r'Iter\(train\) \[\s*(\d+)/\d+\].*?time: ([\d.]+).*?\bloss: ([\d.]+)', log)
    if not losses:
        return 'no training iteration logged'
    first, last = losses[0], losses[-1]
    parts = [f'iters {last[0]}', f'loss {first[2]} -> {last[2]}', f'{last[1]} s/iter (last)']
    # tools/train.py --amp puts an AmpOptimWrapper (CPUAmpOptimWrapper on CPU) in the config dump
    parts.append('amp on' if 'AmpOptimWrapper' in log else 'amp NOT seen in the config dump')
    ap = re.search(r'coco/bbox_mAP: ([\d.]+).*?coco/segm_mAP: ([\d.]+)', log)
    if ap:
        parts.append(f'bbox AP {ap.group(1)}, segm AP {ap.group(2)}')
    return ', '.join(parts)


def model_table(csv_path: str) -> str:
    """VMamba-T vs Swin-T rows, with VMamba's img/s as a ratio of Swin's per mode."""
    if not osp.exists(csv_path):
        return '      (no CSV written)'
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    out = []
    swin = {r['mode']: float(r['img_per_s']) for r in rows if 'swin' in r['config']}
    for r in rows:
        name = 'Swin-T' if 'swin' in r['config'] else 'VMamba-T'
        ratio = ''
        if name == 'VMamba-T' and swin.get(r['mode']):
            ratio = f'  ({float(r["img_per_s"]) / swin[r["mode"]]:.2f}x Swin-T)'
        out.append(f'      {name:9s} {r["mode"]:9s} batch {r["batch"]} {r["shape"]}: '
                   f'{float(r["img_per_s"]):8.1f} img/s, {r["peak_mem_MB"]} MB peak, '
                   f'{r["params_M"]} M params{ratio}')
    return '\n'.join(out) or '      (empty CSV)'


def parse_args():
    parser = argparse.ArgumentParser(description='mmssm GPU check (make gpu-check)')
    parser.add_argument('--budget', type=float, default=450,
                        help='seconds for all sections together (default 450: under 8 min)')
    parser.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs', 'gpu_check'))
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    problem = cuda_problem()
    if problem is not None:
        print(f'[gpu-check] cannot run: {problem}', file=sys.stderr)
        return NO_CUDA
    import torch
    work = osp.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    deadline = time.time() + args.budget

    def cap(seconds: float) -> float:  # a section's cap, never past the overall deadline
        return min(seconds, deadline - time.time())

    results = []
    # 1. kernels on CUDA vs references
    status, sec, _, log = run_section(
        'kernels', [py, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/gpu',
                    'tests/ops/test_selective_scan_triton.py', 'tests/ops/test_scan_order.py'],
        osp.join(work, 'kernels.log'), cap(170))
    results.append(('Triton scan + scan-order tests (CUDA)', status, sec, pytest_counts(log)))
    # 2. GPU section of the scan benchmark (batch 64 on GPU; 'ref' is the slow sequential one)
    status, sec, stdout, _ = run_section(
        'scan-bench', [py, 'benchmarks/bench_selective_scan.py', '--skip-slow'],
        osp.join(work, 'scan_bench.log'), cap(90))
    results.append(('scan benchmark (GPU)', status, sec, '\n' + bench_table(stdout)))
    # 3. 20-iteration --amp Mask R-CNN (V2M-S* pyramid) on the tiny COCO-format set
    data = osp.join(work, 'data')
    subprocess.run([py, 'tools/misc/make_tiny_datasets.py', '--out', data, '--tasks', 'coco'],
                   cwd=REPO, check=True, capture_output=True)
    status, sec, _, log = run_section(
        'mask-rcnn', [py, 'tools/train.py', DET_CONFIG, '--amp', '--work-dir',
                      osp.join(work, 'mask_rcnn'), '--cfg-options',
                      f'train_cfg.max_iters={DET_ITERS}', f'train_cfg.val_interval={DET_ITERS}',
                      f'default_hooks.checkpoint.interval={DET_ITERS}'],
        osp.join(work, 'mask_rcnn.log'), cap(90), env=dict(MMSSM_TINY_DATA=data))
    results.append((f'Mask R-CNN V2M-S* --amp, {DET_ITERS} iters', status, sec,
                    det_numbers(log)))
    # 4. VMamba-T vs Swin-T throughput
    csv_path = osp.join(work, 'models.csv')
    if osp.exists(csv_path):
        os.remove(csv_path)
    status, sec, _, log = run_section(
        'models', [py, 'tools/analysis_tools/benchmark.py', VMAMBA_T, '--compare', SWIN_T,
                   '--batch', '64', '--shape', '224', '224', '--mode', 'both',
                   '--device', 'cuda', '--csv', csv_path],
        osp.join(work, 'models.log'), cap(120))
    results.append(('VMamba-T vs Swin-T img/s (batch 64, 224^2)', status, sec,
                    '\n' + model_table(csv_path)))

    total = args.budget - (deadline - time.time())
    print('\n' + '=' * 78)
    print(f'mmssm gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__}, '
          f'CUDA {torch.version.cuda}; {total:.0f} s in all')
    print('=' * 78)
    for title, status, sec, detail in results:
        print(f'[{status:7s}] {title} ({sec:.0f} s): {detail}')
    print(f'logs: {work}')
    return 0 if all(r[1] == 'PASS' for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
