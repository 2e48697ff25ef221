"""mmssm: state-space-model vision backbones for OpenMMLab 2.x.

Importing mmssm checks the installed versions against the tested matrix and
makes mmengine load local checkpoints on torch>=2.6 (see
:func:`mmssm.utils.compat._load_local_trusted`: local files are trusted).
"""
from .utils.compat import (_warn_transformers, check_environment,
                           install_checkpoint_loader, install_mmaction_drn_fix)
from .version import __version__

check_environment()
_warn_transformers()
install_checkpoint_loader()
install_mmaction_drn_fix()

__all__ = ['__version__']
