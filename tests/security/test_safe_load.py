"""Checkpoints load with weights_only=True and mmssm's narrow allowlist; a malicious
file is refused, naming the global, through every in-process entry point, and nothing
of it runs."""
import argparse
import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from conftest import FIXTURES, REPO, VARIANTS, Payload, malicious, with_date
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import CheckpointLoader

import mmssm  # noqa: F401  (registers the local-file loader)
from mmssm.models.backbones.vim import Vim
from mmssm.models.utils import load_pretrained, read_checkpoint
from mmssm.utils.safe_load import (ALLOWED_GLOBALS, TRUST_ENV, UntrustedCheckpointError,
                                   load_checkpoint_file)

TINY_VIM = dict(arch=dict(embed_dims=16, num_layers=2), img_size=32, patch_size=8, stride=8)


def _vim(**kw):
    torch.manual_seed(0)
    return Vim(**TINY_VIM, **kw)


def _tool(name):
    path = REPO / 'tools/model_converters' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _refused(path, glob='os.makedirs'):
    """pytest.raises for the refusal of ``path`` that names ``glob`` and the opt-ins."""
    return pytest.raises(UntrustedCheckpointError,
                         match=rf"(?s){path.name}'.*{glob}.*trusted=True.*{TRUST_ENV}=1")


@pytest.fixture(autouse=True)
def _no_env_trust(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


# ------------------------------------------------------------------ entry points
ENTRY_POINTS = {
    'init_cfg': lambda p: _vim(init_cfg=dict(type='Pretrained', checkpoint=str(p))).init_weights(),
    'load_pretrained': lambda p: load_pretrained(_vim(), str(p)),
    'read_checkpoint': lambda p: read_checkpoint(str(p)),
    # what load_from, --resume, tools/test.py and mmengine's Pretrained call
    'mmengine_loader': lambda p: CheckpointLoader.load_checkpoint(str(p), map_location='cpu'),
    'vim2mmssm': lambda p: _tool('vim2mmssm').convert(str(p), str(p) + '.out'),
    'convnext_s4nd2mmssm': lambda p: _tool('convnext_s4nd2mmssm').convert(
        str(p), str(p) + '.out', arch=dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8])),
}


@pytest.mark.parametrize('where', VARIANTS)
@pytest.mark.parametrize('entry', list(ENTRY_POINTS))
def test_payload_never_runs(entry, where, tmp_path, pwned):
    path = malicious(tmp_path / f'evil_{where}.pth', where, pwned, _vim().state_dict())
    with _refused(path):
        ENTRY_POINTS[entry](path)
    assert not os.path.exists(str(path) + '.out')


@pytest.mark.parametrize('where', VARIANTS)
def test_vmamba_converter_refuses(where, tmp_path, pwned, monkeypatch, capsys):
    path = malicious(tmp_path / 'evil.pth', where, pwned)
    monkeypatch.setattr(sys, 'argv', ['vmamba2mmssm.py', str(path), str(tmp_path / 'out.pth')])
    with _refused(path):
        _tool('vmamba2mmssm').main()
    assert not (tmp_path / 'out.pth').exists()


