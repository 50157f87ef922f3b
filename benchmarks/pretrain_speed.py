"""Time the stock nnU-Net supervised train step against the pgl_pretrain step, same plan, batch and device.

    python benchmarks/pretrain_speed.py [--tiny] [-d D -c C -p P] [--steps N] [--json PATH]
    python benchmarks/pretrain_speed.py --patch 128 128 128 --case-scale 2.6 --loader-only   # data path alone

``--tiny`` makes a small synthetic CT dataset in a temporary folder and plans it with stock nnU-Net (a CI-sized
plan); otherwise ``-d`` names a planned and preprocessed dataset (``nnUNet_*`` variables set). Both trainers are
built by nnU-Net's own code from the same plans; batches are already on the device (random data of the right
shape: the supervised step gets a patch batch with deep-supervision targets, the PGL step a batch of region pairs
from which it makes the views). The data path (loader workers reading region pairs from blosc2, views made on the
device) is measured after the steps, or alone with ``--loader-only``. Reports medians of ``--steps`` steps after
warm-up (CUDA events on GPU; on CPU the two steps alternate, so that load drift on the host hits both alike), peak
device memory, the ratios, the loader's pairs/s, and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List


def _timeit(fn: Callable[[], Any], steps: int, warmup: int, device) -> List[float]:
    import torch
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t0))
    return out


def _profile(fn: Callable[[], Any], title: str, top: int, device) -> None:
    """Print the torch profiler's operators of one call of ``fn``, by self time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            import torch
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile: {title}")
    print(prof.key_averages().table(sort_by=key, row_limit=top))


def _make_synthetic(root: str, shape=(24, 48, 48), spacing=(2.5, 1.0, 1.0), num_cases: int = 5) -> str:
    """A synthetic CT dataset planned and preprocessed by stock nnU-Net in ``root``; its id."""
    from nnunet_pgl.demo.synthetic import make_dataset
    os.environ.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "pre"),
                      nnUNet_results=os.path.join(root, "res"))
    make_dataset(os.environ["nnUNet_raw"], dataset_id=993, name="PGLBench", num_train=num_cases, shape=shape,
                 spacing=spacing)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    n = str(min(8, os.cpu_count() or 2))
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_plan_and_preprocess"), "-d", "993",
                    "-c", "3d_fullres", "-npfp", n, "-np", n], env=env, check=True, capture_output=True)
    return "993"


def _plans_for_patch(dataset: str, patch, batch_size: int, arch: str) -> str:
    """Write plans ``nnUNetPlans_bench_<arch>`` whose 3d_fullres has ``patch``, ``batch_size`` and the topology
    nnU-Net's own planner derives for that patch (plain: ExperimentPlanner; resenc: ResEncUNetPlanner, the
    topology of ResEnc M/L/XL, which differ only in their memory target). The preprocessed data is shared."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
        ResEncUNetPlanner
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = f"nnUNetPlans_bench_{arch}"
    cls = ResEncUNetPlanner if arch == "resenc" else ExperimentPlanner
    # a memory target so large that the planner keeps the whole patch (the initial patch is clipped to the
    # "median shape" we pass: the requested patch)
    planner = cls(dataset, gpu_memory_target_in_gb=1e6, plans_name=name)
    base = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans = load_json(join(base, "nnUNetPlans.json"))
    cfg = plans["configurations"]["3d_fullres"]
    new = planner.get_plans_for_configuration(cfg["spacing"], patch, cfg["data_identifier"], 1e12, {})
    if list(new["patch_size"]) != list(patch):
        raise SystemExit(f"nnU-Net's topology for spacing {cfg['spacing']} needs patch {list(new['patch_size'])} (divisible by "
                         f"its pooling), not {list(patch)}: pass that patch")
    cfg.update(patch_size=list(patch), batch_size=batch_size, architecture=new["architecture"])
    plans["plans_name"] = name
    save_json(plans, join(base, name + ".json"), sort_keys=False)
    return name


def _short_run_wait(args, dataset_name: str, device) -> Any:
    """Data-wait fraction of epoch 1 of a real 2-epoch pgl_pretrain run (epoch 0 includes start-up)."""
    out = tempfile.mkdtemp(prefix="pgl_bench_run_")
    env = dict(os.environ, nnUNet_results=out)
    iters = 20 if device.type == "cuda" else 4
    cmd = [os.path.join(os.path.dirname(sys.executable), "pgl_pretrain"), "-d", dataset_name, "-c",
           args.configuration, "-p", args.plans, "-device", device.type, "--epochs", "2", "--iters-per-epoch",
           str(iters), "--num-workers", "4"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-2000:])
        return None
    for root, _, fs in os.walk(out):
        if "pgl_log.json" in fs:
            with open(os.path.join(root, "pgl_log.json")) as f:
                return json.load(f)[-1]["data_wait_fraction"]
    return None


def _data_path(files: List[str], patch, bs: int, scale_range, min_overlap: float, device,
               workers_list=(0, 2, 4)) -> Dict[str, Any]:
    """Pairs/s delivered by the region loader (``RegionDataset`` + ``TimedLoader``) with the views made on
    ``device``, per number of workers; the regions' bytes per pair; the mean overlap of the pairs made."""
    import torch
    from nnunet_pgl import make_view_pair
    from nnunet_pgl.pretraining.loader import RegionDataset, TimedLoader, region_size_for
    from nnunet_pgl.views import pair_overlap

    region = region_size_for(patch, scale_range[1])
    out: Dict[str, Any] = {"region_size": list(region), "regions_per_pair": 2, "files": len(files),
                           "pairs_per_s": {}, "read_ms_per_pair": {}}
    overlaps = []
    for workers in workers_list:
        ds = RegionDataset(files, region, bs, seed=0, patch_size=patch, scale_range=tuple(scale_range),
                           min_overlap=min_overlap)
        loader = TimedLoader(ds, workers, pin_memory=device.type == "cuda")
        n = 3 * max(workers, 1) + 5
        b = next(loader)  # start the workers
        out["mb_per_pair"] = b["data"][0].numel() * b["data"].element_size() / 2 ** 20
        t0 = time.perf_counter()
        for _ in range(n):
            b = next(loader)
            d = b["data"].to(device, non_blocking=True)
            _, _, pa, pb = make_view_pair(d[:, 0], patch, scale_range=tuple(scale_range), min_overlap=min_overlap,
                                          region_offset=b["offset"][:, 0], region_b=d[:, 1],
                                          region_offset_b=b["offset"][:, 1])
            overlaps.append(pair_overlap(pa, pb).cpu())
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out["pairs_per_s"][str(workers)] = n * bs / dt
        out["read_ms_per_pair"][str(workers)] = 1000 * dt / (n * bs) * max(workers, 1)  # per worker process
        loader.close()
    out["mean_overlap"] = float(torch.cat(overlaps).mean())
    out["overlap_below_20pct"] = float((torch.cat(overlaps) < 0.2).float().mean())
    out["read_cpu_ms_per_item"] = _read_costs(files, patch, scale_range, min_overlap)
    return out


