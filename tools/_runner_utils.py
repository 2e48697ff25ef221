"""Shared set-up for tools/train.py and tools/test.py (any MM task)."""
import os
import os.path as osp

import torch
import torch.distributed as dist
from mmengine.config import Config, DictAction

import mmssm  # noqa: F401  (version checks, torch>=2.6 checkpoint loading)
from mmssm.utils.config import replace_sync_bn
from _preflight import PreflightError, preflight  # noqa: E402  (tools/ is on sys.path)

TASK_SCOPES = ('mmdet', 'mmseg', 'mmpretrain', 'mmaction', 'mmssm')


def add_common_args(parser) -> None:
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value pairs (xxx=yyy)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torchrun passes LOCAL_RANK in the environment; the old launcher passed an argument
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(args) -> Config:
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    scope = cfg.get('default_scope', None)
    if scope is not None and scope not in TASK_SCOPES:
        raise ValueError(f'default_scope={scope!r} in {args.config}: tools/train.py supports '
                         f'{TASK_SCOPES}')
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.launcher != 'none' and not torch.cuda.is_available():
        setup_cpu_distributed(cfg)
    return cfg


def setup_cpu_distributed(cfg: Config) -> None:
    """Make mmengine 0.10.7 train/test distributed on CPU with gloo.

    mmengine always calls ``torch.cuda.set_device`` in its init and wraps DDP
    with ``device_ids``: initialising the gloo group here makes it skip its own
    init, and the CPU-friendly wrapper drops ``device_ids``.
    """
    if not dist.is_initialized():
        if cfg.launcher == 'slurm':  # srun sets SLURM_*, not the env:// variables gloo reads
            from _slurm import export_torch_env_from_slurm
            export_torch_env_from_slurm()
        dist.init_process_group(backend='gloo')
    cfg.model_wrapper_cfg = dict(type='mmssm.CPUFriendlyDistributedDataParallel',
                                 **cfg.get('model_wrapper_cfg', None) or {})
    cfg.model_wrapper_cfg['type'] = 'mmssm.CPUFriendlyDistributedDataParallel'
    cfg.env_cfg = dict(cfg.get('env_cfg', {}) or {})
    cfg.env_cfg['dist_cfg'] = dict(backend='gloo')
    cfg.pop('sync_bn', None)
    replace_sync_bn(cfg.model)


def finish_distributed() -> None:
    """Destroy the process group this run initialised, before the interpreter exits.

    Left to interpreter shutdown, the gloo group's worker threads can be torn down in the
    wrong order, and a rank then aborts ("terminate called without an active exception",
    SIGABRT) after a finished run; torch asks every program to call it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_or_exit(cfg: Config, mode: str) -> None:
    """Run :func:`_preflight.preflight` and stop with its one message (no traceback)."""
    try:
        preflight(cfg, mode, world_size=int(os.environ.get('WORLD_SIZE', '1')))
    except PreflightError as e:
        raise SystemExit(f'tools/{mode}.py: {e}') from None


def build_runner(cfg: Config):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)
