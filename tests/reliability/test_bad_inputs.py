"""Bad or awkward input gets a clear error or a documented, tested result -- every family.

Families (tiny builds in rel_common.FAMILIES): Vim, V2M, V2M + local window, VMamba v2
and v0, V2MPyramid, ConvNeXt-S4ND. Scan-level input checks live in tests/ops
(test_selective_scan.py: shapes, dtypes, non-contiguous, NaN/Inf, zero length).
"""
import pytest
import torch
from rel_common import FAMILIES, FLOOR, NAMES, REPO, build, expected_hw

from mmssm.models.backbones.convnext_s4nd import ConvNeXtS4ND
from mmssm.models.backbones.v2m import V2M
from mmssm.models.backbones.v2m_pyramid import V2MPyramid
from mmssm.models.backbones.vim import Vim
from mmssm.models.backbones.vmamba import VMamba

SSM_NAMES = [n for n in NAMES if n not in FLOOR]


# ------------------------------------------------------------ awkward but valid images
@pytest.mark.parametrize('name', NAMES)
def test_awkward_sizes_give_documented_shapes_and_batch_independence(name):
    """Non-square, not a multiple of the stride, smaller than a patch/window, batch 1.

    SSM families pad (stage i has ceil(H / stride_i) rows: no pixel dropped);
    ConvNeXt-S4ND floors like ConvNeXt. Every sample's output must not depend on
    the rest of the batch (batch 1 == its slice of batch 2).
    """
    m = build(name).eval()
    sizes = [(32, 48), (37, 45)] + ([(5, 5), (1, 3)] if name not in FLOOR else [(40, 72)])
    torch.manual_seed(1)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            both, one = m(x), m(x[1:])
        assert [tuple(o.shape[-2:]) for o in both] == expected_hw(name, h, w), (h, w)
        for a, b in zip(both, one):
            assert b.shape[0] == 1 and torch.isfinite(a).all()
            torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', SSM_NAMES)
def test_padding_keeps_edge_pixels(name):
    """37 x 45 is not a stride multiple: the last row/column of pixels still reaches the output."""
    m = build(name).eval()
    x = torch.randn(1, 3, 37, 45)
    y = x.clone()
    y[..., -1, -1] += 10.0  # the bottom-right pixel, in the padded part of the last patch
    with torch.no_grad():
        assert not torch.equal(m(x)[0], m(y)[0])


# ---------------------------------------------------------------- bad images
BAD_IMAGES = [
    ('channels', lambda: torch.randn(1, 4, 32, 32), ValueError, r'4 channels .*in_channels=3'),
    ('gray', lambda: torch.randn(1, 1, 32, 32), ValueError, r'1 channels .*in_channels=3'),
    ('no_batch_dim', lambda: torch.randn(3, 32, 32), ValueError, r'\(B, C, H, W\) image batch'),
    ('empty_batch', lambda: torch.randn(0, 3, 32, 32), ValueError, 'batch is empty'),
    ('zero_height', lambda: torch.randn(1, 3, 0, 32), ValueError, 'zero size'),
    ('uint8', lambda: torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, 'floating'),
]


