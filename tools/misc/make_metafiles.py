"""Write configs/<family>/metafile.yml and the root model-index.yml.

    python tools/misc/make_metafiles.py                 # everything (slow on CPU)
    python tools/misc/make_metafiles.py --tasks cls     # FLOPs for classifiers only
    python tools/misc/make_metafiles.py --no-flops      # parameters only

Every number in ``Metadata`` is COMPUTED here: ``Parameters`` by building the
model (exact, all configs) and ``FLOPs`` by tools/analysis_tools/get_flops.py's
``model_complexity`` (mmengine FlopAnalyzer + mmssm handles, 1 multiply-add = 1
FLOP, selective scan 9*B*L*D*N + D skip + z gate) at 224x224 (classification),
1280x800 (detection, the size VMamba reports), 512x512 (segmentation) and one
clip_len x 224 x 224 clip (video, clip_len from the config's test pipeline).
Results are the PAPERS' numbers (copied from shared/research, each with its
source); they are not reproduced by mmssm. mmssm hosts no weights, so no
entry has a ``Weights`` field.

Results of finished configs are cached in ``--cache`` (JSON), so an
interrupted or budget-limited run (``--budget-min``) continues where it
stopped; configs whose FLOPs were not computed say so in a ``Notes`` field.
"""
import argparse
import gc
import glob
import json
import os
import os.path as osp
import sys
import time
import traceback

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(REPO, 'tools', 'analysis_tools'))

SHAPES = {'cls': (224, 224), 'det': (1280, 800), 'seg': (512, 512),
          'video': None}  # video: from the config, see input_shape()
FAMILIES = ('vim', 'v2m', 'vmamba', 'convnext_s4nd', 'mask_rcnn', 'upernet', 'video')

PAPERS = {
    'Vim': dict(URL='https://arxiv.org/abs/2401.09417',
                Title='Vision Mamba: Efficient Visual Representation Learning with '
                      'Bidirectional State Space Model'),
    'VMamba': dict(URL='https://arxiv.org/abs/2401.10166', Title='VMamba: Visual State Space Model'),
    'V2M': dict(URL='https://arxiv.org/abs/2410.10382',
                Title='V2M: Visual 2-Dimensional Mamba for Image Representation Learning'),
    'S4ND': dict(URL='https://arxiv.org/abs/2210.06583',
                 Title='S4ND: Modeling Images and Videos as Multidimensional Signals Using '
                       'State Spaces'),
    'Mask R-CNN': dict(URL='https://arxiv.org/abs/1703.06870', Title='Mask R-CNN'),
    'UPerNet': dict(URL='https://arxiv.org/abs/1807.10221',
                    Title='Unified Perceptual Parsing for Scene Understanding'),
}
CODE = {'Vim': 'https://github.com/hustvl/Vim', 'VMamba': 'https://github.com/MzeroMiko/VMamba',
        'V2M': 'https://github.com/wangck20/V2M', 'S4ND': 'https://github.com/state-spaces/s4'}

