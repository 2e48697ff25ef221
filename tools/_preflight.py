"""Checks tools/train.py and tools/test.py run before building the runner.

A first run of a real config usually stops on something missing on disk: the
dataset, the ImageNet checkpoint the backbone starts from, the checkpoint to
evaluate. Left to the libraries, each ends in a traceback from deep inside
(pycocotools, mmengine's loader) that says neither what the config expected
nor what to do. :func:`preflight` walks the config generically (every dataset
dict in the dataloaders the run builds, evaluator annotation files, every
``init_cfg`` checkpoint in the model, ``load_from``) and collects every problem
into one :class:`PreflightError`, whose message says what is missing, the path
it was looked for at, and what to do. It also refuses, before any data is
loaded, a training set-up that cannot run: a pooling-to-1x1 segmentation head
(UPerNet/PSPNet PPM, ASPP image pool) normalised with BatchNorm over a total
batch of 1.

Only local paths are checked: URLs, ``open-mmlab://``-style names and datasets
read through a non-local ``backend_args`` are left to their loaders.
"""
import glob
import math
import os.path as osp
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# classification config folder of each backbone family (train these first)
CLS_CONFIG_DIRS = {
    'V2MPyramid': 'configs/v2m', 'V2M': 'configs/v2m', 'Vim': 'configs/vim',
    'VMamba': 'configs/vmamba', 'ConvNeXtS4ND': 'configs/convnext_s4nd',
}
# official release files that tools/model_converters/ translates, per family
CONVERTERS = {'Vim': 'vim2mmssm.py', 'VMamba': 'vmamba2mmssm.py',
              'ConvNeXtS4ND': 'convnext_s4nd2mmssm.py'}


class PreflightError(Exception):
    """A run that cannot start; the message lists every problem and its fix."""


def _is_remote(path: str) -> bool:
    return '://' in path


def _local_backend(ds: dict) -> bool:
    backend = (ds.get('backend_args') or {}).get('backend', 'local')
    return backend in ('local', 'disk')


def _datasets(ds: Any, where: str) -> Iterator[Tuple[str, dict]]:
    """Yield (config key, dataset dict) for ``ds`` and the datasets it wraps."""
    if not isinstance(ds, dict):
        return
    yield where, ds
    if isinstance(ds.get('dataset'), dict):  # RepeatDataset, ClassBalancedDataset, ...
        yield from _datasets(ds['dataset'], f'{where}.dataset')
    for i, sub in enumerate(ds.get('datasets') or []):  # ConcatDataset
        yield from _datasets(sub, f'{where}.datasets[{i}]')


def _dataset_paths(ds: dict) -> List[Tuple[str, str]]:
    """(field, path as the dataset will open it) for ann_file and data_prefix,
    joined with data_root the way mmengine's ``BaseDataset._join_prefix`` does."""
    root = ds.get('data_root') or ''
    paths = []
    if root:
        paths.append(('data_root', root))
    ann = ds.get('ann_file')
    if isinstance(ann, str) and ann:
        paths.append(('ann_file', ann if osp.isabs(ann) or not root else osp.join(root, ann)))
    prefix = ds.get('data_prefix')
    items = prefix.items() if isinstance(prefix, dict) else [('', prefix)]
    for key, value in items:
        if isinstance(value, str) and value:
            full = value if osp.isabs(value) or not root else osp.join(root, value)
            paths.append((f'data_prefix.{key}' if key else 'data_prefix', full))
    return paths


def _dataset_problems(cfg, loaders: List[str], evaluators: List[str]) -> List[str]:
    problems = []
    for name in loaders:
        loader = cfg.get(name)
        if not isinstance(loader, dict):
            continue
        for where, ds in _datasets(loader.get('dataset'), f'{name}.dataset'):
            if not _local_backend(ds):
                continue
            missing = [(f, p) for f, p in _dataset_paths(ds)
                       if not _is_remote(p) and not osp.exists(p)]
            if not missing:
                continue
            root = ds.get('data_root') or ''
            lines = [f'{where} ({ds.get("type", "dataset")}) is missing on disk:']
            lines += [f'  {f} = {p}   (looked for {osp.abspath(p)})' for f, p in missing]
            lines.append('  expected layout:' + ''.join(
                f'\n    {p.rstrip("/")}{"" if f == "ann_file" else "/"}' for f, p in _dataset_paths(ds)
                if f != 'data_root'))
            lines.append(_dataset_hint(ds, root))
            problems.append('\n'.join(lines))
    for name in evaluators:
        metrics = cfg.get(name)
        for metric in metrics if isinstance(metrics, list) else [metrics]:
            ann = metric.get('ann_file') if isinstance(metric, dict) else None
            if isinstance(ann, str) and ann and not _is_remote(ann) and not osp.exists(ann):
                problems.append(f'{name}.ann_file = {ann} is missing (looked for '
                                f'{osp.abspath(ann)}): the metric reads the ground truth there.')
    return problems


