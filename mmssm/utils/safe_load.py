"""Reading checkpoints with ``torch.load(weights_only=True)`` and a narrow allowlist.

torch's weights-only unpickler builds tensors, containers and numbers, and refuses
any other global unless it is allowlisted. The files mmssm users really have need a
few more; each entry of :data:`ALLOWED_GLOBALS` was found in such a file:

- ``argparse.Namespace``: ``args`` of official Vim training checkpoints (``vim/main.py``);
- ``yacs.config.CfgNode``: ``config`` of official VMamba training checkpoints. torch only
  fills exact ``dict``/``OrderedDict`` objects, so the node is read as an ``OrderedDict``
  and turned back into a ``CfgNode`` afterwards (no yacs code runs; without yacs it
  stays an ``OrderedDict``);
- numpy ``ndarray``/``dtype`` and the two reconstructors numpy pickles them with (numpy
  2 names, and the numpy 1 names of the same functions), for the float64, int64 and
  uint32 arrays and scalars of mmengine resume files (RNG states, ``eta``, history
  arrays);
- ``mmengine.logging.HistoryBuffer``: the message hub's log scalars. It pickles its
  statistics methods as ``getattr(HistoryBuffer, 'min')``, so ``builtins.getattr`` is
  allowed as a stand-in that returns only the statistics methods HistoryBuffer
  already has (never a general ``getattr``).

A file that needs any other global is refused before anything in it is built, with
:class:`UntrustedCheckpointError` naming the file, the globals and the opt-in:
``load_checkpoint_file(..., trusted=True)`` (``init_cfg=dict(type='Pretrained', ...,
trusted=True)``, ``--trusted`` of the converters) or the environment variable
``MMSSM_TRUSTED_CHECKPOINTS=1``, which unpickle the whole file (``weights_only=False``):
it can then run any code it contains.

The allowlist is added to torch's for the duration of one load only and removed
afterwards (entries a caller had added themselves stay), so loads outside mmssm are
as strict as torch makes them.
"""
import argparse
import contextlib
import os
import os.path as osp
import pickle
import re
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Set

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

TRUST_ENV = 'MMSSM_TRUSTED_CHECKPOINTS'
_TRUE = ('1', 'true', 'yes', 'on')

_np_multiarray = getattr(np, '_core', None)
_np_multiarray = (_np_multiarray or np.core).multiarray


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a global outside mmssm's allowlist (nothing of it was run)."""


def _history_buffer_method(owner: Any, name: str) -> Callable:
    """Stand-in for ``builtins.getattr`` inside a checkpoint.

    HistoryBuffer's ``__getstate__`` stores its statistics methods, which pickle as
    ``getattr(HistoryBuffer, 'mean')``. Only that lookup is served.
    """
    if owner is HistoryBuffer and isinstance(name, str) \
            and name in HistoryBuffer._statistics_methods \
            and getattr(HistoryBuffer, name, None) is HistoryBuffer._statistics_methods[name]:
        return HistoryBuffer._statistics_methods[name]
    raise pickle.UnpicklingError(
        f'getattr({getattr(owner, "__name__", type(owner).__name__)}, {name!r}) is not allowed '
        '(only the statistics methods of mmengine HistoryBuffer are)')


class _CfgNodeStandIn:
    """Stand-in for ``yacs.config.CfgNode``: unpickles as a plain ``OrderedDict``.

    torch's unpickler only fills exact dict types, so ``__new__`` returns an
    ``OrderedDict`` (pickle fills its items and puts the node's attributes into its
    ``__dict__``) and records it; :func:`_restore_cfgnodes` turns the recorded ones
    into ``CfgNode`` objects once the file is read.
    """
    _made = threading.local()

    def __new__(cls, *args: Any) -> 'dict':
        if args:
            raise pickle.UnpicklingError('yacs CfgNode is pickled without arguments')
        node: dict = OrderedDict()
        made = getattr(cls._made, 'nodes', None)
        if made is not None:
            made.append(node)
        return node


