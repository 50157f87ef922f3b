"""``pgl_pretrain``: PGL pretraining on a dataset's nnU-Net plans and preprocessed data (+ unlabeled CT)."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from typing import TYPE_CHECKING, Callable, List, NoReturn, Optional, Union

if TYPE_CHECKING:
    import torch

PLANNED_HINT = "nnUNetv2_plan_and_preprocess -d {d} -c {c}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgl_pretrain",
        description="PGL self-supervised pretraining of the network that a dataset's nnU-Net plans build, on the "
                    "dataset's own images (labels ignored) plus any unlabeled CT. Run after "
                    "nnUNetv2_plan_and_preprocess; fine-tune with nnUNetv2_train ... -tr nnUNetTrainerPGL or "
                    "-pretrained_weights <output>/checkpoint_final.pth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="Dataset name or ID, as for nnUNetv2_train.")
    p.add_argument("-c", dest="configuration", default="3d_fullres",
                   help="Configuration to pretrain (a 3D one). Fine-tune the same configuration.")
    p.add_argument("-p", dest="plans", default="nnUNetPlans",
                   help="Plans identifier, e.g. nnUNetResEncUNetMPlans. The checkpoint only fits these plans.")
    p.add_argument("--unlabeled", nargs="+", default=[], metavar="DIR",
                   help="Folders of extra unlabeled images (NIfTI, NRRD, MHA, ...; one file per case, or "
                        "_0000-style channel files). They are preprocessed with the dataset's plans once and cached "
                        "beside the preprocessed data. More data is the point of pretraining: add all you have.")
    p.add_argument("--no-labeled-images", action="store_true",
                   help="Pretrain on the unlabeled folders only (by default the dataset's training images are used "
                        "too, without their labels).")
    p.add_argument("--exclude-fold", type=int, default=None, metavar="K",
                   help="Leave out the validation cases of fold K of splits_final.json, so that fold K's validation "
                        "stays unseen; the output goes to fold_K (without it: fold_all), which nnUNetTrainerPGL uses "
                        "for fold K. Use it when you report cross-validation numbers of the fine-tuned model.")
    p.add_argument("--folds", type=int, nargs="+", default=None, metavar="K",
                   help="One pretraining per fold, one after another: --exclude-fold K for each K (e.g. --folds 0 1 2 "
                        "3 4). Resumable: finished folds are skipped, interrupted ones continue (--c), so rerun the "
                        "same command after a kill.")
    p.add_argument("--epochs", type=int, default=None, help="Epochs (default 500, the paper's schedule). With --c, "
                   "another value changes the run's length, e.g. extends a finished run: the learning rate and the "
                   "EMA tau then move linearly, over 1 epoch or 5%% of the added epochs if longer, from their last "
                   "values to the schedules of the new length, which they follow from then on.")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="Iterations per epoch (default 250).")
    p.add_argument("--batch-size", type=int, default=None,
                   help="View pairs per step over all GPUs (default: the plans' batch size). Memory grows ~2.2x "
                        "that of supervised training at the same batch size.")
    p.add_argument("--method", choices=["pgl", "byol", "pgl+byol"], default=None,
                   help="pgl: local consistency (the method). byol: global consistency baseline. pgl+byol: both. "
                        "Each method writes its own output folder.")
    p.add_argument("--levels", type=int, nargs="+", default=None,
                   help="Feature levels of the loss: 0 = full resolution ... n-1 = bottleneck. Default: levels "
                        "with stride >= 2 in every pooled axis (level 0 costs ~2.4x time, ~2.6x memory).")
    p.add_argument("--lr", type=float, default=None, help="Peak learning rate (default 1e-2, SGD nesterov 0.99).")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="Write checkpoint_latest.pth every N epochs (default 5): what --c resumes from after a "
                        "kill or preemption. Lower it on preemptible nodes.")
    p.add_argument("--probe-cases", type=int, default=None, metavar="N",
                   help="Labeled training cases of the dense linear probe (default 8: half to fit it, half to score "
                        "it; fold K's validation cases are never used with --exclude-fold K). The probe scores the "
                        "frozen features at the start, every --save-every epochs and at the end.")
    p.add_argument("--no-probe", action="store_true", help="Turn the dense linear probe off.")
    p.add_argument("--num-workers", type=int, default=None,
                   help="CPU loader processes (default: nnUNet_n_proc_DA rule, at most 4; regions are cheap to "
                        "read, views are made on the GPU).")
    p.add_argument("-num_gpus", type=int, default=1, help="GPUs on this node (nnU-Net's DDP). For several "
                   "nodes launch with torchrun instead (env:// rendezvous).")
    p.add_argument("-device", choices=["cuda", "cpu", "mps"], default="cuda", help="Device to train on.")
    p.add_argument("--c", action="store_true", help="Continue from the latest checkpoint of this run.")
    p.add_argument("--seed", type=int, default=None, help="Seed of the loader and view draws (default 12345).")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="Processes for preprocessing the unlabeled images (default: nnU-Net's default_num_processes).")
    return p


def _fail(msg: str) -> NoReturn:
    print(f"pgl_pretrain: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.folds is not None:
        _run_folds(args)
    else:
        _run(args)


def _run_folds(args: argparse.Namespace) -> None:
    """``--folds``: one ``--exclude-fold K`` run per fold, in order; finished folds skipped, interrupted ones resumed.

    A fold is finished when its ``checkpoint_final.pth`` exists and ``--epochs`` (if given) does not ask for more
    epochs than its ``pgl_config.json`` has; it is resumed (``--c``) when it has a checkpoint, else started.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _fail("--folds does not run under torchrun: launch one torchrun per fold, e.g. for K in 0 1 2 3 4; do torchrun "
              "... pgl_pretrain ... --exclude-fold K; done (add --c to resume one)")
    if args.exclude_fold is not None:
        _fail("--folds and --exclude-fold exclude each other: --folds 0 1 2 3 4 runs --exclude-fold K for each K")
    folds = list(dict.fromkeys(args.folds))
    if any(k < 0 for k in folds):
        _fail(f"--folds {' '.join(map(str, args.folds))}: folds are numbered from 0 (splits_final.json)")
    from batchgenerators.utilities.file_and_folder_operations import isfile, join
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_pgl.pretraining.config import CONFIG_FILE, PretrainConfig
    from nnunet_pgl.pretraining.contract import PRETRAINER_BY_METHOD
    trainer = PRETRAINER_BY_METHOD[args.method or "pgl"]
    done: List[int] = []
    for i, k in enumerate(folds):
        run = argparse.Namespace(**vars(args))
        run.folds, run.exclude_fold = None, k
        state = "start"
        if nnUNet_results:
            try:
                out = get_output_folder(maybe_convert_to_dataset_name(args.dataset), trainer, args.plans,
                                        args.configuration, k)
            except RuntimeError:  # unknown dataset: the run below says what to do
                out = None
            if out is not None and isfile(join(out, "checkpoint_final.pth")):
                prev = PretrainConfig.load(join(out, CONFIG_FILE)) if isfile(join(out, CONFIG_FILE)) else None
                state = "extend" if args.epochs is not None and prev is not None and args.epochs > prev.epochs \
                    else "finished"
            elif out is not None and isfile(join(out, "checkpoint_latest.pth")):
                state = "resume"
        tag = f"pgl_pretrain --folds: fold {k} ({i + 1}/{len(folds)})"
        if state == "finished":
            print(f"{tag}: finished ({join(out, 'checkpoint_final.pth')}), skipped", flush=True)
            done.append(k)
            continue
        run.c = args.c or state in ("resume", "extend")
        what = {"start": "starting", "resume": "resuming from checkpoint_latest.pth",
                "extend": f"extending to {args.epochs} epochs"}[state]
        print(f"{tag}: {what}", flush=True)
        _run(run)
        done.append(k)
    print(f"pgl_pretrain --folds: folds {' '.join(map(str, done))} done; nnUNetTrainerPGL uses fold_K for fold K",
          flush=True)


