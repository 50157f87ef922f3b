"""The CPU data path below the pair logic (``tests/test_loader_pairs.py`` covers pair placement and worker
determinism): ``read_region`` against coordinate volumes, the region sizes against their formulas, explicit pair
offsets, the bounded cache of open case files, resuming at a batch index, and ``TimedLoader``'s bookkeeping.

Every voxel of a test volume holds a code of its own ``(c, z, y, x)`` index, so a region's values name where each
of them was read from; the expected regions are computed from the indices, never by slicing.
"""
from __future__ import annotations

import gc
import math
import re
import time
import weakref
from fractions import Fraction

import blosc2
import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from nnunet_pgl.pretraining.loader import (RegionDataset, TimedLoader, cube_region_size_for, read_region,
                                           region_size_for)

SHAPE = (2, 5, 6, 7)            # (C, Z, Y, X) of the test case
PATCH = (4, 6, 5)
REGION = region_size_for(PATCH, 1.4)


def code(c, z, y, x, shape=SHAPE):
    """The value stored at ``(c, z, y, x)``: its flat index + 1 (0 is left for padding); exact in float32."""
    return (((c * shape[1] + z) * shape[2] + y) * shape[3] + x + 1)


def coordinate_volume(shape=SHAPE) -> np.ndarray:
    idx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return code(*idx, shape=shape).astype(np.float32)


def expected_region(start, size, shape=SHAPE) -> np.ndarray:
    """``(C, *size)``: the code of case voxel ``start + i`` at ``i`` where it lies in the case, else 0."""
    c = np.arange(shape[0]).reshape(-1, 1, 1, 1)
    z, y, x = (np.arange(r).reshape([-1 if a == k else 1 for k in range(3)]) + s
               for a, (r, s) in enumerate(zip(size, start)))
    inside = (z >= 0) & (z < shape[1]) & (y >= 0) & (y < shape[2]) & (x >= 0) & (x < shape[3])
    return np.where(inside, code(c, z, y, x, shape), 0).astype(np.float32)


def write_case(path, data: np.ndarray) -> str:
    blosc2.asarray(np.ascontiguousarray(data), urlpath=str(path), mode="w")
    return str(path)


# ---------------------------------------------------------------------------------------------------- read_region
STARTS = [
    ((1, 1, 1), (3, 4, 5)),        # inside
    ((0, 0, 0), SHAPE[1:]),        # exactly the case
    ((-2, 1, 1), (3, 4, 5)),       # leaves the case below, one axis at a time
    ((1, -3, 1), (3, 4, 5)),
    ((1, 1, -4), (3, 4, 5)),
    ((3, 1, 1), (3, 4, 5)),        # ... and above
    ((1, 4, 1), (3, 4, 5)),
    ((1, 1, 5), (3, 4, 5)),
    ((-2, -1, -3), (9, 8, 12)),    # larger than the case: padded on every side
    ((-1, 4, -2), (4, 5, 3)),      # below on two axes, above on one
    ((5, 0, 0), (2, 2, 2)),        # entirely outside (touching the far face)
    ((-3, -3, -3), (3, 3, 3)),     # entirely outside (touching the near corner)
]


@pytest.mark.parametrize("start,size", STARTS)
def test_read_region_is_the_case_where_inside_and_zero_elsewhere(start, size):
    vol = coordinate_volume()
    got = read_region(vol, start, size)
    assert got.dtype == np.float32 and got.shape == (SHAPE[0], *size)
    np.testing.assert_array_equal(got, expected_region(start, size))


def test_read_region_reads_blosc2_arrays_like_numpy(tmp_path):
    f = write_case(tmp_path / "c.b2nd", coordinate_volume())
    arr = blosc2.open(urlpath=f, mode="r")
    for start, size in STARTS:
        np.testing.assert_array_equal(read_region(arr, start, size), expected_region(start, size))


def test_read_region_refills_a_reused_out_buffer():
    vol = coordinate_volume()
    size = (3, 4, 5)
    out = np.full((SHAPE[0], *size), -7.0, dtype=np.float32)
    first = read_region(vol, (1, 1, 1), size, out=out)              # fully inside: overwrites every voxel
    assert first is out
    np.testing.assert_array_equal(out, expected_region((1, 1, 1), size))
    second = read_region(vol, (-2, 4, 3), size, out=out)            # mostly padding: stale values must go
    assert second is out
    np.testing.assert_array_equal(out, expected_region((-2, 4, 3), size))
    assert (out == 0).sum() > out.size // 2


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 4, 5), np.float64), np.zeros((2, 3, 4, 6), np.float32),
                                 np.zeros((1, 3, 4, 5), np.float32), np.zeros((3, 4, 5), np.float32)])