# global name in the pickle -> the object torch may use for it
ALLOWED_GLOBALS: Dict[str, Any] = {
    'argparse.Namespace': argparse.Namespace,
    'yacs.config.CfgNode': _CfgNodeStandIn,
    'numpy.ndarray': np.ndarray,
    'numpy.dtype': np.dtype,
    # the dtypes those files hold: ``numpy.dtype('f8')`` builds a Float64DType, and
    # torch checks the type of the object it fills in (these names are not in pickles)
    **{f'numpy.dtypes.{type(np.dtype(c)).__name__}': type(np.dtype(c)) for c in ('f8', 'i8', 'u4')},
    'numpy._core.multiarray._reconstruct': _np_multiarray._reconstruct,
    'numpy._core.multiarray.scalar': _np_multiarray.scalar,
    'numpy.core.multiarray._reconstruct': _np_multiarray._reconstruct,  # numpy < 2 files
    'numpy.core.multiarray.scalar': _np_multiarray.scalar,
    'mmengine.logging.history_buffer.HistoryBuffer': HistoryBuffer,
    'builtins.getattr': _history_buffer_method,
}


# allowing a global also allows what building it makes
_IMPLIED = {'numpy.dtype': [n for n in ALLOWED_GLOBALS if n.startswith('numpy.dtypes.')]}


# what torch's weights-only unpickler (and the stand-ins above) say when refusing an object
_REFUSAL = re.compile(r'GLOBAL|Can only|unrecognized function|is not allowed|replaced by the file')
_GLOBAL = re.compile(r'GLOBAL ([\w.]+)')


def trusted_by_env() -> bool:
    """Whether ``MMSSM_TRUSTED_CHECKPOINTS`` opts in to full unpickling."""
    return os.environ.get(TRUST_ENV, '').strip().lower() in _TRUE


def _how_to_trust() -> str:
    return ("If you trust this file (it can run any code it contains), load it with "
            "init_cfg=dict(type='Pretrained', checkpoint=..., trusted=True), the converters' "
            f"--trusted flag, or set the environment variable {TRUST_ENV}=1 (every checkpoint "
            'mmssm and mmengine read in that process is then trusted).')


def _refuse(filename: str, names: List[str], detail: str = '') -> UntrustedCheckpointError:
    what = (f'the global(s) {", ".join(sorted(names))}' if names
            else 'an object outside the allowlist')
    return UntrustedCheckpointError(
        f'checkpoint {filename!r} needs {what}, which mmssm does not load '
        f'without trust (weights_only=True; allowed: tensors, containers, numbers, '
        f'{", ".join(ALLOWED_GLOBALS)}). Nothing of the file was run. '
        + _how_to_trust() + (f' [{detail}]' if detail else ''))


@contextlib.contextmanager
def _allowlisted(names: Set[str]) -> Iterator[Optional[List[dict]]]:
    """Add the entries for ``names`` to torch's safe globals for this block only.

    Yields the list that collects the CfgNode stand-ins (None when the file has none).
    """
    names = set(names).union(*(_IMPLIED.get(n, ()) for n in names))
    entries = [(ALLOWED_GLOBALS[n], n) for n in sorted(names)]
    had = set(torch.serialization.get_safe_globals())
    added = [e for e in entries if e not in had]
    HistoryBuffer()  # registers the default statistics methods in the class-wide table
    stats = dict(HistoryBuffer._statistics_methods)
    nodes = _CfgNodeStandIn._made.nodes = [] if 'yacs.config.CfgNode' in names else None
    try:
        # removes exactly ``added`` on exit: entries the caller had added stay
        with torch.serialization.safe_globals(added):
            yield nodes
    finally:
        _CfgNodeStandIn._made.nodes = None
        # HistoryBuffer.__setstate__ merges the file's table into the class-wide one:
        # only the methods already there may come back
        changed = sorted(k for k, v in HistoryBuffer._statistics_methods.items()
                         if stats.get(k, object()) is not v)
        if changed:
            HistoryBuffer._statistics_methods.clear()
            HistoryBuffer._statistics_methods.update(stats)
            raise pickle.UnpicklingError(
                f'HistoryBuffer statistics method(s) {changed} replaced by the file')