def _run(args: argparse.Namespace) -> None:
    """One pretraining run: ``fold_all``, or ``fold_K`` with ``--exclude-fold K``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from nnunet_pgl.trainers.discovery import ensure_ext_trainer_env
    ensure_ext_trainer_env()

    from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_pgl.pretraining.config import CONFIG_ENV, CONFIG_FILE, PretrainConfig
    from nnunet_pgl.pretraining.contract import PRETRAINER_BY_METHOD

    for var, val in (("nnUNet_preprocessed", nnUNet_preprocessed), ("nnUNet_results", nnUNet_results)):
        if not val:
            _fail(f"${var} is not set. Set nnUNet_raw, nnUNet_preprocessed and nnUNet_results as for nnU-Net")
    try:
        dataset_name = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError:
        _fail(f"dataset {args.dataset} is not in $nnUNet_preprocessed ({nnUNet_preprocessed}). Plan and preprocess "
              f"it first: {PLANNED_HINT.format(d=args.dataset, c=args.configuration)}")
    base = join(nnUNet_preprocessed, dataset_name)
    plans_file = join(base, args.plans + ".json")
    if not isfile(plans_file):
        have = sorted(f[:-5] for f in os.listdir(base) if f.endswith("Plans.json")) if isdir(base) else []
        _fail(f"no plans '{args.plans}' for {dataset_name} (found: {have or 'none'}). Plan first: "
              f"{PLANNED_HINT.format(d=args.dataset, c=args.configuration)}, or pass -p with one of those")
    plans = load_json(plans_file)
    if args.configuration not in plans["configurations"]:
        _fail(f"configuration '{args.configuration}' is not in plans {args.plans} (available: "
              f"{sorted(plans['configurations'])})")
    pm = PlansManager(plans_file)
    cm = pm.get_configuration(args.configuration)
    if len(cm.patch_size) != 3:
        _fail(f"configuration '{args.configuration}' is 2D; PGL pretrains 3D networks (use 3d_fullres)")
    data_dir = join(base, cm.data_identifier)
    if not isdir(data_dir) or not any(f.endswith((".b2nd", ".npz", ".npy")) for f in os.listdir(data_dir)):
        _fail(f"{data_dir} holds no preprocessed cases. Preprocess: nnUNetv2_preprocess -d {args.dataset} -c "
              f"{args.configuration} -plans_name {args.plans}")
    dataset_json = load_json(join(base, "dataset.json"))

    cfg_prev: Optional[PretrainConfig] = None
    method = args.method or "pgl"
    trainer = PRETRAINER_BY_METHOD[method]
    fold = "all" if args.exclude_fold is None else args.exclude_fold  # fold_K: the pretraining for fold K
    if args.exclude_fold is not None:
        splits_file = join(base, "splits_final.json")
        n_splits = len(load_json(splits_file)) if isfile(splits_file) else 5  # nnU-Net makes 5 folds if missing
        if not 0 <= args.exclude_fold < n_splits:
            _fail(f"--exclude-fold {args.exclude_fold}: the dataset has folds 0-{n_splits - 1}"
                  + (f" ({splits_file})" if isfile(splits_file) else " (nnU-Net's 5-fold split)"))
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    out = get_output_folder(dataset_name, trainer, args.plans, args.configuration, fold)
    if args.c and isfile(join(out, CONFIG_FILE)):
        cfg_prev = PretrainConfig.load(join(out, CONFIG_FILE))
    cfg = cfg_prev or PretrainConfig()
    cfg.method = method
    for name, val in (("epochs", args.epochs), ("iters_per_epoch", args.iters_per_epoch),
                      ("batch_size", args.batch_size), ("levels", args.levels), ("initial_lr", args.lr),
                      ("num_workers", args.num_workers), ("seed", args.seed), ("exclude_fold", args.exclude_fold),
                      ("save_every", args.save_every), ("probe_cases", args.probe_cases)):
        if val is not None:
            setattr(cfg, name, val)
    if args.no_probe:
        cfg.probe = False
    if cfg.probe and cfg.probe_cases < 2:
        _fail(f"--probe-cases {cfg.probe_cases}: the probe needs at least 2 cases (one to fit, one to score); use "
              "--no-probe to turn it off")
    if args.no_labeled_images:
        cfg.use_labeled_images = False
    if args.unlabeled:
        cfg.unlabeled_dirs = [os.path.abspath(d) for d in args.unlabeled]
    if not cfg.use_labeled_images and not cfg.unlabeled_dirs:
        _fail("--no-labeled-images leaves nothing to pretrain on: add --unlabeled DIR")

    device = _device(args.device)  # fails (e.g. no CUDA) before anything is written
    # any torchrun launch (it sets TORCHELASTIC_RUN_ID), one process too: that runs the DDP code with one rank, the
    # way benchmarks/gpu_check.sh tests it on a single GPU; nnU-Net's own -num_gpus 1 has no DDP
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and (
        int(os.environ["WORLD_SIZE"]) > 1 or "TORCHELASTIC_RUN_ID" in os.environ)
    if torchrun:  # rank 0 ingests and writes the configuration, the others wait and read it
        import torch.distributed as dist
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method="env://")
        if dist.get_rank() != 0:
            dist.barrier()
            os.environ[CONFIG_ENV] = join(out, CONFIG_FILE)
            _train(lambda: run_torchrun(dataset_name, args.configuration, trainer, args.plans, args.c, device, fold),
                   f" (rank {dist.get_rank()})")
            return

    # the output folder's lock comes first: a run refused here has touched nothing (not the unlabeled cache either)
    made = _missing_parents(out)
    os.makedirs(out, exist_ok=True)
    from nnunet_pgl.pretraining.lock import RunLock, RunLockedError
    try:
        lock = RunLock(out).acquire()  # the trainer takes it again in this process (or in DDP children)
    except RunLockedError as e:
        _fail(str(e))
    ok = False
    try:
        if lock.stale:
            print(f"Recovered a stale lock of a dead run (host {lock.stale.get('host')}, pid {lock.stale.get('pid')})")
        if cfg.unlabeled_dirs:
            from nnunet_pgl.pretraining.ingest import ingest_unlabeled
            from nnunetv2.configuration import default_num_processes
            try:
                cases = ingest_unlabeled(cfg.unlabeled_dirs, pm, cm, dataset_json, base,
                                         num_processes=args.num_processes or default_num_processes,
                                         report_dir=out)
            except ValueError as e:
                _fail(str(e))
            cfg.unlabeled_cases = [{"case_id": c.case_id, "data_file": c.data_file, "sha256": c.sha256,
                                    "source": list(c.source)} for c in cases]
            print(f"Unlabeled: {len(cases)} cases ready from {len(cfg.unlabeled_dirs)} folder(s)")
        ok = True
        cfg_path = join(out, CONFIG_FILE)
        cfg.save(cfg_path)
        os.environ[CONFIG_ENV] = cfg_path
        print(f"PGL pretraining {dataset_name} {args.configuration} {args.plans}: method {method}, {cfg.epochs} "
              f"epochs x {cfg.iters_per_epoch} iterations; output {out}")
        if torchrun:
            dist.barrier()
            _train(lambda: run_torchrun(dataset_name, args.configuration, trainer, args.plans, args.c, device, fold))
        else:
            from nnunetv2.run.run_training import run_training
            _train(lambda: run_training(dataset_name, args.configuration, fold, trainer, args.plans, None,
                                        args.num_gpus, continue_training=args.c, device=device))
    finally:
        lock.release()
        if not ok:  # stopped before the run began (bad unlabeled input): leave no empty output folders behind
            for d in [out] + made[::-1]:
                try:
                    os.rmdir(d)
                except OSError:
                    break


def _missing_parents(path: str) -> List[str]:
    """The folders that ``os.makedirs(path)`` would create above ``path``, outermost first."""
    out: List[str] = []
    p = os.path.dirname(os.path.abspath(path))
    while p and not os.path.isdir(p):
        out.append(p)
        p = os.path.dirname(p)
    return out[::-1]


def _train(fn: Callable[[], None], who: str = "") -> None:
    """Run the training; a run stopped by non-finite losses ends with its message and exit code 1, a ``--c`` that
    the checkpoint cannot continue (e.g. other ``--levels``) with its message and exit code 2."""
    from nnunet_pgl.pretraining.pretrainer import NonFiniteLossError, ResumeError
    try:
        fn()
    except NonFiniteLossError as e:
        print(f"pgl_pretrain{who}: error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except ResumeError as e:
        print(f"pgl_pretrain{who}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except Exception as e:  # -num_gpus > 1: nnU-Net's mp.spawn re-raises a rank's error as ProcessRaisedException
        text = str(e)
        if type(e).__name__ == "ProcessRaisedException" and "NonFiniteLossError: " in text:
            print(f"pgl_pretrain: error: {text.rsplit('NonFiniteLossError: ', 1)[1].strip()}", file=sys.stderr)
            raise SystemExit(1)
        raise


def _device(name: str) -> "torch.device":
    import torch
    if name == "cpu":  # the cores this process may use, shared evenly by the ranks on this node (assumes they
        # share one affinity mask, as torchrun / mp.spawn start them)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else multiprocessing.cpu_count()
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            _fail("-device cuda but no CUDA GPU is visible. Use -device cpu (slow) or check CUDA_VISIBLE_DEVICES")
        torch.set_num_threads(1)
        return torch.device("cuda")
    return torch.device("mps")


def run_torchrun(dataset_name: str, configuration: str, trainer: str, plans: str, continue_training: bool,
                 device: "torch.device", fold: Union[int, str] = "all") -> None:
    """One rank of a ``torchrun`` launch (several nodes possible; process group already up), nnU-Net's own steps."""
    import torch
    import torch.distributed as dist
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        t = get_trainer_from_args(dataset_name, configuration, fold, trainer, plans, continue_training,
                                  device=device)
        maybe_load_checkpoint(t, continue_training, False, None)
        t.run_training()
        t.perform_actual_validation(False)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