@pytest.mark.parametrize('case,make,err,msg', BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
@pytest.mark.parametrize('name', NAMES)
def test_bad_images_raise_clear_errors(name, case, make, err, msg):
    m = build(name)
    with pytest.raises(err, match=msg):
        m(make())


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
@pytest.mark.parametrize('name', NAMES)
def test_nan_inf_pixels_propagate(name, bad):
    """A corrupt pixel must show up in the features (never a silently finite result, never a
    hang); the other sample of the batch stays finite."""
    m = build(name).eval()
    x = torch.randn(2, 3, 32, 32)
    x[0, 1, 5, 7] = bad
    with torch.no_grad():
        outs = m(x)
    assert not torch.isfinite(outs[-1][0]).all()
    assert all(torch.isfinite(o[1]).all() for o in outs)


def test_convnext_s4nd_input_below_total_stride_is_refused():
    with pytest.raises(ValueError, match=r'smaller than the total stride \(32, 32\)'):
        build('convnext_s4nd')(torch.randn(1, 3, 37, 29))


# -------------------------------------------------------- arch and option values
UNKNOWN_ARCH = [
    (Vim, {}, r"unknown arch='huge'; valid: \['b', 'base', .*'tiny'\]"),
    (V2M, {}, r"unknown arch='huge'; valid: \['s', 'small', 't', 'ti', 'tiny'\]"),
    (V2M, dict(local_window=True), r"unknown arch='huge'; valid: \['s', 'small'"),
    (VMamba, {}, r"unknown arch='huge'; valid: \[.*'tiny', .*'vanilla-tiny'\]"),
    (V2MPyramid, {}, r"unknown arch='huge'; valid: \['base', 'small'\]"),
    (ConvNeXtS4ND, {}, r"unknown arch='huge'; valid: \['base', 'micro', 'small', 'tiny'\]"),
]


@pytest.mark.parametrize('cls,kw,msg', UNKNOWN_ARCH)
def test_unknown_arch_lists_valid_names(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls(arch='huge', **kw)


BAD_OPTIONS = [
    (lambda: Vim(arch=dict(embed_dims=16, num_layers=1), out_type='map'),
     r"out_type='map'; valid: \('cls_token', 'featmap'"),
    (lambda: Vim(arch=dict(embed_dims=16, num_layers=1), interpolate_mode='cubic'),
     r"interpolate_mode='cubic'; valid: .*'bicubic'"),
    (lambda: V2M(arch=dict(embed_dims=16, num_layers=1), cls_position='top'),
     r"cls_position='top'; valid: \('mean', 'edge', 'middle'\)"),
    (lambda: V2M(arch=dict(embed_dims=16, num_layers=1), gate='first'), r"gate .*'both'.*'last'"),
    (lambda: V2M(arch=dict(embed_dims=16, num_layers=1), corners=['xx']), r"'ul', 'lr'"),
    (lambda: V2M(arch=dict(embed_dims=16, num_layers=2), local_window=True, directions=('w1',)),
     r"direction 'w1' is not valid; use h, v or w<K>"),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=8, forward_type='v9')),
     r"forward_type='v9': valid \['v0', "),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=8, downsample='v9')), r"'v1'.*'v2'.*'v3'"),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=8, patch_embed='v9')), r"'v1'.*'v2'"),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=8, norm_layer='bn')), r"'ln'.*'ln2d'"),
    (lambda: ConvNeXtS4ND(stem_type='conv'), r"'new_s4nd_patch' or 'patch'"),
    (lambda: ConvNeXtS4ND(downsample_type='pool'), r"'s4nd' or 'conv'"),
]


@pytest.mark.parametrize('make,msg', BAD_OPTIONS)
def test_unknown_option_values_list_valid_ones(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


INCONSISTENT_ARCH = [
    (lambda: Vim(arch=dict(embed_dims=16)), r"lacks \['num_layers'\]"),
    (lambda: Vim(arch=dict(embed_dims=16, num_layers=2, depth=3)), r"unknown arch key.*'depth'"),
    (lambda: Vim(arch=dict(embed_dims=0, num_layers=2)), 'embed_dims=0 must be an int >= 1'),
    (lambda: Vim(arch=dict(embed_dims=16, num_layers=0)), 'num_layers=0 must be an int >= 1'),
    (lambda: Vim(arch=dict(embed_dims='16', num_layers=1)), "embed_dims='16' must be an int"),
    (lambda: V2M(arch=dict(embed_dims=16, num_layers=2, d_state=0)), 'd_state=0 must be an int'),
    (lambda: VMamba(arch=dict(depths=[1, 1, 1, 1], dims=[8, 16])), 'differ in length'),
    (lambda: VMamba(arch=dict(depths=[], dims=8)), 'non-empty list'),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=0)), r'dims=\[0, 0, 0, 0\]: need ints >= 1'),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=8, ssm_ratio=0)), 'ssm_ratio=0 must be'),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=8, forward_type='v0')), "needs norm_layer='ln'"),
    (lambda: V2MPyramid(arch=dict(depths=[1] * 4, dims=8, d_state=0)), 'd_state=0 must be'),
    (lambda: V2MPyramid(arch=dict(depths=[1] * 4, dims=8, ssm_ratio=2)),
     "unknown arch key.*'ssm_ratio'"),
    (lambda: ConvNeXtS4ND(arch=dict(depths=[1, 1], dims=[8, 16])), 'needs 4 depths and 4 dims'),
    (lambda: Vim(arch=[192, 24]), 'arch must be a str or dict, got list'),
    (lambda: Vim(arch=dict(embed_dims=16, num_layers=2), in_channels=0), 'in_channels=0'),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=8), in_channels=0), 'in_channels=0'),
    (lambda: Vim(arch=dict(embed_dims=16, num_layers=2), drop_path_rate=1.0),
     r'drop_path_rate=1.0 must be in \[0, 1\)'),
    (lambda: VMamba(arch=dict(depths=[1] * 4, dims=8), drop_path_rate=-0.1),
     r'drop_path_rate=-0.1 must be in \[0, 1\)'),
]