def test_os_system_payload_of_the_issue(tmp_path, pwned):
    """The file of the bug report: os.system('touch PWNED') in the state dict."""
    path = tmp_path / 'system.pth'
    torch.save(dict(state_dict=dict(_vim().state_dict(),
                                    evil=Payload(None, os.system, (f'touch {pwned}', )))), path)
    with _refused(path, f'{os.system.__module__}.system'):  # posix.system
        _vim(init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()


def test_legacy_format_is_checked_too(tmp_path, pwned):
    """Non-zip (torch < 1.6 format) files have no global list: torch's unpickler refuses."""
    path = tmp_path / 'legacy.pth'
    torch.save(dict(state_dict={'w': torch.ones(1)}, meta=Payload(pwned)), path,
               _use_new_zipfile_serialization=False)
    with _refused(path, 'os.makedirs'):
        read_checkpoint(str(path))
    torch.save(dict(state_dict={'w': torch.ones(1)}, meta=dict(args=argparse.Namespace(a=1))),
               tmp_path / 'legacy_ok.pth', _use_new_zipfile_serialization=False)
    assert read_checkpoint(str(tmp_path / 'legacy_ok.pth'))['meta']['args'].a == 1


# ------------------------------------------------------ abuse of the allowed globals
class _GetAttr:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


@pytest.mark.parametrize('owner,name', [(HistoryBuffer, '__init__'), (np.ndarray, 'tofile'),
                                        (argparse.Namespace, '__class__')])
def test_getattr_serves_only_history_buffer_statistics(owner, name, tmp_path):
    torch.save(dict(meta=[_GetAttr(owner, name)]), tmp_path / 'attr.pth')
    with pytest.raises(UntrustedCheckpointError, match=rf'getattr\(\w+, {name!r}\) is not allowed'):
        read_checkpoint(str(tmp_path / 'attr.pth'))


def test_history_buffer_cannot_replace_statistics_methods(tmp_path, monkeypatch):
    """HistoryBuffer.__setstate__ merges the file's methods into the class-wide table:
    a file may only bring back the methods already there."""
    buf = HistoryBuffer([1.0, 2.0], [1, 1])
    monkeypatch.setitem(HistoryBuffer._statistics_methods, 'mean', np.dtype)  # an allowed global
    torch.save(dict(message_hub=dict(log_scalars={'loss': buf})), tmp_path / 'hb.pth')
    monkeypatch.undo()
    before = dict(HistoryBuffer._statistics_methods)
    with pytest.raises(UntrustedCheckpointError, match=r"\['mean'\] replaced by the file"):
        read_checkpoint(str(tmp_path / 'hb.pth'))
    assert HistoryBuffer._statistics_methods == before
    assert HistoryBuffer([1.0, 3.0], [1, 1]).mean() == 2.0


def test_bad_bytes_are_unreadable_not_untrusted(tmp_path):
    (tmp_path / 'junk.pth').write_bytes(b'\x80\x02junk' * 100)
    with pytest.raises(RuntimeError, match='junk.pth.*cannot be read') as e:
        read_checkpoint(str(tmp_path / 'junk.pth'))
    assert not isinstance(e.value, UntrustedCheckpointError)


# ---------------------------------------------------------------------- opt-in
def test_opt_in_loads_an_unlisted_global(tmp_path, monkeypatch):
    sd = _vim().state_dict()
    path = with_date(tmp_path / 'dated.pth', sd)
    with _refused(path, 'datetime.date'):
        read_checkpoint(str(path))
    m = _vim(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with _refused(path, 'datetime.date'):
        m.init_weights()
    m = _vim(init_cfg=dict(type='Pretrained', checkpoint=str(path), trusted=True))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    m.init_weights()
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert read_checkpoint(str(path), trusted=True)['meta']['saved'].year == 2024
    # the environment variable trusts mmssm's and mmengine's loads in this process
    monkeypatch.setenv(TRUST_ENV, '1')
    assert CheckpointLoader.load_checkpoint(str(path))['meta']['saved'].day == 2
    assert load_pretrained(_vim(), str(path), min_coverage=1.0)['coverage'] == 1.0
    monkeypatch.setenv(TRUST_ENV, '0')
    with _refused(path, 'datetime.date'):
        CheckpointLoader.load_checkpoint(str(path))


def test_converters_opt_in(tmp_path, monkeypatch, capsys):
    sd = _vim().state_dict()
    path = with_date(tmp_path / 'dated.pth', sd)
    with _refused(path, 'datetime.date'):
        _tool('vim2mmssm').convert(str(path), str(tmp_path / 'a.pth'))
    _tool('vim2mmssm').convert(str(path), str(tmp_path / 'a.pth'), trusted=True)
    out = torch.load(tmp_path / 'a.pth', weights_only=True)['state_dict']
    assert all(torch.equal(out['backbone.' + k], v) for k, v in sd.items())
    vm = with_date(tmp_path / 'vm.pth', {'patch_embed.0.weight': torch.ones(2)})
    for flag in ((), ('--trusted', )):
        monkeypatch.setattr(sys, 'argv', ['vmamba2mmssm.py', str(vm), str(tmp_path / 'b.pth'),
                                          *flag])
        if not flag:
            with _refused(vm, 'datetime.date'):
                _tool('vmamba2mmssm').main()
        else:
            _tool('vmamba2mmssm').main()
    out = torch.load(tmp_path / 'b.pth')['state_dict']
    assert torch.equal(out['backbone.patch_embed.0.weight'], torch.ones(2))


# -------------------------------------------------------------------- scope
def test_allowlist_lives_for_one_load_only(tmp_path, pwned):
    """After mmssm loads a file, torch's own loads are as strict as before, and entries a
    caller allowlisted stay allowlisted."""
    before = set(torch.serialization.get_safe_globals())
    torch.save(dict(args=argparse.Namespace(x=1), h=HistoryBuffer([1.0], [1])), tmp_path / 'ns.pth')
    assert read_checkpoint(str(tmp_path / 'ns.pth'))['args'].x == 1
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError, match='argparse.Namespace'):
        torch.load(tmp_path / 'ns.pth')
    with torch.serialization.safe_globals([argparse.Namespace]):
        read_checkpoint(str(tmp_path / 'ns.pth'))
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    evil = malicious(tmp_path / 'evil.pth', 'meta', pwned)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)


