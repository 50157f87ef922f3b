"""Prior-guided alignment, checked exactly on a linear field (pgl_method.md, "Correctness tests").

A region filled with its own coordinates (3 channels z, y, x) gives views whose values are the region
coordinates of their voxel centres. Average-pooling a view by ``s`` gives, per feature voxel, the region
coordinate of the feature voxel's centre ``i·s + (s − 1)/2`` (mean of a linear field over a box). So after
alignment both maps must equal the region coordinates of the sampled points, on every valid point.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_pgl.alignment import align_features, feature_stride, overlap_points
from nnunet_pgl.geometry import LevelGeometry, avg_pool_geometry
from nnunet_pgl.prior import ViewPrior
from nnunet_pgl.views import make_view_pair, sample_view

REGION = (28, 52, 48)
PATCH = (16, 32, 32)
ATOL = 1e-3


def pool(view: torch.Tensor, stride) -> torch.Tensor:
    return F.avg_pool3d(view, kernel_size=stride, stride=stride)


def check_exact(feat_a, prior_a, feat_b, prior_b, out_size=None, offset=None, min_valid=0.5):
    """Align, then check both maps against the region coordinates of the points on every valid point.

    ``offset`` (``(B, 3)``) is added to the expected points when the fields hold case coordinates.
    Returns ``(a, b, valid, points)``.
    """
    a, b, valid = align_features(feat_a, prior_a, feat_b, prior_b, out_size)
    out = tuple(out_size) if out_size is not None else tuple(feat_a.shape[2:])
    points, nonempty = overlap_points(prior_a, feat_a.shape[2:], prior_b, feat_b.shape[2:], out)
    assert a.shape == (feat_a.shape[0], feat_a.shape[1], *out)
    assert b.shape == (feat_b.shape[0], feat_b.shape[1], *out)
    assert valid.shape == (feat_a.shape[0], 1, *out) and valid.dtype == torch.bool
    assert bool(nonempty.all())
    expected = points.double()
    if offset is not None:
        expected = expected + offset.double().view(-1, 1, 1, 1, 3)
    m = valid[:, 0]
    assert valid.float().mean().item() >= min_valid
    torch.testing.assert_close(a.movedim(1, -1)[m].double(), expected[m], rtol=0, atol=ATOL)
    torch.testing.assert_close(b.movedim(1, -1)[m].double(), expected[m], rtol=0, atol=ATOL)
    torch.testing.assert_close(a.movedim(1, -1)[m], b.movedim(1, -1)[m], rtol=0, atol=ATOL)
    return a, b, valid, points


STRIDE_PAIRS = [((1, 1, 1), (1, 1, 1)), ((2, 2, 2), (2, 2, 2)), ((1, 2, 2), (1, 2, 2)), ((2, 4, 4), (2, 4, 4)),
                ((2, 2, 2), (2, 4, 4)), ((1, 2, 2), (2, 4, 4)), ((2, 4, 4), (1, 1, 1))]


@pytest.mark.parametrize("stride_a,stride_b", STRIDE_PAIRS)
@pytest.mark.parametrize("seed", [0, 1])
def test_coordinate_field_aligns_exactly(stride_a, stride_b, seed, coords):
    region = coords(REGION, batch=4)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(seed))
    fa, fb = pool(va, stride_a), pool(vb, stride_b)
    assert feature_stride(pa, fa.shape[2:]) == tuple(float(s) for s in stride_a)
    _, _, valid, _ = check_exact(fa, pa, fb, pb)
    # crop/scale/flip priors: the bounding box of the overlap is the overlap, every point is valid
    assert bool(valid.all())


def test_explicit_out_size_and_batched_items_match_single_items(coords):
    region = coords(REGION, batch=4)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(3))
    fa, fb = pool(va, (1, 2, 2)), pool(vb, (2, 4, 4))
    a, b, valid, _ = check_exact(fa, pa, fb, pb, out_size=(5, 7, 6))
    # priors differ per item, and each item aligns as it would alone
    assert not torch.equal(pa.to_region[0], pa.to_region[1])
    for i in range(4):
        ai, bi, vi = align_features(fa[i:i + 1], pa[i], fb[i:i + 1], pb[i], (5, 7, 6))
        torch.testing.assert_close(ai, a[i:i + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(bi, b[i:i + 1], rtol=0, atol=1e-5)
        assert torch.equal(vi, valid[i:i + 1])


def test_anisotropic_patch(coords):
    patch = (8, 32, 24)
    region = coords((14, 48, 36), batch=3)
    va, vb, pa, pb = make_view_pair(region, patch, generator=torch.Generator().manual_seed(4))
    for sa, sb in (((1, 2, 2), (2, 4, 4)), ((2, 4, 4), (1, 1, 1)), ((1, 4, 2), (2, 2, 4))):
        _, _, valid, _ = check_exact(pool(va, sa), pa, pool(vb, sb), pb)
        assert bool(valid.all())


def test_flip_only(coords):
    # views are the whole region (crop = region extent, no resize), only flipped
    size = (8, 16, 16)
    region = coords(size, batch=4)
    whole = [[-0.5] * 3] * 4, [[float(s) for s in size]] * 4
    flips_a = torch.tensor([[True, False, False], [False, True, True], [True, True, True], [False, False, False]])
    flips_b = torch.tensor([[False, False, True], [True, True, False], [False, False, False], [True, True, True]])
    pa = ViewPrior.from_crop(*whole, size, flips=flips_a)
    pb = ViewPrior.from_crop(*whole, size, flips=flips_b)
    va, vb = sample_view(region, pa), sample_view(region, pb)
    # a flip-only view is the flipped region, voxel for voxel
    for i in range(4):
        dims = [2 + d for d in range(3) if bool(flips_a[i, d])]
        torch.testing.assert_close(va[i:i + 1], region[i:i + 1].flip(dims) if dims else region[i:i + 1],
                                   rtol=0, atol=1e-4)
    for s in ((1, 1, 1), (2, 2, 2), (2, 4, 4)):
        _, _, valid, points = check_exact(pool(va, s), pa, pool(vb, s), pb)
        assert bool(valid.all())


def test_scale_only(coords):
    region = coords(REGION, batch=2)
    pa = ViewPrior.from_crop([[-0.5, -0.5, -0.5], [3.0, 4.0, 2.0]],
                             [[1.25 * p for p in PATCH], [1.1 * p for p in PATCH]], PATCH)
    pb = ViewPrior.from_crop([[2.0, 3.0, 1.5], [-0.5, 0.0, 0.5]],
                             [[1.1 * p for p in PATCH], [1.4 * p for p in PATCH]], PATCH)
    va, vb = sample_view(region, pa), sample_view(region, pb)
    for sa, sb in (((1, 1, 1), (1, 1, 1)), ((2, 2, 2), (2, 4, 4)), ((1, 2, 2), (1, 2, 2))):
        check_exact(pool(va, sa), pa, pool(vb, sb), pb)


def test_ten_percent_overlap(coords):
    # two unscaled views shifted on every axis so that each axis shares 0.1^(1/3) of the patch: 10 % overlap
    region = coords((40, 72, 72), batch=1)
    share = 0.1 ** (1 / 3)
    start_b = [-0.5 + (1 - share) * p for p in PATCH]
    pa = ViewPrior.from_crop([-0.5] * 3, [float(p) for p in PATCH], PATCH, flips=(True, False, True))
    pb = ViewPrior.from_crop(start_b, [float(p) for p in PATCH], PATCH, flips=(False, True, False))
    lo_a, hi_a = pa.footprint()
    lo_b, hi_b = pb.footprint()
    inter = (torch.minimum(hi_a, hi_b) - torch.maximum(lo_a, lo_b)).clamp_min(0).prod()
    assert math.isclose(float(inter) / math.prod(PATCH), 0.1, rel_tol=1e-5)
    va, vb = sample_view(region, pa), sample_view(region, pb)
    for s in ((1, 1, 1), (1, 2, 2), (2, 4, 4)):
        _, _, valid, points = check_exact(pool(va, s), pa, pool(vb, s), pb)
        assert bool(valid.all())
        # the points lie inside the shared box only
        assert bool((points >= lo_b.view(1, 1, 1, 1, 3)).all()) and bool((points <= hi_a.view(1, 1, 1, 1, 3)).all())


def test_identical_priors_give_identical_maps(coords):
    g = torch.Generator().manual_seed(5)
    region = coords(REGION, batch=3)
    _, _, pa, _ = make_view_pair(region, PATCH, generator=g)
    feat = torch.randn(3, 6, 8, 8, 8, generator=g)
    a, b, valid = align_features(feat, pa, feat, pa)
    assert bool(valid.all())
    assert torch.equal(a, b)


def test_flipping_a_view_changes_nothing_in_the_aligned_result(coords):
    g = torch.Generator().manual_seed(6)
    region = coords(REGION, batch=3)
    _, _, pa, pb = make_view_pair(region, PATCH, generator=g)
    fa = torch.randn(3, 5, 8, 8, 8, generator=g)          # stride (2, 4, 4)
    fb = torch.randn(3, 5, 16, 16, 16, generator=g)       # stride (1, 2, 2)
    a0, b0, v0 = align_features(fa, pa, fb, pb)
    for axes in ((0,), (1, 2), (0, 1, 2)):
        # new view voxel k is old view voxel P − 1 − k on the flipped axes
        flip = torch.eye(4)
        for ax in axes:
            flip[ax, ax] = -1.0
            flip[ax, 3] = PATCH[ax] - 1.0
        dims = [2 + ax for ax in axes]
        a1, b1, v1 = align_features(fa, pa, fb.flip(dims), pb.after(flip))
        assert torch.equal(v0, v1)
        torch.testing.assert_close(a1, a0, rtol=0, atol=1e-4)
        torch.testing.assert_close(b1, b0, rtol=0, atol=1e-4)
        a2, b2, v2 = align_features(fa.flip(dims), pa.after(flip), fb, pb)
        assert torch.equal(v0, v2)
        torch.testing.assert_close(a2, a0, rtol=0, atol=1e-4)
        torch.testing.assert_close(b2, b0, rtol=0, atol=1e-4)


def test_flipping_the_view_tensor_changes_nothing(coords):
    # the literal statement: flip the view itself, record the flip in its prior, pool, align
    region = coords(REGION, batch=2)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(8))
    s = (2, 4, 4)
    a0, b0, v0 = align_features(pool(va, s), pa, pool(vb, s), pb)
    flip = torch.eye(4)
    for ax in (0, 2):
        flip[ax, ax] = -1.0
        flip[ax, 3] = PATCH[ax] - 1.0
    vb_flipped, pb_flipped = vb.flip([2, 4]), pb.after(flip)
    # the flipped prior describes the flipped view exactly
    torch.testing.assert_close(sample_view(region, pb_flipped), vb_flipped, rtol=0, atol=1e-4)
    a1, b1, v1, _ = check_exact(pool(va, s), pa, pool(vb_flipped, s), pb_flipped)
    assert torch.equal(v0, v1)
    torch.testing.assert_close(a1, a0, rtol=0, atol=1e-4)
    torch.testing.assert_close(b1, b0, rtol=0, atol=1e-4)


def test_no_overlap_is_rejected():
    pa = ViewPrior.from_crop([[-0.5] * 3, [-0.5] * 3], [[8.0] * 3] * 2, (8, 8, 8))
    # item 1 only touches view a on z (shared face, no volume); item 0 overlaps
    pb = ViewPrior.from_crop([[3.5, 3.5, 3.5], [7.5, 0.0, 0.0]], [[8.0] * 3] * 2, (8, 8, 8))
    fa = torch.randn(2, 2, 4, 4, 4)
    fb = torch.randn(2, 2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"views do not overlap in batch items \[1\]"):
        align_features(fa, pa, fb, pb)
    far = ViewPrior.from_crop([[30.0, 0.0, 0.0]] * 2, [[8.0] * 3] * 2, (8, 8, 8))
    with pytest.raises(ValueError, match="views do not overlap"):
        align_features(fa, pa, fb, far)
    _, _, valid = align_features(fa, pa, fb, far, strict=False)
    assert not bool(valid.any())
    _, _, valid = align_features(fa, pa, fb, pb, strict=False)
    assert bool(valid[0].any()) and not bool(valid[1].any())


def test_regions_with_different_offsets_of_the_same_case(coords):
    # a case of 40 × 70 × 64 voxels filled with case coordinates; two regions cut at different places
    case = coords((40, 70, 64), batch=1)
    off_a, off_b = (3, 5, 7), (8, 12, 2)
    ra = case[:, :, off_a[0]:off_a[0] + 26, off_a[1]:off_a[1] + 50, off_a[2]:off_a[2] + 48]
    rb = case[:, :, off_b[0]:off_b[0] + 26, off_b[1]:off_b[1] + 50, off_b[2]:off_b[2] + 48]
    pa = ViewPrior.from_crop((2.0, 4.0, 6.0), [1.2 * p for p in PATCH], PATCH, flips=(True, False, True),
                             region_offset=off_a)
    # in case voxels view a spans ≈ [5, 24] × [9, 47] × [13, 51], view b ≈ [12, 33] × [18, 60] × [6, 48]
    pb = ViewPrior.from_crop((4.0, 6.0, 4.0), [1.3 * p for p in PATCH], PATCH, flips=(False, True, True),
                             region_offset=off_b)
    va, vb = sample_view(ra, pa), sample_view(rb, pb)
    off = torch.tensor([off_a], dtype=torch.float64)      # the points are in region a's frame
    for sa, sb in (((1, 1, 1), (1, 1, 1)), ((2, 2, 2), (2, 4, 4)), ((1, 2, 2), (2, 2, 2))):
        _, _, valid, _ = check_exact(pool(va, sa), pa, pool(vb, sb), pb, offset=off)
        assert bool(valid.all())
    # swapping the roles: points are then in region b's frame
    check_exact(pool(vb, (2, 2, 2)), pb, pool(va, (1, 2, 2)), pa, offset=torch.tensor([off_b]))


def test_rotation_prior_marks_points_outside_a_hull_invalid(coords):
    # view b is rotated by 10° in the (y, x) plane about its centre: the bounding box of its footprint is larger
    # than the footprint, so some points of the grid fall outside view b and must be invalid
    region = coords((24, 64, 64), batch=1)
    pa = ViewPrior.from_crop((3.0, 10.0, 12.0), [1.2 * p for p in PATCH], PATCH)
    c = [(p - 1) / 2 for p in PATCH]
    t = math.radians(10.0)
    rot = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                        [0.0, math.cos(t), -math.sin(t), 0.0],
                        [0.0, math.sin(t), math.cos(t), 0.0],
                        [0.0, 0.0, 0.0, 1.0]])
    to_c, from_c = torch.eye(4), torch.eye(4)
    to_c[:3, 3] = -torch.tensor(c)
    from_c[:3, 3] = torch.tensor(c)
    base = ViewPrior.from_crop((4.0, 14.0, 16.0), [1.1 * p for p in PATCH], PATCH)
    pb = base.after(from_c @ rot @ to_c)
    va, vb = sample_view(region, pa), sample_view(region, pb)
    _, _, valid, _ = check_exact(pool(va, (1, 2, 2)), pa, pool(vb, (1, 2, 2)), pb, min_valid=0.3)
    assert not bool(valid.all())


def test_errors():
    pa = ViewPrior.identity((8, 8, 8), batch=2)
    f = torch.randn(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"feat_a must be \(B, C, Z, Y, X\)"):
        align_features(f[0], pa, f, pa)
    with pytest.raises(ValueError, match="batch sizes differ"):
        align_features(f, pa, f[:1], pa)
    with pytest.raises(ValueError, match="batch sizes differ"):
        align_features(f, pa[0], f, pa)
    with pytest.raises(ValueError, match="out_size must be 3 positive integers"):
        align_features(f, pa, f, pa, out_size=(4, 4))
    with pytest.raises(ValueError, match="3 spatial axes"):
        feature_stride(pa, (4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stride_a,stride_b", STRIDE_PAIRS)
def test_coordinate_field_aligns_exactly_cuda(stride_a, stride_b, coords):
    dev = torch.device("cuda")
    region = coords(REGION, batch=4).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=g)
    assert va.device.type == "cuda" and pa.to_region.device.type == "cuda"
    fa, fb = pool(va, stride_a), pool(vb, stride_b)
    a, b, valid = align_features(fa, pa, fb, pb)
    assert a.device.type == "cuda" and valid.device.type == "cuda"
    points, _ = overlap_points(pa, fa.shape[2:], pb, fb.shape[2:], fa.shape[2:])
    m = valid[:, 0]
    assert bool(m.all())
    torch.testing.assert_close(a.movedim(1, -1)[m], points[m], rtol=0, atol=ATOL)
    torch.testing.assert_close(b.movedim(1, -1)[m], points[m], rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------- geometry parameter
def test_default_geometry_is_the_average_pooling_convention(coords):
    region = coords(REGION, batch=2)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(9))
    fa, fb = pool(va, (2, 4, 4)), pool(vb, (1, 2, 2))
    ga, gb = avg_pool_geometry((2, 4, 4)), avg_pool_geometry((1, 2, 2))
    assert ga.origin == (0.5, 1.5, 1.5)
    a0, b0, v0 = align_features(fa, pa, fb, pb)
    a1, b1, v1 = align_features(fa, pa, fb, pb, geometry=(ga, gb))
    assert torch.equal(a0, a1) and torch.equal(b0, b1) and torch.equal(v0, v1)
    # one geometry serves both maps of the same level
    a2, b2, _ = align_features(fa, pa, pool(vb, (2, 4, 4)), pb, geometry=ga)
    check_exact(fa, pa, pool(vb, (2, 4, 4)), pb)
    torch.testing.assert_close(a2, align_features(fa, pa, pool(vb, (2, 4, 4)), pb)[0], rtol=0, atol=0)


def test_geometry_origin_shifts_the_sampled_points(coords):
    # a map whose voxel i stands for view coordinate i·s (strided subsampling, the convolution convention) aligns
    # exactly with origin 0 and not with the average-pooling origin
    region = coords(REGION, batch=3)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(10))
    s = (2, 4, 4)
    fa, fb = va[:, :, ::2, ::4, ::4], vb[:, :, ::2, ::4, ::4]
    g = LevelGeometry((2.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    a, b, valid = align_features(fa, pa, fb, pb, geometry=g)
    pts, _ = overlap_points(pa, fa.shape[2:], pb, fb.shape[2:], fa.shape[2:], geometry=g)
    m = valid[:, 0]
    assert bool(m.all())
    torch.testing.assert_close(a.movedim(1, -1)[m], pts[m], rtol=0, atol=ATOL)
    torch.testing.assert_close(b.movedim(1, -1)[m], pts[m], rtol=0, atol=ATOL)
    a_old, b_old, _ = align_features(fa, pa, fb, pb)
    assert float((a_old - b_old).abs().max()) > 0.5 * min(s)   # the pair has opposite flips on some axis


def test_geometry_errors():
    pa = ViewPrior.identity((8, 8, 8), batch=1)
    f = torch.randn(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"geometry of map a has stride \(4.0, 4.0, 4.0\).*level_geometry"):
        align_features(f, pa, f, pa, geometry=LevelGeometry((4, 4, 4), (0, 0, 0)))
    with pytest.raises(ValueError, match="geometry must be a LevelGeometry"):
        align_features(f, pa, f, pa, geometry=((2, 2, 2), (0, 0, 0)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stride must be positive"):
        LevelGeometry((0, 2, 2), (0, 0, 0))


# ------------------------------------------------------- float32 coordinates whatever the feature dtype
def _spy_grid_sample(monkeypatch):
    seen = []
    orig = F.grid_sample

    def spy(inp, grid, *args, **kwargs):
        seen.append((inp.dtype, grid.dtype))
        return orig(inp, grid, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_features_are_sampled_with_a_float32_grid(dtype, coords, monkeypatch):
    region = coords(REGION, batch=3)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(11))
    fa, fb = pool(va, (1, 1, 1)).to(dtype), pool(vb, (1, 2, 2)).to(dtype)
    seen = _spy_grid_sample(monkeypatch)
    a, b, valid = align_features(fa, pa, fb, pb)
    assert seen and all(g == torch.float32 for _, g in seen), seen
    assert a.dtype == dtype and b.dtype == dtype
    # as exact as the float32 alignment of the same (rounded) values, up to rounding the result to ``dtype``
    a32, b32, v32 = align_features(fa.float(), pa, fb.float(), pb)
    assert torch.equal(valid, v32)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(a.float(), a32, rtol=eps, atol=1e-4)
    torch.testing.assert_close(b.float(), b32, rtol=eps, atol=1e-4)


def test_coordinates_stay_float32_under_autocast(coords, monkeypatch):
    # CPU autocast runs matmuls in bfloat16, as CUDA AMP runs them in float16: the point transforms must not follow
    region = coords(REGION, batch=4)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(12))
    seen = _spy_grid_sample(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16     # autocast is really on
        for s in ((1, 1, 1), (2, 4, 4)):
            a, b, valid, _ = check_exact(pool(va, s), pa, pool(vb, s), pb)
            assert bool(valid.all()) and a.dtype == torch.float32
    assert seen and all(g == torch.float32 for _, g in seen), seen
