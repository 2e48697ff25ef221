"""ConvNeXt-S4ND (2-D and video): official keys/param counts, small forward/backward,
resolution change through rate, freezing, checkpoint conversion and 2-D -> 3-D inflation."""
import json
from pathlib import Path

import pytest
import torch

from mmssm.models.backbones.convnext_s4nd import ConvNeXtS4ND, ConvNeXtS4ND3D
from mmssm.registry import MODELS

REPO = Path(__file__).resolve().parents[3]
MANIFEST = REPO.parent / 'shared' / 'fixtures' / 'official' / 's4nd' / 'convnext_s4nd_keys.json'
SMALL = dict(depths=[1, 1, 2, 1], dims=[16, 24, 32, 40])
# small stem/stage kernels; dt range as in the official config
SMALL_KW = dict(arch=SMALL, stem_channels=8, layer_cfg=dict(d_state=8))


def _manifest():
    if not MANIFEST.exists():
        pytest.skip(f'official ConvNeXt-S4ND key manifest missing: {MANIFEST}')
    return json.loads(MANIFEST.read_text())


def _check_manifest(model, entry, n_classes):
    man = entry['state_dict']
    official = {k: torch.empty(shape) for k, (shape, _) in man.items()}
    ours = model.state_dict()
    conv = ConvNeXtS4ND.convert_checkpoint(model, official)
    assert set(conv) == set(ours)
    assert all(tuple(conv[k].shape) == tuple(ours[k].shape) for k in conv)
    assert all(str(ours[k].dtype) == 'torch.' + man[k][1] for k in man if k in ours)
    n = sum(p.numel() for p in model.parameters())
    assert n + model.dims[-1] * n_classes + n_classes == entry['n_params']


def test_tiny_matches_official_keys_and_param_count():
    entry = _manifest()['convnext_s4nd_tiny_2d']
    model = ConvNeXtS4ND('tiny', out_indices=3)  # norm3 <-> official head.norm
    _check_manifest(model, entry, 1000)
    # official classifier (29,409,457 params) = this backbone + a 768 -> 1000 linear head
    assert entry['n_params'] == 29_409_457
    assert [p for p in model.state_dict() if p.endswith('l_kernel')].__len__() == 44


def test_video_tiny_matches_official_keys():
    man = _manifest()
    names = [k for k in man if k.startswith('convnext3d')]
    yaml_name = [k for k in names if 'yaml' in k][0]
    readme_name = [k for k in names if 'README' in k][0]
    _check_manifest(ConvNeXtS4ND3D('tiny', out_indices=3), man[yaml_name], 51)
    _check_manifest(ConvNeXtS4ND3D('tiny', out_indices=3, stem_type='patch',
                                   downsample_type='conv'), man[readme_name], 51)