def _restore_cfgnodes(obj: Any, nodes: List[dict]) -> Any:
    """Replace the OrderedDicts made by :class:`_CfgNodeStandIn` with yacs CfgNodes."""
    try:
        from yacs.config import CfgNode
    except ImportError:  # keep them as OrderedDicts
        return obj
    ids = {id(n) for n in nodes}
    done: Dict[int, Any] = {}

    def walk(o: Any) -> Any:
        if id(o) in done:
            return done[id(o)]
        if isinstance(o, torch.Tensor):
            return o
        if isinstance(o, dict):
            if id(o) in ids:
                new = dict.__new__(CfgNode)  # what pickle does: no __init__
                done[id(o)] = new
                for k, v in o.items():
                    dict.__setitem__(new, k, walk(v))
                new.__dict__.update(o.__dict__)
                return new
            done[id(o)] = o
            for k, v in list(o.items()):
                o[k] = walk(v)
            return o
        if isinstance(o, list):
            done[id(o)] = o
            o[:] = [walk(v) for v in o]
            return o
        if type(o) is tuple:
            return tuple(walk(v) for v in o)
        return o

    return walk(obj)


def _unreadable(filename: str, e: Exception) -> RuntimeError:
    return RuntimeError(f'checkpoint file {filename!r} cannot be read '
                        f'(truncated or not a torch checkpoint): {e}')


def load_checkpoint_file(filename: str, map_location: Any = None,
                         trusted: Optional[bool] = None) -> Any:
    """Read a local checkpoint file without running code from it.

    Args:
        filename: path of a ``torch.save`` file (``~`` is expanded).
        map_location: as for ``torch.load``.
        trusted: ``True`` unpickles the whole file (``weights_only=False``: only for
            files you trust). ``None`` (default): trusted only when the environment
            variable ``MMSSM_TRUSTED_CHECKPOINTS`` is 1.

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the file needs a global outside
            :data:`ALLOWED_GLOBALS` (raised before anything in it is built).
        RuntimeError: the file is truncated, empty or not a torch checkpoint.
    """
    filename = osp.expanduser(str(filename))
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file {filename!r} does not exist')
    if trusted is None:
        trusted = trusted_by_env()
    if trusted:
        try:
            return torch.load(filename, map_location=map_location, weights_only=False)
        except Exception as e:
            raise _unreadable(filename, e) from e

    # List the file's globals without unpickling it (zip format; the legacy format
    # is checked op by op by torch's unpickler below, which also builds nothing unlisted).
    with open(filename, 'rb') as f:
        is_zip = torch.serialization._is_zipfile(f)
    names: Set[str] = set()
    if is_zip:
        try:
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(filename))
        except pickle.UnpicklingError:  # an opcode the scanner skips: check op by op below
            names = set(ALLOWED_GLOBALS)
        except Exception as e:
            raise _unreadable(filename, e) from e
        unknown = sorted(names - set(ALLOWED_GLOBALS))
        if unknown:
            raise _refuse(filename, unknown)
    else:
        names = set(ALLOWED_GLOBALS)
    try:
        with _allowlisted(names) as nodes:
            ckpt = torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if not _REFUSAL.search(msg):  # e.g. junk bytes: not a question of trust
            raise _unreadable(filename, e) from e
        detail = msg.split('WeightsUnpickler error:')[-1].strip().split('\n')[0]
        raise _refuse(filename, _GLOBAL.findall(msg), detail) from None
    except Exception as e:
        raise _unreadable(filename, e) from e
    if nodes:
        ckpt = _restore_cfgnodes(ckpt, nodes)
    return ckpt
