"""Loading backbone weights from official and mmssm checkpoints, loudly.

mmengine's ``PretrainedInit`` unwraps only ``'state_dict'`` and loads with
``strict=False``, so an official Vim/VMamba file (``{'model': ..., 'args': ...}``)
would silently load nothing. :func:`load_backbone_weights` unwraps the usual
containers, strips prefixes, lets the backbone convert/resize keys, names
every shape mismatch, and refuses a load that covers under ``min_coverage`` of
the backbone's keys unless the caller opts in.
"""
import os
import os.path as osp
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence
from urllib.parse import urlparse

from mmengine.logging import MMLogger, print_log
from mmengine.runner import CheckpointLoader
from torch import Tensor, nn

from ...utils.safe_load import load_checkpoint_file

CONTAINER_KEYS = ('state_dict', 'model', 'module')
STRIP_PREFIXES = ('module.', 'backbone.')


def _download(url: str) -> str:
    """Download ``url`` once into ``<torch hub dir>/checkpoints`` (rank 0 first); its path."""
    import torch.distributed as dist
    from mmengine.dist import get_dist_info
    from torch.hub import download_url_to_file, get_dir

    cached = osp.join(get_dir(), 'checkpoints', osp.basename(urlparse(url).path))
    rank, world_size = get_dist_info()
    if rank == 0 and not osp.isfile(cached):
        os.makedirs(osp.dirname(cached), exist_ok=True)
        download_url_to_file(url, cached, None, progress=False)
    if world_size > 1:
        dist.barrier()
    return cached


def read_checkpoint(filename: str, map_location: str = 'cpu',
                    trusted: Optional[bool] = None) -> dict:
    """Read a checkpoint file (local, http(s) or any mmengine scheme).

    Local files are read by :func:`mmssm.utils.safe_load.load_checkpoint_file`:
    ``weights_only=True`` with a narrow allowlist (official Vim/VMamba training files
    and mmengine checkpoints load); a file needing any other global is refused
    unless ``trusted=True`` (or ``MMSSM_TRUSTED_CHECKPOINTS=1``), which unpickles it
    whole and can run code from it. http(s) files are downloaded to torch's hub
    cache first and read the same way (mmengine's own http loader unpickles them
    whole); other schemes go through mmengine's loaders.
    """
    filename = str(filename)
    if filename.startswith(('http://', 'https://')):
        filename = _download(filename)
    if '://' not in filename:
        ckpt = load_checkpoint_file(filename, map_location=map_location, trusted=trusted)
    else:
        ckpt = CheckpointLoader.load_checkpoint(filename, map_location=map_location)
    if not isinstance(ckpt, dict):
        raise TypeError(f'checkpoint {filename!r} holds a {type(ckpt).__name__}, '
                        'expected a dict of tensors or a training checkpoint')
    return ckpt


def unwrap_state_dict(ckpt: dict, checkpoint_key: Optional[str] = None) -> Dict[str, Tensor]:
    """Return the state dict inside a training checkpoint.

    Args:
        ckpt: what ``torch.load`` returned.
        checkpoint_key: force an entry (e.g. ``'model_ema'``); by default the first
            of ``state_dict``, ``model``, ``module`` that exists, else ``ckpt``.
    """
    if checkpoint_key is not None:
        if checkpoint_key not in ckpt:
            raise KeyError(f'checkpoint_key={checkpoint_key!r} is not in the checkpoint; '
                           f'it has {sorted(ckpt)[:20]}')
        sd = ckpt[checkpoint_key]
    else:
        sd = ckpt
        for key in CONTAINER_KEYS:
            if key in ckpt and isinstance(ckpt[key], dict):
                sd = ckpt[key]
                break
    # timm ModelEma saves its own module: unwrap 'module' once more if needed
    if isinstance(sd, dict) and 'module' in sd and isinstance(sd['module'], dict):
        sd = sd['module']
    return OrderedDict((k, v) for k, v in sd.items() if isinstance(v, Tensor))


def strip_prefix(sd: Dict[str, Tensor], prefix: Optional[str]) -> Dict[str, Tensor]:
    """Keep keys under ``prefix`` (stripped). None: strip 'module.'/'backbone.' if all keys have it."""
    if prefix:
        if not prefix.endswith('.'):
            prefix += '.'
        out = OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix))
        if not out:
            raise KeyError(f'prefix={prefix!r} matches no key of the checkpoint')
        return out
    for p in STRIP_PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = OrderedDict((k[len(p):], v) for k, v in sd.items())
        elif any(k.startswith(p) for k in sd) and p == 'backbone.':
            # a whole detector/segmentor checkpoint: take its backbone
            sd = OrderedDict((k[len(p):], v) for k, v in sd.items() if k.startswith(p))
    return sd