# Paper results, from shared/research/vmamba_s4nd.md sec. 4 (VMamba README /
# assets/performance.md), shared/research/vim_v2m_localmamba.md sec. 1.9 (Vim
# README release names) and sec. 3.6 (V2M result.png). Keyed by config stem.
_VM = 'VMamba'
PAPER_RESULTS = {
    # ImageNet-1k top-1 (224)
    'vim-tiny_8xb128_in1k': ('Vim', {'Top 1 Accuracy': 76.1}),
    'vim-small_8xb64_in1k': ('Vim', {'Top 1 Accuracy': 80.5}),
    'vim-base_8xb64_in1k': ('Vim', {'Top 1 Accuracy': 81.9}),
    'v2m-tiny_8xb64_in1k': ('V2M', {'Top 1 Accuracy': 76.2}),
    'v2m-tiny-local_8xb128_in1k': ('V2M', {'Top 1 Accuracy': 76.4}),
    'v2m-small_8xb64_in1k': ('V2M', {'Top 1 Accuracy': 80.5}),
    'v2m-small-local_8xb128_in1k': ('V2M', {'Top 1 Accuracy': 81.3}),
    'v2m-s-star_8xb128_in1k': ('V2M', {'Top 1 Accuracy': 82.9}),
    'v2m-b-star_8xb128_in1k': ('V2M', {'Top 1 Accuracy': 83.8}),
    'vmamba-tiny_8xb128_in1k': (_VM, {'Top 1 Accuracy': 82.6}),
    'vmamba-small_8xb128_in1k': (_VM, {'Top 1 Accuracy': 83.3}),
    'vmamba-base_8xb128_in1k': (_VM, {'Top 1 Accuracy': 83.8}),
    'vmamba-tiny-s2l5_8xb128_in1k': (_VM, {'Top 1 Accuracy': 82.5}),
    'vmamba-small-s2l15_8xb128_in1k': (_VM, {'Top 1 Accuracy': 83.6}),
    'vmamba-base-s2l15_8xb128_in1k': (_VM, {'Top 1 Accuracy': 83.9}),
    'vmamba-vanilla-tiny_8xb128_in1k': (_VM, {'Top 1 Accuracy': 82.2}),
    'vmamba-vanilla-small_8xb128_in1k': (_VM, {'Top 1 Accuracy': 83.5}),
    'vmamba-vanilla-base_8xb128_in1k': (_VM, {'Top 1 Accuracy': 83.7}),
    # COCO Mask R-CNN box AP / mask AP
    'vmamba_t_1x': (_VM, {'box AP': 47.3, 'mask AP': 42.7}),
    'vmamba_t_3x': (_VM, {'box AP': 48.8, 'mask AP': 43.7}),
    'vmamba_t_s2l5_1x': (_VM, {'box AP': 47.4, 'mask AP': 42.7}),
    'vmamba_t_s2l5_3x': (_VM, {'box AP': 48.9, 'mask AP': 43.7}),
    'vmamba_s_s2l15_1x': (_VM, {'box AP': 48.7, 'mask AP': 43.7}),
    'vmamba_s_s2l15_3x': (_VM, {'box AP': 49.9, 'mask AP': 44.2}),
    'vmamba_b_s2l15_1x': (_VM, {'box AP': 49.2, 'mask AP': 44.1}),
    'vmamba_vanilla_t_1x': (_VM, {'box AP': 46.5, 'mask AP': 42.1}),
    'vmamba_vanilla_t_3x': (_VM, {'box AP': 48.5, 'mask AP': 43.2}),
    'vmamba_vanilla_s_1x': (_VM, {'box AP': 48.2, 'mask AP': 43.0}),
    'vmamba_vanilla_s_3x': (_VM, {'box AP': 49.7, 'mask AP': 44.0}),
    'vmamba_vanilla_b_1x': (_VM, {'box AP': 48.6, 'mask AP': 43.3}),
    # ADE20K UPerNet 160k, 512: mIoU single-scale (mIoU(ms) multi-scale)
    'vmamba_t_160k_ade20k': (_VM, {'mIoU': 47.9, 'mIoU(ms)': 48.8}),
    'vmamba_t_s2l5_160k_ade20k': (_VM, {'mIoU': 48.3, 'mIoU(ms)': 48.6}),
    'vmamba_s_s2l15_160k_ade20k': (_VM, {'mIoU': 50.6, 'mIoU(ms)': 51.2}),
    'vmamba_b_s2l15_160k_ade20k': (_VM, {'mIoU': 51.0, 'mIoU(ms)': 51.6}),
    'vmamba_vanilla_t_160k_ade20k': (_VM, {'mIoU': 47.3, 'mIoU(ms)': 48.3}),
    'vmamba_vanilla_s_160k_ade20k': (_VM, {'mIoU': 49.5, 'mIoU(ms)': 50.5}),
    'vmamba_vanilla_b_160k_ade20k': (_VM, {'mIoU': 50.0, 'mIoU(ms)': 51.3}),
}
TASK_INFO = {
    'cls': ('Image Classification', 'ImageNet-1k'),
    'det': ('Instance Segmentation', 'COCO'),  # box AP and mask AP
    'seg': ('Semantic Segmentation', 'ADE20K'),
    'video': ('Action Recognition', 'HMDB51'),
}


def input_shape(cfg, task):
    """(H, W) per task; video: (T, 224, 224) with T = the test pipeline's ``clip_len``."""
    if task != 'video':
        return SHAPES[task]
    steps = cfg.test_dataloader.dataset.pipeline
    clip_len = next(t['clip_len'] for t in steps if t['type'] == 'SampleFrames')
    return (int(clip_len), 224, 224)


def list_configs(family):
    return sorted(p for p in glob.glob(osp.join(REPO, 'configs', family, '*.py'))
                  if not p.endswith('_tiny.py'))


