"""Argument handling of ``benchmarks/gpu_check.sh`` (the interface other scripts call: ``[--tiny] OUT_DIR``).

The run itself is not in the suite: its tiny CPU mode takes minutes (see BENCHMARKS.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
USAGE = "usage: bash benchmarks/gpu_check.sh [--tiny] OUT_DIR"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_help_prints_usage():
    p = _run("--help")
    assert p.returncode == 0 and p.stdout.startswith(USAGE)


@pytest.mark.parametrize("args", [(), ("--tiny",), ("--bogus", "x"), ("a", "b")])
def test_bad_arguments_exit_2_with_usage(args, tmp_path):
    p = _run(*args)
    assert p.returncode == 2 and USAGE in p.stderr
    assert not Path("a").exists()


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    p = _run("--tiny", str(tmp_path))
    assert p.returncode == 2 and "not an empty folder" in p.stderr
    assert os.listdir(tmp_path) == ["keep.txt"]  # nothing written, nothing removed


def test_broken_python_fails_before_any_step(tmp_path):
    out = tmp_path / "out"
    p = _run("--tiny", str(out), PYTHON="/bin/false")
    assert p.returncode == 2 and "set PYTHON to the project's environment" in p.stderr
    assert not (out / "logs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_mode_without_cuda_points_to_tiny(tmp_path):
    p = _run(str(tmp_path / "out"))
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "--tiny" in p.stderr


@pytest.mark.slow
def test_torchrun_with_one_process_runs_the_ddp_code(planned, tmp_path):
    """gpu_check.sh's ddp_1rank step on CPU: any torchrun launch, one process too, trains under DDP (gloo here)."""
    import json

    from conftest import BIN, DATASET, run
    env, _, _ = planned
    run([f"{BIN}/torchrun", "--standalone", "--nproc_per_node", "1", f"{BIN}/pgl_pretrain", "-d", "991",
         "-device", "cpu", "--epochs", "1", "--iters-per-epoch", "1", "--num-workers", "0", "--no-probe"],
        dict(env, nnUNet_results=str(tmp_path), OMP_NUM_THREADS="1"))
    log = json.loads((tmp_path / DATASET / "nnUNetPretrainerPGL__nnUNetPlans__3d_fullres" / "fold_all" /
                      "pgl_log.json").read_text())
    assert log[-1]["ranks_in_sync"] is True  # recorded under DDP only