def test_read_region_refuses_a_wrong_out_buffer(bad):
    before = bad.copy()
    with pytest.raises(ValueError, match=re.escape(str((2, 3, 4, 5)))):
        read_region(coordinate_volume(), (0, 0, 0), (3, 4, 5), out=bad)
    np.testing.assert_array_equal(bad, before)                      # refused before touching it


# ---------------------------------------------------------------------------------------------------- region sizes
@pytest.mark.parametrize("patch,scale_max", [((8, 16, 12), "1.4"), ((5, 10, 20), "1.4"), ((1, 7, 128), "1.1"),
                                             ((10, 10, 10), "2"), ((3, 64, 96), "1.25"),
                                             ((50, 90, 100), "1.1")])   # float 1.1 · p is a hair above the integer
def test_region_size_is_the_smallest_holding_the_largest_crop(patch, scale_max):
    u = Fraction(scale_max)                                          # the decimal scale, exactly
    got = region_size_for(patch, float(scale_max))
    assert got == tuple(math.ceil(u * p) for p in patch)
    assert all(isinstance(r, int) for r in got)
    for r, p in zip(got, patch):                                     # holds u·p, one voxel less would not
        assert r >= u * p > r - 1


@pytest.mark.parametrize("patch,hi,min_overlap,cube_root", [
    ((10, 20, 7), "1.4", 0.125, Fraction(1, 2)),                    # (2 - 1/2) · 1.4 = 2.1 exactly
    ((4, 9, 33), "1.2", 1.0, Fraction(1)),                          # full overlap: one crop, ceil(hi · p)
    ((6, 8, 10), "1.5", 0.008, Fraction(1, 5)),                     # (2 - 0.2) · 1.5 = 2.7
    ((5, 10, 15), "1.5", 0.064, Fraction(2, 5)),                    # 2.4 · p, a hair above it in floats
])
def test_cube_region_size_matches_its_formula(patch, hi, min_overlap, cube_root):
    got = cube_region_size_for(patch, (1.1, float(hi)), min_overlap)
    assert got == tuple(math.ceil((2 - cube_root) * Fraction(hi) * p) for p in patch)


def test_cube_region_is_about_2_15_patches_for_the_default_views():
    # the docstring's figure: (2 - 0.1^(1/3)) · 1.4 = 2.1502...
    got = cube_region_size_for((200, 400, 1000), (1.1, 1.4), 0.1)
    for r, p in zip(got, (200, 400, 1000)):
        assert r / p == pytest.approx(2.15, abs=0.005)
        assert r >= (2 - 0.1 ** (1 / 3)) * 1.4 * p > r - 1


# ---------------------------------------------------------------------------------------------------- RegionDataset
def test_sample_places_the_second_region_at_the_given_offset(tmp_path):
    shape = (2, 20, 24, 22)
    f = write_case(tmp_path / "c.b2nd", coordinate_volume(shape))
    ds = RegionDataset([f], REGION, batch_size=1, seed=0, patch_size=PATCH)
    rng = np.random.default_rng(1)
    for delta in [(0, 0, 0), (2, -3, 4), (-5, 6, -1), (1, 1, -7)]:
        data, off = ds.sample(rng, delta)
        assert data.shape == (2, shape[0], *REGION) and off.shape == (2, 3) and off.dtype == np.int64
        assert (off[1] - off[0]).tolist() == list(delta)
        lo, hi = np.minimum(off[0], off[1]), np.maximum(off[0], off[1]) + np.array(REGION)
        assert (lo >= 0).all() and (hi <= np.array(shape[1:])).all()  # the pair fits: no padding
        for k in range(2):
            np.testing.assert_array_equal(data[k], expected_region(off[k].tolist(), REGION, shape))


