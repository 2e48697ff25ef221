"""configs/*/metafile.yml and model-index.yml (written by tools/misc/make_metafiles.py)."""
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))
sys.path.insert(0, str(REPO / 'tools' / 'misc'))
FAMILIES = ('vim', 'v2m', 'vmamba', 'convnext_s4nd', 'mask_rcnn', 'upernet', 'video')
METRICS = {'Top 1 Accuracy', 'box AP', 'mask AP', 'mIoU', 'mIoU(ms)'}


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def all_models():
    return [m for fam in FAMILIES for m in load(REPO / 'configs' / fam / 'metafile.yml')['Models']]


def test_model_index_imports_every_family():
    index = load(REPO / 'model-index.yml')
    assert index == {'Import': [f'configs/{f}/metafile.yml' for f in FAMILIES]}


@pytest.mark.parametrize('family', FAMILIES)
def test_metafile_lists_every_config(family):
    data = load(REPO / 'configs' / family / 'metafile.yml')
    configs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / 'configs' / family).glob('*.py')
                     if not p.name.endswith('_tiny.py'))
    assert sorted(m['Config'] for m in data['Models']) == configs
    names = {c['Name'] for c in data['Collections']}
    for m in data['Models']:
        assert m['In Collection'] in names
        assert m['Name'] == Path(m['Config']).stem
        assert 'Weights' not in m and 'No weights hosted' in m['Notes']
        meta = m['Metadata']
        assert isinstance(meta['Parameters'], int) and meta['Parameters'] > 10**6
        assert 0 < meta['Backbone Parameters'] < meta['Parameters']
        if 'FLOPs' in meta:
            assert isinstance(meta['FLOPs'], int) and 0 < meta['Backbone FLOPs'] <= meta['FLOPs']
        else:
            assert 'FLOPs not computed' in m['Notes']
        for r in m.get('Results', []):
            assert set(r['Metrics']) <= METRICS and r['Dataset'] in ('ImageNet-1k', 'COCO', 'ADE20K')
            assert m['Paper']['URL'].startswith('https://arxiv.org/abs/')


def test_every_config_has_flops():
    models = all_models()
    assert sum(m['Metadata']['Training Data'] == 'ImageNet-1k' for m in models) >= 21
    missing = [m['Name'] for m in models if 'FLOPs' not in m['Metadata']]
    assert not missing, f'run tools/misc/make_metafiles.py for {missing}'


def test_numbers_are_recomputed_not_typed():
    """Parameters and FLOPs of one config equal a fresh get_flops computation."""
    from get_flops import model_complexity
    from _model_utils import load_config
    entry = next(m for m in all_models() if m['Name'] == 'vim-tiny_8xb128_in1k')
    res = model_complexity(load_config(str(REPO / entry['Config'])), (224, 224))
    assert entry['Metadata']['Parameters'] == res['params']
    assert entry['Metadata']['FLOPs'] == res['flops']
    assert entry['Metadata']['Input Size'] == '224x224'


def test_paper_results_match_research_tables():
    """Spot checks against shared/research (VMamba README / V2M result.png)."""
    by_name = {m['Name']: m for m in all_models()}
    top1 = lambda n: by_name[n]['Results'][0]['Metrics']['Top 1 Accuracy']  # noqa: E731
    assert top1('vmamba-tiny_8xb128_in1k') == 82.6
    assert top1('v2m-s-star_8xb128_in1k') == 82.9
    assert top1('vim-small_8xb64_in1k') == 80.5
    assert by_name['vmamba_t_1x']['Results'][0]['Metrics'] == {'box AP': 47.3, 'mask AP': 42.7}
    assert by_name['vmamba_t_160k_ade20k']['Results'][0]['Metrics']['mIoU'] == 47.9
    assert 'Results' not in by_name['v2m_s_1x']  # no paper number for this recipe


def test_generator_entry_without_flops_says_so():
    from make_metafiles import model_entry
    entry, coll = model_entry(str(REPO / 'configs/vmamba/vmamba-tiny_8xb128_in1k.py'),
                              dict(params=3, backbone_params=2, flops=None, backbone_flops=None))
    assert coll == 'VMamba' and 'FLOPs' not in entry['Metadata']
    assert entry['Metadata']['Parameters'] == 3
    assert 'FLOPs not computed' in entry['Notes']
    assert entry['Results'][0]['Metrics'] == {'Top 1 Accuracy': 82.6}
