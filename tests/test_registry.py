"""`type='mmssm.X'` builds from mmpretrain, mmdet and mmseg scopes without custom_imports."""
import subprocess
import sys

import pytest

SCOPES = ('mmpretrain', 'mmdet', 'mmseg')


@pytest.mark.parametrize('scope', SCOPES)
def test_build_from_each_scope(scope):
    import importlib
    registry = importlib.import_module(f'{scope}.registry')
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        neck = registry.MODELS.build(dict(type='mmssm.SimplePyramid', in_channels=8))
    from mmssm.models.necks import SimplePyramid
    assert type(neck) is SimplePyramid
    assert len(neck.levels) == 4


def test_scoped_type_imports_mmssm_lazily():
    """A fresh process that never imports mmssm still finds `mmssm.SimplePyramid`."""
    code = ('from mmdet.registry import MODELS\n'
            'import sys\n'
            'assert "mmssm" not in sys.modules\n'
            'm = MODELS.build(dict(type="mmssm.SimplePyramid", in_channels=8))\n'
            'print(type(m).__module__)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith('mmssm.models.necks.simple_pyramid')


def test_backbone_modules_do_not_import_mmdet_or_mmseg():
    code = ('import sys\nimport mmssm.models\n'
            'bad = [m for m in ("mmdet", "mmseg") if m in sys.modules]\n'
            'assert not bad, bad\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_unscoped_name_is_not_found_in_mmdet():
    """Only the scoped name resolves: no accidental clash with upstream names."""
    from mmdet.registry import MODELS
    with pytest.raises(KeyError):
        MODELS.build(dict(type='SimplePyramid', in_channels=8))
