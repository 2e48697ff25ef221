"""Loading backbone weights fails loudly: missing, truncated or corrupt files, another
family's checkpoint, too little coverage, shape mismatches -- through
``init_cfg=dict(type='Pretrained', ...)`` and ``mmssm.models.utils.load_pretrained``."""
import itertools
import random

import pytest
import torch
from rel_common import NAMES, build

from mmssm.models.utils import load_pretrained


def _pretrained(name, path, **kw):
    return build(name, init_cfg=dict(type='Pretrained', checkpoint=str(path), **kw))


def _save(model, path, wrap=True):
    sd = model.state_dict()
    torch.save(dict(meta=dict(note='test'), state_dict=sd) if wrap else sd, path)
    return sd


@pytest.fixture(params=['init_cfg', 'load_pretrained'])
def load(request):
    """Load ``path`` into a fresh ``name`` model one of the two public ways."""
    def fn(name, path, **kw):
        if request.param == 'init_cfg':
            m = _pretrained(name, path, **kw)
            m.init_weights()
            return m, None
        m = build(name)
        return m, load_pretrained(m, str(path), convert=m.convert_checkpoint,
                                  ignore_missing=m.checkpoint_ignore_missing, **kw)
    return fn


@pytest.mark.parametrize('name', NAMES)
def test_round_trip_then_every_broken_file(name, load, tmp_path):
    src = build(name)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / 'ok.pth'
    sd = _save(src, path)
    m, _ = load(name, path, min_coverage=1.0)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k

    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load(name, tmp_path / 'missing.pth')
    data = path.read_bytes()
    (tmp_path / 'trunc.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match='trunc.pth.*cannot be read'):
        load(name, tmp_path / 'trunc.pth')
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(RuntimeError, match='empty.pth.*cannot be read'):
        load(name, tmp_path / 'empty.pth')
    (tmp_path / 'junk.pth').write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(RuntimeError, match='junk.pth.*cannot be read'):
        load(name, tmp_path / 'junk.pth')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(TypeError, match='holds a list'):
        load(name, tmp_path / 'list.pth')


@pytest.mark.parametrize('name', NAMES)
def test_low_coverage_needs_opt_in(name, load, tmp_path):
    sd = build(name).state_dict()
    keys = list(sd)
    kept = {k: sd[k] for k in keys[:int(len(keys) * 0.7)]}  # 70% < 90%
    torch.save(kept, tmp_path / 'part.pth')
    with pytest.raises(RuntimeError, match=r'only [67]\d\.\d% of the backbone keys.*'
                                           'min_coverage=0'):
        load(name, tmp_path / 'part.pth')
    m, report = load(name, tmp_path / 'part.pth', min_coverage=0.0)  # opted in: loads what is there
    for k, v in kept.items():
        assert torch.equal(m.state_dict()[k], v), k
    if report is not None:
        assert 0.6 < report['coverage'] < 0.8 and report['missing']


@pytest.mark.parametrize('name', NAMES)
def test_shape_mismatch_is_named(name, load, tmp_path):
    sd = build(name).state_dict()
    key = next(k for k, v in sd.items() if v.dim() >= 2 and 'pos_embed' not in k)
    bad = dict(sd)
    bad[key] = torch.zeros(*[s + 1 for s in sd[key].shape])
    torch.save(bad, tmp_path / 'bad.pth')
    shape = ', '.join(str(s + 1) for s in sd[key].shape)
    with pytest.raises(RuntimeError, match=rf'(?s)shape mismatch .*{key}: checkpoint \({shape}\)'):
        load(name, tmp_path / 'bad.pth', min_coverage=0.0)  # never allowed, even with opt-in


COVERAGE = r'only \d+\.\d% of the backbone keys are in the checkpoint .*another model family'
# Vim <-> V2M share most key names; their position embeddings do not convert
NOT_CONVERTIBLE = {('vim', 'v2m'), ('vim', 'v2m_local'), ('v2m', 'vim'), ('v2m_local', 'vim')}


@pytest.mark.parametrize('src,dst', [p for p in itertools.permutations(NAMES, 2)
                                     if {p[0], p[1]} != {'v2m', 'v2m_local'}])
def test_checkpoint_of_another_family_is_a_coverage_error(src, dst, tmp_path):
    """e.g. a Vim checkpoint into VMamba: 'another model family', not a random shape error."""
    _save(build(src), tmp_path / 'other.pth')
    m = _pretrained(dst, tmp_path / 'other.pth')
    with pytest.raises(RuntimeError, match=COVERAGE if (src, dst) not in NOT_CONVERTIBLE
                       else r'cannot convert it for .*another model family'):
        m.init_weights()


def test_checkpoint_key_and_prefix_errors(tmp_path):
    sd = build('vim').state_dict()
    torch.save(dict(model=sd), tmp_path / 'a.pth')
    m = _pretrained('vim', tmp_path / 'a.pth', checkpoint_key='model_ema')
    with pytest.raises(KeyError, match="checkpoint_key='model_ema' is not in the checkpoint; "
                                       r"it has \['model'\]"):
        m.init_weights()
    m = _pretrained('vim', tmp_path / 'a.pth', prefix='encoder')
    with pytest.raises(KeyError, match="prefix='encoder.' matches no key"):
        m.init_weights()
    # a whole detector checkpoint: the backbone part is found
    torch.save(dict(state_dict={**{f'backbone.{k}': v for k, v in sd.items()},
                                'neck.w': torch.zeros(1)}), tmp_path / 'det.pth')
    m = _pretrained('vim', tmp_path / 'det.pth', min_coverage=1.0)
    m.init_weights()
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
