"""Time the stock nnU-Net supervised train step against the pgl_pretrain step, same plan, batch and device.

    python benchmarks/pretrain_speed.py [--tiny] [-d D -c C -p P] [--steps N] [--json PATH]

``--tiny`` makes a small synthetic CT dataset in a temporary folder and plans it with stock nnU-Net (a CI-sized
plan); otherwise ``-d`` names a planned and preprocessed dataset (``nnUNet_*`` variables set). Both trainers are
built by nnU-Net's own code from the same plans; batches are already on the device (random data of the right
shape: the supervised step gets a patch batch with deep-supervision targets, the PGL step a region batch from which
it makes the views). Reports medians of ``--steps`` steps after warm-up (CUDA events on GPU; on CPU the two steps
alternate, so that load drift on the host hits both alike), peak device memory,
the ratios, and writes JSON.
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
    from nnunet_pgl.pretraining.synthetic import make_dataset
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
    ap.add_argument("--batch", type=int, default=2, help="with --patch: batch size (pairs for PGL)")
    ap.add_argument("--arch", choices=["plain", "resenc"], default="plain", help="with --patch: network family")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 5 on CPU)")
    ap.add_argument("--no-run", action="store_true", help="skip the short real pgl_pretrain run (data wait)")
    ap.add_argument("--workdir", default=None, help="with --tiny/--patch: folder of the synthetic dataset, reused "
                                                    "if it is already planned there (default: a new temp folder)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the torch profiler's top N operators of one supervised and one PGL step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny or args.patch:
        tmp = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="pgl_bench_")
        shape = [int(math.ceil(1.4 * p)) for p in args.patch] if args.patch else [24, 48, 48]
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

    from nnunet_pgl.pretraining.loader import region_size_for
    from nnunet_pgl.pretraining.pretrainer import nnUNetPretrainerPGL

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    region = region_size_for(patch, pgl.pgl_config.scale_range[1])
    batch = {"data": torch.randn(bs, pgl.num_input_channels, *region, device=device),
             "offset": torch.zeros(bs, 3, dtype=torch.long, device=device)}
    pgl.dataloader_train = None
    pgl.on_epoch_start()
    pgl.on_train_epoch_start()
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

    # the real data path: loader workers read regions from blosc2, views are made on the device
    from nnunet_pgl import make_view_pair
    from nnunet_pgl.pretraining.loader import RegionDataset, TimedLoader
    files = [c["data_file"] for c in pgl._case_lists()]
    pairs_per_s: Dict[str, float] = {}
    for workers in (0, 2, 4):
        loader = TimedLoader(RegionDataset(files, region, bs, seed=0), workers, pin_memory=device.type == "cuda")
        n = 3 * max(workers, 1) + 5
        next(loader)  # start the workers
        t0 = time.perf_counter()
        for _ in range(n):
            b = next(loader)
            make_view_pair(b["data"].to(device, non_blocking=True), patch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        pairs_per_s[str(workers)] = n * bs / (time.perf_counter() - t0)
        loader.close()
    med_sup, med_pgl = statistics.median(t_sup), statistics.median(t_pgl)
    results.update(supervised_step_ms=med_sup, pgl_step_ms=med_pgl, step_ratio=med_pgl / med_sup,
                   supervised_peak_mem_gib=mem_sup, pgl_peak_mem_gib=mem_pgl,
                   memory_ratio=(mem_pgl / mem_sup) if mem_sup else None,
                   data_wait_fraction=None if args.no_run else _short_run_wait(args, name, device),
                   loader_pairs_per_s=pairs_per_s,
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
    print(f"loader + on-device views, pairs/s by workers: "
          + ", ".join(f"{k}: {v:.1f}" for k, v in pairs_per_s.items())
          + f" (the PGL step consumes {bs / (med_pgl / 1000):.1f} pairs/s)")
    wait = results["data_wait_fraction"]
    print(f"data wait of a short real pgl_pretrain run (4 workers): "
          f"{'not measured' if wait is None else '%.2f %%' % (100 * wait)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
