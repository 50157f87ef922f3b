"""How cached ingestion and ``pgl_pretrain``'s start-up grow with the number of unlabeled cases (CPU).

    python benchmarks/corpus_scale.py [--counts 100 2000] [--repeat 3] [--workdir DIR] [--json PATH]

Makes a small synthetic CT dataset (4 labeled cases) planned and preprocessed by stock nnU-Net, and
``max(--counts)`` tiny unlabeled CT-like volumes (8×16×16 voxels, ``.nii.gz``). For each count N, in its own
``nnUNet_preprocessed`` / ``nnUNet_results`` copy:

1. ``ingest_unlabeled`` of the first N volumes, nothing cached yet (``-np 2``; skipped when ``--workdir`` holds a
   finished one);
2. ``ingest_unlabeled`` again, ``--repeat`` times, with every case cached: wall time, and how often it called the
   header probe (SimpleITK), the hash and the preprocessing of a case (all three should be 0);
3. ``pgl_pretrain --unlabeled <N volumes> -device cpu --num-workers 2`` (cached), ``--repeat`` times, stopped at its
   first training step: seconds from the command's start to the first step, and the parts of it that can grow with
   N (ingestion, writing and reading ``pgl_config.json``, the case list, the loader's construction and its first
   batch). The dense probe at the start of a run (``--no-probe`` where the version has it) is switched off: it
   works on a fixed number of labeled cases, whatever N.

It first measures what a loader worker pays for reopening a case instead of keeping it open (``blosc2.open``
against one region read, nnU-Net's blosc2 parameters; ``--reopen-only``: only that). Tiny volumes keep the set-up
short; what is timed per case (file system, index and configuration bookkeeping)
does not depend on the volume size, except the first ingestion.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

DATASET_ID = 994
DATASET = "Dataset994_PGLScale"
UNL_SHAPE = (8, 16, 16)


def _env(root: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "pre"),
               nnUNet_results=os.path.join(root, "res"), nnUNet_def_n_proc="2", OMP_NUM_THREADS="1")
    return env


def _setup(work: str, max_count: int) -> str:
    """Plan the labeled dataset (once) and write ``max_count`` unlabeled volumes; returns their folder."""
    import numpy as np
    from nnunet_pgl.demo.synthetic import make_case, make_dataset, write_image
    base = os.path.join(work, "base")
    if not os.path.isfile(os.path.join(base, "pre", DATASET, "nnUNetPlans.json")):
        env = _env(base)
        make_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID, name="PGLScale", num_train=4, shape=(16, 32, 32))
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_plan_and_preprocess"), "-d",
                        str(DATASET_ID), "-c", "3d_fullres", "-npfp", "2", "-np", "2"], env=env, check=True,
                       capture_output=True)
    unl = os.path.join(work, "unlabeled_all")
    os.makedirs(unl, exist_ok=True)
    for i in range(max_count):
        p = os.path.join(unl, f"unl_{i:05d}.nii.gz")
        if not os.path.isfile(p):  # one seed per volume: distinct contents, whichever volumes exist already
            write_image(make_case(UNL_SHAPE, (2.5, 1.0, 1.0), np.random.default_rng(i))[0], (2.5, 1.0, 1.0), p)
    return unl


def _managers(root: str):
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    base = join(root, "pre", DATASET)
    pm = PlansManager(join(base, "nnUNetPlans.json"))
    return pm, pm.get_configuration("3d_fullres"), load_json(join(base, "dataset.json")), base


def _reopen_cost(work: str) -> List[Dict[str, Any]]:
    """What a loader worker pays per read without a cache of open arrays: ``blosc2.open`` of a case against one
    region read from it, for cases written with nnU-Net's blosc2 parameters (page cache warm)."""
    import blosc2
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunet_pgl.pretraining.loader import read_region
    blosc2.set_nthreads(1)
    folder = os.path.join(work, "reopen")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    # (name, case shape (C, Z, Y, X), patch, region = ceil(1.4 · patch))
    for name, shape, patch, region in (("tiny", (1, 8, 8, 8), (8, 8, 8), (12, 12, 12)),
                                       ("128^3", (1, 128, 128, 128), (128, 128, 128), (180, 180, 180)),
                                       ("128^3, patch 64^3", (1, 128, 128, 128), (64, 64, 64), (90, 90, 90)),
                                       ("CT 256x320x320", (1, 256, 320, 320), (128, 128, 128), (180, 180, 180))):
        axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape[1:]]
        z, y, x = np.meshgrid(*axes, indexing="ij")  # smooth + noise: compresses like an image, not like zeros
        data = (np.sin(6 * z) * np.cos(5 * y) + x + 0.1 * rng.standard_normal(shape[1:]))[None].astype(np.float32)
        seg = np.zeros(shape, np.int16)
        blocks, chunks = comp_blosc2_params(shape, patch, 4)
        blocks_seg, chunks_seg = comp_blosc2_params(shape, patch, 2)
        prefix = os.path.join(folder, name.replace(" ", "_").replace(",", "").replace("^", ""))
        nnUNetDatasetBlosc2.save_case(data, seg, {}, prefix, chunks=chunks, blocks=blocks, chunks_seg=chunks_seg,
                                      blocks_seg=blocks_seg)
        path = prefix + ".b2nd"
        n_open = 200 if name == "tiny" else 50
        t = time.perf_counter()
        for _ in range(n_open):
            a = blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, mmap_mode="r")
            del a
        t_open = (time.perf_counter() - t) / n_open
        a = blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, mmap_mode="r")
        reads = []
        for _ in range(20):
            start = [int(rng.integers(0, n - r + 1)) if n >= r else -((r - n) // 2)
                     for n, r in zip(shape[1:], region)]
            t = time.perf_counter()
            read_region(a, start, region)
            reads.append(time.perf_counter() - t)
        t_read = statistics.median(reads)
        out.append({"case": name, "shape": list(shape), "chunks": list(chunks), "blocks": list(blocks),
                    "region": list(region), "open_ms": 1e3 * t_open, "read_ms": 1e3 * t_read})
        print(f"reopen cost, {name}: chunks {chunks}, blocks {blocks}; open {1e3 * t_open:.3f} ms, region "
              f"{region} read {1e3 * t_read:.1f} ms (open = {100 * t_open / t_read:.1f} % of the read)")
    shutil.rmtree(folder, ignore_errors=True)
    return out


def _count_calls(targets: List[Tuple[Any, str]]) -> Dict[str, int]:
    """Count the calls of each ``module.name`` (wrapped in place; the caller restores them)."""
    counts = {n: 0 for _, n in targets}
    for module, n in targets:
        real = getattr(module, n)

        def wrapped(*a, _real=real, _n=n, **k):
            counts[_n] += 1
            return _real(*a, **k)
        setattr(module, n, wrapped)
    return counts


def _startup_child(out_json: str, argv: List[str]) -> None:
    """Run ``pgl_pretrain argv`` in this process, timing its parts, and stop at the first training step."""
    t0 = time.perf_counter()
    times: Dict[str, float] = {}

    def timed(owner: Any, name: str, key: str, first_only: bool = False) -> None:
        real = getattr(owner, name)

        def wrapped(*a, **k):
            s = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                if not (first_only and key in times):
                    times[key] = times.get(key, 0.0) + time.perf_counter() - s
        setattr(owner, name, wrapped)

    from nnunet_pgl.pretraining import cli, ingest, loader, pretrainer
    from nnunet_pgl.pretraining.config import PretrainConfig
    timed(ingest, "ingest_unlabeled", "ingest")
    timed(PretrainConfig, "save", "config_save")
    timed(PretrainConfig, "load", "config_load")
    timed(pretrainer.nnUNetPretrainerPGL, "_case_lists", "case_lists")
    timed(pretrainer.nnUNetPretrainerPGL, "get_dataloaders", "get_dataloaders")
    timed(pretrainer.nnUNetPretrainerPGL, "on_train_start", "on_train_start")
    timed(loader.TimedLoader, "__next__", "first_batch", first_only=True)

    class _Stop(BaseException):
        pass

    def first_step(self, batch):
        times["to_first_step"] = time.perf_counter() - t0
        raise _Stop

    pretrainer.nnUNetPretrainerPGL.train_step = first_step
    try:
        cli.main(argv)
    except _Stop:
        pass
    with open(out_json, "w") as f:
        json.dump(times, f)
    os._exit(0)  # leave the loader workers to die with this process (they watch their parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 2000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="reused if it holds the dataset and volumes already")
    ap.add_argument("--json", default=None)
    ap.add_argument("--reopen-only", action="store_true", help="only measure the cost of reopening a case")
    ap.add_argument("--ingest-only", action="store_true", help="skip the pgl_pretrain start-up runs (step 3)")
    ap.add_argument("--startup-child", nargs=argparse.REMAINDER, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.startup_child is not None:
        _startup_child(args.startup_child[0], args.startup_child[1:])
        return

    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="pgl_scale_")
    results: Dict[str, Any] = {"reopen": [] if args.ingest_only else _reopen_cost(work), "counts": {}}
    if args.reopen_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    t = time.perf_counter()
    unl_all = _setup(work, max(args.counts))
    print(f"set-up (dataset, {max(args.counts)} volumes): {time.perf_counter() - t:.0f} s in {work}")

    import warnings
    from nnunet_pgl.pretraining import cli, ingest
    # the start-of-run dense probe (where this version has one) scores labeled cases only, the same for every N
    no_probe = ["--no-probe"] if "--no-probe" in cli.build_parser()._option_string_actions else []
    for n in args.counts:
        root = os.path.join(work, f"n{n}")
        unl = os.path.join(root, "unlabeled")
        done = os.path.join(root, "ingested")  # a finished first ingestion of this count: reused
        if not os.path.isfile(done):
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            shutil.copytree(os.path.join(work, "base", "pre"), os.path.join(root, "pre"))
            os.makedirs(unl)
            for i in range(n):  # hard links: same files, same (size, mtime)
                name = f"unl_{i:05d}.nii.gz"
                os.link(os.path.join(unl_all, name), os.path.join(unl, name))
        env = _env(root)
        os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet")})
        pm, cm, dj, base = _managers(root)
        r: Dict[str, Any] = {"ingest_first_s": None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not os.path.isfile(done):
                t = time.perf_counter()
                ingest.ingest_unlabeled([unl], pm, cm, dj, base, num_processes=2, verbose=False)
                r["ingest_first_s"] = time.perf_counter() - t
                open(done, "w").close()
            targets = [(ingest.discovery, "probe"), (ingest.integrity, "hash_and_check"),
                       (ingest.preprocessing, "preprocess_case")]
            real = {(m, k): getattr(m, k) for m, k in targets}
            counts = _count_calls(targets)
            cached = []
            try:
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    ingest.ingest_unlabeled([unl], pm, cm, dj, base, num_processes=2, verbose=False)
                    cached.append(time.perf_counter() - t)
            finally:
                for (m, k), f in real.items():
                    setattr(m, k, f)
        r["ingest_cached_s"] = cached
        r["cached_calls"] = counts
        startups = []
        for k in range(0 if args.ingest_only else args.repeat):
            out_json = os.path.join(root, f"startup_{k}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--startup-child", out_json, "-d", str(DATASET_ID),
                   "--unlabeled", unl, "-device", "cpu", "--num-workers", "2", "-np", "2", "--epochs", "1",
                   "--iters-per-epoch", "1"] + no_probe
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0 or not os.path.isfile(out_json):
                raise SystemExit(f"pgl_pretrain start-up run failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                                 f"{p.stderr[-3000:]}")
            with open(out_json) as f:
                startups.append(json.load(f))
        r["startup"] = startups
        results["counts"][str(n)] = r
        med: Callable[[List[float]], float] = statistics.median
        first = "reused" if r["ingest_first_s"] is None else f"{r['ingest_first_s']:.1f} s"
        print(f"N={n}: first ingest {first}; cached ingest median {med(cached):.3f} s, min {min(cached):.3f} s "
              f"(runs {', '.join(f'{c:.3f}' for c in cached)}), calls {counts}")
        keys = ["to_first_step", "ingest", "config_save", "config_load", "case_lists", "get_dataloaders",
                "first_batch", "on_train_start"]
        if startups:
            print("  start-up medians: " + ", ".join(f"{k} {med([s.get(k, 0.0) for s in startups]):.3f} s"
                                                     for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