def test_allowlist_is_what_real_files_need():
    """Names and objects agree (numpy 1 and 2 names of the same reconstructors)."""
    assert ALLOWED_GLOBALS['numpy.core.multiarray._reconstruct'] is \
        ALLOWED_GLOBALS['numpy._core.multiarray._reconstruct']
    assert ALLOWED_GLOBALS['builtins.getattr'] is not getattr  # a restricted stand-in
    assert not any(n.startswith(('os.', 'subprocess', 'builtins.eval', 'builtins.exec'))
                   for n in ALLOWED_GLOBALS)


# -------------------------------------------------- real files still load the same
def _same(a, b, where='ckpt'):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f'{where}[{k!r}]')
        if type(a) is not dict:  # OrderedDict _metadata, CfgNode flags
            _same(dict(vars(a)), dict(vars(b)), f'{where}.__dict__')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f'{where}[{i}]')
    elif isinstance(a, (HistoryBuffer, argparse.Namespace)):
        _same(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


OFFICIAL = sorted(FIXTURES.glob('*/*.pt*')) if FIXTURES else []


@pytest.mark.skipif(not OFFICIAL, reason='official fixtures not found')
@pytest.mark.parametrize('path', OFFICIAL, ids=lambda p: p.name)
def test_official_fixture_loads_as_a_full_unpickle(path):
    got = read_checkpoint(str(path))
    _same(got, torch.load(path, weights_only=False))
    _same(CheckpointLoader.load_checkpoint(str(path)), got)
    if 'config' in got:  # yacs CfgNode, rebuilt without running yacs code
        from yacs.config import CfgNode
        assert isinstance(got['config'], CfgNode) and isinstance(got['config'].MODEL, CfgNode)
        full = torch.load(path, weights_only=False)['config']
        assert got['config'].is_frozen() == full.is_frozen()


def test_mmengine_resume_objects_round_trip(tmp_path):
    """What mmengine and mmssm's RNGStateHook write, built here as a runner does."""
    import random
    hub = MessageHub.get_instance('sec_test')
    for i in range(3):
        hub.update_scalar('train/loss', 0.5 / (i + 1))
    hub.update_info('eta', np.float64(12.5))
    ckpt = dict(meta=dict(epoch=0, iter=3), message_hub=hub.state_dict(),
                rng_state=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                               python=random.getstate(), cuda=[]),
                state_dict={'w': torch.randn(3)})
    torch.save(ckpt, tmp_path / 'resume.pth')
    got = CheckpointLoader.load_checkpoint(str(tmp_path / 'resume.pth'))
    _same(got, torch.load(tmp_path / 'resume.pth', weights_only=False))
    MessageHub.get_instance('sec_test2').load_state_dict(got['message_hub'])
    assert MessageHub.get_instance('sec_test2').get_scalar('train/loss').mean() == \
        pytest.approx((0.5 + 0.25 + 0.5 / 3) / 3)


# ------------------------------------------------------------- http(s) Pretrained
@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """(served directory, base url): a local HTTP server; torch's hub cache in tmp_path."""
    import functools
    import http.server
    import threading
    served = tmp_path / 'www'
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    yield served, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_pretrained_from_http_is_read_with_the_allowlist(http_dir, pwned):
    served, url = http_dir
    sd = _vim().state_dict()
    torch.save(dict(model=sd, args=argparse.Namespace(model='vim')), served / 'ok.pth')
    m = _vim(init_cfg=dict(type='Pretrained', checkpoint=f'{url}/ok.pth', min_coverage=1.0))
    m.init_weights()
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    bad = malicious(served / 'evil.pth', 'nested', pwned, sd)
    with _refused(bad):
        _vim(init_cfg=dict(type='Pretrained', checkpoint=f'{url}/evil.pth')).init_weights()
