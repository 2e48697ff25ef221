"""Install mmssm: state-space-model vision backbones for OpenMMLab 2.x."""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup

ROOT = osp.dirname(osp.abspath(__file__))
# What `mmssm::` config bases and `mim` look for inside the installed package.
MIM_FILES = ('configs', 'tools', 'model-index.yml')


def read_version() -> str:
    ns: dict = {}
    with open(osp.join(osp.dirname(__file__), 'mmssm', 'version.py')) as f:
        exec(f.read(), ns)
    return ns['__version__']


def read_requirements(name: str) -> list:
    path = osp.join(osp.dirname(__file__), 'requirements', name)
    with open(path) as f:
        return [ln.split('#')[0].strip() for ln in f if ln.split('#')[0].strip()]


def add_mim_extension() -> None:
    """Expose configs/, tools/ and model-index.yml as mmssm/.mim/ (the OpenMMLab layout).

    Symlinks, so an editable install sees edits at once; a wheel build copies the files they point
    at (setuptools reads through links). Where the OS offers no symlinks, copies are written.
    A no-op when the links are already in place (they are committed to git).
    """
    mim = osp.join(ROOT, 'mmssm', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in MIM_FILES:
        src, dst = osp.join(ROOT, name), osp.join(mim, name)
        if not osp.exists(src):  # building from a tree that lacks it: keep what is shipped
            continue
        rel = osp.relpath(src, mim)
        if osp.islink(dst) and os.readlink(dst) == rel:
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        try:
            os.symlink(rel, dst)
        except OSError:
            if osp.isdir(src):
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
            else:
                shutil.copyfile(src, dst)


add_mim_extension()
setup(
    name='mmssm',
    version=read_version(),
    description='State-space-model vision backbones (Vim, VMamba, V2M, S4ND) for OpenMMLab 2.x',
    long_description=open('README.md').read() if osp.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmssm', 'mmssm.*']),
    package_data={'mmssm': ['.mim/model-index.yml', '.mim/configs/**/*.py', '.mim/configs/**/*.yml',
                            '.mim/tools/**/*.py', '.mim/tools/**/*.sh']},
    python_requires='>=3.9',
    install_requires=read_requirements('runtime.txt'),
    extras_require={
        'tests': read_requirements('tests.txt'),
        'video': read_requirements('video.txt'),
    },
    license='Apache License 2.0',
    zip_safe=False,
)