def _read_costs(files: List[str], patch, scale_range, min_overlap: float, items: int = 16) -> Dict[str, float]:
    """CPU time (this process, 1 blosc2 thread; insensitive to other jobs' load) of reading one batch item: a pair
    of regions as the loader reads it, one region of the same size (what the loader read before view pairs had
    two regions), and one cube that admits the pairs down to ``min_overlap`` (the alternative); medians."""
    import blosc2
    import numpy as np
    from nnunet_pgl.pretraining.loader import RegionDataset, cube_region_size_for, read_region, region_size_for

    region = region_size_for(patch, scale_range[1])
    cube = cube_region_size_for(patch, scale_range, min_overlap)
    ds = RegionDataset(files, region, 1, seed=0, patch_size=patch, scale_range=tuple(scale_range),
                       min_overlap=min_overlap)
    blosc2.set_nthreads(1)
    rng = np.random.default_rng(0)

    def one(size) -> None:
        arr = ds._array(files[int(rng.integers(len(files)))])
        start = [int(rng.integers(0, n - r + 1)) if n >= r else -((r - n) // 2) for n, r in zip(arr.shape[1:], size)]
        read_region(arr, start, size)

    out = {}
    for name, fn in (("pair", lambda: ds.sample(rng)), ("one_region", lambda: one(region)),
                     ("cube", lambda: one(cube))):
        fn()
        t = []
        for _ in range(items):
            t0 = time.process_time()
            fn()
            t.append(1000 * (time.process_time() - t0))
        out[name] = statistics.median(t)
    return out


def _print_data_path(d: Dict[str, Any]) -> None:
    print(f"data path: {d['regions_per_pair']} regions of {d['region_size']} per pair, {d['mb_per_pair']:.1f} MiB "
          f"per pair (read and host->device), {d['files']} cases")
    print("loader + on-device views, pairs/s by workers: "
          + ", ".join(f"{k}: {v:.1f}" for k, v in d["pairs_per_s"].items())
          + "; ms per pair and worker process: "
          + ", ".join(f"{k}: {v:.0f}" for k, v in d["read_ms_per_pair"].items()))
    print(f"view pairs made: mean overlap {100 * d['mean_overlap']:.1f} %, "
          f"{100 * d['overlap_below_20pct']:.1f} % below 20 %")
    c = d["read_cpu_ms_per_item"]
    print(f"read CPU time per batch item (1 thread): pair of regions {c['pair']:.1f} ms, one region "
          f"{c['one_region']:.1f} ms ({c['pair'] / c['one_region']:.2f}x), one cube admitting the pairs "
          f"{c['cube']:.1f} ms ({c['cube'] / c['one_region']:.2f}x)")


def _loader_only(args, name: str, device) -> None:
    """``--loader-only``: the data path alone (no network is built), on the dataset's preprocessed cases."""
    import glob

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_pgl.pretraining.config import PretrainConfig

    cm = PlansManager(load_json(join(nnUNet_preprocessed, name, args.plans + ".json"))).get_configuration(
        args.configuration)
    files = sorted(f for f in glob.glob(join(nnUNet_preprocessed, name, cm.data_identifier, "*.b2nd"))
                   if not f.endswith("_seg.b2nd"))
    cfg = PretrainConfig()
    patch, bs = list(cm.patch_size), cm.batch_size
    d = _data_path(files, patch, bs, cfg.scale_range, cfg.min_overlap, device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, patch {patch}, batch {bs} "
          f"(pairs), threads {torch.get_num_threads()}")
    _print_data_path(d)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": name, "plans": args.plans, "patch_size": patch, "batch_size": bs, "loader": d,
                       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}, f, indent=2)


