"""Scan-order ops: visiting order (token ids), exact round trips, adjointness,
gradcheck of the autograd versions, bad inputs."""
import pytest
import torch

from mmssm.ops import (CORNERS, corner_merge_all, corner_rotate, corner_rotate_all,
                       corner_unrotate, cross_merge, cross_scan, local_reverse, local_scan)

from mmssm.ops import selective_scan_cpp
from mmssm.ops.scan_order import _impl

GRIDS = [(3, 5), (4, 4), (1, 7), (6, 1)]
IMPLS = ['torch'] + (['cpp'] if selective_scan_cpp.available() else [])


@pytest.fixture(autouse=True, params=IMPLS)
def impl(request, monkeypatch):
    """Every test runs through the PyTorch ops and through the fused C++ kernels."""
    monkeypatch.setenv('MMSSM_SCAN_BACKEND', request.param)
    assert _impl(torch.zeros(1, 1, 2, 2), None) == request.param
    return request.param


def ids(h, w, c=1):
    """Grid whose value at (i, j) is the row-major token id i*w + j (per channel c)."""
    return torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w).repeat(1, c, 1, 1)


@pytest.mark.parametrize('h,w', GRIDS)
def test_cross_scan_visiting_order(h, w):
    seq = cross_scan(ids(h, w))[0, :, 0].long().tolist()
    row = list(range(h * w))
    col = [i * w + j for j in range(w) for i in range(h)]  # 0, w, 2w, ..., 1, w+1, ...
    assert seq[0] == row and seq[1] == col
    assert seq[2] == row[::-1] and seq[3] == col[::-1]


@pytest.mark.parametrize('h,w', GRIDS)
def test_cross_merge_inverts_each_direction(h, w):
    """Each direction alone lands back on its own grid cell (a transposed or
    mirrored merge, like the official V2M output bug, fails here)."""
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    xs = cross_scan(x)
    for k in range(4):
        only = torch.zeros_like(xs)
        only[:, k] = xs[:, k]
        torch.testing.assert_close(cross_merge(only, h, w), x.flatten(2))
    torch.testing.assert_close(cross_merge(xs, h, w), 4 * x.flatten(2))


@pytest.mark.parametrize('h,w', GRIDS)
def test_corner_visiting_order(h, w):
    """Row-major scan of each rotated grid starts at its corner and runs along the
    adjacent edge: ul 0,1,..; ur w-1,w-2,..; ll (h-1)w,(h-1)w+1,..; lr hw-1,hw-2,.."""
    g = ids(h, w)
    want = {
        'ul': [i * w + j for i in range(h) for j in range(w)],
        'ur': [i * w + j for i in range(h) for j in reversed(range(w))],
        'll': [i * w + j for i in reversed(range(h)) for j in range(w)],
        'lr': [i * w + j for i in reversed(range(h)) for j in reversed(range(w))],
    }
    for c in CORNERS:
        assert corner_rotate(g, c).flatten().long().tolist() == want[c], c
        torch.testing.assert_close(corner_unrotate(corner_rotate(g, c), c), g)
    batched = corner_rotate_all(g, CORNERS)
    for i, c in enumerate(CORNERS):
        assert batched[i].flatten().long().tolist() == want[c]


@pytest.mark.parametrize('corners', [CORNERS, ('lr', 'ul'), ('ur',)])
def test_corner_round_trip(corners):
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    y = corner_rotate_all(x, corners)
    assert y.shape == (2 * len(corners), 3, 3, 5)
    torch.testing.assert_close(corner_merge_all(y, corners), len(corners) * x)


