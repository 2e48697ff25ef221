"""Install mmssm: state-space-model vision backbones for OpenMMLab 2.x."""
import os
import os.path as osp
import shutil
import warnings

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

# ---- compiled CPU selective scan (mmssm/ops/csrc) -------------------------------------
# One kernel source built once per SIMD level (no -march=native: a wheel or a
# shared install must run on any x86-64 CPU); mmssm.ops.selective_scan_cpp loads
# the best one the CPU supports. MMSSM_BUILD_EXT=0 skips the build; without a
# compiler (or torch) the install still succeeds and the chunked PyTorch scan is used.
SCAN_EXT_LEVELS = {  # module suffix -> (ATen CPU_CAPABILITY, compiler flags)
    'default': ('DEFAULT', []),
    'avx2': ('AVX2', ['-mavx2', '-mfma', '-mf16c']),
    'avx512': ('AVX512', ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq', '-mavx2',
                          '-mfma', '-mf16c']),
}


def _ext_warning(msg: str) -> None:
    warnings.warn(f'mmssm: a compiled CPU kernel (selective scan / S4 Cauchy products) is NOT '
                  f'built ({msg}); mmssm still works with the slower PyTorch code for it. To '
                  'build it: install a C++ compiler and run `python setup.py build_ext '
                  '--inplace` (or reinstall).')
    print(f'WARNING: mmssm compiled kernel not built: {msg}')


def scan_extensions() -> dict:
    """``ext_modules`` / ``cmdclass`` for setup(); empty when the build is skipped."""
    if os.environ.get('MMSSM_BUILD_EXT', '1') == '0':
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing (e.g. pip's isolated build env)
        _ext_warning(f'torch is not importable at build time: {e}')
        return {}
    import platform
    levels = SCAN_EXT_LEVELS if platform.machine() in ('x86_64', 'AMD64') else {
        'default': SCAN_EXT_LEVELS['default']}
    # e.g. 'avx512' for a quick dev rebuild of one scan level ('cauchy': the Cauchy kernel)
    only = os.environ.get('MMSSM_BUILD_LEVELS')
    if only:
        levels = {k: v for k, v in levels.items() if k in only.split(',')}
    exts = [CppExtension(
        f'mmssm.ops._scan_cpu_{name}', [f'mmssm/ops/csrc/selective_scan_{name}.cpp'],
        extra_compile_args={'cxx': ['-O3', '-fopenmp', f'-DCPU_CAPABILITY={cap}',
                                    f'-DMMSSM_SCAN_NS=mmssm_scan_{name}'] +
                                   ([f'-DCPU_CAPABILITY_{cap}'] if cap != 'DEFAULT' else []) +
                                   flags},
        depends=['mmssm/ops/csrc/selective_scan.h', 'mmssm/ops/csrc/scan_order.h',
                 'mmssm/ops/csrc/cross_selective_scan.h',
                 'mmssm/ops/csrc/bidir_selective_scan.h'],
        extra_link_args=['-fopenmp']) for name, (cap, flags) in levels.items()]
    # fused float64 Cauchy products of the S4 (DPLR) kernel generation
    # (mmssm.ops.cauchy_cpu); one build, SIMD width picked at load time by the compiler's
    # function multi-versioning. Without it ssm_kernels computes them in PyTorch.
    if not only or 'cauchy' in only.split(','):
        exts.append(CppExtension(
            'mmssm.ops._cauchy_cpu',
            ['mmssm/ops/csrc/cauchy.cpp', 'mmssm/ops/csrc/dplr_spectrum.cpp'],
            extra_compile_args={'cxx': ['-O3', '-fopenmp']}, extra_link_args=['-fopenmp'],
            depends=['mmssm/ops/csrc/clones.h']))

    class TolerantBuildExtension(BuildExtension.with_options(use_ninja=False)):
        """Builds the SIMD levels in parallel; a failed compile warns, never fails.

        No ninja: torch's ninja path writes one build.ninja per build_temp, which
        parallel extension builds would overwrite.
        """

        def finalize_options(self):
            super().finalize_options()
            if not self.parallel:
                self.parallel = min(len(exts), os.cpu_count() or 1)

        def run(self):
            try:
                super().run()
            except Exception as e:  # no compiler, compile error, ...
                _ext_warning(f'{type(e).__name__}: {e}')

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                _ext_warning(f'{ext.name}: {type(e).__name__}: {e}')

    return dict(ext_modules=exts, cmdclass={'build_ext': TolerantBuildExtension})


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
        'deploy': read_requirements('deploy.txt'),
    },
    license='Apache License 2.0',
    zip_safe=False,
    **scan_extensions(),
)