def load_backbone_weights(model: nn.Module, state_dict: Dict[str, Tensor],
                          min_coverage: float = 0.9,
                          ignore_missing: Sequence[str] = (),
                          logger: Optional[MMLogger] = None,
                          source: str = 'checkpoint') -> dict:
    """Load ``state_dict`` into ``model`` and report coverage.

    Args:
        model: the backbone.
        state_dict: already unwrapped and converted to the model's key names.
        min_coverage: fraction of the model's keys that must be loaded; below it
            a ``RuntimeError`` is raised (0 disables the check).
        ignore_missing: key substrings not counted as missing (e.g. new heads).
        source: a name for messages.

    Returns:
        dict with ``missing``, ``unexpected``, ``coverage``.
    """
    own = model.state_dict()
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    counted = [k for k in own if not any(s in k for s in ignore_missing)]
    named = sum(k in state_dict for k in counted) / max(len(counted), 1)
    if named < min_coverage:
        # another family: say so first (its few same-named keys may also differ in shape)
        raise RuntimeError(
            f'{source}: only {named:.1%} of the backbone keys are in the checkpoint '
            f'(< {min_coverage:.0%}); is it a checkpoint of another model family or arch? '
            f'e.g. missing {[k for k in counted if k not in state_dict][:5]}, checkpoint has '
            f'{list(state_dict)[:5]}'
            + (f'; {len(mismatched)} shape mismatch(es): {mismatched[:3]}' if mismatched else '')
            + ". Pass init_cfg=dict(type='Pretrained', ..., min_coverage=0.0) to allow it.")
    if mismatched:
        raise RuntimeError(f'{source}: shape mismatch for {len(mismatched)} key(s):\n  '
                           + '\n  '.join(mismatched[:20]))
    incompatible = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in incompatible.missing_keys
               if not any(s in k for s in ignore_missing)]
    loaded = len(counted) - len(missing)
    coverage = loaded / max(len(counted), 1)
    msg = (f'{source}: loaded {loaded}/{len(counted)} backbone keys '
           f'({coverage:.1%}); {len(missing)} missing, '
           f'{len(incompatible.unexpected_keys)} unexpected')
    if missing:
        msg += f'\n  missing: {missing[:10]}{" ..." if len(missing) > 10 else ""}'
    if incompatible.unexpected_keys:
        unexp = incompatible.unexpected_keys
        msg += f'\n  unexpected: {unexp[:10]}{" ..." if len(unexp) > 10 else ""}'
    print_log(msg, logger=logger or 'current')
    if coverage < min_coverage:
        raise RuntimeError(
            msg + f'\nOnly {coverage:.1%} of the backbone keys were found (< {min_coverage:.0%}). '
            'Is this a checkpoint of another model family or arch? Pass '
            "init_cfg=dict(type='Pretrained', ..., min_coverage=0.0) to allow it.")
    return dict(missing=missing, unexpected=list(incompatible.unexpected_keys),
                coverage=coverage)


def load_pretrained(model: nn.Module, checkpoint: str, prefix: Optional[str] = None,
                    checkpoint_key: Optional[str] = None, min_coverage: float = 0.9,
                    convert: Optional[Callable[[Dict[str, Tensor]], Dict[str, Tensor]]] = None,
                    ignore_missing: Sequence[str] = (),
                    map_location: str = 'cpu', trusted: Optional[bool] = None) -> dict:
    """Read, unwrap, convert and load a checkpoint file into a backbone.

    ``trusted``: see :func:`read_checkpoint` (True runs whatever the file pickled).
    """
    ckpt = read_checkpoint(checkpoint, map_location, trusted=trusted)
    sd = strip_prefix(unwrap_state_dict(ckpt, checkpoint_key), prefix)
    if convert is not None:
        try:
            sd = convert(sd)
        except (ValueError, KeyError, RuntimeError) as e:  # e.g. a pos_embed of another layout
            raise RuntimeError(f'{checkpoint}: cannot convert it for {type(model).__name__} ({e}); '
                               'is it a checkpoint of another model family or arch?') from e
    return load_backbone_weights(model, sd, min_coverage, ignore_missing,
                                 source=str(checkpoint))