@pytest.mark.parametrize('size', [32, 64])
def test_forward_backward_small(size):
    torch.manual_seed(0)
    model = ConvNeXtS4ND(img_size=size, out_indices=(0, 1, 2, 3), drop_path_rate=0.1,
                         **SMALL_KW)
    model.init_weights()
    x = torch.randn(2, 3, size, size, requires_grad=True)
    outs = model(x)
    assert [o.shape for o in outs] == [(2, c, size // 4 // 2 ** i, size // 4 // 2 ** i)
                                       for i, c in enumerate(SMALL['dims'])]
    sum(o.square().mean() for o in outs).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.pop('stem.stem.D') is None  # the dense stem has no D skip (official too)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the S4ND kernels of stem, downsample and blocks all learn
    for key in ('stem.stem.kernel.0.C', 'stages.1.downsample.s4conv.kernel.1.inv_dt',
                'stages.2.blocks.1.conv_dw.kernel.0.B'):
        assert grads[key].abs().sum() > 0, key


def test_prefetched_kernels_equal_per_layer(monkeypatch):
    """Training (several threads, or the compiled spectrum op) generates the kernels of all
    depthwise S4ND layers in one batched call per shape (`prefetch_kernels`): same outputs
    and gradients as per-layer generation, every prefetched kernel used once, and none used
    after the parameters changed."""
    import mmssm.models.backbones.convnext_s4nd as cb
    from mmssm.models.layers.s4nd import S4ND, prefetch_kernels
    torch.manual_seed(0)
    model = ConvNeXtS4ND(img_size=64, out_indices=(0, 1, 2, 3), **SMALL_KW)
    x = torch.randn(2, 3, 64, 48)
    w = [torch.randn(o.shape) for o in model(x)]
    used = []  # per kernel_operators call: whether it took prefetched kernels
    orig_take = S4ND._take_prefetched

    def take(self, *args):
        kernels = orig_take(self, *args)
        used.append(kernels is not None)
        return kernels
    monkeypatch.setattr(S4ND, '_take_prefetched', take)

    def run(prefetch: bool):
        monkeypatch.setattr(cb, 'prefetch_kernels',
                            prefetch_kernels if prefetch else lambda *a, **k: None)
        model.zero_grad(set_to_none=True)
        outs = model(x)
        sum((o * g).sum() for o, g in zip(outs, w)).backward()
        return [o.detach() for o in outs], [p.grad.clone() for p in model.parameters()
                                            if p.grad is not None]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the backbone prefetches with > 1 thread
    try:
        ref_out, ref_grad = run(False)
        used.clear()
        out, grad = run(True)
    finally:
        torch.set_num_threads(threads)
    n_layers = len(model._s4nd_layers((64, 48)))
    assert n_layers == sum(SMALL['depths']) + 3 and used == [True] * n_layers
    assert not any('_prefetched' in m.__dict__ for m in model.modules())
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grad, ref_grad):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # stale: parameters changed in place after the prefetch -> generated again
    layers = model._s4nd_layers((64, 48))
    prefetch_kernels(layers, 1.0)
    with torch.no_grad():
        layers[0][0].kernel[0].inv_dt.add_(0.1)
    used.clear()
    layer, size = layers[0]
    layer(torch.randn(1, layer.h, *size))
    assert used == [False]


def test_kernels_are_global_over_each_stage():
    model = ConvNeXtS4ND(img_size=64, **SMALL_KW)
    assert model.stem.stem.l_max == [16, 16]
    assert [s.blocks[0].conv_dw.l_max for s in model.stages] == [[16, 16], [8, 8], [4, 4],
                                                                [2, 2]]
    assert [s.downsample.s4conv.l_max for s in model.stages[1:]] == [[16, 16], [8, 8], [4, 4]]
    assert not hasattr(model.stages[0], 'downsample')


def test_other_resolution_through_rate():
    torch.manual_seed(0)
    model = ConvNeXtS4ND(img_size=32, out_indices=(0, 3), **SMALL_KW).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # first forward: DPLR C -> C~ attuned to l_max
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y_rate = model(x, rate=0.5)  # kernels re-discretised to cover the 2x larger maps
        y_clip = model(x)  # rate 1: kernels clipped to the training l_max
    assert y_rate[0].shape == (1, 16, 16, 16) and y_rate[1].shape == (1, 40, 2, 2)
    assert not torch.allclose(y_rate[0], y_clip[0])
    blk = model.stages[0].blocks[0].conv_dw
    assert blk.kernel_lengths([16, 16], 0.5) == [16, 16]
    assert blk.kernel_lengths([16, 16], 1) == [8, 8]
    for k, v in model.state_dict().items():  # weights are neither resized nor changed
        assert torch.equal(v, sd[k]), k


def test_frozen_stages_and_layer_depth():
    model = ConvNeXtS4ND(img_size=32, frozen_stages=2, out_indices=(0, 1, 3), **SMALL_KW)
    model.train()
    for name, p in model.named_parameters():
        frozen = name.startswith(('stem.', 'stages.0.', 'stages.1.', 'norm0.', 'norm1.'))
        assert p.requires_grad != frozen, name
    assert not model.stem.training and not model.stages[1].training and model.stages[2].training
    ids = {n: model.get_layer_depth(n, prefix='')[0] for n, _ in model.named_parameters()}
    max_id = model.get_layer_depth('stem.stem.D')[1]
    assert max_id == 8 and ids['stem.stem.D'] == 0
    assert ids['stages.0.blocks.0.gamma'] == 1 and ids['stages.1.downsample.fc.weight'] == 2
    assert ids['stages.3.blocks.0.gamma'] == 6 and ids['norm3.weight'] == 7
    assert model.get_layer_depth('head.fc.weight', prefix='backbone.') == (7, 8)
    assert all(0 <= i < max_id for i in ids.values())
    with pytest.raises(ValueError, match='frozen_stages'):
        ConvNeXtS4ND(img_size=32, frozen_stages=5, **SMALL_KW)


