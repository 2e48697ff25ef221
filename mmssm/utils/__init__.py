from .compat import (check_environment, check_mmcv_ops,
                     install_checkpoint_loader)

__all__ = ['check_environment', 'check_mmcv_ops', 'install_checkpoint_loader']