def backbone_family(cfg):
    t = cfg.model.backbone.type.split('.')[-1]
    return {'Vim': 'Vim', 'VMamba': 'VMamba', 'V2M': 'V2M', 'V2MPyramid': 'V2M',
            'ConvNeXtS4ND': 'S4ND', 'ConvNeXtS4ND3D': 'S4ND'}.get(t, t)


def architecture(cfg, task):
    m = cfg.model
    bb = m.backbone.type.split('.')[-1]
    if task == 'cls':
        parts = [bb] + ([m.neck.type.split('.')[-1]] if m.get('neck') else []) + [m.head.type]
    elif task == 'video':
        parts = [m.type, bb] + ([m.neck.type.split('.')[-1]] if m.get('neck') else []) + [
            m.cls_head.type]
    elif task == 'det':
        necks = m.neck if isinstance(m.neck, (list, tuple)) else [m.neck]
        parts = [m.type, bb] + [n.type.split('.')[-1] for n in necks] + ['RPN']
    else:
        parts = [m.decode_head.type, bb] + ([m.auxiliary_head.type] if m.get('auxiliary_head')
                                            else [])
    return parts


def model_key(cfg):
    """Identity of the built model (schedules differ, the model may not)."""
    import hashlib
    text = json.dumps(cfg.model.to_dict(), sort_keys=True, default=str)
    return hashlib.md5(text.encode()).hexdigest()


def compute(cfg_path, task, with_flops):
    from _model_utils import load_config
    from get_flops import model_complexity
    cfg = load_config(cfg_path)
    res = model_complexity(cfg, input_shape(cfg, task), with_flops=with_flops)
    res.pop('analyzer', None)
    return dict(params=res['params'], backbone_params=res['backbone_params'],
                flops=res['flops'], backbone_flops=res['backbone_flops'],
                unsupported=res['unsupported'])


def model_entry(cfg_path, numbers):
    from _model_utils import load_config, task_of
    cfg = load_config(cfg_path)
    task = task_of(cfg)
    stem = osp.splitext(osp.basename(cfg_path))[0]
    family = osp.basename(osp.dirname(cfg_path))
    bfam = backbone_family(cfg)
    collection = {'mask_rcnn': 'Mask R-CNN', 'upernet': 'UPerNet'}.get(family, bfam)
    shape = input_shape(cfg, task)
    meta = {'Training Data': TASK_INFO[task][1], 'Architecture': architecture(cfg, task)}
    if numbers.get('flops') is not None:
        meta['FLOPs'] = int(numbers['flops'])
        meta['Backbone FLOPs'] = int(numbers['backbone_flops'])
    meta['Parameters'] = int(numbers['params'])
    meta['Backbone Parameters'] = int(numbers['backbone_params'])
    meta['Input Size'] = 'x'.join(map(str, shape))
    tc = cfg.get('train_cfg') or {}
    if tc.get('max_epochs'):
        meta['Epochs'] = int(tc['max_epochs'])
    elif tc.get('max_iters'):
        meta['Iterations'] = int(tc['max_iters'])
    entry = {'Name': stem, 'In Collection': collection,
             'Config': osp.relpath(cfg_path, REPO).replace(os.sep, '/'), 'Metadata': meta}
    notes = []
    if bfam == 'S4ND' and numbers.get('flops') is not None:
        notes.append("FLOPs count the S4ND convolution the layer runs by default (conv_mode="
                     "'auto': dense Toeplitz operators on short axes, rfft elsewhere), more "
                     "than an FFT-only count, and one SSM kernel generation per layer.")
    if numbers.get('flops') is None:
        notes.append('FLOPs not computed (CPU time budget of make_metafiles.py); run '
                     f'tools/analysis_tools/get_flops.py {entry["Config"]} --shape '
                     f'{" ".join(map(str, shape))}.')
    if stem in PAPER_RESULTS:
        paper, metrics = PAPER_RESULTS[stem]
        entry['Results'] = [{'Task': TASK_INFO[task][0], 'Dataset': TASK_INFO[task][1],
                             'Metrics': dict(metrics)}]
        entry['Paper'] = dict(PAPERS[paper])
        notes.append(f'Results: reported by the {paper} paper/repository, not reproduced '
                     'by mmssm.')
    else:
        notes.append('No paper result for this exact configuration.')
    notes.append('No weights hosted by mmssm.')
    entry['Notes'] = ' '.join(notes)
    return entry, collection


