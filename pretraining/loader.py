"""The CPU side of the data path: random regions of preprocessed cases, read from nnU-Net's blosc2 arrays.

Each batch item is a region of ``region_size`` voxels (``ceil(scale_range[1] · patch_size)``, the largest crop a
view can need) at a uniformly random position, bounded by the case; where the case is smaller than the region the
rest is padded with 0 (as nnU-Net's loader pads images). Only the touched blosc2 chunks are read. The batch is
``{'data': (B, C, *region_size) float32, 'offset': (B, 3) int64}``, ``offset`` being the case voxel coordinate of
region voxel 0 (negative where padded). Views, priors and intensity augmentation are made later, on the training
device (``nnunet_pgl.make_view_pair``).

Workers are torch ``DataLoader`` worker processes (they exit when the parent dies); batches are pinned when
training on CUDA.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import blosc2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def region_size_for(patch_size: Sequence[int], scale_max: float) -> Tuple[int, int, int]:
    """Region a CPU worker must read so that every crop ``u · patch`` (``u ≤ scale_max``) fits."""
    r = [int(math.ceil(scale_max * p - 1e-9)) for p in patch_size]
    return (r[0], r[1], r[2])


def read_region(arr: "blosc2.NDArray | np.ndarray", start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``arr[:, start:start+size]`` of a ``(C, Z, Y, X)`` array, zero-padded where it leaves the case."""
    shape = arr.shape[1:]
    lo = [max(0, s) for s in start]
    hi = [min(n, s + r) for s, r, n in zip(start, size, shape)]
    out = np.zeros((arr.shape[0], *size), dtype=np.float32)
    if all(h > l for l, h in zip(lo, hi)):
        block = arr[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
        out[(slice(None),) + dst] = block
    return out


class RegionDataset(IterableDataset):
    """Infinite stream of region batches drawn uniformly from ``data_files`` (blosc2 ``(C, Z, Y, X)`` arrays).

    Batch ``k`` (counted from ``start_batch``, e.g. the global iteration a resumed run starts at) depends only on
    ``(seed, k)``, whatever the number of workers: a run resumed at iteration ``k`` sees the batches an
    uninterrupted run would.
    """

    def __init__(self, data_files: List[str], region_size: Sequence[int], batch_size: int, seed: int,
                 start_batch: int = 0):
        super().__init__()
        if not data_files:
            raise ValueError("no cases to pretrain on: the dataset has no preprocessed images and no unlabeled "
                             "folder was given (check --no-labeled-images / --unlabeled / --exclude-fold)")
        self.data_files = list(data_files)
        self.region_size = tuple(int(r) for r in region_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_batch = int(start_batch)
        self._open: Dict[str, "blosc2.NDArray"] = {}

    def _array(self, path: str) -> "blosc2.NDArray":
        arr = self._open.get(path)
        if arr is None:
            arr = blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, mmap_mode="r")
            self._open[path] = arr
        return arr

    def sample(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """One region and its offset."""
        arr = self._array(self.data_files[int(rng.integers(len(self.data_files)))])
        start = []
        for n, r in zip(arr.shape[1:], self.region_size):
            if n >= r:
                start.append(int(rng.integers(0, n - r + 1)))
            else:  # case smaller than the region: centre it, pad both sides
                start.append(-((r - n) // 2))
        return read_region(arr, start, self.region_size), np.asarray(start, dtype=np.int64)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        blosc2.set_nthreads(1)
        idx = self.start_batch + wid
        while True:  # worker w makes batches w, w + W, ...; the DataLoader yields them in index order
            rng = np.random.default_rng([self.seed, idx])
            idx += nw
            items = [self.sample(rng) for _ in range(self.batch_size)]
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