@pytest.mark.parametrize('make,msg', INCONSISTENT_ARCH)
def test_inconsistent_custom_arch_and_values(make, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        make()


@pytest.mark.parametrize('name', NAMES)
def test_out_indices_and_frozen_stages_out_of_range(name):
    num = FAMILIES[name][2]
    with pytest.raises(ValueError, match=rf'index {num} is out of range .*-{num}..{num - 1}'):
        build(name, out_indices=(0, num))
    with pytest.raises(ValueError, match=rf'index {-num - 1} is out of range'):
        build(name, out_indices=(-num - 1, ))
    with pytest.raises(ValueError, match='out_indices is empty'):
        build(name, out_indices=())
    # a repeated index used to give fewer outputs than asked for, silently
    with pytest.raises(ValueError, match=f'repeats layer/stage {num - 1}'):
        build(name, out_indices=(num - 1, -1))
    with pytest.raises(ValueError, match=rf'frozen_stages={num + 1} must be in -1..{num}'):
        build(name, frozen_stages=num + 1)
    with pytest.raises(ValueError, match=rf'frozen_stages=-2 must be in -1..{num}'):
        build(name, frozen_stages=-2)


# ------------------------------------------------------------------ frozen stages
FROZEN_1 = {  # what frozen_stages=1 must freeze
    'vim': ('patch_embed.', 'pos_embed', 'cls_token', 'layers.0.'),
    'v2m': ('patch_embed.', 'pos_embed', 'cls_token', 'layers.0.'),
    'v2m_local': ('patch_embed.', 'pos_embed', 'cls_token', 'layers.0.'),
    'vmamba_v2': ('patch_embed.', 'layers.0.', 'outnorm0.'),
    'vmamba_v0': ('patch_embed.', 'layers.0.', 'outnorm0.'),
    'v2m_pyramid': ('patch_embed.', 'layers.0.', 'outnorm0.'),
    'convnext_s4nd': ('stem.', 'stages.0.', 'norm0.'),
}


@pytest.mark.parametrize('name', NAMES)
def test_frozen_stages_are_really_frozen(name):
    m = build(name, frozen_stages=1, drop_path_rate=0.1)
    prefixes = FROZEN_1[name]
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in m.named_parameters() if n.startswith(prefixes)}
    assert expected and frozen == expected
    m.train()  # a runner calls .train() after building: frozen parts must stay in eval
    for n, mod in m.named_modules():
        if n and n.startswith(prefixes):
            assert not mod.training, f'{n} is frozen but in training mode'
        elif n.startswith(('layers.1.', 'stages.1.')):
            assert mod.training, f'{n} is not frozen but in eval mode'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # S4ND re-expresses its DPLR C~ in place (same kernel) the first time an input is
        # longer than l_max; only what happens after that is the optimizer's doing
        m(x)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        sum(o.square().mean() for o in m(x)).backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), f'frozen {n} changed'
    changed = [n for n, p in m.named_parameters()
               if n not in frozen and not torch.equal(p, before[n])]
    assert len(changed) > len(list(m.parameters())) // 2 - len(frozen)


