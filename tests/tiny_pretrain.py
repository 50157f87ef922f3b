"""A tiny preprocessed dataset written directly in nnU-Net's format, and pretraining runs on it in this process.

For tests of the pretrainer's own code paths (schedules, resume, devices) that need a real trainer but not a real
dataset: no planning subprocess, a 5-stage ``PlainConvUNet`` of 4-8 channels, a 16×32×32 patch, 2 cases. A run of
one epoch of 2 iterations takes a few seconds of one CPU core.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

DATA_DIR = Path(__file__).parent / "data"
DATASET_ID = 993
DATASET = f"Dataset{DATASET_ID}_PGLTiny"
CASE_SHAPE = (20, 40, 40)


def make_tiny_dataset(root: Path, num_cases: int = 2) -> Dict[str, str]:
    """Write plans, dataset.json, fingerprint and ``num_cases`` smooth random cases under ``root``; the env vars."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    plans = json.loads((DATA_DIR / "plans_plain.json").read_text())
    plans["dataset_name"] = DATASET
    cfg = plans["configurations"]["3d_fullres"]
    cfg.update(patch_size=[16, 32, 32], batch_size=2, median_image_size_in_voxels=list(CASE_SHAPE))
    cfg["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 8, 8, 8]
    pre = root / "pre" / DATASET
    data = pre / cfg["data_identifier"]
    data.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text((DATA_DIR / "dataset.json").read_text())
    (pre / "dataset_fingerprint.json").write_text("{}")
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in CASE_SHAPE], indexing="ij")
    for i in range(num_cases):
        k = rng.uniform(2, 6, size=3)
        img = (np.sin(k[0] * z * 3) + np.cos(k[1] * y * 3) * np.sin(k[2] * x * 3)
               + 0.1 * rng.standard_normal(CASE_SHAPE))[None].astype(np.float32)
        seg = np.zeros((1, *CASE_SHAPE), np.int8)
        nnUNetDatasetBlosc2.save_case(img, seg, {"spacing": [2.5, 1.0, 1.0]}, str(data / f"case_{i:03d}"),
                                      chunks=(1, *CASE_SHAPE), blocks=(1, 10, 20, 20))
    for d in ("raw", "res"):
        (root / d).mkdir(exist_ok=True)
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
            "nnUNet_results": str(root / "res")}


def output_folder(root: Path, trainer: str = "nnUNetPretrainerPGL") -> Path:
    return root / "res" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_all"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny dataset under ``tmp_path`` with nnU-Net's variables pointing at it; returns ``tmp_path``.

    Every variable that ``pgl_pretrain`` sets in its own process is registered here first, so it is restored after
    the test.
    """
    for k, v in make_tiny_dataset(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_compile", "f")
    for k in ("nnUNet_pgl_config", "nnUNet_extTrainer", "OMP_NUM_THREADS"):
        if k in os.environ:
            monkeypatch.setenv(k, os.environ[k])
        else:  # set, then delete: the undo deletes what pgl_pretrain sets
            monkeypatch.setenv(k, "")
            monkeypatch.delenv(k)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def pgl_pretrain(*args: str) -> None:
    """``pgl_pretrain -d <tiny> -device cpu --num-workers 0 ARGS`` in this process (use with the ``tiny`` fixture)."""
    from nnunet_pgl.pretraining.cli import main
    main(["-d", str(DATASET_ID), "-device", "cpu", "--num-workers", "0", *args])


def load_checkpoint(path: Path) -> Dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def log_lines(folder: Path) -> List[str]:
    """The lines of the newest nnU-Net training log in ``folder``."""
    logs = sorted(folder.glob("training_log_*.txt"), key=os.path.getmtime)
    return logs[-1].read_text().splitlines() if logs else []
