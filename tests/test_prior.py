"""ViewPrior: construction from a crop, algebra (inverse, composition, relative maps), batching and errors.

Expected values come from the written-down convention (view voxel ``k`` ↦ ``crop_start + (k + 0.5)·crop_size/P``,
a flip first maps ``k ↦ P − 1 − k``) evaluated by hand or with plain Python arithmetic, never from the
implementation's own output.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from nnunet_pgl.prior import ViewPrior, box_bounds, check_patch_size, transform_points

# a hand case: anisotropic patch, different scale per axis, flips on z and x
START = (1.5, -0.5, 2.0)
SIZE = (6.0, 8.0, 3.0)
PATCH = (4, 8, 6)
FLIPS = (True, False, True)


def hand_region_coord(k: tuple[int, int, int], start=START, size=SIZE, patch=PATCH, flips=FLIPS) -> list[float]:
    """The documented convention, written out per axis in plain Python."""
    out = []
    for kk, s0, n, p, f in zip(k, start, size, patch, flips):
        kk = p - 1 - kk if f else kk
        out.append(s0 + (kk + 0.5) * n / p)
    return out


def test_from_crop_matches_hand_formula_at_every_voxel():
    prior = ViewPrior.from_crop(START, SIZE, PATCH, flips=FLIPS)
    assert prior.batch_size == 1 and prior.patch_size == PATCH
    pts = torch.tensor([list(k) for k in itertools.product(*(range(p) for p in PATCH))], dtype=torch.float32)
    expected = torch.tensor([hand_region_coord(tuple(int(v) for v in k)) for k in pts.tolist()])
    got = prior.apply(pts[None])[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_from_crop_matrix_by_hand():
    # z: flipped, scale 6/4 = 1.5: r = 1.5 + (4 - 1 - k + 0.5)·1.5 = 6.75 − 1.5k
    # y: not flipped, scale 8/8 = 1: r = −0.5 + (k + 0.5) = k
    # x: flipped, scale 3/6 = 0.5: r = 2 + (6 − 1 − k + 0.5)·0.5 = 4.75 − 0.5k
    expected = torch.tensor([[-1.5, 0.0, 0.0, 6.75],
                             [0.0, 1.0, 0.0, 0.0],
                             [0.0, 0.0, -0.5, 4.75],
                             [0.0, 0.0, 0.0, 1.0]])
    prior = ViewPrior.from_crop(START, SIZE, PATCH, flips=FLIPS)
    torch.testing.assert_close(prior.to_region[0], expected, rtol=0, atol=1e-6)


def test_identity_prior_and_whole_region_crop():
    ps = (3, 5, 4)
    ident = ViewPrior.identity(ps, batch=2)
    assert torch.equal(ident.to_region, torch.eye(4).expand(2, 4, 4))
    # cropping the whole region (edges −0.5 … N − 0.5) without resizing is the identity too
    whole = ViewPrior.from_crop([-0.5] * 3, [float(p) for p in ps], ps, batch=2)
    torch.testing.assert_close(whole.to_region, ident.to_region, rtol=0, atol=1e-6)
    assert torch.equal(whole.region_offset, torch.zeros(2, 3, dtype=torch.long))


def test_to_view_is_inverse():
    g = torch.Generator().manual_seed(0)
    b = 5
    start = torch.rand(b, 3, generator=g) * 10 - 0.5
    size = 1 + torch.rand(b, 3, generator=g) * 20
    flips = torch.rand(b, 3, generator=g) < 0.5
    prior = ViewPrior.from_crop(start, size, (8, 16, 12), flips=flips, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64).expand(b, 4, 4)
    torch.testing.assert_close(prior.to_view @ prior.to_region, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(prior.to_region @ prior.to_view, eye, rtol=0, atol=1e-12)
    # the inverse of the hand formula: region coordinate r ↦ view voxel k
    r = torch.tensor([[hand_region_coord((1, 2, 3))]])
    one = ViewPrior.from_crop(START, SIZE, PATCH, flips=FLIPS)
    torch.testing.assert_close(transform_points(one.to_view, r), torch.tensor([[[1.0, 2.0, 3.0]]]),
                               rtol=0, atol=1e-5)


def test_flip_by_after_equals_flipped_crop():
    p = (4, 6, 5)
    plain = ViewPrior.from_crop((0.0, 1.0, 2.0), (5.0, 7.0, 6.0), p)
    flipped = ViewPrior.from_crop((0.0, 1.0, 2.0), (5.0, 7.0, 6.0), p, flips=(False, True, True))
    # new view voxel (z, y, x) is old view voxel (z, P_y − 1 − y, P_x − 1 − x)
    f = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                      [0.0, -1.0, 0.0, p[1] - 1.0],
                      [0.0, 0.0, -1.0, p[2] - 1.0],
                      [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(plain.after(f).to_region, flipped.to_region, rtol=0, atol=1e-6)


def test_then_translation():
    prior = ViewPrior.from_crop(START, SIZE, PATCH, flips=FLIPS)
    t = torch.eye(4)
    t[:3, 3] = torch.tensor([10.0, -2.0, 0.5])
    moved = prior.then(t)
    pts = torch.tensor([[[0.0, 0.0, 0.0], [3.0, 7.0, 5.0]]])
    torch.testing.assert_close(moved.apply(pts), prior.apply(pts) + torch.tensor([10.0, -2.0, 0.5]),
                               rtol=0, atol=1e-5)


def test_to_case_adds_region_offset():
    prior = ViewPrior.from_crop(START, SIZE, PATCH, flips=FLIPS, region_offset=(10, -3, 7))
    k = (2, 5, 1)
    expected = [c + o for c, o in zip(hand_region_coord(k), (10, -3, 7))]
    got = transform_points(prior.to_case(), torch.tensor([[list(map(float, k))]]))
    torch.testing.assert_close(got, torch.tensor([[expected]]), rtol=0, atol=1e-5)


def test_relative_to_with_different_region_offsets_hand_case():
    ps = (4, 6, 8)
    whole = [float(p) for p in ps]
    # both priors are identities onto their regions; the regions start at different case voxels
    a = ViewPrior.from_crop([-0.5] * 3, whole, ps, region_offset=(10, 20, 30))
    b = ViewPrior.from_crop([-0.5] * 3, whole, ps, region_offset=(12, 17, 30))
    # view a voxel v = case voxel v + (10, 20, 30) = view b voxel v + (−2, 3, 0)
    expected = torch.eye(4)
    expected[:3, 3] = torch.tensor([-2.0, 3.0, 0.0])
    torch.testing.assert_close(a.relative_to(b)[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.relative_to(a)[0], torch.linalg.inv(expected), rtol=0, atol=1e-6)


def test_relative_to_agrees_with_case_frame():
    g = torch.Generator().manual_seed(1)
    b = 4
    ps = (6, 10, 8)
    a = ViewPrior.from_crop(torch.rand(b, 3, generator=g) * 5, 5 + torch.rand(b, 3, generator=g) * 10, ps,
                            flips=torch.rand(b, 3, generator=g) < 0.5,
                            region_offset=torch.randint(-20, 20, (b, 3), generator=g), dtype=torch.float64)
    c = ViewPrior.from_crop(torch.rand(b, 3, generator=g) * 5, 5 + torch.rand(b, 3, generator=g) * 10, ps,
                            flips=torch.rand(b, 3, generator=g) < 0.5,
                            region_offset=torch.randint(-20, 20, (b, 3), generator=g), dtype=torch.float64)
    v = torch.rand(b, 7, 3, generator=g, dtype=torch.float64) * 5
    w = transform_points(a.relative_to(c), v)
    # the same case point, seen from a's view and from c's view
    torch.testing.assert_close(transform_points(c.to_case(), w), transform_points(a.to_case(), v),
                               rtol=0, atol=1e-9)
    # and in region terms: case = region + offset
    torch.testing.assert_close(transform_points(a.to_case(), v),
                               a.apply(v) + a.region_offset[:, None].double(), rtol=0, atol=1e-9)


def test_cat_and_indexing():
    ps = (4, 4, 4)
    p1 = ViewPrior.from_crop((0.0, 0.0, 0.0), (4.0, 4.0, 4.0), ps, region_offset=(1, 2, 3))
    p2 = ViewPrior.from_crop([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], [[5.0, 5.0, 5.0], [6.0, 6.0, 6.0]], ps,
                             flips=[[True, False, False], [False, False, True]],
                             region_offset=[[4, 5, 6], [7, 8, 9]])
    both = ViewPrior.cat([p1, p2])
    assert both.batch_size == 3 and both.patch_size == ps
    assert torch.equal(both.to_region[0], p1.to_region[0])
    assert torch.equal(both.to_region[1:], p2.to_region)
    assert both.region_offset.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    item = both[2]                                      # int index keeps the batch axis
    assert item.batch_size == 1
    assert torch.equal(item.to_region, p2.to_region[1:2])
    assert item.region_offset.tolist() == [[7, 8, 9]]
    # negative indices count from the end (a plain slice(idx, idx + 1) would make both[-1] empty)
    assert torch.equal(both[-1].to_region, item.to_region)
    assert torch.equal(both[-3].to_region, both[0].to_region)
    for bad in (3, -4):
        with pytest.raises(IndexError, match="out of range"):
            both[bad]
    sl = both[1:]
    assert sl.batch_size == 2 and torch.equal(sl.to_region, p2.to_region)
    picked = both[torch.tensor([True, False, True])]
    assert picked.region_offset.tolist() == [[1, 2, 3], [7, 8, 9]]
    assert both.to("cpu").to_region.device.type == "cpu"
    with pytest.raises(ValueError, match="different patch sizes"):
        ViewPrior.cat([p1, ViewPrior.identity((4, 4, 8))])


def test_single_triples_broadcast_to_batch():
    prior = ViewPrior.from_crop(START, SIZE, PATCH, flips=FLIPS, region_offset=(1, 2, 3), batch=3)
    assert prior.batch_size == 3
    assert torch.equal(prior.to_region, prior.to_region[:1].expand(3, 4, 4))
    assert prior.region_offset.tolist() == [[1, 2, 3]] * 3
    # per-item start with a single size triple
    p = ViewPrior.from_crop([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], (4.0, 4.0, 4.0), (4, 4, 4))
    assert p.batch_size == 2
    torch.testing.assert_close(p.to_region[1, :3, 3] - p.to_region[0, :3, 3], torch.ones(3))


def test_footprint_is_the_crop_box():
    prior = ViewPrior.from_crop([START, (0.0, 0.0, 0.0)], [SIZE, (2.0, 3.0, 4.0)], PATCH,
                                flips=[FLIPS, (False, False, False)])
    lo, hi = prior.footprint()
    torch.testing.assert_close(lo, torch.tensor([START, (0.0, 0.0, 0.0)]), rtol=0, atol=1e-5)
    torch.testing.assert_close(hi, torch.tensor([[7.5, 7.5, 5.0], [2.0, 3.0, 4.0]]), rtol=0, atol=1e-5)


def test_box_bounds_of_a_rotation():
    # 90° rotation in the (y, x) plane: (z, y, x) ↦ (z, x, −y); the unit box [0, 1]·[0, 2]·[0, 3] maps to
    # z ∈ [0, 1], y ∈ [0, 3], x ∈ [−2, 0]
    m = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]]])
    lo, hi = box_bounds(m, [0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert lo.tolist() == [[0.0, 0.0, -2.0]]
    assert hi.tolist() == [[1.0, 3.0, 0.0]]


def test_check_patch_size():
    assert check_patch_size([2, 3, 4]) == (2, 3, 4)
    for bad in ([4, 4], [4, 4, 4, 4], [0, 4, 4], [4, -1, 4], [4.5, 4, 4]):
        with pytest.raises(ValueError, match="patch_size must be 3 positive integers"):
            check_patch_size(bad)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"to_region must have shape \(B, 4, 4\)"):
        ViewPrior(torch.eye(4), (4, 4, 4), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"to_region must have shape \(B, 4, 4\)"):
        ViewPrior(torch.eye(3)[None], (4, 4, 4), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"region_offset must have shape \(B, 3\)"):
        ViewPrior(torch.eye(4)[None].repeat(2, 1, 1), (4, 4, 4), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="patch_size must be 3 positive integers"):
        ViewPrior(torch.eye(4)[None], (4, 4), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="crop_start must have 3 entries"):
        ViewPrior.from_crop((0.0, 0.0), (1.0, 1.0, 1.0), (4, 4, 4))
    with pytest.raises(ValueError, match=r"crop_start must have shape \(B, 3\)"):
        ViewPrior.from_crop(torch.zeros(2, 4), (1.0, 1.0, 1.0), (4, 4, 4))
    with pytest.raises(ValueError, match="crop_size must have 3 entries"):
        ViewPrior.from_crop((0.0, 0.0, 0.0), (1.0, 1.0), (4, 4, 4))
    with pytest.raises(ValueError, match="crop_size has 3 items, crop_start has 2"):
        ViewPrior.from_crop(torch.zeros(2, 3), torch.ones(3, 3), (4, 4, 4))
    with pytest.raises(ValueError, match="crop_size must be positive"):
        ViewPrior.from_crop((0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (4, 4, 4))
    with pytest.raises(ValueError, match="flips must have 3 entries"):
        ViewPrior.from_crop((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (4, 4, 4), flips=(True, False))
    with pytest.raises(ValueError, match="region_offset must have 3 entries"):
        ViewPrior.from_crop((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (4, 4, 4), region_offset=(1, 2))
    with pytest.raises(ValueError, match="patch_size must be 3 positive integers"):
        ViewPrior.from_crop((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (4, 0, 4))