# ------------------------------------------------------ detection / segmentation batches
def _build(config):
    from mmengine.config import Config
    from mmengine.registry import MODELS as ROOT, init_default_scope
    cfg = Config.fromfile(str(REPO / config))
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = ROOT.build(cfg.model)
    model.init_weights()
    return model.train()


def _det_sample(n_boxes: int):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    s = DetDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64),
                                    scale_factor=(1., 1.), batch_input_shape=(64, 64)))
    gt = InstanceData()
    gt.bboxes = torch.tensor([[4., 6., 40., 50.]])[:n_boxes]
    gt.labels = torch.zeros(n_boxes, dtype=torch.long)
    masks = torch.zeros(n_boxes, 64, 64, dtype=torch.uint8)
    masks[:, 6:50, 4:40] = 1
    gt.masks = BitmapMasks(masks.numpy(), 64, 64)
    s.gt_instances = gt
    return s


def _finite_loss_and_grads(model, data):
    data = model.data_preprocessor(data, training=True)
    losses = model.loss(data['inputs'], data['data_samples'])
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total), losses
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return losses


def test_detection_batch_with_an_unannotated_image():
    """Mask R-CNN (tiny VMamba): an image without boxes next to one with a box, then a batch
    of one image without boxes: finite losses, the box/mask losses of the empty batch are 0."""
    pytest.importorskip('mmdet')
    model = _build('configs/mask_rcnn/vmamba_t_1x_tiny.py')
    img = lambda: torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)  # noqa: E731
    _finite_loss_and_grads(model, dict(inputs=[img(), img()],
                                       data_samples=[_det_sample(1), _det_sample(0)]))
    model.zero_grad()
    losses = _finite_loss_and_grads(model, dict(inputs=[img()], data_samples=[_det_sample(0)]))
    def value(k):
        vs = losses[k] if isinstance(losses[k], list) else [losses[k]]
        return float(sum(torch.as_tensor(v).detach().sum() for v in vs))
    assert value('loss_bbox') == 0 and value('loss_mask') == 0
    assert value('loss_rpn_cls') > 0  # background anchors still train


def test_segmentation_batch_with_only_ignored_pixels():
    """UPerNet (tiny V2M pyramid): a label map that is all ignore_index (255) next to a
    normal one, then a batch of only such maps: finite losses (0 for the latter), no NaN."""
    pytest.importorskip('mmseg')
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    model = _build('configs/upernet/v2m_s_tiny.py')

    def sample(label):
        s = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64),
                                        pad_shape=(64, 64)))
        s.gt_sem_seg = PixelData(data=torch.full((1, 64, 64), label, dtype=torch.long))
        return s
    img = lambda: torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)  # noqa: E731
    _finite_loss_and_grads(model, dict(inputs=[img(), img()],
                                       data_samples=[sample(1), sample(255)]))
    model.zero_grad()
    losses = _finite_loss_and_grads(model, dict(inputs=[img(), img()],
                                                data_samples=[sample(255), sample(255)]))
    assert all(float(v.detach()) == 0 for k, v in losses.items() if k.endswith('loss_ce'))
    # documented limitation (mmseg, not the backbone): UPerNet's pyramid pooling has a
    # BatchNorm over a 1x1 map, so training with batch size 1 is refused by torch
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        _finite_loss_and_grads(model, dict(inputs=[img()], data_samples=[sample(1)]))


@pytest.mark.parametrize('config', ['configs/mask_rcnn/vmamba_t_1x_tiny.py',
                                    'configs/upernet/v2m_s_tiny.py',
                                    'configs/vmamba/vmamba_in1k_tiny.py'])
def test_empty_data_sample_list_is_a_clear_error(config):
    """A batch of zero samples stops in the data preprocessor with an 'empty' message
    (mmseg's used to die on ``inputs[0]`` with an IndexError)."""
    model = _build(config)
    msg = 'empty' if 'in1k' in config else 'the batch is empty'  # mmpretrain: its own assert
    with pytest.raises((AssertionError, ValueError), match=msg):
        model.data_preprocessor(dict(inputs=[], data_samples=[]), training=True)
