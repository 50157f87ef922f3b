"""The region-pair loader: each batch item holds two regions of one case at an offset that admits every pair of
crops at ``min_overlap``; the regions equal the case where they lie in it (zero elsewhere);
batches are deterministic per (seed, batch index), whatever the number of workers; a case smaller than the patch
appears at different places in the two views.

Cases are written directly as blosc2 arrays holding their own voxel coordinates (and a case id), so every value
of a region names where it was read from.
"""
from __future__ import annotations

import blosc2
import numpy as np
import pytest
import torch

from nnunet_pgl.pretraining.loader import RegionDataset, TimedLoader, region_size_for
from nnunet_pgl.views import make_view_pair, pair_offset_feasible

PATCH = (8, 16, 12)
REGION = region_size_for(PATCH, 1.4)          # (12, 23, 17)


def write_case(path, shape, case_id: int) -> str:
    """``(4, *shape)`` blosc2 array: channels z, y, x coordinates and the constant ``case_id``."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    data = np.concatenate([grid, np.full((1, *shape), case_id, dtype=np.float32)])
    blosc2.asarray(np.ascontiguousarray(data), urlpath=str(path), mode="w")
    return str(path)


def expected_region(shape, start, case_id: int) -> np.ndarray:
    """What a region of ``REGION`` voxels at case voxel ``start`` must hold: coordinates inside, 0 outside."""
    idx = np.stack(np.meshgrid(*[np.arange(r) + s for r, s in zip(REGION, start)], indexing="ij"))
    inside = np.all([(idx[a] >= 0) & (idx[a] < shape[a]) for a in range(3)], axis=0)
    out = np.concatenate([idx.astype(np.float32), np.full((1, *REGION), case_id, dtype=np.float32)])
    return np.where(inside[None], out, 0.0).astype(np.float32)


def test_batches_hold_two_regions_of_the_case_at_feasible_offsets(tmp_path):
    shapes = {1: (40, 70, 60), 2: (5, 9, 7)}      # larger than any pair (no padding); smaller than the patch
    files = [write_case(tmp_path / f"case_{i}.b2nd", s, i) for i, s in shapes.items()]
    ds = RegionDataset(files, REGION, batch_size=16, seed=3, patch_size=PATCH)
    it = iter(ds)
    for _ in range(3):
        batch = next(it)
        data, off = batch["data"], batch["offset"]
        assert data.shape == (16, 2, 4, *REGION) and data.dtype == torch.float32
        assert off.shape == (16, 2, 3) and off.dtype == torch.int64
        delta = off[:, 1] - off[:, 0]
        assert bool(pair_offset_feasible(delta, REGION, PATCH, (1.1, 1.4), 0.1).all())
        for i in range(16):
            case_id = int(data[i, :, 3].max())
            for k in range(2):
                np.testing.assert_array_equal(data[i, k].numpy(),
                                              expected_region(shapes[case_id], off[i, k].tolist(), case_id))
            if case_id == 1:   # the pair lies inside the big case
                lo = torch.minimum(off[i, 0], off[i, 1])
                hi = torch.maximum(off[i, 0], off[i, 1]) + torch.tensor(REGION)
                assert bool((lo >= 0).all()) and bool((hi <= torch.tensor(shapes[1])).all())
            else:              # centred on the small case: the case's centre lies mid-way between the regions
                mid = (off[i, 0] + off[i, 1]).double() / 2 + (torch.tensor(REGION).double() - 1) / 2
                centre = (torch.tensor(shapes[2]).double() - 1) / 2
                assert bool(((mid - centre).abs() <= 1.0).all()), (mid, centre)


def test_batches_depend_only_on_seed_and_index(tmp_path):
    files = [write_case(tmp_path / f"case_{i}.b2nd", (20, 40, 30), i) for i in (1, 2, 3)]
    kw = dict(batch_size=2, seed=5, patch_size=PATCH)
    direct = iter(RegionDataset(files, REGION, start_batch=4, **kw))
    first = [next(direct) for _ in range(3)]
    loader = TimedLoader(RegionDataset(files, REGION, start_batch=4, **kw), num_workers=2, pin_memory=False)
    try:
        second = [next(loader) for _ in range(3)]
    finally:
        loader.close()
    for a, b in zip(first, second):
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["offset"], b["offset"])
    other = next(iter(RegionDataset(files, REGION, start_batch=5, **kw)))
    assert not torch.equal(other["offset"], first[0]["offset"])


def _view_position(prior, point: torch.Tensor) -> torch.Tensor:
    """View voxel coordinates ``(B, 3)`` of a case point: the inverse of (to_region, then + region_offset)."""
    m = prior.to_region.double().clone()
    m[:, :3, 3] += prior.region_offset.double()
    inv = torch.linalg.inv(m)
    return inv[:, :3, :3] @ point + inv[:, :3, 3]


def test_small_case_sits_at_different_places_in_the_two_views(tmp_path):
    # a case smaller than the patch (common where nnU-Net's patch covers the whole image): in one region of
    # ceil(1.4 P) both views saw it at nearly the same place (median displacement ~9 % of the patch), so features
    # could learn their position in the view; a pair's two regions must move it
    shape = (6, 12, 9)
    ds = RegionDataset([write_case(tmp_path / "small.b2nd", shape, 1)], REGION, batch_size=256, seed=6,
                       patch_size=PATCH)
    batch = next(iter(ds))
    d, off = batch["data"], batch["offset"]
    _, _, pa, pb = make_view_pair(d[:, 0], PATCH, flip_prob=0.0, region_offset=off[:, 0], region_b=d[:, 1],
                                  region_offset_b=off[:, 1], generator=torch.Generator().manual_seed(7))
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    shift = ((_view_position(pa, centre) - _view_position(pb, centre)).abs()
             / torch.tensor([float(p) for p in PATCH], dtype=torch.float64)).amax(dim=1)
    assert float(shift.median()) > 0.4
    assert float((shift > 0.3).double().mean()) > 0.8


def test_region_size_must_hold_the_largest_crop(tmp_path):
    f = write_case(tmp_path / "c.b2nd", (20, 40, 30), 1)
    with pytest.raises(ValueError, match="must hold the largest crop"):
        RegionDataset([f], (11, 23, 17), batch_size=1, seed=0, patch_size=PATCH)
