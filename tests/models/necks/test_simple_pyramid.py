import pytest
import torch

from mmssm.models.necks import SimplePyramid


def test_strides_and_channels():
    neck = SimplePyramid(in_channels=16, out_channels=8)
    x = torch.randn(2, 16, 6, 10)  # stride-16 map of a 96x160 image
    outs = neck([x])
    assert [tuple(o.shape) for o in outs] == [(2, 8, 24, 40), (2, 8, 12, 20), (2, 8, 6, 10),
                                               (2, 8, 3, 5)]
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in neck.parameters())


def test_one_input_per_level():
    neck = SimplePyramid(in_channels=4, in_index=(0, 1, 2, 3))
    feats = [torch.full((1, 4, 4, 4), float(i)) for i in range(4)]
    outs = neck(feats)
    assert torch.all(outs[2] == 2.0)  # identity level reads the third map
    assert torch.all(outs[3] == 3.0)  # max-pool of a constant map


def test_bad_arguments():
    with pytest.raises(ValueError, match='scale_factors'):
        SimplePyramid(8, scale_factors=(3, ))
    with pytest.raises(ValueError, match='in_index'):
        SimplePyramid(8, in_index=(0, 1))