def test_local_scan_visiting_order():
    g = ids(4, 4)
    assert local_scan(g, 2)[0, 0].long().tolist() == [
        0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert local_scan(g, 2, column_first=True)[0, 0].long().tolist() == [
        0, 4, 1, 5, 8, 12, 9, 13, 2, 6, 3, 7, 10, 14, 11, 15]
    assert local_scan(g, 2, flip=True)[0, 0].long().tolist() == [
        15, 14, 11, 10, 13, 12, 9, 8, 7, 6, 3, 2, 5, 4, 1, 0]
    # 3x5 grid, window 2: padded to 4x6 with zeros at the right/bottom (id -> value+1)
    seq = local_scan(ids(3, 5) + 1, 2)[0, 0].long().tolist()
    assert len(seq) == 24
    assert seq[:8] == [1, 2, 6, 7, 3, 4, 8, 9]
    assert seq[8:12] == [5, 0, 10, 0]  # last window of the first band: padded column
    assert seq[12:16] == [11, 12, 0, 0]  # bottom band: padded row


@pytest.mark.parametrize('h,w,k', [(3, 5, 2), (4, 4, 2), (7, 7, 7), (5, 9, 3), (2, 2, 4)])
@pytest.mark.parametrize('flip', [False, True])
@pytest.mark.parametrize('column_first', [False, True])
def test_local_round_trip(h, w, k, flip, column_first):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    y = local_scan(x, k, flip, column_first)
    L = -(-h // k) * k * (-(-w // k) * k)
    assert y.shape == (2, 3, L)
    torch.testing.assert_close(local_reverse(y, k, h, w, flip, column_first), x)
    # the other way round, padded slots come back zero
    y2 = torch.randn_like(y)
    back = local_scan(local_reverse(y2, k, h, w, flip, column_first), k, flip, column_first)
    pad = local_scan(torch.ones_like(x), k, flip, column_first) == 0
    torch.testing.assert_close(back, y2.masked_fill(pad, 0))


def test_gradcheck_scan_order():
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cross_scan, (x,))
    y = torch.randn(1, 4, 2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, 3, 4), (y,))
    assert torch.autograd.gradcheck(lambda t: corner_rotate_all(t, CORNERS), (x,))
    yc = torch.randn(8, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: corner_merge_all(t, CORNERS), (yc,))
    for flip in (False, True):
        for cf in (False, True):
            assert torch.autograd.gradcheck(lambda t: local_scan(t, 3, flip, cf), (x,))
            yl = torch.randn(1, 2, 18, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda t: local_reverse(t, 3, 3, 4, flip, cf), (yl,))


def test_adjoint_pairs():
    """<scan(x), y> == <x, merge(y)>: each backward is the partner op."""
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    y = torch.randn(2, 4, 3, 15, dtype=torch.float64)
    torch.testing.assert_close((cross_scan(x) * y).sum(),
                               (x.flatten(2) * cross_merge(y, 3, 5)).sum())
    yl = torch.randn(2, 3, 24, dtype=torch.float64)
    torch.testing.assert_close((local_scan(x, 2) * yl).sum(),
                               (x * local_reverse(yl, 2, 3, 5)).sum())


def test_bad_inputs():
    with pytest.raises(ValueError, match=r'x must be \(b, c, h, w\)'):
        cross_scan(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r'y must be \(b, 4, c, h\*w=12\)'):
        cross_merge(torch.zeros(1, 4, 2, 10), 3, 4)
    with pytest.raises(ValueError, match='corner must be one of'):
        corner_rotate(torch.zeros(1, 1, 2, 2), 'center')
    with pytest.raises(ValueError, match='corners must be a non-empty sequence'):
        corner_rotate_all(torch.zeros(1, 1, 2, 2), ['ul', 'up'])
    with pytest.raises(ValueError, match='not a multiple of len'):
        corner_merge_all(torch.zeros(3, 1, 2, 2), ('ul', 'lr'))
    with pytest.raises(ValueError, match='window must be a positive int'):
        local_scan(torch.zeros(1, 1, 2, 2), 0)
    with pytest.raises(ValueError, match=r'y must be \(b, c, L=16\)'):
        local_reverse(torch.zeros(1, 1, 9), 2, 3, 3)


@pytest.mark.skipif(not selective_scan_cpp.available(), reason='compiled scan not built')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
def test_fused_kernels_match_torch_ops(dtype, monkeypatch):
    """CPU tensors get the fused kernels by default; values and gradients equal the
    PyTorch ops' (odd, non-square grid, non-contiguous input)."""
    monkeypatch.delenv('MMSSM_SCAN_BACKEND', raising=False)
    x = torch.randn(2, 5, 7, 3, dtype=dtype).transpose(2, 3)  # (2, 5, 3, 7) strided
    assert _impl(x, None) == 'cpp'
    y = torch.randn(2, 4, 5, 21, dtype=dtype)
    yc = torch.randn(6, 5, 3, 7, dtype=dtype)
    corners = ('lr', 'ul', 'll')
    outs = {}
    for backend in ('cpp', 'torch'):
        xs = x.clone().requires_grad_()
        ys = y.clone().requires_grad_()
        ycs = yc.clone().requires_grad_()
        res = (cross_scan(xs, backend), cross_merge(ys, 3, 7, backend),
               corner_rotate_all(xs, corners, backend), corner_merge_all(ycs, corners, backend))
        sum((r.double() * torch.arange(r.numel()).view_as(r).sin()).sum() for r in res).backward()
        outs[backend] = [r.detach() for r in res] + [xs.grad, ys.grad, ycs.grad]
    for a, b in zip(outs['cpp'], outs['torch']):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