def _dataset_hint(ds: dict, root: str) -> str:
    kind = str(ds.get('type', ''))
    where = f' (e.g. `ln -s /path/to/your/copy {root.rstrip("/")}`)' if root else ''
    fetch = {
        'Coco': 'COCO 2017 from https://cocodataset.org (train2017, val2017, annotations)',
        'ADE20K': 'ADEChallengeData2016 from http://sceneparsing.csail.mit.edu',
        'ImageNet': 'ImageNet-1k from https://image-net.org (train/, val/, meta/)',
    }
    what = next((v for k, v in fetch.items() if k in kind), 'the dataset')
    return (f'  to fix: put {what} at that layout{where}, or point the config at your copy '
            '(data_root in a child config); to try the tools without any download: make demo')


def _init_checkpoints(obj: Any, where: str) -> Iterator[Tuple[str, str]]:
    """Yield (config key, local path) of every Pretrained init_cfg in ``obj``."""
    if isinstance(obj, dict):
        init = obj.get('init_cfg')
        for i, item in enumerate(init if isinstance(init, list) else [init]):
            if isinstance(item, dict) and item.get('type') == 'Pretrained' \
                    and isinstance(item.get('checkpoint'), str):
                key = f'{where}.init_cfg' + (f'[{i}]' if isinstance(init, list) else '')
                yield key, item['checkpoint']
        for k, v in obj.items():
            if k != 'init_cfg':
                yield from _init_checkpoints(v, f'{where}.{k}')
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _init_checkpoints(v, f'{where}[{i}]')


def _owner(cfg, key: str) -> Optional[dict]:
    """The model dict that holds ``key``'s init_cfg (e.g. model.backbone)."""
    node: Any = cfg
    for part in key.split('.')[:-1]:
        part, _, idx = part.partition('[')
        node = node.get(part) if hasattr(node, 'get') else None
        if idx and isinstance(node, list):
            node = node[int(idx.rstrip(']'))]
    return node if isinstance(node, dict) else None


def _family(module: dict) -> str:
    return str(module.get('type', '')).split('.')[-1]


def _matching_cls_configs(module: dict) -> List[str]:
    """Classification configs whose backbone has ``module``'s type and named
    arch (read from the leaf file's text: quick, and no config is executed)."""
    folder = CLS_CONFIG_DIRS.get(_family(module))
    if folder is None:
        return []
    arch = module.get('arch')
    pattern = re.compile(r"type='(?:mmssm\.)?" + re.escape(_family(module))
                         + r"',\s*arch='" + re.escape(str(arch)) + "'")
    found = [osp.relpath(path, REPO) for path in sorted(glob.glob(osp.join(REPO, folder, '*.py')))
             if isinstance(arch, str) and pattern.search(open(path).read())]
    return found or [f'{folder}/...']


def _checkpoint_problem(cfg, key: str, path: str) -> str:
    module = _owner(cfg, key) or {}
    family = _family(module)
    lines = [f'{key}.checkpoint = {path} does not exist (looked for {osp.abspath(path)}).']
    if key.endswith('backbone.init_cfg') and family in CLS_CONFIG_DIRS:
        lines.append(f'  It is the ImageNet-1k checkpoint the {family} backbone starts from. '
                     'Either:')
        cls_cfgs = ' or '.join(_matching_cls_configs(module))
        lines.append(f'  - train it: python tools/train.py {cls_cfgs}, then copy its last '
                     f'checkpoint to {path} (the backbone.* weights are read from it);')
        conv = CONVERTERS.get(family)
        if conv:
            lines.append(f'  - or convert an official release file: python '
                         f'tools/model_converters/{conv} OFFICIAL.pth {path};')
        else:
            lines.append('  - (no official release file of this backbone exists to convert '
                         f'with tools/model_converters/: {", ".join(CONVERTERS.values())} cover '
                         f'{", ".join(CONVERTERS)});')
    else:
        lines.append('  Put the checkpoint there, or point the config at it;')
    lines.append(f'  - or train from scratch: --cfg-options {key}=None')
    return '\n'.join(lines)


