"""What the dense linear probe and the collapse statistics cost, relative to pgl_pretrain's epoch.

    python benchmarks/probe_cost.py -d DATASET [-c C] [-p P] [--repeats N] [--probe-cases N] [--json PATH]
    python benchmarks/probe_cost.py --tiny DIR ...   # make and plan the test dataset in DIR first (reused)

Builds ``nnUNetPretrainerPGL`` from the plans with nnU-Net's code (as ``pgl_pretrain`` does), reads the probe's
crops from the preprocessed dataset (:func:`nnunet_pgl.evaluation.probe.build_probe_set`), then alternates one PGL
train step (random region pairs of the right shape, already on the device) with one probe
(:func:`~nnunet_pgl.evaluation.probe.probe_network`, all its forward passes and fits) and one collapse-statistics
update, ``--repeats`` times, so that load drift on a shared host hits all of them alike. The first probe (one-off
imports of the optimiser machinery) is reported separately. Reports medians of wall time and of this process's CPU
time, and the probe's share of an epoch of ``--iters-per-epoch`` steps (the probe runs once every ``--save-every``
epochs, so this is the worst epoch's share), and the collapse statistics' share (one update every
``collapse_every`` steps).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Tuple


def _timed(fn: Callable[[], Any], device: Any) -> Tuple[float, float]:
    """(wall s, process CPU s) of one call (CUDA synchronised)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _tiny(root: str) -> str:
    """The test dataset (6 cases of 24×48×48, ``pgl_pretrain``'s test plan) planned by stock nnU-Net in ``root``."""
    os.environ.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "pre"),
                      nnUNet_results=os.path.join(root, "res"))
    if not os.path.isfile(os.path.join(root, "pre", "Dataset991_PGLE2E", "nnUNetPlans.json")):
        from nnunet_pgl.demo.synthetic import make_dataset
        make_dataset(os.environ["nnUNet_raw"], dataset_id=991, name="PGLE2E", num_train=6, shape=(24, 48, 48), seed=3)
        env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_plan_and_preprocess"), "-d", "991",
                        "-c", "3d_fullres", "-npfp", "2", "-np", "2"], env=env, check=True, capture_output=True)
    return "991"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", dest="dataset")
    ap.add_argument("--tiny", metavar="DIR", help="make (or reuse) the test dataset in DIR")
    ap.add_argument("-c", dest="configuration", default="3d_fullres")
    ap.add_argument("-p", dest="plans", default="nnUNetPlans")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probe-cases", type=int, default=None, help="default: pgl_pretrain's")
    ap.add_argument("--probe-samples", type=int, default=None,
                    help="voxels per class and crop (default: pgl_pretrain's)")
    ap.add_argument("--iters-per-epoch", type=int, default=250)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.dataset = _tiny(os.path.abspath(args.tiny))
    if not args.dataset:
        ap.error("give -d DATASET or --tiny DIR")

    import tempfile

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_pgl.collapse import CollapseMonitor
    from nnunet_pgl.evaluation.probe import build_probe_set, probe_network
    from nnunet_pgl.pretraining.pretrainer import nnUNetPretrainerPGL
    from nnunet_pgl.views import make_view_pair
    from pretrain_speed import start_synthetic_epoch  # benchmarks/ (this script's folder) is on sys.path

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = maybe_convert_to_dataset_name(args.dataset)
    base = join(nnUNet_preprocessed, name)
    os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="pgl_probe_cost_"))
    plans = load_json(join(base, args.plans + ".json"))
    plans["continue_training"] = False
    t = nnUNetPretrainerPGL(plans, args.configuration, "all", load_json(join(base, "dataset.json")), device)
    t.initialize()
    cfg = t.pgl_config
    n_cases = args.probe_cases or cfg.probe_cases
    n_samples = args.probe_samples or cfg.probe_samples
    patch = list(t.configuration_manager.patch_size)
    bs = t.batch_size

    w0, c0 = time.perf_counter(), time.process_time()
    ps = build_probe_set(base, t.preprocessed_dataset_folder, patch, t.label_manager, n_cases, None, n_samples)
    build = (time.perf_counter() - w0, time.process_time() - c0)

    batch = start_synthetic_epoch(t, bs, device)
    levels = t.probe_levels

    # one step's target output, for the collapse statistics
    g = torch.Generator(device=device).manual_seed(1)
    va, vb, pa, pb = make_view_pair(batch["data"][:, 0], patch, scale_range=tuple(cfg.scale_range),
                                    min_overlap=cfg.min_overlap, generator=g, region_offset=batch["offset"][:, 0],
                                    region_b=batch["data"][:, 1], region_offset_b=batch["offset"][:, 1])
    with torch.no_grad():
        tgt = t.target(torch.cat([va, vb]), pa, pb, use_predictor=False)
    monitor = CollapseMonitor()

    def step() -> None:
        t.train_step(batch)

    def probe() -> None:
        probe_network(t.network, levels, ps, device, t.online.geometry)

    def collapse() -> None:
        monitor.update(tgt, t.online.loss_levels, pa, pb, t.online.geometry)
        monitor.summary()

    step()                                   # warm-up
    first_probe = _timed(probe, device)
    collapse()
    rows: Dict[str, List[Tuple[float, float]]] = {"step": [], "probe": [], "collapse": []}
    for _ in range(args.repeats):
        rows["step"].append(_timed(step, device))
        rows["probe"].append(_timed(probe, device))
        rows["collapse"].append(_timed(collapse, device))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    epoch = [args.iters_per_epoch * med["step"][i] for i in (0, 1)]
    res: Dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "dataset": name, "plans": args.plans,
        "configuration": args.configuration, "patch_size": patch, "batch_size": bs, "levels": levels,
        "probe_cases": n_cases, "probe_samples": n_samples, "samples": {"fit": sum(len(c.classes) for c in ps.fit),
                                                                        "score": sum(len(c.classes) for c in ps.score)},
        "repeats": args.repeats, "build_probe_set_s": build, "first_probe_s": first_probe,
        "median_s": med, "iters_per_epoch": args.iters_per_epoch,
        "probe_share_of_epoch": [med["probe"][i] / epoch[i] for i in (0, 1)],
        "collapse_share_of_steps": [med["collapse"][i] / (cfg.collapse_every * med["step"][i]) for i in (0, 1)],
    }
    if args.json:  # written first: the numbers survive a broken pipe on the printout
        from nnunet_pgl.pretraining.atomic import atomic_write_json
        atomic_write_json(args.json, res, indent=2)
    print(f"{name} {args.configuration} patch {patch} batch {bs} levels {levels} on {res['device']} "
          f"({res['torch_threads']} torch threads); probe {n_cases} cases, {n_samples} voxels per class")
    for k in ("step", "probe", "collapse"):
        print(f"  {k:<9} median wall {med[k][0]:.3f} s, CPU {med[k][1]:.3f} s")
    print(f"  first probe (one-off imports): wall {first_probe[0]:.2f} s; reading the crops: {build[0]:.2f} s")
    print(f"  probe / epoch of {args.iters_per_epoch} steps: wall {100 * res['probe_share_of_epoch'][0]:.2f} %, "
          f"CPU {100 * res['probe_share_of_epoch'][1]:.2f} %")
    print(f"  collapse statistics / the {cfg.collapse_every} steps between two updates: wall "
          f"{100 * res['collapse_share_of_steps'][0]:.2f} %, CPU {100 * res['collapse_share_of_steps'][1]:.2f} %")


if __name__ == "__main__":
    main()
