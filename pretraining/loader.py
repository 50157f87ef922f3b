"""The CPU side of the data path: random region pairs of preprocessed cases, read from nnU-Net's blosc2 arrays.

Each batch item is one view pair's two regions of the same case, each of ``region_size`` voxels
(``ceil(scale_range[1] · patch_size)``, the largest crop a view can need). Their relative offset is drawn by
:func:`nnunet_pgl.views.draw_pair_offsets` (the centre displacement of two random crops that share at least
``min_overlap``), and the pair is placed uniformly in the case; where the case is smaller than the two regions
together, they are centred on it and the rest is padded with 0 (as nnU-Net's loader pads images), so a small case
sits at different places in the two regions. Only the touched blosc2 chunks are read. The batch is
``{'data': (B, 2, C, *region_size) float32, 'offset': (B, 2, 3) int64}``: ``data[:, k]`` is view k's region and
``offset[:, k]`` the case voxel coordinate of its voxel 0 (negative where padded). Views, priors and intensity
augmentation are made later, on the training device (``nnunet_pgl.make_view_pair(data[:, 0], ...,
region_offset=offset[:, 0], region_b=data[:, 1], region_offset_b=offset[:, 1])``).

Workers are torch ``DataLoader`` worker processes (they exit when the parent dies); batches are pinned when
training on CUDA.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import blosc2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nnunet_pgl.views import draw_pair_offsets


def region_size_for(patch_size: Sequence[int], scale_max: float) -> Tuple[int, int, int]:
    """Each of a pair's two regions: the size a CPU worker reads so that every crop ``u · patch`` (``u ≤ scale_max``)
    fits (a pair reads two, see the module docstring)."""
    r = [int(math.ceil(scale_max * p - 1e-9)) for p in patch_size]
    return (r[0], r[1], r[2])


def cube_region_size_for(patch_size: Sequence[int], scale_range: Sequence[float],
                         min_overlap: float) -> Tuple[int, int, int]:
    """One region in which two crops of the largest scale can share as little as ``min_overlap`` (equally on every
    axis): ``ceil((2 − min_overlap^(1/3)) · hi · patch)`` per axis, ≈ 2.15 × the patch for (1.1, 1.4) and 0.1.

    The alternative to a pair of ``region_size_for`` regions that the loader does not use (≈ 1.8× their read and
    transfer); the pretrainer's feature picture crops both views from one such region.
    """
    hi = float(scale_range[1])
    r = [int(math.ceil((2.0 - min_overlap ** (1.0 / 3.0)) * hi * p - 1e-9)) for p in patch_size]
    return (r[0], r[1], r[2])


def read_region(arr: "blosc2.NDArray | np.ndarray", start: Sequence[int], size: Sequence[int],
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """``arr[:, start:start+size]`` of a ``(C, Z, Y, X)`` array, zero-padded where it leaves the case; written into
    ``out`` (float32 ``(C, *size)``) when given."""
    shape = arr.shape[1:]
    lo = [max(0, s) for s in start]
    hi = [min(n, s + r) for s, r, n in zip(start, size, shape)]
    if out is None:
        out = np.zeros((arr.shape[0], *size), dtype=np.float32)
    else:
        if out.shape != (arr.shape[0], *size) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {(arr.shape[0], *size)}; got {out.dtype} {out.shape}")
        out.fill(0.0)
    if all(h > l for l, h in zip(lo, hi)):
        block = arr[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
        out[(slice(None),) + dst] = block
    return out


#: open blosc2 arrays kept per loader process (one file descriptor each). Opening a case costs 0.1-0.6 ms, under
#: 5 % of one region read at real sizes (BENCHMARKS.md, "Corpus scale (CPU)"): a corpus larger than the cache,
#: where almost every read opens its case, loses little; a small dataset never reopens.
MAX_OPEN_ARRAYS = 16


class RegionDataset(IterableDataset):
    """Infinite stream of region-pair batches drawn uniformly from ``data_files`` (blosc2 ``(C, Z, Y, X)`` arrays).

    Batch ``k`` (counted from ``start_batch``, e.g. the global iteration a resumed run starts at) depends only on
    ``(seed, k)``, whatever the number of workers: a run resumed at iteration ``k`` sees the batches an
    uninterrupted run would.

    ``patch_size``, ``scale_range`` and ``min_overlap`` are the views' (as given to ``make_view_pair``); they set
    the pairs' offsets. ``patch_size`` defaults to the largest patch whose largest crop fits ``region_size``.
    """

    def __init__(self, data_files: List[str], region_size: Sequence[int], batch_size: int, seed: int,
                 start_batch: int = 0, *, patch_size: Optional[Sequence[int]] = None,
                 scale_range: Sequence[float] = (1.1, 1.4), min_overlap: float = 0.1):
        super().__init__()
        if not data_files:
            raise ValueError("no cases to pretrain on: the dataset has no preprocessed images and no unlabeled "
                             "folder was given (check --no-labeled-images / --unlabeled / --exclude-fold)")
        self.data_files = list(data_files)
        self.region_size = tuple(int(r) for r in region_size)
        hi = float(scale_range[1])
        self.patch_size = (tuple(int(p) for p in patch_size) if patch_size is not None
                           else tuple(int(math.floor(r / hi + 1e-9)) for r in self.region_size))
        self.scale_range = (float(scale_range[0]), hi)
        self.min_overlap = float(min_overlap)
        # validates region size, scales and overlap with the message of the method code
        draw_pair_offsets(1, self.region_size, self.patch_size, self.scale_range, self.min_overlap,
                          torch.Generator().manual_seed(0))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_batch = int(start_batch)
        self.max_open = MAX_OPEN_ARRAYS
        self._open: "OrderedDict[str, blosc2.NDArray]" = OrderedDict()  # least recently used first

    def _array(self, path: str) -> "blosc2.NDArray":
        """The opened array of ``path``, from a per-process LRU cache of at most ``max_open`` arrays.

        Each open array holds one file descriptor; evicting it (dropping the last reference) closes it, so a
        worker holds at most ``max_open`` case files open whatever the number of cases.
        """
        arr = self._open.get(path)
        if arr is not None:
            self._open.move_to_end(path)
            return arr
        arr = blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, mmap_mode="r")
        self._open[path] = arr
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arr

    def sample(self, rng: np.random.Generator, delta: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """One pair's regions ``(2, C, *region_size)`` and offsets ``(2, 3)``; ``delta`` = offset of region 1
        relative to region 0 (default: drawn with ``draw_pair_offsets``)."""
        arr = self._array(self.data_files[int(rng.integers(len(self.data_files)))])
        if delta is None:
            delta = self._deltas(1, rng)[0].tolist()
        starts: List[List[int]] = [[], []]
        for n, r, di in zip(arr.shape[1:], self.region_size, (int(x) for x in delta)):
            e = r + abs(di)                                   # extent of the two regions together on this axis
            if n >= e:
                s0 = int(rng.integers(0, n - e + 1))
            else:  # case smaller than the pair: centre the pair on it, pad both sides
                s0 = -((e - n) // 2)
            starts[0].append(s0 + max(0, -di))
            starts[1].append(s0 + max(0, di))
        # two reads: reading the pair's bounding box once instead saved ~8 % CPU on the quarter of pairs where it is
        # the smaller read (BENCHMARKS.md), not worth a second code path
        out = np.empty((2, arr.shape[0], *self.region_size), dtype=np.float32)
        for k in range(2):
            read_region(arr, starts[k], self.region_size, out=out[k])
        return out, np.asarray(starts, dtype=np.int64)

    def _deltas(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``(n, 3)`` pair offsets, drawn with a torch generator seeded from ``rng`` (deterministic per batch)."""
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        return draw_pair_offsets(n, self.region_size, self.patch_size, self.scale_range, self.min_overlap, g)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        blosc2.set_nthreads(1)
        idx = self.start_batch + wid
        while True:  # worker w makes batches w, w + W, ...; the DataLoader yields them in index order
            rng = np.random.default_rng([self.seed, idx])
            idx += nw
            deltas = self._deltas(self.batch_size, rng).tolist()
            items = [self.sample(rng, d) for d in deltas]
            yield {"data": torch.from_numpy(np.stack([i[0] for i in items])),
                   "offset": torch.from_numpy(np.stack([i[1] for i in items]))}


class TimedLoader:
    """Iterator over region batches that measures how long the training loop waited for each one."""

    def __init__(self, dataset: RegionDataset, num_workers: int, pin_memory: bool):
        self.num_workers = num_workers
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0,
                                 prefetch_factor=4 if num_workers > 0 else None)
        self._it: Optional[Iterator[Dict[str, torch.Tensor]]] = None
        self.wait_s = 0.0

    def __iter__(self) -> "TimedLoader":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.wait_s += time.perf_counter() - t0
        return batch

    def pop_wait(self) -> float:
        """Seconds waited since the last call."""
        w, self.wait_s = self.wait_s, 0.0
        return w

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
