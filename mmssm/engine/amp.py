"""Mixed-precision training on CPU (bf16), which mmengine 0.10.7's AmpOptimWrapper refuses."""
from typing import Union

import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from ..registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` for CPU: bf16 autocast, no loss scaling.

    mmengine's wrapper asserts a GPU/NPU/MLU/MUSA device and builds a CUDA
    ``GradScaler``. CPU autocast supports bfloat16 only, which has fp32's
    exponent range, so gradients need no scaling: the scaler here is disabled
    (an identity) and checkpoints stay compatible with ``AmpOptimWrapper``'s
    (``loss_scaler`` state is empty). ``tools/train.py --amp`` selects it
    when no CUDA device is available. Building it also makes mmcv's CPU
    ``nms``/``RoIAlign`` (fp32-only kernels) accept bf16 inputs, and mmaction2's
    recognizer heads accept bf16 scores.
    """

    def __init__(self, loss_scale: Union[str, float, dict] = 'dynamic',
                 dtype: Union[str, torch.dtype] = 'bfloat16', **kwargs) -> None:
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ValueError(f'CPUAmpOptimWrapper: CPU autocast supports dtype=bfloat16 only, '
                             f'got {dtype!r}')
        OptimWrapper.__init__(self, **kwargs)  # skip AmpOptimWrapper's device assert
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler('cpu', enabled=False)
        self.cast_dtype = torch.bfloat16
        try:
            _install_cpu_bf16_mmcv_ops()
        except ImportError:  # no compiled mmcv: no detection ops to fix
            pass
        _install_bf16_mmaction_heads()


def _install_cpu_bf16_mmcv_ops() -> None:
    """mmcv 2.1.0's CPU ``nms`` and ``RoIAlign`` kernels take fp32 only: under CPU bf16
    autocast (mmdet's RPN proposals, RoI feature extraction) run them in fp32. Idempotent;
    only installed when a CPUAmpOptimWrapper is built (GPU kernels support half)."""
    import sys

    import mmcv.ops  # noqa: F401
    nms_mod, roi_mod = sys.modules['mmcv.ops.nms'], sys.modules['mmcv.ops.roi_align']
    if getattr(nms_mod.nms, '_mmssm_fp32', False):
        return
    low = (torch.bfloat16, torch.float16)
    nms = nms_mod.nms

    def nms_fp32(boxes, scores, *args, **kwargs):
        if boxes.device.type == 'cpu' and (boxes.dtype in low or scores.dtype in low):
            boxes, scores = boxes.float(), scores.float()
        return nms(boxes, scores, *args, **kwargs)

    roi_forward = roi_mod.RoIAlign.forward

    def roi_align_fp32(self, input, rois):
        if input.device.type == 'cpu' and (input.dtype in low or rois.dtype in low):
            return roi_forward(self, input.float(), rois.float()).to(input.dtype)
        return roi_forward(self, input, rois)

    nms_fp32._mmssm_fp32 = True
    nms_mod.nms = nms_fp32  # batched_nms looks its nms_type up in this module
    roi_mod.RoIAlign.forward = roi_align_fp32


def _install_bf16_mmaction_heads() -> None:
    """mmaction2 1.2.0's ``BaseHead.loss_by_feat`` computes the top-k accuracy it logs from
    ``cls_scores.detach().cpu().numpy()``, which fails for bfloat16 (numpy has no bf16), so
    every bf16 training step of a video recognizer died there. Upcast bf16 scores first
    (under autocast the cross-entropy runs in fp32 anyway). Idempotent; only when mmaction's
    heads are already imported (the Runner builds the model before the optimizer wrapper)."""
    import sys
    base = sys.modules.get('mmaction.models.heads.base')
    if base is None or getattr(base.BaseHead.loss_by_feat, '_mmssm_bf16', False):
        return
    loss_by_feat = base.BaseHead.loss_by_feat

    def loss_by_feat_fp32(self, cls_scores, data_samples):
        if isinstance(cls_scores, torch.Tensor) and cls_scores.dtype == torch.bfloat16:
            cls_scores = cls_scores.float()
        return loss_by_feat(self, cls_scores, data_samples)

    loss_by_feat_fp32._mmssm_bf16 = True
    base.BaseHead.loss_by_feat = loss_by_feat_fp32
