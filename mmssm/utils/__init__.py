from .compat import (check_environment, check_mmcv_ops,
                     install_checkpoint_loader)
from .safe_load import (ALLOWED_GLOBALS, UntrustedCheckpointError,
                        load_checkpoint_file)

__all__ = ['check_environment', 'check_mmcv_ops', 'install_checkpoint_loader',
           'ALLOWED_GLOBALS', 'UntrustedCheckpointError', 'load_checkpoint_file']
