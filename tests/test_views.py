"""make_view_pair: views are exact samples of the region at the recorded prior; crop, overlap, scale and flip
statistics; padding; determinism; errors.

The region is filled with its own voxel coordinates (a linear field), so the view must equal the prior applied
to the view's voxel grid: an independent check of resampling and prior together.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_pgl.prior import ViewPrior
from nnunet_pgl.views import make_view_pair, overlap_fraction, sample_view, to_grid_sample, voxel_grid

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