def _bn_batch1_problems(cfg, world_size: int) -> List[str]:
    """Segmentation heads that pool to 1x1 then BatchNorm: a total batch of 1
    gives BN one value per channel, which fails in training."""
    loader = cfg.get('train_dataloader') or {}
    batch = loader.get('batch_size')
    model = cfg.get('model') or {}
    problems = []
    for name in ('decode_head', 'auxiliary_head'):
        heads = model.get(name)
        for i, head in enumerate(heads if isinstance(heads, list) else [heads]):
            if not isinstance(head, dict):
                continue
            pools_1x1 = 1 in tuple(head.get('pool_scales') or ()) \
                or str(head.get('type', '')).endswith('ASPPHead')
            norm = str((head.get('norm_cfg') or {}).get('type', ''))
            total = batch * (world_size if norm == 'SyncBN' else 1) if batch else None
            if not (pools_1x1 and norm in ('BN', 'BN2d', 'SyncBN') and total == 1):
                continue
            key = f'model.{name}' + (f'[{i}]' if isinstance(heads, list) else '')
            groups = math.gcd(32, int(head.get('channels', 32)))
            procs = f' x {world_size} process' if norm == 'SyncBN' else ''
            problems.append(
                f'{key} ({head.get("type")}) pools features to 1x1 (its pyramid pooling / '
                f'image-pool branch) and normalises them with {norm}; with '
                f'train_dataloader.batch_size=1{procs} (a total batch of 1) BatchNorm sees one '
                'value per channel and training fails.\n'
                '  to fix: a batch of at least 2 (--cfg-options '
                'train_dataloader.batch_size=2), or SyncBN over >= 2 processes, or '
                f'GroupNorm: --cfg-options {key}.norm_cfg.type=GN '
                f'{key}.norm_cfg.num_groups={groups}')
    return problems


def preflight(cfg, mode: str, world_size: int = 1) -> None:
    """Check what a run of ``cfg`` needs before the runner is built.

    Args:
        cfg: the loaded config (after --cfg-options and the tool's own edits).
        mode: 'train' (train/val data, init_cfg checkpoints, load_from unless
            resuming automatically, the BatchNorm batch-1 rule) or 'test'
            (test data and ``load_from``, the checkpoint under test).
        world_size: number of processes (SyncBN's total batch).

    Raises:
        PreflightError: listing every problem found, each with its fix.
    """
    if mode not in ('train', 'test'):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    problems: List[str] = []
    if mode == 'train':
        loaders = ['train_dataloader'] + (['val_dataloader'] if cfg.get('val_cfg') else [])
        evaluators = ['val_evaluator'] if cfg.get('val_cfg') else []
    else:
        loaders, evaluators = ['test_dataloader'], ['test_evaluator']
    problems += _dataset_problems(cfg, loaders, evaluators)
    if mode == 'train':
        # mmengine calls init_weights only when training; testing loads load_from over it
        for key, path in _init_checkpoints(cfg.get('model'), 'model'):
            if not _is_remote(path) and not osp.exists(path):
                problems.append(_checkpoint_problem(cfg, key, path))
        problems += _bn_batch1_problems(cfg, world_size)
    load_from = cfg.get('load_from')
    if isinstance(load_from, str) and not _is_remote(load_from) and not osp.exists(load_from):
        what = 'the checkpoint to evaluate' if mode == 'test' else (
            'the checkpoint to resume from' if cfg.get('resume') else
            'the checkpoint the whole model starts from')
        fix = ('pass an existing checkpoint file' if mode == 'test' or cfg.get('resume') else
               'fix the path, or drop it: --cfg-options load_from=None')
        problems.append(f'load_from = {load_from} ({what}) does not exist (looked for '
                        f'{osp.abspath(load_from)}); {fix}.')
    if problems:
        head = f'cannot start ({len(problems)} problem{"s" * (len(problems) > 1)}):'
        raise PreflightError('\n'.join([head] + [f'[{i + 1}] {p}'
                                                 for i, p in enumerate(problems)]))