def test_official_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    src = ConvNeXtS4ND(img_size=32, out_indices=3, **SMALL_KW)
    src(torch.randn(1, 3, 32, 32))  # first forward: C -> C~, l_kernel set (as trained ckpts)
    official = {('head.norm.' + k[6:] if k.startswith('norm3.') else k): v
                for k, v in src.state_dict().items()}
    official['head.fc.weight'] = torch.randn(10, 40)
    official['head.fc.bias'] = torch.randn(10)
    path = tmp_path / 'official.pth'
    torch.save({'state_dict': official}, path)
    dst = ConvNeXtS4ND(img_size=32, out_indices=(1, 3), **SMALL_KW,
                       init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    dst.init_weights()
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)[1], src(x)[0])


def test_gap_before_final_norm_and_registry():
    model = MODELS.build(dict(type='mmssm.ConvNeXtS4ND', img_size=32, gap_before_final_norm=True,
                              **SMALL_KW))
    assert model(torch.randn(2, 3, 32, 32))[0].shape == (2, 40, 1, 1)
    with pytest.raises(ValueError, match='unknown arch'):
        ConvNeXtS4ND('huge')
    with pytest.raises(ValueError, match='stem_type'):
        ConvNeXtS4ND(stem_type='s4nd', **SMALL_KW)


def test_video_forward_backward_small():
    torch.manual_seed(0)
    model = ConvNeXtS4ND3D(img_size=(4, 32, 32), patch_size=(2, 4, 4), stem_l_max=(2, 8, 8),
                           out_indices=(0, 3), **SMALL_KW)
    x = torch.randn(1, 3, 4, 32, 32, requires_grad=True)
    outs = model(x)
    assert outs[0].shape == (1, 16, 2, 8, 8) and outs[1].shape == (1, 40, 2, 1, 1)
    (outs[0].mean() + outs[1].mean()).backward()
    assert torch.isfinite(x.grad).all()
    with torch.no_grad():  # other resolution: 2x larger frames, rate 0.5
        assert model(torch.randn(1, 3, 4, 64, 64), rate=0.5)[0].shape == (1, 16, 2, 16, 16)


def test_inflation_from_2d():
    """Spatial kernels move to axes 1, 2; temporal kernel.0 stays fresh.

    Guarantee: for a clip whose T frames all equal an image x, every inflated depthwise
    S4ND layer gives, per frame t and channel h,
        y3[:, h, t] = c_t[h] * (y2[:, h] - D_h x_h) + D_h x_h,
    with y2 the 2-D layer on x and c_t[h] = sum of the temporal kernel taps that land
    inside the clip at t (causal taps s <= t, anti-causal taps m < T-1-t).
    """
    torch.manual_seed(0)
    m2 = ConvNeXtS4ND(img_size=32, **SMALL_KW)
    m2(torch.randn(1, 3, 32, 32))  # attune C~ (what a checkpoint holds)
    m3 = ConvNeXtS4ND3D(img_size=(4, 32, 32), patch_size=(2, 4, 4), stem_l_max=(2, 8, 8),
                        **SMALL_KW)
    fresh_t = m3.state_dict()['stages.0.blocks.0.conv_dw.kernel.0.C'].clone()
    sd3 = m3.convert_checkpoint(m2.state_dict())  # detected as 2-D -> inflated
    m3.load_state_dict(sd3)
    s2, s3 = m2.state_dict(), m3.state_dict()
    for part in ('C', 'inv_dt', 'B', 'P', 'A_real', 'A_imag', 'l_kernel'):
        for a in (0, 1):
            assert torch.equal(s3[f'stages.2.blocks.1.conv_dw.kernel.{a + 1}.{part}'],
                               s2[f'stages.2.blocks.1.conv_dw.kernel.{a}.{part}'])
            assert torch.equal(s3[f'stem.stem.0.kernel.{a + 1}.{part}'],
                               s2[f'stem.stem.kernel.{a}.{part}'])
    assert torch.equal(s3['stages.0.blocks.0.conv_dw.kernel.0.C'], fresh_t)
    assert torch.equal(s3['stem.stem.2.weight'], s2['stem.post_stem.1.weight'])
    assert torch.equal(s3['norm3.weight'], s2['norm3.weight'])

    l2, l3 = m2.stages[0].blocks[0].conv_dw, m3.stages[0].blocks[0].conv_dw
    T = 3
    x = torch.randn(2, 16, 8, 8)
    video = x[:, :, None].expand(-1, -1, T, -1, -1).contiguous()
    with torch.no_grad():
        y2, y3 = l2(x), l3(video)
        kt = l3.kernel[0](L=min(T, l3.l_max[0]))  # (2, H, Lt): causal, anti-causal halves
        Dx = l2.D[0][None, :, None, None] * x
        for t in range(T):
            c = kt[0, :, :t + 1].sum(-1) + kt[1, :, :T - 1 - t].sum(-1)  # (H,)
            torch.testing.assert_close(y3[:, :, t], c[None, :, None, None] * (y2 - Dx) + Dx,
                                       atol=1e-5, rtol=1e-4)


