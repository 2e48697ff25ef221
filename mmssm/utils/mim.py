"""Make ``_base_ = 'mmssm::mask_rcnn/v2m_s_1x.py'`` work in any mmengine config.

mmengine 0.10.7 resolves ``pkg::path`` bases in ``Config._get_cfg_path`` (mmengine/config/
config.py) through two things that do not know mmssm:

* ``mmengine.config.utils.MODULE2PACKAGE``, a fixed table of OpenMMLab packages
  (``_get_package_and_cfg_path`` asserts the scope is in it: "mmengine does not support to load
  mmssm config");
* ``get_installed_path``, which takes the distribution's ``location`` from pkg_resources. For a
  setuptools >= 64 editable install that is site-packages, where no ``mmssm/`` folder exists.

``register_config_package`` adds mmssm to the table and answers ``get_installed_path('mmssm')``
with the folder of the imported package, which holds ``.mim/configs`` (symlinks in a checkout and
an editable install, copied files in a wheel; see setup.py). It runs at ``import mmssm``, so it
applies only once mmssm is imported: our tools import it before parsing a config; a third-party
entry point (another project's train.py, ``mim``) must ``import mmssm`` first.
"""
import os.path as osp

PACKAGE_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))  # .../mmssm


def register_config_package() -> None:
    """Let mmengine's config loader resolve ``mmssm::`` bases (idempotent)."""
    from mmengine.config import config as config_module
    from mmengine.config import utils as config_utils

    # The same dict object is shared by mmengine.registry and mmengine.infer.
    config_utils.MODULE2PACKAGE.setdefault('mmssm', 'mmssm')

    original = config_module.get_installed_path
    if getattr(original, '_mmssm_aware', False):
        return

    def get_installed_path(package: str) -> str:
        if package == 'mmssm':
            return PACKAGE_DIR
        return original(package)

    get_installed_path._mmssm_aware = True  # type: ignore[attr-defined]
    get_installed_path.__doc__ = original.__doc__
    # Config._get_cfg_path looks the name up in its module's globals.
    config_module.get_installed_path = get_installed_path
