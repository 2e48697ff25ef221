"""Convert an official Vim checkpoint (hustvl/Vim) into an mmssm / mmpretrain checkpoint.

The official files are training checkpoints ``{'model', 'model_ema', 'args': Namespace, ...}``
(``args`` makes a plain ``torch.load(weights_only=True)`` refuse them; mmssm's loader allows
``argparse.Namespace`` and nothing else beyond tensors, so ``--trusted`` is needed only for
files holding other objects, and then runs whatever they pickled).
The output is ``{'state_dict': {'backbone.<key>': ..., 'head.fc.weight', 'head.fc.bias'},
'meta': {...}}``: load it into an mmpretrain ``ImageClassifier`` whose backbone is
``type='mmssm.Vim'`` (the config printed at the end) or into the backbone alone with
``init_cfg=dict(type='Pretrained', checkpoint=OUT)``. Backbone keys keep the official
names (our layout is the official one, class token in the middle of ``pos_embed``).

Usage:
    python tools/model_converters/vim2mmssm.py vim_t_midclstok_76p1acc.pth vim-t_mmssm.pth
        [--ema] [--trusted]
"""
import argparse
import math
import os.path as osp
import sys
from collections import OrderedDict

import torch

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..', '..')))

import mmssm  # noqa: E402,F401
from mmssm.models.backbones.vim import Vim  # noqa: E402
from mmssm.models.utils.checkpoint import (load_backbone_weights,  # noqa: E402
                                           read_checkpoint, unwrap_state_dict)


def infer_backbone_cfg(sd: dict, args_ns=None, stride=None, img_size=None) -> dict:
    """mmssm.Vim settings that reproduce the official model behind ``sd``."""
    D = sd['patch_embed.proj.weight'].shape[0]
    patch = sd['patch_embed.proj.weight'].shape[-1]
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('layers.'))
    d_inner, d_state = sd['layers.0.mixer.A_log'].shape
    arch = dict(embed_dims=D, num_layers=depth, d_state=d_state, expand=d_inner // D,
                d_conv=sd['layers.0.mixer.conv1d.weight'].shape[-1],
                dt_rank=sd['layers.0.mixer.dt_proj.weight'].shape[1])
    named = {192: 'tiny', 384: 'small', 768: 'base'}.get(D)
    if named and depth == 24 and d_state == 16 and arch['expand'] == 2 and arch['d_conv'] == 4 \
            and arch['dt_rank'] == math.ceil(D / 16):
        arch = named
    has_cls = 'cls_token' in sd
    grid = math.isqrt(sd['pos_embed'].shape[1] - int(has_cls))
    if img_size is None:
        img_size = getattr(args_ns, 'input_size', None) or 224
    if stride is None:
        model_name = str(getattr(args_ns, 'model', ''))
        if 'stride8' in model_name:
            stride = 8
        elif grid > 1 and (img_size - patch) % (grid - 1) == 0:
            stride = (img_size - patch) // (grid - 1)
        else:
            stride = patch
    return dict(type='mmssm.Vim', arch=arch, img_size=img_size, patch_size=patch,
                stride=stride, with_cls_token=has_cls)


def convert(src: str, dst: str, ema: bool = False, stride=None, img_size=None,
            trusted: bool = False) -> dict:
    ckpt = read_checkpoint(src, trusted=trusted)
    key = 'model_ema' if ema else None
    if ema and 'model_ema' not in ckpt:
        raise KeyError(f'{src} has no model_ema entry (keys: {sorted(ckpt)})')
    sd = unwrap_state_dict(ckpt, key)
    args_ns = ckpt.get('args')
    cfg = infer_backbone_cfg(sd, args_ns, stride, img_size)

    out = OrderedDict()
    for k, v in sd.items():
        if k.startswith('rope.'):
            continue  # RoPE tables are recomputed buffers (not supported by mmssm.Vim)
        if k.startswith('head.'):
            out['head.fc.' + k[len('head.'):]] = v
        else:
            out['backbone.' + k] = v

    # coverage report: load the backbone part into a freshly built model
    build = {k: v for k, v in cfg.items() if k != 'type'}
    model = Vim(**build)
    backbone_sd = {k[len('backbone.'):]: v for k, v in out.items() if k.startswith('backbone.')}
    report = load_backbone_weights(model, model.convert_checkpoint(backbone_sd),
                                   min_coverage=1.0, source=src)
    meta = dict(converted_from=osp.basename(src), entry='model_ema' if ema else 'model',
                backbone=cfg, mmssm_version=mmssm.__version__,
                num_classes=int(sd['head.weight'].shape[0]) if 'head.weight' in sd else None,
                epoch=ckpt.get('epoch'))
    torch.save(dict(state_dict=out, meta=meta), dst)
    print(f'wrote {dst}: {len(out)} tensors, backbone coverage {report["coverage"]:.1%}')
    print('backbone=dict(' + ', '.join(f'{k}={v!r}' for k, v in cfg.items()) + ')')
    if meta['num_classes']:
        print(f"head=dict(type='LinearClsHead', num_classes={meta['num_classes']}, "
              f"in_channels={model.embed_dims})")
    return dict(report, meta=meta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('src', help='official Vim checkpoint (.pth)')
    p.add_argument('dst', help='output file')
    p.add_argument('--ema', action='store_true', help='convert model_ema instead of model')
    p.add_argument('--stride', type=int, default=None,
                   help='patch stride (default: from args.model / the pos_embed grid)')
    p.add_argument('--img-size', type=int, default=None,
                   help='training image size (default: args.input_size or 224)')
    p.add_argument('--trusted', action='store_true',
                   help='unpickle the whole file, also globals outside mmssm\'s allowlist '
                        '(can run code from it: only for files you trust)')
    a = p.parse_args()
    convert(a.src, a.dst, a.ema, a.stride, a.img_size, trusted=a.trusted)


if __name__ == '__main__':
    main()