def test_non_square_odd_input():
    """Detection/segmentation-style inputs: non-square, not a multiple of 32."""
    torch.manual_seed(0)
    model = ConvNeXtS4ND(img_size=32, out_indices=(0, 1, 2, 3), **SMALL_KW)
    outs = model(torch.randn(1, 3, 70, 45))
    assert [tuple(o.shape[2:]) for o in outs] == [(17, 11), (8, 5), (4, 2), (2, 1)]
    assert all(torch.isfinite(o).all() for o in outs)


def _dt_range(module):
    dts = torch.cat([m.inv_dt.detach().exp().flatten() for m in module.modules()
                     if hasattr(m, 'inv_dt')])
    return dts.min().item(), dts.max().item()


@pytest.mark.parametrize('cls,kw', [
    (ConvNeXtS4ND, dict(img_size=32)),
    (ConvNeXtS4ND3D, dict(img_size=(4, 32, 32), stem_l_max=(2, 8, 8)))])
def test_per_layer_overrides_override(cls, kw):
    """The official constructor values (a layer dict plus stem/stage dicts that restate
    dt_min/dt_max/init) build, and an override wins over the defaults below it."""
    official_layer = dict(d_state=8, channels=1, bidirectional=True, activation=None,
                          final_act='none', init='fourier', rank=1, trank=1, dt_min=0.01,
                          dt_max=1.0, lr=0.001, n_ssm=1, linear=True, bandlimit=None)
    torch.manual_seed(0)
    model = cls(arch=SMALL, stem_channels=8, layer_cfg=official_layer,
                stem_layer_cfg=dict(dt_min=0.1, dt_max=1.0, init='fourier'),
                stage_layer_cfg=dict(dt_min=0.1, dt_max=1.0), **kw)
    lo, hi = _dt_range(model)
    assert 0.1 <= lo and hi <= 1.0
    # every key of the defaults can be overridden, per part
    model = cls(arch=SMALL, stem_channels=8, layer_cfg=dict(official_layer, d_state=4),
                stem_layer_cfg=dict(dt_min=0.02, dt_max=0.03, d_state=6),
                stage_layer_cfg=dict(dt_min=0.5, dt_max=0.6, init='legs'), **kw)
    stem = model.stem.stem if cls is ConvNeXtS4ND else model.stem.stem[0]
    assert 0.02 <= _dt_range(stem)[0] and _dt_range(stem)[1] <= 0.03
    assert stem.kernel[0].N == 3  # d_state 6 (N/2 stored)
    lo, hi = _dt_range(model.stages)
    assert 0.5 <= lo and hi <= 0.6
    blk = model.stages[0].blocks[0].conv_dw.kernel[0]
    assert blk.N == 2  # layer_cfg's d_state reaches the stages
    legs = cls(arch=SMALL, stem_channels=8, layer_cfg=dict(d_state=4),
               stage_layer_cfg=dict(init='legs'), **kw).stages[0].blocks[0].conv_dw.kernel[0]
    torch.testing.assert_close(blk.A_imag, legs.A_imag)
    fourier = cls(arch=SMALL, stem_channels=8, layer_cfg=dict(d_state=4), **kw)
    assert not torch.allclose(blk.A_imag, fourier.stages[0].blocks[0].conv_dw.kernel[0].A_imag)
    x = torch.randn(1, 3, *kw['img_size']) if cls is ConvNeXtS4ND3D else torch.randn(1, 3, 32, 32)
    assert torch.isfinite(model(x)[0]).all()
    with pytest.raises(TypeError, match='stage_layer_cfg'):
        cls(arch=SMALL, stage_layer_cfg=[('dt_min', 0.1)], **kw)
