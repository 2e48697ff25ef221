"""Convert an official VMamba checkpoint into an mmssm checkpoint.

Inputs (``MzeroMiko/VMamba``):
- classification training checkpoints ``{'model', 'model_ema'?, 'config', ...}``
  (``--key model_ema`` picks the EMA weights) or bare ``VSSM`` state dicts;
- detection / segmentation checkpoints (``MM_VSSM`` under ``backbone.``, plus
  mmdet/mmseg neck and head keys, which are kept as they are).

Output: ``{'state_dict': {'backbone.<key>': ...}, 'meta': {...}}``. With ``--head``
a classification checkpoint becomes an mmpretrain ``ImageClassifier`` checkpoint
(``VMamba(out_indices=(3,))`` + ``GlobalAveragePooling`` + ``LinearClsHead``):
``classifier.norm`` -> ``backbone.outnorm{last}`` and ``classifier.head`` -> ``head.fc``,
which reproduces the official logits exactly.

``--arch`` builds the mmssm backbone and reports key coverage (missing,
unexpected and mismatched keys) before writing.

Example::

    python tools/model_converters/vmamba2mmssm.py vssm1_tiny_0230s_ckpt_epoch_264.pth \
        vmamba_tiny_mmssm.pth --arch tiny

The source is read with ``weights_only=True`` and mmssm's allowlist
(:mod:`mmssm.utils.safe_load`: official files hold a yacs ``CfgNode``, which is allowed);
``--trusted`` unpickles a file needing other globals, and can run code from it.
"""
import argparse
import json
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor


def _official_backbone(ckpt: dict, key: Optional[str]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Return (VSSM/MM_VSSM backbone keys, other keys of a detector/segmentor)."""
    if key is not None:
        if key not in ckpt:
            raise KeyError(f'--key {key!r} is not in the checkpoint; it has {sorted(ckpt)}')
        sd = ckpt[key]
    else:
        sd = next((ckpt[k] for k in ('model', 'state_dict') if isinstance(ckpt.get(k), dict)), ckpt)
    sd = OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                     for k, v in sd.items() if isinstance(v, Tensor))
    if any(k.startswith('backbone.') for k in sd):  # MM_VSSM inside mmdet/mmseg
        backbone = OrderedDict((k[9:], v) for k, v in sd.items() if k.startswith('backbone.'))
        others = OrderedDict((k, v) for k, v in sd.items() if not k.startswith('backbone.'))
        return backbone, others
    return sd, OrderedDict()


def convert(ckpt: dict, key: Optional[str] = None, with_head: bool = False,
            arch=None) -> Tuple[Dict[str, Tensor], dict]:
    """Convert a loaded official checkpoint.

    Args:
        ckpt: what ``torch.load`` returned.
        key: entry holding the weights (default ``'model'``, else ``'state_dict'``, else the dict).
        with_head: classification only: also emit mmpretrain head weights and
            put ``classifier.norm`` into ``backbone.outnorm{last}``.
        arch: a VMamba ``arch`` (name or dict) to check coverage against.

    Returns:
        (mmssm state dict with ``backbone.`` prefixes, report dict).
    """
    from mmssm.models.backbones.vmamba import convert_vmamba_state_dict

    sd, others = _official_backbone(ckpt, key)
    cls = OrderedDict((k, v) for k, v in sd.items() if k.startswith('classifier.'))
    own = None
    if arch is not None:
        from mmssm.models.backbones.vmamba import VMamba
        num = len(VMamba._settings(arch)['depths'])
        outs = tuple(range(num)) if not cls or not with_head else (num - 1, )
        own = VMamba(arch=arch, out_indices=outs).state_dict()
    backbone = convert_vmamba_state_dict(sd, own if own is not None else sd, verbose=False)
    report = dict(backbone_keys=len(backbone), dropped=[k for k in cls], other_keys=len(others))
    out = OrderedDict(('backbone.' + k, v) for k, v in backbone.items())
    if with_head:
        if not cls:
            raise ValueError('--head needs a classification checkpoint (classifier.* keys)')
        last = max(int(k[len('layers.'):].split('.')[0]) for k in backbone if k.startswith('layers.'))
        out[f'backbone.outnorm{last}.weight'] = cls['classifier.norm.weight']
        out[f'backbone.outnorm{last}.bias'] = cls['classifier.norm.bias']
        out['head.fc.weight'] = cls['classifier.head.weight']
        out['head.fc.bias'] = cls['classifier.head.bias']
        report['dropped'] = []
    out.update(others)
    if own is not None:
        got = {k[len('backbone.'):]: v for k, v in out.items() if k.startswith('backbone.')}
        report['missing'] = [k for k in own if k not in got and not k.startswith('outnorm')]
        # per-stage output norms exist only in det/seg (MM_VSSM) checkpoints
        report['new_outnorm'] = [k for k in own if k not in got and k.startswith('outnorm')]
        report['unexpected'] = [k for k in got if k not in own]
        report['mismatched'] = [k for k in got if k in own and got[k].shape != own[k].shape]
        report['coverage'] = 1 - len(report['missing']) / max(len(own), 1)
    return out, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='output mmssm checkpoint')
    parser.add_argument('--key', default=None, help="weights entry, e.g. 'model_ema' (default 'model')")
    parser.add_argument('--head', action='store_true',
                        help='emit an mmpretrain ImageClassifier checkpoint (classification input)')
    parser.add_argument('--arch', default=None,
                        help="VMamba arch to check coverage against: a name (tiny) or a JSON dict")
    parser.add_argument('--trusted', action='store_true',
                        help='unpickle the whole file, also globals outside mmssm\'s allowlist '
                             '(can run code from it: only for files you trust)')
    args = parser.parse_args()

    # weights_only=True + mmssm's allowlist (the yacs CfgNode of official training files)
    from mmssm.models.utils.checkpoint import read_checkpoint
    ckpt = read_checkpoint(args.src, trusted=args.trusted)
    arch = json.loads(args.arch) if args.arch and args.arch.startswith('{') else args.arch
    out, report = convert(ckpt, args.key, args.head, arch)
    print(f"{args.src}: {report['backbone_keys']} backbone keys, {report['other_keys']} "
          f"detector/segmentor keys kept, dropped {report['dropped']}")
    if 'coverage' in report:
        print(f"coverage of VMamba(arch={args.arch!r}): {report['coverage']:.1%}; "
              f"missing {report['missing']}; unexpected {report['unexpected']}; "
              f"mismatched {report['mismatched']}; new (init) {report['new_outnorm']}")
        if report['mismatched'] or report['unexpected']:
            raise SystemExit('checkpoint does not match the arch; nothing written')
    torch.save({'state_dict': out, 'meta': dict(converted_from=args.src, key=args.key)}, args.dst)
    print(f'saved {len(out)} keys to {args.dst}')


if __name__ == '__main__':
    main()
