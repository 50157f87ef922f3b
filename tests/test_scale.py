"""Corpus scale on CPU: thousands of cases must not exhaust file descriptors, and a cached re-run stays cheap.

The cases are written directly in nnU-Net's preprocessed blosc2 format (``nnUNetDatasetBlosc2.save_case`` with the
chunks and blocks of ``comp_blosc2_params``, as ``DefaultPreprocessor.run_case_save`` writes them), so no nnU-Net
preprocessing runs and the test stays cheap.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import numpy as np
import pytest

NUM_CASES = 2000
CASE_SHAPE = (1, 6, 7, 8)  # (C, Z, Y, X)
FD_LIMIT = 256

# Runs in a child process whose soft RLIMIT_NOFILE is FD_LIMIT (the loader workers inherit it). Case i holds the
# constant value i + 1, so the maximum of a batch item names the case it was read from, however regions are drawn.
_STREAM = textwrap.dedent("""
    import json, os, resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, hard))
    from nnunet_pgl.pretraining.loader import RegionDataset, TimedLoader

    def fds(pid):
        try:
            return len(os.listdir(f"/proc/{{pid}}/fd"))
        except FileNotFoundError:  # a worker that exited meanwhile
            return 0

    def children(pid):
        out = set()
        for tid in os.listdir(f"/proc/{{pid}}/task"):
            with open(f"/proc/{{pid}}/task/{{tid}}/children") as f:
                out.update(int(c) for c in f.read().split())
        return sorted(out)

    files = json.load(open(sys.argv[1]))
    ds = RegionDataset(files, (8, 8, 8), batch_size=8, seed=0)
    loader = TimedLoader(ds, num_workers=2, pin_memory=False)
    me = os.getpid()
    seen, main_fds, worker_fds, workers = set(), [], [], set()
    for step in range({batches}):
        batch = next(loader)
        seen.update(int(v) for v in batch["data"].flatten(1).max(1).values)
        kids = children(me)
        workers.update(kids)
        main_fds.append(fds(me))
        worker_fds.append([fds(k) for k in kids])
    loader.close()
    print(json.dumps({{"limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "seen": sorted(seen),
                       "main_fds": main_fds, "worker_fds": worker_fds, "workers": sorted(workers)}}))
""")


def write_cases(folder: Path, n: int) -> List[str]:
    """``n`` cases ``case_XXXX`` (data, seg, pkl) as nnU-Net's preprocessing writes them; case i is constant i+1."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    folder.mkdir(parents=True, exist_ok=True)
    patch = CASE_SHAPE[1:]
    blocks, chunks = comp_blosc2_params(CASE_SHAPE, patch, 4)
    blocks_seg, chunks_seg = comp_blosc2_params(CASE_SHAPE, patch, 2)
    seg = np.zeros(CASE_SHAPE, np.int16)
    out = []
    for i in range(n):
        prefix = str(folder / f"case_{i:04d}")
        nnUNetDatasetBlosc2.save_case(np.full(CASE_SHAPE, i + 1, np.float32), seg, {"case": i}, prefix,
                                      chunks=chunks, blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        out.append(prefix + ".b2nd")
    return out


@pytest.mark.slow
def test_loader_descriptors_stay_bounded_over_2000_cases(tmp_path):
    """2 loader workers stream batches from 2,000 cases under a soft limit of 256 descriptors: every process's
    open descriptors stay bounded (LRU of open arrays) while far more distinct cases than the limit are read."""
    files = write_cases(tmp_path / "nnUNetPlans_3d_fullres", NUM_CASES)
    (tmp_path / "files.json").write_text(json.dumps(files))
    script = tmp_path / "stream.py"
    script.write_text(_STREAM.format(limit=FD_LIMIT, batches=160))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "files.json")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, f"streaming failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["limit"] == FD_LIMIT
    assert len(res["workers"]) == 2
    seen = res["seen"]
    assert set(seen) <= set(range(1, NUM_CASES + 1))
    assert len(seen) > 2 * FD_LIMIT  # on average each worker alone read more distinct cases than the limit
    from nnunet_pgl.pretraining.loader import MAX_OPEN_ARRAYS
    assert MAX_OPEN_ARRAYS <= FD_LIMIT // 8
    # bounded, and not growing with the cases read: the last half of the run holds no more descriptors than the
    # first quarter (a third of the distinct cases read so far) plus the jitter of batches in flight
    main, workers = res["main_fds"], res["worker_fds"]
    quarter, half = len(main) // 4, len(main) // 2
    assert max(main) <= FD_LIMIT // 4, main
    assert max(main[half:]) <= max(main[:quarter]) + 8, main
    per_step = [max(w) for w in workers if w]
    assert max(per_step) <= FD_LIMIT // 4, workers
    assert max(per_step[half:]) <= max(per_step[:quarter]) + 8, workers


@pytest.mark.slow
def test_pgl_pretrain_summarises_warnings_and_writes_the_report(planned, tmp_path):
    """``pgl_pretrain --unlabeled`` over 7 MR-like and 7 unreadable files: one warning per kind on stderr (not one
    per file) and every file in ``unlabeled_warnings.txt`` in the output folder (training itself stubbed out)."""
    import SimpleITK as sitk
    from nnunet_pgl.demo.synthetic import make_case
    env, _, _ = planned
    env = dict(env, nnUNet_results=str(tmp_path / "res"))
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    rng = np.random.default_rng(5)
    for name, arr in [("ct.nii.gz", make_case(shape=(12, 24, 24), rng=rng)[0])] + \
            [(f"mr_{i}.nii.gz", rng.uniform(0, 1000, size=(12, 24, 24)).astype(np.float32)) for i in range(7)]:
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((1.0, 1.0, 2.5))
        sitk.WriteImage(im, str(unl / name))
    for i in range(7):
        (unl / f"bad_{i}.nii.gz").write_bytes(b"not an image")
    driver = ("import nnunetv2.run.run_training as r\n"
              "r.run_training = lambda *a, **k: None  # ingestion and configuration only\n"
              "import sys\nfrom nnunet_pgl.pretraining.cli import main\nmain(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", driver, "-d", "991", "-device", "cpu", "-np", "1", "--unlabeled",
                        str(unl)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stderr.count("IngestWarning") == 2, p.stderr
    assert "7 unlabeled image file(s) do not look like CT in Hounsfield units" in p.stderr
    assert "skipped 7 unlabeled file(s)" in p.stderr and p.stderr.count("... and 2 more") == 2
    from nnunet_pgl.pretraining.ingest import REPORT_FILE
    out = tmp_path / "res" / "Dataset991_PGLE2E" / "nnUNetPretrainerPGL__nnUNetPlans__3d_fullres" / "fold_all"
    report = (out / REPORT_FILE).read_text()
    assert f"(all 7 in {out / REPORT_FILE})" in p.stderr
    for i in range(7):
        assert f"{unl / f'mr_{i}.nii.gz'}: channel 0 (CT) does not look like CT" in report
        assert f"{unl / f'bad_{i}.nii.gz'}: SimpleITK cannot read it" in report
    assert "ct.nii.gz" not in report
