"""Atomic local writes for mmengine checkpoints (installed at ``import mmssm``).

mmengine 0.10.7 writes ``iter_N.pth`` with ``open(path, 'wb').write(...)``
(``LocalBackend.put``) and ``last_checkpoint`` with ``open(path, 'w')`` in
``CheckpointHook``: both truncate the file first, so a job killed while
saving can leave a truncated checkpoint or an empty ``last_checkpoint`` and
``--resume`` then fails. Here every such write goes to a temporary file in the
same directory, is fsync'ed and then ``os.replace``'d over the target, so the
target is always either the complete old file or the complete new one.
"""
import builtins
import os
import os.path as osp
import uuid
from typing import Any, Union


def _is_write_mode(mode: str) -> bool:
    return any(c in mode for c in 'wx') and '+' not in mode


class AtomicWriter:
    """File-like object: writes go to ``.<name>.<id>.tmp``; a clean close moves it over ``path``.

    An exception inside the ``with`` block (or :meth:`discard`) deletes the
    temporary file and leaves ``path`` untouched.
    """

    def __init__(self, path: Union[str, os.PathLike], mode: str = 'wb', **kwargs: Any) -> None:
        self.path = osp.abspath(os.fspath(path))
        d = osp.dirname(self.path)
        os.makedirs(d, exist_ok=True)
        self.tmp = osp.join(d, f'.{osp.basename(self.path)}.{uuid.uuid4().hex[:12]}.tmp')
        self._f = builtins.open(self.tmp, mode.replace('x', 'w'), **kwargs)

    def write(self, data) -> int:
        return self._f.write(data)

    def __getattr__(self, name: str):  # flush, fileno, ... of the temporary file
        return getattr(self._f, name)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        try:  # make the rename itself durable
            fd = os.open(osp.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def discard(self) -> None:
        self._f.close()
        if osp.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> 'AtomicWriter':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def atomic_open(file, mode: str = 'r', *args: Any, **kwargs: Any):
    """``open`` that is atomic for plain write modes ('w', 'wb', 'x'); else the builtin."""
    if isinstance(file, (str, os.PathLike)) and _is_write_mode(mode) and not args:
        return AtomicWriter(file, mode, **kwargs)
    return builtins.open(file, mode, *args, **kwargs)


def _atomic_put(self, obj: bytes, filepath) -> None:
    with AtomicWriter(filepath, 'wb') as f:
        f.write(obj)


def _atomic_put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
    with AtomicWriter(filepath, 'w', encoding=encoding) as f:
        f.write(obj)


def install_atomic_checkpoint_writes() -> None:
    """Make mmengine's local checkpoint and ``last_checkpoint`` writes atomic (idempotent)."""
    from mmengine.fileio.backends import local_backend
    from mmengine.hooks import checkpoint_hook
    local_backend.LocalBackend.put = _atomic_put
    local_backend.LocalBackend.put_text = _atomic_put_text
    # CheckpointHook writes last_checkpoint with the builtin open: shadow it in that module
    checkpoint_hook.open = atomic_open
