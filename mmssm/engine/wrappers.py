"""A DDP wrapper that also works for CPU (gloo) training."""
from mmengine.model import MMDistributedDataParallel

from ..registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUFriendlyDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that drops ``device_ids`` for CPU modules.

    mmengine 0.10.7's Runner always passes ``device_ids=[LOCAL_RANK]``, which
    DDP rejects for CPU modules ("device_ids ... only work with ... GPU
    modules"). ``tools/train.py`` selects this wrapper when training on CPU.
    """

    def __init__(self, module, device_ids=None, **kwargs) -> None:
        on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
        kwargs.setdefault('broadcast_buffers', False)
        super().__init__(module=module, device_ids=None if on_cpu else device_ids, **kwargs)
