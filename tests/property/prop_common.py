"""Shared checks of the backbone property tests: one drawn configuration, every contract.

:func:`check_backbone` builds a drawn config through the registry and checks, on one
drawn input batch:

1. forward and backward run in training mode, outputs and gradients are finite;
2. the dense contract: ``len(out_indices)`` outputs, channels and strides as the
   backbone declares them (``out_channels`` / ``out_strides`` / ``feature_info``),
   sizes as the family's documented rule (``expected`` gives them);
3. ``frozen_stages``: frozen parameters get no gradient, stay unchanged after an
   AdamW step (with weight decay) and their modules stay in eval mode after
   ``.train()``;
4. in eval mode: the same input twice gives bit-identical outputs, and item i of the
   batch equals the model run on item i alone;
5. the state dict saved to a file and loaded through ``init_cfg=dict(type='Pretrained')``
   into a differently seeded model gives identical outputs;
6. ``get_layer_depth``: every parameter gets an id in ``0..num-1`` and ids never
   decrease with the parameter's position in the network (``position(name)``).
"""
import os
import tempfile
from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor

import mmssm.models  # noqa: F401  (registers the backbones)
from mmssm.registry import MODELS

SLOW = os.environ.get('HYPOTHESIS_PROFILE', 'mmssm-ci') in ('mmssm-slow', 'mmssm-explore')


def budget(n: int) -> int:
    """Examples for a test: ``n`` in the default tier, 10 x n under the slow profile."""
    return n * 10 if SLOW else n


def build(cfg: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS.build(dict(cfg))


def _loss(outs: Sequence[Tensor]) -> Tensor:
    return sum(o.float().square().mean() for o in outs)


def check_backbone(cfg: dict, x: Tensor, expected: List[tuple], strides: List,
                   frozen_prefixes: Sequence[str], position: Callable[[str], float],
                   atol: float = 1e-5) -> None:
    """All contracts of one drawn configuration (see the module docstring).

    Args:
        cfg: registry config of the backbone.
        x: the input batch.
        expected: per output, its shape without the batch axis.
        strides: per output, the stride the family's size rule used (None: not a map).
        frozen_prefixes: parameter-name prefixes that ``frozen_stages`` must freeze.
        position: parameter name -> its depth in the network (for get_layer_depth).
    """
    model = build(cfg).train()
    n_out = len(model.out_indices)

    # 1. training forward/backward, finite
    outs = model(x)
    assert isinstance(outs, tuple) and len(outs) == n_out, (len(outs), n_out)
    for k, o in enumerate(outs):
        assert tuple(o.shape) == (x.shape[0], ) + tuple(expected[k]), \
            (k, tuple(o.shape), expected[k])
        assert torch.isfinite(o).all(), k
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # parameters that never train by design (e.g. the unused D of S4ND's dense stem)
    fixed = {n for n, p in build(dict(cfg, frozen_stages=-1)).named_parameters()
             if not p.requires_grad}
    # (trainable parameters not reached by the outputs, e.g. layers after the last
    # out_index, legitimately get no gradient)
    expect_frozen = fixed | {n for n, _ in model.named_parameters()
                             if n.startswith(tuple(frozen_prefixes))}
    assert frozen == expect_frozen, (sorted(frozen ^ expect_frozen))[:8]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _loss(outs)
    # with every output behind frozen stages nothing can get a gradient
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    if loss.requires_grad:
        assert grads, 'no parameter got a gradient'
    else:
        assert all(o.grad_fn is None for o in outs)

    # 2. declared channels and strides
    assert len(model.out_channels) == n_out
    assert list(model.out_strides) == list(strides), (model.out_strides, strides)
    info = model.feature_info
    assert [f['index'] for f in info] == list(model.out_indices)
    for k, o in enumerate(outs):
        # 'raw' outputs are channel-last token sequences / grids, the rest channel-first
        ch = o.shape[-1] if cfg.get('out_type') == 'raw' else o.shape[1]
        assert info[k]['num_chs'] == model.out_channels[k] == ch, (k, model.out_channels)

    # 3. frozen stages: no gradient, unchanged by an optimizer step, eval mode kept
    for n in frozen:
        assert n not in grads, f'frozen {n} got a gradient'
    # every parameter goes to the optimizer, as a runner's optimizer wrapper does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), f'frozen {n} changed'
    model.train()
    for n, m in model.named_modules():
        if n and n.startswith(tuple(frozen_prefixes)) and any(True for _ in m.parameters()):
            assert not m.training, f'{n} is frozen but in training mode'

    # 4. eval: determinism and batch consistency
    model.eval()
    with torch.no_grad():
        ref = model(x)
        again = model(x)
        for a, b in zip(ref, again):
            assert torch.equal(a, b), 'eval forward is not deterministic'
        for i in range(x.shape[0]):
            single = model(x[i:i + 1])
            for k, (a, b) in enumerate(zip(ref, single)):
                torch.testing.assert_close(b[0], a[i], rtol=1e-4, atol=atol,
                                           msg=lambda m: f'item {i}, output {k}: {m}')

    # 5. state dict -> file -> init_cfg Pretrained
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'backbone.pth')
        torch.save(model.state_dict(), path)
        other = build(dict(cfg, init_cfg=dict(type='Pretrained', checkpoint=path)), seed=1)
        other.init_weights()
        other.eval()
        sd, sd2 = model.state_dict(), other.state_dict()
        assert sd.keys() == sd2.keys()
        for k in sd:
            assert torch.equal(sd[k], sd2[k]), f'{k} differs after loading'
        with torch.no_grad():
            for a, b in zip(ref, other(x)):
                assert torch.equal(a, b), 'reloaded model gives other outputs'

    # 6. layer-wise lr decay ids
    check_layer_depth(model, position)


def check_layer_depth(model: torch.nn.Module, position: Callable[[str], float]) -> None:
    """Every parameter: id in range; a deeper parameter never gets a smaller id."""
    rows = []
    num = None
    for n, _ in model.named_parameters():
        lid, total = model.get_layer_depth('backbone.' + n, 'backbone.')
        num = total if num is None else num
        assert total == num, (n, total, num)
        assert isinstance(lid, int) and 0 <= lid < total, (n, lid, total)
        rows.append((position(n), lid, n))
    rows.sort()
    for (pa, la, na), (pb, lb, nb) in zip(rows, rows[1:]):
        assert pa == pb or la <= lb, f'{nb} (depth {pb}) has id {lb} < {la} of {na} (depth {pa})'
    # a head after the backbone gets the last id
    assert model.get_layer_depth('head.fc.weight', 'backbone.') == (num - 1, num)


def split_prefix_position(order: Dict[str, float]) -> Callable[[str], float]:
    """position(name) from a prefix -> depth table (longest prefix wins)."""
    keys = sorted(order, key=len, reverse=True)

    def position(name: str) -> float:
        for k in keys:
            if name.startswith(k):
                return order[k]
        raise AssertionError(f'no depth known for parameter {name}')
    return position
