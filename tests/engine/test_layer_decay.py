"""The constructor gives every backbone layer its own lr and matches real names."""
import pytest
import torch
from torch import nn

from mmssm.engine import LayerDecayOptimWrapperConstructor


class TinyPlain(nn.Module):
    """Stand-in with mmpretrain's get_layer_depth contract (0: embed, i+1: layers.i)."""

    def __init__(self, depth=3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(4)
        self.depth = depth

    def get_layer_depth(self, name, prefix=''):
        name = name[len(prefix):]
        max_id = self.depth + 2
        if name.startswith('patch_embed'):
            return 0, max_id
        if name.startswith('layers.'):
            return int(name.split('.')[1]) + 1, max_id
        return max_id - 1, max_id


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyPlain()
        self.neck = nn.Linear(4, 4)


def build(model, **paramwise):
    cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.1))
    ctor = LayerDecayOptimWrapperConstructor(cfg, paramwise_cfg=dict(paramwise))
    return ctor(model).optimizer


def test_lr_per_group_detector():
    opt = build(Detector(), layer_decay_rate=0.5, norm_decay_mult=0.0)
    lrs = {g['param_name']: g['lr'] for g in opt.param_groups}
    # max_id = 5: scale = 0.5 ** (4 - layer_id)
    assert lrs['backbone.patch_embed.weight'] == pytest.approx(0.5 ** 4)
    assert lrs['backbone.layers.0.weight'] == pytest.approx(0.5 ** 3)
    assert lrs['backbone.layers.2.bias'] == pytest.approx(0.5 ** 1)
    assert lrs['backbone.norm.weight'] == pytest.approx(1.0)
    assert lrs['neck.weight'] == pytest.approx(1.0)
    wds = {g['param_name']: g['weight_decay'] for g in opt.param_groups}
    assert wds['backbone.norm.weight'] == 0.0 and wds['neck.weight'] == pytest.approx(0.1)


def test_custom_keys_and_special_optim():
    model = TinyPlain()
    model.layers[0].weight._optim = dict(lr=0.01, weight_decay=0.0)
    opt = build(model, layer_decay_rate=1.0, custom_keys={'patch_embed': dict(decay_mult=0.0)})
    groups = {g['param_name']: g for g in opt.param_groups}
    assert groups['patch_embed.weight']['weight_decay'] == 0.0
    assert groups['layers.0.weight']['lr'] == pytest.approx(0.01)
    assert groups['layers.0.weight']['weight_decay'] == 0.0


def test_backbone_without_depth_is_an_error():
    class NoDepth(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(2, 2)
    with pytest.raises(NotImplementedError, match='get_layer_depth'):
        build(NoDepth(), layer_decay_rate=0.9)


def test_real_vim_detector_layers_get_their_own_lr():
    """Vim's parameters are `layers.i.*`: every layer must land in its own lr group."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    import mmdet.models  # noqa: F401
    from mmdet.registry import MODELS
    cfg = Config.fromfile('configs/mask_rcnn/vim_t_1x_tiny.py')
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    opt = build(model, layer_decay_rate=0.5)
    lrs = {g['param_name']: g['lr'] for g in opt.param_groups}
    depth = model.backbone.num_layers  # 4 layers: ids 0 (embeddings) .. 5 (top)
    assert lrs['backbone.pos_embed'] == pytest.approx(0.5 ** (depth + 1))
    assert lrs['backbone.patch_embed.proj.weight'] == pytest.approx(0.5 ** (depth + 1))
    for i in range(depth):
        assert lrs[f'backbone.layers.{i}.mixer.in_proj.weight'] == pytest.approx(0.5 ** (depth - i))
    assert lrs['neck.1.lateral_convs.0.conv.weight'] == pytest.approx(1.0)
    assert lrs['roi_head.bbox_head.fc_cls.weight'] == pytest.approx(1.0)
