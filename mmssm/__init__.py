"""mmssm: state-space-model vision backbones for OpenMMLab 2.x.

Importing mmssm checks the installed versions against the tested matrix and
makes mmengine load local checkpoints on torch>=2.6 with ``weights_only=True`` and
a narrow allowlist (see :mod:`mmssm.utils.safe_load`; no file runs code) and
write them atomically (:mod:`mmssm.utils.atomic_io`: a job killed while saving
keeps its previous checkpoint and ``last_checkpoint``), and makes an empty
batch a clear error in every mmengine data preprocessor. It also lets mmengine
resolve ``_base_ = 'mmssm::...'`` config bases (:mod:`mmssm.utils.mim`).
"""
from .utils.atomic_io import install_atomic_checkpoint_writes
from .utils.compat import (_warn_transformers, check_environment,
                           install_checkpoint_loader, install_empty_batch_check,
                           install_mmaction_drn_fix)
from .utils.mim import register_config_package
from .version import __version__

check_environment()
_warn_transformers()
install_checkpoint_loader()
install_atomic_checkpoint_writes()
install_empty_batch_check()
install_mmaction_drn_fix()
register_config_package()  # `_base_ = 'mmssm::...'` in other projects' configs

__all__ = ['__version__']
