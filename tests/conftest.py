"""Shared, generic fixtures for the test suite (keep this file small)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    """Folder of the test data (plans, dataset.json)."""
    return DATA_DIR


def coordinate_field(size: Sequence[int], batch: int = 1, offset: Sequence[int] = (0, 0, 0),
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(batch, 3, *size)`` volume whose channels hold each voxel's own coordinates (z, y, x) + ``offset``.

    Built with ``arange``/``meshgrid`` here (independently of the package) so that tests can use it as the
    ground truth of a field that is linear in voxel coordinates.
    """
    axes = [torch.arange(int(n), dtype=dtype) + float(o) for n, o in zip(size, offset)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return grid.unsqueeze(0).expand(batch, 3, *grid.shape[1:]).contiguous()


@pytest.fixture
def coords() -> Callable[..., torch.Tensor]:
    """The :func:`coordinate_field` factory as a fixture."""
    return coordinate_field
