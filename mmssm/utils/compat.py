"""Environment checks and the torch>=2.6 checkpoint loader, run at ``import mmssm``."""
import importlib.metadata as md
import os.path as osp
import warnings
from typing import Optional


# The version matrix the project is tested on; see README "Version matrix".
MMCV_RANGE = ('2.0.0rc4', '2.2.0')  # mmdet 3.3.0 / mmseg 1.2.2 assert mmcv < 2.2.0
SETUPTOOLS_MAX = '81'  # >=81 drops pkg_resources (mmcv build, mmengine 'mmdet::' bases)


def _vtuple(v: str) -> tuple:
    out = []
    for part in v.replace('rc', '.').split('.')[:3]:
        num = ''.join(ch for ch in part if ch.isdigit())
        out.append(int(num) if num else 0)
    return tuple(out)


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def check_environment() -> None:
    """Fail early, naming the fix, when installed versions are outside the matrix."""
    mmcv_v = _version('mmcv')
    if mmcv_v is not None and not (_vtuple(MMCV_RANGE[0]) <= _vtuple(mmcv_v) < _vtuple(MMCV_RANGE[1])):
        raise ImportError(
            f'mmssm needs mmcv>={MMCV_RANGE[0]},<{MMCV_RANGE[1]} (mmdet 3.3.0 and mmseg 1.2.2 '
            f'refuse others), found mmcv {mmcv_v}. Fix: run `bash tools/setup_env.sh`, or '
            f'`pip uninstall mmcv && pip install --no-build-isolation mmcv==2.1.0`.')
    st_v = _version('setuptools')
    if st_v is not None and _vtuple(st_v) >= _vtuple(SETUPTOOLS_MAX):
        raise ImportError(
            f'setuptools {st_v} removed pkg_resources, which mmengine 0.10.7 needs for '
            f"'mmdet::'/'mmseg::' config bases. Fix: pip install 'setuptools>=77.0.3,<81'.")
    if _version('mmcv-lite') is not None and mmcv_v is None:
        raise ImportError(
            'mmcv-lite is installed but mmdet/mmseg need the compiled mmcv ops. Fix: '
            'pip uninstall mmcv-lite && bash tools/setup_env.sh')


def check_mmcv_ops() -> None:
    """Raise a clear error when mmcv was built without its compiled ops."""
    try:
        import mmcv.ops  # noqa: F401
        from mmcv import _ext  # noqa: F401
    except Exception as e:  # ImportError, or OSError for an ABI mismatch
        raise ImportError(
            f'mmcv is installed without working compiled ops ({e}). mmdet/mmseg need them. '
            'Fix: rebuild with MMCV_WITH_OPS=1 (bash tools/setup_env.sh does this) against '
            'the installed torch.') from e


def install_checkpoint_loader() -> None:
    """Make mmengine read local checkpoints with :func:`mmssm.utils.safe_load.load_checkpoint_file`.

    Stock torch>=2.6 + mmengine 0.10.7 call ``torch.load(weights_only=True)``, which
    refuses mmengine's own resume files (HistoryBuffer and numpy objects) and the
    official Vim/VMamba files (``argparse.Namespace``, yacs ``CfgNode``). The loader
    registered here keeps ``weights_only=True`` and allows those few globals for the
    duration of one load (see :data:`mmssm.utils.safe_load.ALLOWED_GLOBALS`); any
    other global is refused before the file is unpickled, unless the environment
    variable ``MMSSM_TRUSTED_CHECKPOINTS=1`` opts in. So ``load_from``, ``--resume``,
    ``tools/test.py`` and ``Pretrained`` init work, and no file loads that stock
    torch + mmengine would refuse for running code.
    """
    from mmengine.runner import CheckpointLoader

    from .safe_load import load_checkpoint_file

    def load_from_local(filename: str, map_location=None):
        return load_checkpoint_file(filename, map_location=map_location)

    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local)


def _warn_transformers() -> None:
    if _version('transformers') is not None and _version('mmpretrain') is not None:
        t = _version('transformers')
        if _vtuple(t) >= (4, 56, 0):
            warnings.warn(f'transformers {t} breaks `import mmpretrain.models` (mmpretrain 1.2.0 '
                          'multimodal imports). Fix: pip uninstall transformers, or '
                          "pip install 'transformers<4.56'.")


def install_empty_batch_check() -> None:
    """Refuse a batch with no samples with a clear error (idempotent).

    mmseg 1.2.2's SegDataPreProcessor indexes ``inputs[0]`` first and dies with an
    IndexError on an empty batch; mmengine's stack_batch asserts. Every data
    preprocessor of mmdet/mmseg passes the whole batch dict through
    ``BaseDataPreprocessor.cast_data``, so the check goes there.
    """
    from mmengine.model import BaseDataPreprocessor
    cast = BaseDataPreprocessor.cast_data
    if getattr(cast, '_mmssm_empty_check', False):
        return

    def cast_data(self, data):
        if isinstance(data, dict) and 'inputs' in data and hasattr(data['inputs'], '__len__') \
                and len(data['inputs']) == 0:
            raise ValueError(f'{type(self).__name__}: the batch is empty (0 inputs, '
                             f'{len(data.get("data_samples") or [])} data samples); check the '
                             'dataset filters and the sampler')
        return cast(self, data)

    cast_data._mmssm_empty_check = True
    BaseDataPreprocessor.cast_data = cast_data


class _MissingDRNFinder:
    """Provide ``mmaction.models.localizers.drn`` where the mmaction2 wheel lacks it.

    mmaction2 1.2.0's PyPI wheel and sdist omit the ``localizers/drn`` package
    that ``mmaction/models/localizers/__init__.py`` imports, so
    ``import mmaction.models`` fails for everyone. The modules given here hold
    a ``DRN`` whose construction raises, naming the packaging bug; nothing
    else in mmaction is touched.
    """
    NAMES = ('mmaction.models.localizers.drn', 'mmaction.models.localizers.drn.drn')

    def find_spec(self, name, path=None, target=None):
        if name not in self.NAMES:
            return None
        import importlib.machinery
        return importlib.machinery.ModuleSpec(name, self, is_package=name == self.NAMES[0])

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        class DRN:  # noqa: D401 - placeholder for the missing upstream model
            def __init__(self, *args, **kwargs):
                raise ImportError('mmaction2 1.2.0 from PyPI ships without its DRN localizer '
                                  '(mmaction/models/localizers/drn); install mmaction2 from '
                                  'source to use DRN.')
        module.DRN = DRN
        if module.__name__ == self.NAMES[0]:
            module.__path__ = []


def install_mmaction_drn_fix() -> None:
    """Let ``import mmaction.models`` work with the incomplete mmaction2 1.2.0 wheel."""
    import importlib.util
    import sys
    try:
        spec = importlib.util.find_spec('mmaction')
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    root = list(spec.submodule_search_locations)[0]
    if osp.isdir(osp.join(root, 'models', 'localizers', 'drn')):
        return
    if not any(isinstance(f, _MissingDRNFinder) for f in sys.meta_path):
        sys.meta_path.append(_MissingDRNFinder())
