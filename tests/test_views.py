"""make_view_pair: views are exact samples of the region at the recorded prior; crop, overlap, scale and flip
statistics; padding; determinism; errors. Pairs from two regions of a case: exactness in case coordinates, the
overlap distribution over [min_overlap, 1], the offset feasibility rule against brute force.

The region is filled with its own voxel coordinates (a linear field), so the view must equal the prior applied
to the view's voxel grid: an independent check of resampling and prior together.
"""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_pgl.prior import ViewPrior
from nnunet_pgl.views import (draw_pair_offsets, make_view_pair, max_pair_offset, overlap_fraction,
                              pair_offset_feasible, pair_overlap, sample_view, to_grid_sample, voxel_grid)

REGION = (20, 30, 26)
PATCH = (8, 16, 12)


def expected_view(prior: ViewPrior) -> torch.Tensor:
    """``(B, 3, *patch)``: region coordinates of every view voxel, by the prior."""
    pts = voxel_grid(prior.patch_size, torch.device("cpu"), torch.float64).expand(prior.batch_size,
                                                                                  *prior.patch_size, 3)
    return prior.apply(pts).movedim(-1, 1).float()


def my_overlap(lo_a, hi_a, lo_b, hi_b):
    """Shared volume / volume of the larger box, written out independently of ``overlap_fraction``."""
    inter = (torch.minimum(hi_a, hi_b) - torch.maximum(lo_a, lo_b)).clamp_min(0).prod(1)
    return inter / torch.maximum((hi_a - lo_a).prod(1), (hi_b - lo_b).prod(1))


def test_voxel_grid_is_arange_meshgrid(coords):
    g = voxel_grid((3, 4, 5), torch.device("cpu"))
    assert g.shape == (3, 4, 5, 3)
    assert g[2, 1, 4].tolist() == [2.0, 1.0, 4.0]
    torch.testing.assert_close(g.movedim(-1, 0), coords((3, 4, 5))[0], rtol=0, atol=0)


