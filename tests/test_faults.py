"""Faults in real ``pgl_pretrain`` runs (subprocesses, stock nnU-Net underneath): SIGKILL at random moments, including
during unlabeled ingestion and during a checkpoint write, then resume; NaN/Inf losses. Faults are injected by
``fault_runner.py`` (slow checkpoint writes, non-finite losses); kills are real SIGKILLs."""
from __future__ import annotations

import datetime
import json
import os
import re
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET, run

pytestmark = pytest.mark.slow

RUNNER = str(Path(__file__).parent / "fault_runner.py")
OUT = Path(DATASET) / "nnUNetPretrainerPGL__nnUNetPlans__3d_fullres" / "fold_all"
CACHE = Path(DATASET) / "nnUNetPlans_3d_fullres_pgl_unlabeled"


def copy_preprocessed(root: Path, dst: Path) -> None:
    """The planned dataset without any unlabeled cache, so that ingestion starts from nothing."""
    shutil.copytree(root / "pre" / DATASET, dst / DATASET,
                    ignore=lambda d, names: [n for n in names if n.endswith("_pgl_unlabeled")])


# ------------------------------------------------------------------------------------------------ process helpers
def _stat(pid: int) -> Tuple[int, str, int]:
    """(ppid, state, start time) of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[1]), rest[0], int(rest[19])


def descendants(pid: int) -> List[Tuple[int, int]]:
    """(pid, start time) of every process below ``pid``."""
    children: Dict[int, List[Tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid, _, start = _stat(int(name))
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append((int(name), start))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c[0])
    return out


def still_running(proc: Tuple[int, int]) -> bool:
    try:
        _, state, start = _stat(proc[0])
    except (OSError, IndexError):
        return False
    return start == proc[1] and state not in "ZX"  # a zombie (no reaper in a container) has exited


# ------------------------------------------------------------------------------------------------ state checks
def checkpoint_epochs(out: Path) -> Dict[str, int]:
    """Load every checkpoint in ``out``: each must be complete (loads, finite weights). Their epochs."""
    epochs = {}
    for f in sorted(out.glob("*.pth")):
        ck = torch.load(f, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["network_weights"].values() if v.is_floating_point()), f
        epochs[f.name] = ck["current_epoch"]
    return epochs


def check_cache(cache: Path) -> int:
    """Every case the unlabeled index lists is complete and readable. The number of cases listed."""
    index = cache / "index.json"
    if not index.exists():
        return 0
    entries = json.loads(index.read_text())
    for e in entries:
        data = blosc2.open(urlpath=str(cache / (e["case_id"] + ".b2nd")), mode="r")[:]
        assert list(data.shape) == e["shape"] and np.isfinite(data).all()
        blosc2.open(urlpath=str(cache / (e["case_id"] + "_seg.b2nd")), mode="r")[:]
        with open(cache / (e["case_id"] + ".pkl"), "rb") as f:
            assert pickle.load(f)["pgl_sha256"] == e["sha256"]
    return len(entries)


EPOCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+): Epoch (\d+)$", re.M)


def epoch_lines(log: Path) -> List[Tuple[datetime.datetime, int]]:
    """(time, epoch) of every ``Epoch N`` line nnU-Net printed."""
    text = log.read_text() if log.exists() else ""
    return [(datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S.%f"), int(e)) for t, e in EPOCH_LINE.findall(text)]


def phase_of(log: Path, out: Path) -> str:
    """What the run was doing, from its output and files."""
    text = log.read_text() if log.exists() else ""
    def fresh(name: str) -> bool:  # written to right now (not a leftover of a killed run)
        try:
            return time.time() - (out / name).stat().st_mtime < 1.0
        except FileNotFoundError:  # renamed meanwhile
            return False

    if out.is_dir() and any(n.endswith(".tmp") and fresh(n) for n in os.listdir(out)):
        return "checkpoint write"
    if "Unlabeled: " not in text:
        return "ingestion" if "Unlabeled images:" in text else "start-up"
    lines = epoch_lines(log)
    return f"epoch {lines[-1][1]}" if lines else "trainer set-up"


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture
def fault_env(planned, tmp_path):
    env, _, root = planned
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    from nnunet_pgl.demo.synthetic import make_case
    for i in range(6):
        img = make_case(shape=(24, 48, 48), spacing=(2.5, 1.0, 1.0), rng=np.random.default_rng(500 + i))[0]
        im = sitk.GetImageFromArray(img)
        im.SetSpacing((1.0, 1.0, 2.5))
        sitk.WriteImage(im, str(unlabeled / f"u{i}.nii.gz"))
    return dict(env, PYTHONUNBUFFERED="1"), unlabeled, tmp_path


def test_kill_anywhere_then_resume(fault_env):
    """SIGKILL at 12 moments: the first during ingestion, the second in the middle of a checkpoint write, ten at
    random times. After each kill every checkpoint and every cached case on disk is complete and no child process
    survives; rerunning with --c finally reaches exactly the weights of an uninterrupted run with the same seed."""
    env, unlabeled, tmp = fault_env
    args = [sys.executable, RUNNER, "-d", "991", "-device", "cpu", "--epochs", "5", "--iters-per-epoch", "1",
            "--seed", "7", "--num-workers", "2", "--save-every", "1", "--unlabeled", str(unlabeled), "-np", "2", "--no-probe"]
    ref = dict(env, nnUNet_preprocessed=str(tmp / "pre_ref"), nnUNet_results=str(tmp / "res_ref"))
    copy_preprocessed(Path(env["nnUNet_preprocessed"]).parent, tmp / "pre_ref")
    t0 = time.monotonic()
    p = run(args, ref)
    t_ref = time.monotonic() - t0
    (tmp / "ref.log").write_text(p.stdout)
    ref_epochs = epoch_lines(tmp / "ref.log")
    t_epoch = float(np.median([(b[0] - a[0]).total_seconds() for a, b in zip(ref_epochs, ref_epochs[1:])])) + 0.4
    t_start = t_ref - 5 * t_epoch  # launch to the first epoch, ingestion included

    kill = dict(env, nnUNet_preprocessed=str(tmp / "pre"), nnUNet_results=str(tmp / "res"),
                PGL_FAULT_SLOW_SAVE="0.4")
    copy_preprocessed(Path(env["nnUNet_preprocessed"]).parent, tmp / "pre")
    out, cache = tmp / "res" / OUT, tmp / "pre" / CACHE
    rng = np.random.default_rng(2026)
    killed: List[Tuple[int, int]] = []
    report, last_epoch = [], 0
    for k in range(12):
        log = tmp / f"run{k}.log"
        marker = tmp / "half_written"
        with open(log, "w") as fh:
            p = subprocess.Popen(args + ["--c"], env=dict(kill, PGL_FAULT_PAUSE_SAVE=str(marker)) if k == 1 else kill,
                                 stdout=fh, stderr=subprocess.STDOUT)
        t1 = time.monotonic()
        if k == 0:  # while the unlabeled images are preprocessed: a worker has written a temporary case file
            while p.poll() is None and not (cache.is_dir() and any(n.startswith(".pgltmp-") for n in os.listdir(cache))):
                assert "Unlabeled: " not in log.read_text(), "ingestion ended before a temporary case file was seen"
                time.sleep(0.005)
        elif k == 1:  # in the middle of writing checkpoint_latest.pth: half of it is written, the run waits
            while p.poll() is None and not marker.exists():
                time.sleep(0.01)
        else:  # random: a moment of start-up (always once 3 epochs are done, so that work remains), else of
            # the first 1.3 epochs after start-up
            u_start, u_epoch, startup = rng.uniform(0.1, 1.0), rng.uniform(0.0, 1.3), rng.random() < 0.3
            if startup or last_epoch >= 3:
                deadline = t1 + u_start * t_start
                while p.poll() is None and time.monotonic() < deadline and not epoch_lines(log):
                    time.sleep(0.01)
            else:
                while p.poll() is None and not epoch_lines(log):
                    time.sleep(0.01)
                deadline = time.monotonic() + u_epoch * t_epoch
                while p.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
        assert p.poll() is None, f"run {k} ended before its kill:\n{log.read_text()[-3000:]}"
        phase = phase_of(log, out)
        procs = descendants(p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed += procs
        epochs = checkpoint_epochs(out) if out.is_dir() else {}
        cases = check_cache(cache)
        if k == 0:
            assert phase == "ingestion" and cases < 6, phase
            assert procs, "the ingest worker processes should have been running"
        if k == 1:
            assert phase == "checkpoint write"
            with pytest.raises((RuntimeError, EOFError, pickle.UnpicklingError)):  # really partial ...
                torch.load(out / "checkpoint_latest.pth.tmp", weights_only=True)
        epoch = max(epochs.values(), default=0)
        assert epoch >= last_epoch, "a kill lost a complete checkpoint"
        last_epoch = epoch
        report.append(f"kill {k:2d} at {time.monotonic() - t1:5.2f} s ({phase}): checkpoint epoch {epoch}, "
                      f"{cases} cached cases, {len(procs)} child processes")
    print("\n".join(report))

    p = run(args + ["--c"], kill)  # ... and is never read: the rerun removes it and goes on from the last complete one
    assert "Recovered a stale lock" in p.stdout
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")] and not (out / "pgl_pretrain.lock").exists()
    assert not [n for n in os.listdir(cache) if n.startswith(".pgltmp-")] and check_cache(cache) == 6
    a = torch.load(tmp / "res_ref" / OUT / "checkpoint_final.pth", weights_only=True)
    b = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert a["current_epoch"] == b["current_epoch"] == 5
    for part in ("network_weights", "pgl_heads", "pgl_target"):
        for name, v in a[part].items():
            assert torch.equal(v, b[part][name]), (part, name)
    assert [r["loss"] for r in a["pgl_log"]] == [r["loss"] for r in b["pgl_log"]]
    # loader workers (torch checks its parent every 5 s) and ingest workers (killed by the kernel) are gone
    deadline = time.monotonic() + 12
    while any(still_running(c) for c in killed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in killed if still_running(c)], "child processes outlived a killed pgl_pretrain"


def test_nonfinite_losses_are_skipped_then_stop_the_run(planned, tmp_path):
    """Step 1 gives +Inf (skipped, the run goes on); steps 4-8 give NaN: five in a row stop the run at epoch 2,
    iteration 2, with the message, exit code 1, the epoch-2 checkpoint kept and the lock released."""
    env, _, _ = planned
    env = dict(env, nnUNet_results=str(tmp_path), PGL_FAULT_INF_STEPS="1", PGL_FAULT_NAN_STEPS="4,5,6,7,8")
    args = [sys.executable, RUNNER, "-d", "991", "-device", "cpu", "--epochs", "4", "--iters-per-epoch", "3",
            "--save-every", "1", "--method", "byol", "--num-workers", "1", "--no-probe"]
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr[-3000:]
    out = tmp_path / DATASET / "nnUNetPretrainerBYOL__nnUNetPlans__3d_fullres" / "fold_all"
    msg = (f"5 consecutive non-finite losses, the last at epoch 2, iteration 2. The run stopped; its last checkpoint, "
           f"{out / 'checkpoint_latest.pth'} (epoch 2), is kept: lower the learning rate (--lr) or check the data "
           f"for NaN/Inf, and resume from it with --c")
    assert f"pgl_pretrain: error: {msg}" in p.stderr and f"ERROR: {msg}" in p.stdout
    assert "Traceback" not in p.stderr
    assert "non-finite loss (inf) at epoch 0, iteration 1: step skipped (1 in a row)" in p.stdout
    assert "non-finite loss (nan) at epoch 1, iteration 1: step skipped (1 in a row)" in p.stdout
    assert checkpoint_epochs(out) == {"checkpoint_latest.pth": 2}  # finite weights: bad steps never updated them
    ck = torch.load(out / "checkpoint_latest.pth", weights_only=True)
    assert ck["bad_steps_total"] == 3 and [r["bad_steps"] for r in ck["pgl_log"]] == [1, 2]
    assert not (out / "pgl_pretrain.lock").exists()
    clean = {k: v for k, v in env.items() if not k.startswith("PGL_FAULT")}
    p = run(args + ["--c"], clean)
    assert checkpoint_epochs(out) == {"checkpoint_final.pth": 4}
    assert "Epoch 2" in p.stdout and "Epoch 1" not in p.stdout
    # five bad steps before the first checkpoint: nothing to resume from, and the message says so
    env = dict(clean, nnUNet_results=str(tmp_path / "early"), PGL_FAULT_NAN_STEPS="0,1,2,3,4")
    p = subprocess.run([sys.executable, RUNNER, "-d", "991", "-device", "cpu", "--epochs", "4", "--iters-per-epoch",
                        "3", "--save-every", "5", "--method", "byol", "--num-workers", "0", "--no-probe"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert ("epoch 1, iteration 1. The run stopped; no checkpoint was written yet (the first comes after 5 epochs): "
            "lower the learning rate (--lr) or check the data for NaN/Inf, and rerun without --c") in p.stderr


def test_second_run_on_the_same_folder_is_refused(planned, tmp_path):
    """While a run holds its output folder, a second pgl_pretrain into it stops with exit code 2, names the owner
    (host, pid) and leaves the running one and its files alone."""
    env, _, _ = planned
    env = dict(env, nnUNet_results=str(tmp_path))
    args = [sys.executable, RUNNER, "-d", "991", "-device", "cpu", "--epochs", "100", "--iters-per-epoch", "1",
            "--method", "byol", "--num-workers", "0"]
    lock = tmp_path / DATASET / "nnUNetPretrainerBYOL__nnUNetPlans__3d_fullres" / "fold_all" / "pgl_pretrain.lock"
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        first = subprocess.Popen(args, env=dict(env, PYTHONUNBUFFERED="1"), stdout=fh, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()  # until its trainer runs: the lock is taken for good by then
        while not epoch_lines(log) and first.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.05)
        owner = json.loads(lock.read_text())
        assert owner["pid"] == first.pid
        # the second run names an unlabeled folder too: refused before ingesting, it leaves the cache as it was
        unl = tmp_path / "unlabeled"
        unl.mkdir()
        from nnunet_pgl.demo.synthetic import make_case
        im = sitk.GetImageFromArray(make_case(shape=(24, 48, 48), rng=np.random.default_rng(9))[0])
        im.SetSpacing((1.0, 1.0, 2.5))
        sitk.WriteImage(im, str(unl / "u.nii.gz"))
        cache = Path(env["nnUNet_preprocessed"]) / CACHE
        before = sorted(os.listdir(cache)) if cache.is_dir() else None
        p = subprocess.run(args + ["--unlabeled", str(unl)], env=env, capture_output=True, text=True)
        assert (sorted(os.listdir(cache)) if cache.is_dir() else None) == before
        assert "Unlabeled images:" not in p.stdout
        assert p.returncode == 2
        assert (f"another pgl_pretrain run (host {owner['host']}, pid {first.pid}, started {owner['started']}) is "
                f"using {lock.parent}. Wait for it to finish, or stop it") in p.stderr
        assert first.poll() is None and json.loads(lock.read_text()) == owner
    finally:
        first.kill()
        first.wait()