def start_synthetic_epoch(trainer: Any, bs: int, device) -> Dict[str, Any]:
    """Start an epoch of an initialised pretrainer without its loader; return a synthetic loader batch: each pair's
    two regions of random values, offsets drawn as the loader draws them (kept on the host, as pinned loader batches
    are)."""
    import torch

    from nnunet_pgl.pretraining.loader import region_size_for
    from nnunet_pgl.views import draw_pair_offsets
    cfg = trainer.pgl_config
    patch = list(trainer.configuration_manager.patch_size)
    region = region_size_for(patch, cfg.scale_range[1])
    delta = draw_pair_offsets(bs, region, patch, tuple(cfg.scale_range), cfg.min_overlap,
                              torch.Generator().manual_seed(0))
    trainer.dataloader_train = None
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return {"data": torch.randn(bs, 2, trainer.num_input_channels, *region, device=device),
            "offset": torch.stack([torch.zeros_like(delta), delta], dim=1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("-d", dest="dataset")
    ap.add_argument("-c", dest="configuration", default="3d_fullres")
    ap.add_argument("-p", dest="plans", default="nnUNetPlans")
    ap.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                    help="benchmark this patch: a synthetic dataset (cases 1.4x the patch) is planned by nnU-Net, "
                         "then plans with this patch, --batch and nnU-Net's topology for it (--arch) are written")
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="with --patch (z y x, mm)")
    ap.add_argument("--case-scale", type=float, default=1.4,
                    help="with --patch: synthetic cases of ceil(F x patch) voxels (default 1.4; a pair's two "
                         "regions span up to ~2.6x the patch, so use >= 2.6 to measure reads without padding)")
    ap.add_argument("--batch", type=int, default=2, help="with --patch: batch size (pairs for PGL)")
    ap.add_argument("--arch", choices=["plain", "resenc"], default="plain", help="with --patch: network family")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 5 on CPU)")
    ap.add_argument("--no-run", action="store_true", help="skip the short real pgl_pretrain run (data wait)")
    ap.add_argument("--loader-only", action="store_true",
                    help="measure only the data path (loader workers + views on the device): no network is built")
    ap.add_argument("--workdir", default=None, help="with --tiny/--patch: folder of the synthetic dataset, reused "
                                                    "if it is already planned there (default: a new temp folder)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the torch profiler's top N operators of one supervised and one PGL step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny or args.patch:
        tmp = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="pgl_bench_")
        shape = [int(math.ceil(args.case_scale * p)) for p in args.patch] if args.patch else [24, 48, 48]
        spacing = args.spacing if args.patch else [2.5, 1.0, 1.0]
        if os.path.isfile(os.path.join(tmp, "pre", "Dataset993_PGLBench", "nnUNetPlans.json")):
            os.environ.update(nnUNet_raw=os.path.join(tmp, "raw"), nnUNet_preprocessed=os.path.join(tmp, "pre"),
                              nnUNet_results=os.path.join(tmp, "res"))
            args.dataset = "993"
        else:
            args.dataset = _make_synthetic(tmp, shape, spacing, num_cases=4 if args.patch else 5)
        if args.patch:
            args.plans = _plans_for_patch(args.dataset, args.patch, args.batch, args.arch)
    if not args.dataset:
        ap.error("give -d DATASET, --patch Z Y X or --tiny")

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_pgl.pretraining.pretrainer import nnUNetPretrainerPGL

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.loader_only:
        _loader_only(args, maybe_convert_to_dataset_name(args.dataset), device)
        return
    steps = args.steps or (20 if device.type == "cuda" else 5)
    warmup = 5 if device.type == "cuda" else 1
    name = maybe_convert_to_dataset_name(args.dataset)
    base = join(nnUNet_preprocessed, name)
    dataset_json = load_json(join(base, "dataset.json"))
    os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="pgl_bench_res_"))

    def trainer(cls):
        plans = load_json(join(base, args.plans + ".json"))
        plans["continue_training"] = False
        t = cls(plans, args.configuration, "all", dataset_json, device)
        t.initialize()
        return t

    results: Dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "dataset": name, "plans": args.plans,
                               "configuration": args.configuration, "steps": steps}

    sup = trainer(nnUNetTrainer)
    patch = list(sup.configuration_manager.patch_size)
    bs = sup.batch_size
    results.update(patch_size=patch, batch_size=bs)
    x = torch.randn(bs, sup.num_input_channels, *patch, device=device)
    scales = sup._get_deep_supervision_scales()
    nlab = len(sup.label_manager.all_labels)
    tgt = [torch.randint(0, nlab, (bs, 1, *[int(round(p * s)) for p, s in zip(patch, sc)]), device=device).float()
           for sc in scales]
    def sup_step():
        sup.train_step({"data": x, "target": tgt})

    mem_sup = None
    if device.type == "cuda":  # one trainer on the GPU at a time, so that each peak is its own
        torch.cuda.reset_peak_memory_stats()
        t_sup = _timeit(sup_step, steps, warmup, device)
        mem_sup = torch.cuda.max_memory_allocated() / 2 ** 30
    if args.profile:
        _profile(sup_step, "supervised step", args.profile, device)
    if device.type == "cuda":
        del sup
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    pgl = trainer(nnUNetPretrainerPGL)
    cfg = pgl.pgl_config
    batch = start_synthetic_epoch(pgl, bs, device)
    def pgl_step():
        pgl.train_step(batch)

    mem_pgl = None
    if device.type == "cuda":
        t_pgl = _timeit(pgl_step, steps, warmup, device)
        mem_pgl = torch.cuda.max_memory_allocated() / 2 ** 30
    else:  # CPU timings drift with the host's load: alternate the two steps so that both see the same drift
        t_sup, t_pgl = [], []
        for _ in range(steps):
            t_sup += _timeit(sup_step, 1, warmup, device)
            t_pgl += _timeit(pgl_step, 1, warmup, device)
            warmup = 0
    if args.profile:
        _profile(pgl_step, "pgl_pretrain step", args.profile, device)

    # the real data path: loader workers read region pairs from blosc2, views are made on the device
    files = [c.data_file for c in pgl._case_lists()]
    data_path = _data_path(files, patch, bs, cfg.scale_range, cfg.min_overlap, device)
    pairs_per_s = data_path["pairs_per_s"]
    med_sup, med_pgl = statistics.median(t_sup), statistics.median(t_pgl)
    results.update(supervised_step_ms=med_sup, pgl_step_ms=med_pgl, step_ratio=med_pgl / med_sup,
                   supervised_peak_mem_gib=mem_sup, pgl_peak_mem_gib=mem_pgl,
                   memory_ratio=(mem_pgl / mem_sup) if mem_sup else None,
                   data_wait_fraction=None if args.no_run else _short_run_wait(args, name, device),
                   loader_pairs_per_s=pairs_per_s, loader=data_path,
                   pgl_pairs_per_s_needed=bs / (med_pgl / 1000),
                   levels=pgl.online.loss_levels, threads=torch.get_num_threads())
    print(f"device {results['device']}, patch {patch}, batch {bs} (pairs), loss levels {pgl.online.loss_levels}, "
          f"{steps} timed steps")
    print("| step | median ms | peak GiB |")
    print("|---|---|---|")
    print(f"| nnU-Net supervised | {med_sup:.1f} | {mem_sup if mem_sup is None else round(mem_sup, 2)} |")
    print(f"| pgl_pretrain | {med_pgl:.1f} | {mem_pgl if mem_pgl is None else round(mem_pgl, 2)} |")
    print(f"| ratio | {med_pgl / med_sup:.2f}x | "
          f"{'n/a' if not mem_sup else '%.2fx' % (mem_pgl / mem_sup)} |")
    _print_data_path(data_path)
    print(f"(the PGL step consumes {bs / (med_pgl / 1000):.1f} pairs/s)")
    wait = results["data_wait_fraction"]
    print(f"data wait of a short real pgl_pretrain run (4 workers): "
          f"{'not measured' if wait is None else '%.2f %%' % (100 * wait)}")
    if args.json:
        from nnunet_pgl.pretraining.atomic import atomic_write_json
        atomic_write_json(args.json, results, indent=2)


if __name__ == "__main__":
    main()
