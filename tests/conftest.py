"""Shared, generic fixtures for the test suite (keep this file small)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence

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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded (``pytestmark = pytest.mark.usefixtures("one_thread")``): small 3D convolutions
    gain nothing from intra-op threads, and on a shared 2-core runner spinning OpenMP threads slow them down
    several-fold. The setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def coords() -> Callable[..., torch.Tensor]:
    """The :func:`coordinate_field` factory as a fixture."""
    return coordinate_field


# ------------------------------------------------------------------ fake nnU-Net results
def write_summary(path: "os.PathLike[str] | str", cases: List[dict]) -> None:
    """A validation ``summary.json`` written by nnU-Net's own ``save_summary_json`` (label keys as strings, keys
    sorted, NaN as NaN) for ``cases``, entries of ``metric_per_case`` (``reference_file``, ``prediction_file``,
    ``metrics``: ``{label: {metric: value}}``, numpy values allowed).

    ``mean`` holds, per label and metric, the mean over the cases without NaN, as nnU-Net computes it;
    ``foreground_mean`` the mean of the labels' means without NaN (where nnU-Net's plain mean would be NaN because
    a class is absent from every case, this one is the mean of the other classes).
    """
    import warnings

    import numpy as np
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    labels = list(cases[0]["metrics"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of a label that is NaN in every case
        means = {r: {m: float(np.nanmean([c["metrics"][r][m] for c in cases])) for m in cases[0]["metrics"][r]}
                 for r in labels}
        foreground = {m: float(np.nanmean([means[r][m] for r in labels])) for m in means[labels[0]]}
    for c in cases:
        recursive_fix_for_json_export(c)
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    save_summary_json({"metric_per_case": cases, "mean": means, "foreground_mean": foreground}, os.fspath(path))


# ------------------------------------------------------------------ end-to-end fixtures (stock nnU-Net in subprocesses)
BIN = os.path.dirname(sys.executable)
DATASET = "Dataset991_PGLE2E"
PRETRAINER_DIR = "nnUNetPretrainerPGL__nnUNetPlans__3d_fullres"


def run(cmd: List[str], env: Dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def planned(tmp_path_factory):
    """A small synthetic CT dataset, planned and preprocessed by stock nnU-Net, plus an unlabeled folder."""
    from nnunet_pgl.demo.synthetic import make_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0", OMP_NUM_THREADS="2")
    out = make_dataset(env["nnUNet_raw"], dataset_id=991, name="PGLE2E", num_train=6, num_unlabeled=2,
                       unlabeled_dir=str(root / "unlabeled"), shape=(24, 48, 48), seed=3,
                       unlabeled_formats=(".nii.gz", ".nrrd"))
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # planning calls set_num_threads(n_proc_DA)
    run([f"{BIN}/nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-npfp", "2", "-np", "2"], plan_env)
    return env, out["unlabeled"], root


@pytest.fixture(scope="session")
def pretrained(planned):
    env, unlabeled, root = planned
    p = run([f"{BIN}/pgl_pretrain", "-d", "991", "-device", "cpu", "--epochs", "2", "--iters-per-epoch", "2",
             "--unlabeled", unlabeled, "-np", "1", "--num-workers", "1"], env)
    out = root / "res" / DATASET / PRETRAINER_DIR / "fold_all"
    return env, out, p.stdout + p.stderr