def test_to_grid_sample_edges_and_order():
    # align_corners=False: the outer edges −0.5 and N − 0.5 are −1 and +1; last axis reversed to (x, y, z)
    c = torch.tensor([[-0.5, -0.5, -0.5], [3.5, 7.5, 1.5], [1.5, 3.5, 0.5]])
    g = to_grid_sample(c, (4, 8, 2))
    torch.testing.assert_close(g, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    g2 = to_grid_sample(torch.tensor([[0.0, 0.0, 1.0]]), (4, 8, 2))
    torch.testing.assert_close(g2, torch.tensor([[0.5, -7 / 8, -3 / 4]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_views_are_exact_samples_of_a_linear_field(seed, coords):
    region = coords(REGION, batch=6)
    g = torch.Generator().manual_seed(seed)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=g)
    assert va.shape == vb.shape == (6, 3, *PATCH)
    assert va.dtype == region.dtype
    torch.testing.assert_close(va, expected_view(pa), rtol=0, atol=1e-3)
    torch.testing.assert_close(vb, expected_view(pb), rtol=0, atol=1e-3)


def test_sample_view_of_hand_prior(coords):
    region = coords(REGION, batch=1, dtype=torch.float64)
    prior = ViewPrior.from_crop((2.0, 3.0, 1.0), (10.0, 20.0, 15.0), (5, 10, 6), flips=(False, True, True),
                                dtype=torch.float64)
    view = sample_view(region, prior)
    # voxel (1, 2, 3) of the view: z = 2 + 1.5·2; y flipped: 3 + (7 + 0.5)·2; x flipped: 1 + (2 + 0.5)·2.5
    torch.testing.assert_close(view[0, :, 1, 2, 3], torch.tensor([5.0, 18.0, 7.25], dtype=torch.float64))


@pytest.mark.parametrize("min_overlap", [0.0, 0.1, 0.3, (1.1 / 1.4) ** 3])
def test_crops_inside_region_and_overlap(min_overlap):
    region = torch.zeros(64, 1, *REGION)
    n = torch.tensor([float(s) for s in REGION])
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        _, _, pa, pb = make_view_pair(region, PATCH, min_overlap=min_overlap, generator=g)
        lo_a, hi_a = pa.footprint()
        lo_b, hi_b = pb.footprint()
        for lo, hi in ((lo_a, hi_a), (lo_b, hi_b)):
            assert bool((lo >= -0.5 - 1e-4).all()) and bool((hi <= n - 0.5 + 1e-4).all())
        frac = my_overlap(lo_a, hi_a, lo_b, hi_b)
        assert bool((frac >= min_overlap - 1e-5).all()), frac.min()
        assert bool((frac > 0).all()) or min_overlap == 0.0


def test_overlap_fraction_hand_cases():
    lo_a = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    size_a = torch.tensor([[4.0, 4.0, 4.0], [4.0, 4.0, 4.0], [4.0, 4.0, 4.0]])
    lo_b = torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    size_b = torch.tensor([[4.0, 4.0, 4.0], [2.0, 2.0, 2.0], [4.0, 4.0, 4.0]])
    # half of x shared; a 2³ box inside a 4³ box (8/64); disjoint along z
    torch.testing.assert_close(overlap_fraction(lo_a, size_a, lo_b, size_b), torch.tensor([0.5, 0.125, 0.0]))


def test_scale_shared_by_axes_and_in_range():
    region = torch.zeros(64, 1, *REGION)
    g = torch.Generator().manual_seed(3)
    _, _, pa, pb = make_view_pair(region, PATCH, scale_range=(1.1, 1.4), generator=g)
    for prior in (pa, pb):
        lin = prior.to_region[:, :3, :3]
        diag = lin.diagonal(dim1=1, dim2=2)
        assert torch.equal(lin - torch.diag_embed(diag), torch.zeros_like(lin))   # crop/scale/flip only
        u = diag.abs()                                   # crop size / patch size = u per axis
        lo, hi = prior.footprint()
        torch.testing.assert_close((hi - lo) / torch.tensor([float(p) for p in PATCH]), u, rtol=1e-5, atol=0)
        torch.testing.assert_close(u, u[:, :1].expand(-1, 3), rtol=1e-6, atol=0)
        assert bool((u >= 1.1 - 1e-6).all()) and bool((u <= 1.4 + 1e-6).all())
    # the two views draw their own scale
    assert not torch.allclose(pa.to_region[:, 0, 0].abs(), pb.to_region[:, 0, 0].abs())


@pytest.mark.parametrize("flip_prob", [0.0, 0.2, 0.5, 1.0])
def test_flip_frequency(flip_prob):
    region = torch.zeros(512, 1, *REGION)
    g = torch.Generator().manual_seed(4)
    _, _, pa, pb = make_view_pair(region, PATCH, flip_prob=flip_prob, generator=g)
    flips = torch.cat([pa.to_region.diagonal(dim1=1, dim2=2)[:, :3],
                       pb.to_region.diagonal(dim1=1, dim2=2)[:, :3]]) < 0
    freq = flips.float().mean().item()
    # 3072 Bernoulli draws: standard deviation ≤ 0.009, the bound is > 5 of them
    assert abs(freq - flip_prob) < 0.05
    if 0 < flip_prob < 1:
        per_axis = flips.float().mean(0)
        assert bool(((per_axis - flip_prob).abs() < 0.08).all()), per_axis


def test_padding_small_region_keeps_case_coordinates(coords):
    # region of 6 × 10 × 10 voxels starting at case voxel (5, 7, 9), filled with case coordinates
    size, offset = (6, 10, 10), (5, 7, 9)
    region = coords(size, batch=4, offset=offset)
    patch = (8, 8, 8)        # the largest crop is ceil(1.4 · 8) = 12 voxels: pad (6, 2, 2) → before (3, 1, 1)
    g = torch.Generator().manual_seed(5)
    va, vb, pa, pb = make_view_pair(region, patch, generator=g, pad_value=-1000.0,
                                    region_offset=torch.tensor([offset] * 4))
    for view, prior in ((va, pa), (vb, pb)):
        assert prior.region_offset.tolist() == [[2, 6, 8]] * 4
        lo, hi = prior.footprint()
        assert bool((lo >= -0.5 - 1e-4).all()) and bool((hi <= torch.tensor([11.5, 11.5, 11.5]) + 1e-4).all())
        pts = voxel_grid(patch, torch.device("cpu"), torch.float64).expand(4, *patch, 3)
        case = _apply(prior.to_case(), pts)              # case coordinates of the view voxels
        # trilinear samples use only real voxels where the case coordinate lies in the hull of region centres
        lo_c = torch.tensor([float(o) for o in offset], dtype=torch.float64)
        hi_c = lo_c + torch.tensor([float(s - 1) for s in size], dtype=torch.float64)
        inside = ((case >= lo_c - 1e-6) & (case <= hi_c + 1e-6)).all(-1)
        assert int(inside.sum()) > 100
        got = view.movedim(1, -1)[inside].double()
        torch.testing.assert_close(got, case[inside], rtol=0, atol=1e-3)
        # a view voxel whose neighbours are all padding gets the pad value
        far = ((case < lo_c - 1.0) | (case > hi_c + 1.0)).any(-1)
        assert bool(far.any())
        vals = view.movedim(1, -1)[far]
        torch.testing.assert_close(vals, torch.full_like(vals, -1000.0), rtol=0, atol=1e-3)


def _apply(affine: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Homogeneous affine ``(B, 4, 4)`` on points ``(B, ..., 3)``, written out with einsum."""
    a = affine.to(pts.dtype)
    return torch.einsum("bij,b...j->b...i", a[:, :3, :3], pts) + a[:, :3, 3].view(a.shape[0], *[1] * (pts.ndim - 2), 3)


def test_no_padding_when_region_is_large_enough(coords):
    region = coords(REGION, batch=2)
    off = torch.tensor([[3, 4, 5], [-1, 0, 2]])
    _, _, pa, pb = make_view_pair(region, PATCH, region_offset=off, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pa.region_offset, off) and torch.equal(pb.region_offset, off)


def test_pad_false_rejects_small_region():
    with pytest.raises(ValueError, match="smaller than the largest crop"):
        make_view_pair(torch.zeros(1, 1, 6, 10, 10), (8, 8, 8), pad=False)


def test_deterministic_with_seeded_generator():
    region = torch.randn(3, 2, *REGION, generator=torch.Generator().manual_seed(9))
    out1 = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(7))
    out2 = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(7))
    out3 = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(8))
    for x, y in zip(out1[:2], out2[:2]):
        assert torch.equal(x, y)
    for p, q in zip(out1[2:], out2[2:]):
        assert torch.equal(p.to_region, q.to_region) and torch.equal(p.region_offset, q.region_offset)
    assert not torch.equal(out1[2].to_region, out3[2].to_region)


def test_batched_priors_differ_per_item(coords):
    region = coords(REGION, batch=8)
    va, vb, pa, pb = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(11))
    for prior in (pa, pb):
        m = prior.to_region
        for i in range(8):
            for j in range(i + 1, 8):
                assert not torch.equal(m[i], m[j])
    # and each item's view follows its own prior
    torch.testing.assert_close(va, expected_view(pa), rtol=0, atol=1e-3)


def test_float64_region_keeps_dtype(coords):
    region = coords(REGION, batch=2, dtype=torch.float64)
    va, vb, pa, _ = make_view_pair(region, PATCH, generator=torch.Generator().manual_seed(0))
    assert va.dtype == vb.dtype == torch.float64
    torch.testing.assert_close(va, expected_view(pa).double(), rtol=0, atol=1e-4)


def test_errors():
    region = torch.zeros(1, 1, *REGION)
    with pytest.raises(ValueError, match=r"region must be \(B, C, Z, Y, X\)"):
        make_view_pair(torch.zeros(1, *REGION), PATCH)
    with pytest.raises(ValueError, match="patch_size must be 3 positive integers"):
        make_view_pair(region, (8, 16))
    with pytest.raises(ValueError, match="patch_size must be 3 positive integers"):
        make_view_pair(region, (8, 0, 12))
    with pytest.raises(ValueError, match="impossible overlap"):
        make_view_pair(region, PATCH, min_overlap=0.9)
    with pytest.raises(ValueError, match="impossible overlap"):
        make_view_pair(region, PATCH, min_overlap=(1.1 / 1.4) ** 3 + 1e-6)
    for bad in ((0.0, 1.2), (1.4, 1.1), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="scale_range must satisfy"):
            make_view_pair(region, PATCH, scale_range=bad)
    with pytest.raises(ValueError, match="min_overlap is a fraction"):
        make_view_pair(region, PATCH, min_overlap=-0.1)
    with pytest.raises(ValueError, match="flip_prob is a probability"):
        make_view_pair(region, PATCH, flip_prob=1.5)
    with pytest.raises(ValueError, match=r"region_offset must be \(B, 3\)"):
        make_view_pair(region, PATCH, region_offset=torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------ pairs from two regions of a case
PAIR_PATCH = (8, 16, 12)
PAIR_REGION = tuple(math.ceil(1.4 * p) for p in PAIR_PATCH)          # (12, 23, 17): the largest crop


def case_box(prior: ViewPrior) -> tuple:
    """``(lo, hi)`` ``(B, 3)`` of a view's extent in *case* coordinates: its 8 corners through ``to_region``
    (einsum), plus ``region_offset``, written out independently of ``to_case`` / ``box_bounds``."""
    ext = [(-0.5, p - 0.5) for p in prior.patch_size]
    corners = torch.tensor([[z, y, x] for z in ext[0] for y in ext[1] for x in ext[2]], dtype=torch.float64)
    pts = _apply(prior.to_region.double(), corners.expand(prior.batch_size, 8, 3))
    pts = pts + prior.region_offset.double()[:, None, :]
    return pts.amin(1), pts.amax(1)


def exact_overlap(pa: ViewPrior, pb: ViewPrior) -> torch.Tensor:
    """Shared volume / larger volume of two views' extents in case coordinates (float64)."""
    (lo_a, hi_a), (lo_b, hi_b) = case_box(pa), case_box(pb)
    return my_overlap(lo_a, hi_a, lo_b, hi_b)


def case_fields(offsets: torch.Tensor, size) -> torch.Tensor:
    """``(B, 3, *size)``: per item, a region starting at case voxel ``offsets[i]`` filled with case coordinates."""
    from conftest import coordinate_field
    return torch.cat([coordinate_field(size, offset=tuple(int(v) for v in o)) for o in offsets])


def test_two_regions_views_are_exact_samples_in_case_coordinates():
    g = torch.Generator().manual_seed(21)
    delta = draw_pair_offsets(6, PAIR_REGION, PAIR_PATCH, generator=g)
    off_a = torch.tensor([[3, -2, 5], [0, 0, 0], [40, 7, -9], [1, 2, 3], [-5, 0, 11], [2, 2, 2]])
    off_b = off_a + delta
    ra, rb = case_fields(off_a, PAIR_REGION), case_fields(off_b, PAIR_REGION)
    va, vb, pa, pb = make_view_pair(ra, PAIR_PATCH, region_offset=off_a, region_b=rb, region_offset_b=off_b,
                                    generator=g)
    assert torch.equal(pa.region_offset, off_a) and torch.equal(pb.region_offset, off_b)
    n = torch.tensor([float(s) for s in PAIR_REGION], dtype=torch.float64)
    for view, prior in ((va, pa), (vb, pb)):
        # each crop lies inside its own region
        lo, hi = prior.footprint()
        assert bool((lo >= -0.5 - 1e-4).all()) and bool((hi <= n - 0.5 + 1e-4).all())
        pts = voxel_grid(PAIR_PATCH, torch.device("cpu"), torch.float64).expand(6, *PAIR_PATCH, 3)
        case = _apply(prior.to_region.double(), pts) + prior.region_offset.double().view(6, 1, 1, 1, 3)
        torch.testing.assert_close(view.movedim(1, -1).double(), case, rtol=0, atol=2e-3)
    assert bool((exact_overlap(pa, pb) >= 0.1 - 1e-6).all())


def _reference_overlaps(n: int, scale_range, min_overlap: float, seed: int) -> torch.Tensor:
    """Two random crops of an unbounded case: scales U(lo, hi), the second placed uniformly among placements
    touching the first, kept if they share >= min_overlap of the larger (written out here, not the module's)."""
    g = torch.Generator().manual_seed(seed)
    lo_u, hi_u = scale_range
    u = lo_u + (hi_u - lo_u) * torch.rand(n, 2, generator=g, dtype=torch.float64)
    sa, sb = u[:, :1].expand(n, 3), u[:, 1:].expand(n, 3)
    pos = -sb + torch.rand(n, 3, generator=g, dtype=torch.float64) * (sa + sb)     # b's lower edge, a at 0
    inter = (torch.minimum(sa, pos + sb) - torch.maximum(torch.zeros_like(pos), pos)).clamp_min(0).prod(1)
    frac = inter / torch.maximum(sa.prod(1), sb.prod(1))
    return frac[frac >= min_overlap]


def test_pair_overlap_spans_min_overlap_to_one():
    # what the loader and the trainer do: offsets by draw_pair_offsets, crops by make_view_pair; the overlap is
    # computed from the priors by exact_overlap (own code), and pair_overlap must agree with it
    g = torch.Generator().manual_seed(22)
    ours = []
    for _ in range(2):
        delta = draw_pair_offsets(1024, PAIR_REGION, PAIR_PATCH, generator=g)
        region = torch.zeros(1024, 1, *PAIR_REGION)
        off = torch.zeros(1024, 3, dtype=torch.long)
        _, _, pa, pb = make_view_pair(region, PAIR_PATCH, region_offset=off, region_b=region,
                                      region_offset_b=off + delta, generator=g)
        frac = exact_overlap(pa, pb)
        torch.testing.assert_close(pair_overlap(pa, pb).double(), frac, rtol=0, atol=1e-5)
        ours.append(frac)
    o = torch.cat(ours)
    assert float(o.min()) >= 0.1 - 1e-6                   # never below min_overlap
    assert float((o < 0.2).float().mean()) > 0.3          # small overlaps are common (one region: none < 0.38)
    assert float((o > 0.5).float().mean()) > 0.03 and float(o.max()) > 0.75   # and large ones occur
    # the distribution is that of two random crops of a large case under the overlap constraint
    ref = _reference_overlaps(400_000, (1.1, 1.4), 0.1, seed=23)
    q = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(o, q), torch.quantile(ref, q), rtol=0, atol=0.03)
    torch.testing.assert_close(o.mean(), ref.mean(), rtol=0, atol=0.02)


def test_one_region_never_goes_below_38_percent():
    # the reason for two regions: two crops inside one region of R = ceil(1.4 P) voxels share at least
    # s_a + s_b − R per axis, lowest for two crops of 1.1 P: Π (2.2 P − R) / (1.1 P)  (≈ 0.385 for R = 1.4 P)
    region = torch.zeros(1024, 1, *PAIR_REGION)
    _, _, pa, pb = make_view_pair(region, PAIR_PATCH, generator=torch.Generator().manual_seed(24))
    bound = math.prod((2.2 * p - r) / (1.1 * p) for p, r in zip(PAIR_PATCH, PAIR_REGION))
    assert bound > 0.3
    assert float(exact_overlap(pa, pb).min()) >= bound - 1e-6


def _max_shared_1d(s_a: torch.Tensor, s_b: torch.Tensor, r: int, d: int, steps: int = 101) -> torch.Tensor:
    """Brute force, per pair of lengths ``(K,)``: the longest intersection of two intervals of lengths s_a, s_b
    placed anywhere (on a grid of ``steps`` positions each) inside [-0.5, r - 0.5] and [d - 0.5, d + r - 0.5]."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    pa = -0.5 + t[None, :, None] * (r - s_a)[:, None, None]                      # (K, steps, 1)
    pb = d - 0.5 + t[None, None, :] * (r - s_b)[:, None, None]                  # (K, 1, steps)
    inter = torch.minimum(pa + s_a[:, None, None], pb + s_b[:, None, None]) - torch.maximum(pa, pb)
    return inter.clamp_min(0).flatten(1).max(dim=1).values


def test_pair_offset_feasible_matches_brute_force():
    g = torch.Generator().manual_seed(25)
    r, p = PAIR_REGION, PAIR_PATCH
    deltas = torch.cat([torch.randint(-r[i] + 1, r[i], (60, 1), generator=g) for i in range(3)], dim=1)
    got = pair_offset_feasible(deltas, r, p, (1.1, 1.4), 0.1)
    us = torch.tensor([1.1, 1.25, 1.4], dtype=torch.float64)
    ua, ub = us.repeat_interleave(3), us.repeat(3)                              # pairs of scales, ends included
    checked = 0
    for d, ok in zip(deltas.tolist(), got.tolist()):
        shared = torch.stack([_max_shared_1d(ua * p[i], ub * p[i], r[i], d[i]) for i in range(3)]).prod(dim=0)
        worst = float((shared / (torch.maximum(ua, ub) ** 3 * math.prod(p))).min())
        if abs(worst - 0.1) > 0.005:       # the brute force grid resolves the optimum to ~1e-3
            assert ok == (worst >= 0.1), (d, worst, ok)
            checked += 1
    assert checked > 50 and 3 < sum(got.tolist()) < 57


def test_max_pair_offset_is_tight_and_draws_stay_inside():
    r, p = PAIR_REGION, PAIR_PATCH
    dmax = max_pair_offset(r, p, (1.1, 1.4), 0.1)
    for axis in range(3):
        at, beyond = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)
        at[0, axis], at[1, axis] = dmax[axis], -dmax[axis]
        beyond[0, axis], beyond[1, axis] = dmax[axis] + 1, -dmax[axis] - 1
        assert pair_offset_feasible(at, r, p, (1.1, 1.4), 0.1).all()
        assert not pair_offset_feasible(beyond, r, p, (1.1, 1.4), 0.1).any()
    d = draw_pair_offsets(2000, r, p, generator=torch.Generator().manual_seed(26))
    assert d.dtype == torch.int64 and d.shape == (2000, 3)
    assert bool(pair_offset_feasible(d, r, p, (1.1, 1.4), 0.1).all())
    assert bool((d.abs() <= torch.tensor(dmax)).all())
    assert len({tuple(x) for x in d.tolist()}) > 500          # offsets vary, on every axis, in both directions
    assert bool((d.min(0).values < 0).all()) and bool((d.max(0).values > 0).all())


def test_two_region_errors():
    region = torch.zeros(2, 1, *PAIR_REGION)
    off = torch.zeros(2, 3, dtype=torch.long)
    far = torch.tensor([[0, 0, 0], [PAIR_REGION[0] - 1, 0, 0]])
    with pytest.raises(ValueError, match=r"regions of batch items \[1\] are too far apart"):
        make_view_pair(region, PAIR_PATCH, region_offset=off, region_b=region, region_offset_b=far)
    with pytest.raises(ValueError, match="region_offset_b was given without region_b"):
        make_view_pair(region, PAIR_PATCH, region_offset_b=off)
    with pytest.raises(ValueError, match="region_b must match region"):
        make_view_pair(region, PAIR_PATCH, region_b=torch.zeros(2, 1, 12, 23, 18))
    with pytest.raises(ValueError, match=r"region_offset_b must be \(B, 3\)"):
        make_view_pair(region, PAIR_PATCH, region_b=region, region_offset_b=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="must hold the largest crop"):
        draw_pair_offsets(1, (11, 23, 17), PAIR_PATCH)


def test_two_small_regions_are_padded_alike(coords):
    # regions smaller than the largest crop are padded the same way; the offsets shift together
    size, patch = (6, 10, 10), (8, 8, 8)
    off_a = torch.tensor([[5, 7, 9]] * 4)
    off_b = off_a + torch.tensor([[2, -1, 0]])
    ra, rb = case_fields(off_a, size), case_fields(off_b, size)
    va, vb, pa, pb = make_view_pair(ra, patch, region_offset=off_a, region_b=rb, region_offset_b=off_b,
                                    generator=torch.Generator().manual_seed(27), pad_value=-1000.0)
    assert pa.region_offset.tolist() == [[2, 6, 8]] * 4 and pb.region_offset.tolist() == [[4, 5, 8]] * 4
    for view, prior, off in ((va, pa, off_a), (vb, pb, off_b)):
        pts = voxel_grid(patch, torch.device("cpu"), torch.float64).expand(4, *patch, 3)
        case = _apply(prior.to_region.double(), pts) + prior.region_offset.double().view(4, 1, 1, 1, 3)
        lo_c = off[0].double()
        inside = ((case >= lo_c) & (case <= lo_c + torch.tensor([s - 1.0 for s in size]))).all(-1)
        assert int(inside.sum()) > 100
        torch.testing.assert_close(view.movedim(1, -1)[inside].double(), case[inside], rtol=0, atol=1e-3)


@pytest.mark.parametrize("min_overlap", [0.0, 0.3, (1.1 / 1.4) ** 3])
def test_two_region_pairs_meet_any_min_overlap(min_overlap):
    g = torch.Generator().manual_seed(28)
    delta = draw_pair_offsets(512, PAIR_REGION, PAIR_PATCH, min_overlap=min_overlap, generator=g)
    region = torch.zeros(512, 1, *PAIR_REGION)
    off = torch.zeros(512, 3, dtype=torch.long)
    _, _, pa, pb = make_view_pair(region, PAIR_PATCH, min_overlap=min_overlap, region_offset=off, region_b=region,
                                  region_offset_b=off + delta, generator=g)
    frac = exact_overlap(pa, pb)
    assert float(frac.min()) >= min_overlap - 1e-5 and float(frac.min()) > 0
