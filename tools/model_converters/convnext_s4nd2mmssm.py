"""Convert an official ConvNeXt-S4ND checkpoint (state-spaces/s4) into an mmssm checkpoint.

The official training code saves PyTorch Lightning checkpoints whose ``state_dict``
holds the network under ``model.`` (bare ``state_dict()`` files work too). Key names
inside are ours already (``stem.*``, ``stages.*``, S4ND ``kernel.{axis}.*`` with the
DPLR ``C``/``l_kernel`` pair), except the classifier: ``head.norm`` becomes the backbone's
last output norm ``norm3`` and ``head.fc`` becomes mmpretrain's ``head.fc``.

``--video T H W`` inflates a 2-D checkpoint into ``ConvNeXtS4ND3D`` (spatial kernels
copied, fresh temporal kernel; see ``ConvNeXtS4ND3D.inflate_2d_state_dict``).

Usage:
    python tools/model_converters/convnext_s4nd2mmssm.py SRC.ckpt DST.pth [--arch tiny]
        [--img-size 224] [--video 30 224 224] [--trusted]

The source is read with ``weights_only=True`` and mmssm's allowlist
(:mod:`mmssm.utils.safe_load`); ``--trusted`` unpickles a file needing other globals.
"""
import argparse
import os.path as osp
import sys
from collections import OrderedDict
from typing import Union

import torch

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), '..', '..')))

import mmssm  # noqa: E402,F401
from mmssm.models.backbones.convnext_s4nd import (ConvNeXtS4ND,  # noqa: E402
                                                  ConvNeXtS4ND3D)
from mmssm.models.utils.checkpoint import (load_backbone_weights,  # noqa: E402
                                           read_checkpoint, strip_prefix,
                                           unwrap_state_dict)


def convert(src: str, dst: str, arch: Union[str, dict] = 'tiny', img_size: int = 224,
            video=None, trusted: bool = False) -> dict:
    sd = unwrap_state_dict(read_checkpoint(src, trusted=trusted))
    if any(k.startswith('model.') for k in sd):
        sd = strip_prefix(sd, 'model.')
    head = OrderedDict(('head.fc.' + k[len('head.fc.'):], v) for k, v in sd.items()
                       if k.startswith('head.fc.'))
    if video:
        cfg = dict(type='mmssm.ConvNeXtS4ND3D', arch=arch, img_size=tuple(video))
        model = ConvNeXtS4ND3D(arch=arch, img_size=tuple(video))
    else:
        cfg = dict(type='mmssm.ConvNeXtS4ND', arch=arch, img_size=img_size)
        model = ConvNeXtS4ND(arch=arch, img_size=img_size)
    backbone_sd = model.convert_checkpoint(sd)  # head.norm -> norm3; 2-D -> 3-D inflation
    report = load_backbone_weights(model, backbone_sd, min_coverage=0.9, source=src)
    out = OrderedDict(('backbone.' + k, v) for k, v in model.state_dict().items())
    out.update(head if not video else {})
    meta = dict(converted_from=osp.basename(src), backbone=cfg, mmssm_version=mmssm.__version__)
    torch.save(dict(state_dict=out, meta=meta), dst)
    print(f'wrote {dst}: {len(out)} tensors, backbone coverage {report["coverage"]:.1%}')
    print('backbone=dict(' + ', '.join(f'{k}={v!r}' for k, v in cfg.items()) + ')')
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('src', help='official checkpoint (Lightning .ckpt or a state dict)')
    p.add_argument('dst', help='output file')
    p.add_argument('--arch', default='tiny', help='micro | tiny | small | base')
    p.add_argument('--img-size', type=int, default=224, help='training resolution')
    p.add_argument('--video', type=int, nargs=3, metavar=('T', 'H', 'W'),
                   help='inflate into ConvNeXtS4ND3D for clips of this size')
    p.add_argument('--trusted', action='store_true',
                   help='unpickle the whole file, also globals outside mmssm\'s allowlist '
                        '(can run code from it: only for files you trust)')
    a = p.parse_args()
    convert(a.src, a.dst, a.arch, a.img_size, a.video, trusted=a.trusted)


if __name__ == '__main__':
    main()