def collection_entry(name, family):
    c = {'Name': name, 'Metadata': {}, 'Paper': dict(PAPERS[name])}
    if name in CODE:
        c['Code'] = {'URL': CODE[name]}
        c['Metadata']['Training Data'] = 'HMDB51' if family == 'video' else 'ImageNet-1k'
        c['Metadata']['Architecture'] = (['State Space Model', 'S4ND convolution'] if name == 'S4ND'
                                         else ['State Space Model', 'Selective Scan'])
    elif name == 'Mask R-CNN':
        c['Metadata'] = {'Training Data': 'COCO', 'Architecture': ['Mask R-CNN', 'FPN', 'RPN']}
    else:
        c['Metadata'] = {'Training Data': 'ADE20K', 'Architecture': ['UPerNet', 'FCN']}
    return c


HEADER = """# Generated by tools/misc/make_metafiles.py -- do not edit by hand.
# Parameters and FLOPs are computed by tools/analysis_tools/get_flops.py
# (mmengine FlopAnalyzer + mmssm handles; 1 multiply-add = 1 FLOP; selective scan
# 9*B*L*D*N + B*D*L (D) + B*D*L (z gate); element-wise ops and the data preprocessor
# not counted) at 224x224 (classification), 1280x800 (detection), 512x512
# (segmentation) and one clip of the test pipeline's clip_len x 224x224 (video).
# Results are the papers' numbers (see each entry's Paper), not reproduced here.
# mmssm hosts no weights: entries have no 'Weights' field.
"""


def write_yaml(path, data):
    import yaml
    with open(path, 'w') as f:
        f.write(HEADER)
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True, width=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', nargs='+', choices=list(SHAPES), default=list(SHAPES),
                        help='tasks whose FLOPs are computed (parameters: always)')
    parser.add_argument('--no-flops', action='store_true')
    parser.add_argument('--only', nargs='+', default=None,
                        help='compute FLOPs only for these config stems (others: params)')
    parser.add_argument('--cache', default=osp.join(REPO, 'work_dirs', 'metafile_cache.json'))
    parser.add_argument('--budget-min', type=float, default=None,
                        help='stop computing FLOPs after this many minutes')
    parser.add_argument('--root', default=REPO, help='where configs/ and model-index.yml go')
    args = parser.parse_args()

    cache = {}
    if osp.exists(args.cache):
        with open(args.cache) as f:
            cache = json.load(f)
    os.makedirs(osp.dirname(args.cache) or '.', exist_ok=True)
    t0 = time.time()
    from _model_utils import load_config, task_of
    imports = []
    for family in FAMILIES:
        models, collections = [], []
        for cfg_path in list_configs(family):
            stem = osp.splitext(osp.basename(cfg_path))[0]
            cfg = load_config(cfg_path)
            task = task_of(cfg)
            mkey = model_key(cfg)
            want_flops = (not args.no_flops and task in args.tasks
                          and (args.only is None or stem in args.only))
            over = args.budget_min is not None and time.time() - t0 > 60 * args.budget_min
            have = cache.get(stem)
            if have is not None:
                have.setdefault('model_key', mkey)
            twin = next((v for v in cache.values() if v.get('model_key') == mkey
                         and v.get('flops') is not None), None)
            if twin is not None and (have is None or have.get('flops') is None):
                have = cache[stem] = dict(twin)  # e.g. the 1x and 3x configs: same model
            if have is None or (want_flops and have.get('flops') is None and not over):
                t1 = time.time()
                try:
                    have = compute(cfg_path, task, want_flops and not over)
                except Exception:  # keep going; report at the end
                    traceback.print_exc()
                    print(f'FAILED {stem}', flush=True)
                    continue
                have['model_key'] = mkey
                cache[stem] = have
                with open(args.cache, 'w') as f:
                    json.dump(cache, f, indent=1)
                gc.collect()
                print(f'{stem}: params {have["params"]}, flops {have["flops"]} '
                      f'({time.time() - t1:.0f} s)', flush=True)
            entry, coll = model_entry(cfg_path, have)
            models.append(entry)
            if coll not in collections:
                collections.append(coll)
        data = {'Collections': [collection_entry(c, family) for c in collections],
                'Models': models}
        out = osp.join(args.root, 'configs', family, 'metafile.yml')
        write_yaml(out, data)
        imports.append(f'configs/{family}/metafile.yml')
        print(f'wrote {out} ({len(models)} models)')
    write_yaml(osp.join(args.root, 'model-index.yml'), {'Import': imports})
    print(f'wrote model-index.yml in {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