def _case_of(batch) -> list:
    """The case index of each item: case ``i`` holds ``10_000 · i`` + its coordinate codes (all under 10_000)."""
    tops = [float(batch["data"][i, 0].max()) for i in range(batch["data"].shape[0])]
    assert all(t > 0 for t in tops)                                  # each item's first region touches its case
    return [int(t) // 10_000 for t in tops]


def test_open_arrays_are_an_lru_cache_of_max_open(tmp_path, monkeypatch):
    # case i holds 10_000 · i + its coordinate code, so every item names its case
    n_cases, shape = 5, (1, 12, 14, 13)
    files = [write_case(tmp_path / f"c{i}.b2nd", coordinate_volume(shape) + 10_000 * i) for i in range(n_cases)]
    opened, alive = [], []
    real_open = blosc2.open

    def counting_open(*args, **kwargs):
        arr = real_open(*args, **kwargs)
        opened.append(kwargs.get("urlpath", args[0] if args else None))
        alive.append(weakref.ref(arr))
        return arr

    monkeypatch.setattr(blosc2, "open", counting_open)
    ds = RegionDataset(files, REGION, batch_size=6, seed=4, patch_size=PATCH)
    ds.max_open = 2
    it = iter(ds)
    accessed = []
    for _ in range(5):
        accessed += _case_of(next(it))
        gc.collect()
        assert sum(r() is not None for r in alive) <= 2           # evicted arrays are released (file closed)
    # an independent LRU of 2 over the same access sequence opens exactly the same files in the same order
    cache, expected_opens = [], []
    for c in accessed:
        if c in cache:
            cache.remove(c)
        else:
            expected_opens.append(files[c])
            if len(cache) == 2:
                cache.pop(0)
        cache.append(c)
    assert opened == expected_opens
    assert len(set(accessed)) == n_cases and len(opened) < len(accessed)  # every case seen, some reads reused


def test_a_single_case_is_opened_once(tmp_path, monkeypatch):
    f = write_case(tmp_path / "c.b2nd", coordinate_volume((1, 12, 14, 13)))
    calls = []
    real_open = blosc2.open
    monkeypatch.setattr(blosc2, "open", lambda *a, **k: calls.append(k.get("urlpath")) or real_open(*a, **k))
    it = iter(RegionDataset([f], REGION, batch_size=4, seed=0, patch_size=PATCH))
    for _ in range(3):
        next(it)
    assert calls == [f]


def test_a_dataset_started_at_batch_k_yields_the_uninterrupted_kth_batch(tmp_path):
    files = [write_case(tmp_path / f"c{i}.b2nd", coordinate_volume((1, 10 + i, 16, 14)) + 10_000 * i)
             for i in range(3)]
    kw = dict(batch_size=3, seed=11, patch_size=PATCH)
    it = iter(RegionDataset(files, REGION, **kw))
    uninterrupted = [next(it) for _ in range(6)]
    for k in (1, 4):
        resumed = iter(RegionDataset(files, REGION, start_batch=k, **kw))
        for j in range(k, 6):
            b = next(resumed)
            assert torch.equal(b["data"], uninterrupted[j]["data"]), (k, j)
            assert torch.equal(b["offset"], uninterrupted[j]["offset"]), (k, j)
    # and a different seed gives different batches
    other = next(iter(RegionDataset(files, REGION, **dict(kw, seed=12))))
    assert not torch.equal(other["offset"], uninterrupted[0]["offset"])


def test_no_cases_is_refused_with_what_to_check():
    with pytest.raises(ValueError) as e:
        RegionDataset([], REGION, batch_size=1, seed=0, patch_size=PATCH)
    msg = str(e.value)
    assert "no cases to pretrain on" in msg
    for flag in ("--unlabeled", "--no-labeled-images", "--exclude-fold"):
        assert flag in msg


# ---------------------------------------------------------------------------------------------------- TimedLoader
class SlowBatches(IterableDataset):
    """Yields ``{'i': i}`` after sleeping ``delay`` seconds."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def __iter__(self):
        i = 0
        while True:
            time.sleep(self.delay)
            yield {"i": torch.tensor(i)}
            i += 1


def test_timed_loader_accumulates_the_wait_and_pop_resets_it():
    loader = TimedLoader(SlowBatches(0.03), num_workers=0, pin_memory=False)
    assert loader.pop_wait() == 0.0
    t0 = time.perf_counter()
    got = [int(next(loader)["i"]) for _ in range(3)]
    outside = time.perf_counter() - t0
    assert got == [0, 1, 2]
    waited = loader.pop_wait()
    assert 3 * 0.03 <= waited <= outside
    assert loader.pop_wait() == 0.0                                  # reset by the first pop
    time.sleep(0.05)                                                 # time outside next() is not waiting
    t0 = time.perf_counter()
    assert int(next(loader)["i"]) == 3
    assert 0.03 <= loader.pop_wait() <= time.perf_counter() - t0
    loader.close()


def test_timed_loader_yields_the_dataset_batches_and_closes_twice(tmp_path):
    f = write_case(tmp_path / "c.b2nd", coordinate_volume((1, 12, 14, 13)))
    kw = dict(batch_size=2, seed=3, patch_size=PATCH)
    direct = iter(RegionDataset([f], REGION, **kw))
    loader = TimedLoader(RegionDataset([f], REGION, **kw), num_workers=0, pin_memory=False)
    assert iter(loader) is loader
    for _ in range(2):
        a, b = next(direct), next(loader)
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["offset"], b["offset"])
    loader.close()
    loader.close()
    TimedLoader(RegionDataset([f], REGION, **kw), num_workers=0, pin_memory=False).close()  # never iterated
