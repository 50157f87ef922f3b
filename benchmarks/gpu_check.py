"""Data and output checks of ``benchmarks/gpu_check.sh`` (one subcommand per kind of step; exit 1 on a problem).

    python benchmarks/gpu_check.py prepare  --root DIR --patch Z Y X [--spacing Z Y X] [--cases N] [--unlabeled N]
    python benchmarks/gpu_check.py pretrain --out FOLD_ALL --method M --epochs N [--ddp] [--log FILE ...]
    python benchmarks/gpu_check.py finetune --out FOLD_DIR --pgl-checkpoint PATH [--log FILE ...]
    python benchmarks/gpu_check.py predict  --inputs DIR --outputs DIR --dataset-json PATH
    python benchmarks/gpu_check.py env

``prepare`` makes the synthetic dataset and the plans with ``benchmarks/pretrain_speed.py``'s own functions (cases
1.4× the patch, stock ``nnUNetv2_plan_and_preprocess``, then plans ``nnUNetPlans_bench_plain`` with the patch and
nnU-Net's topology for it), so that ``gpu_suite.sh`` reuses the same dataset folder; plus unlabeled volumes and two
images to predict. The other subcommands check what a step wrote and print one line per problem.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
from typing import List, Sequence

PICTURE_ERROR = "could not write the feature picture"
DDP_ERROR = "the ranks' weights differ"


def _read_logs(paths: Sequence[str]) -> str:
    text = []
    for p in paths:
        if os.path.isfile(p):
            with open(p, errors="replace") as f:
                text.append(f.read())
    return "\n".join(text)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def prepare(args: argparse.Namespace) -> List[str]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pretrain_speed import _make_synthetic, _plans_for_patch  # the suite's own dataset and plans

    from nnunet_pgl.demo.synthetic import make_dataset

    root = os.path.abspath(args.root)
    shape = [int(math.ceil(1.4 * p)) for p in args.patch]
    dataset = _make_synthetic(root, shape, args.spacing, num_cases=args.cases)
    plans = _plans_for_patch(dataset, args.patch, args.batch, "plain")
    # unlabeled volumes for --unlabeled (a throwaway raw root: make_dataset also writes an empty labeled folder)
    unl = os.path.join(root, "unlabeled")
    make_dataset(os.path.join(root, "unlabeled_raw"), dataset_id=994, name="PGLCheckUnlabeled", num_train=0,
                 num_unlabeled=args.unlabeled, unlabeled_dir=unl, shape=shape, spacing=args.spacing, seed=1)
    # images to predict: two of them, under nnU-Net's channel naming
    pred = os.path.join(root, "predict_in")
    os.makedirs(pred, exist_ok=True)
    for f in sorted(os.listdir(unl))[:2]:
        shutil.copy(os.path.join(unl, f), os.path.join(pred, f.replace(".nii.gz", "_0000.nii.gz")))
    print(f"dataset {dataset}: {args.cases} cases of {shape} at spacing {args.spacing}; plans {plans} "
          f"(patch {args.patch}, batch {args.batch}); {args.unlabeled} unlabeled volumes in {unl}; "
          f"{len(os.listdir(pred))} images to predict in {pred}")
    return []


def pretrain(args: argparse.Namespace) -> List[str]:
    import torch

    problems: List[str] = []
    out = args.out
    ckpt_file = os.path.join(out, "checkpoint_final.pth")
    if not os.path.isfile(ckpt_file):
        return [f"no {ckpt_file}"]
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    if ckpt.get("current_epoch") != args.epochs:
        problems.append(f"checkpoint_final.pth is at epoch {ckpt.get('current_epoch')}, expected {args.epochs}")
    if ckpt.get("pgl_meta", {}).get("method") != args.method:
        problems.append(f"pgl_meta method {ckpt.get('pgl_meta', {}).get('method')!r}, expected {args.method!r}")
    bad = [k for k, v in ckpt.get("network_weights", {}).items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if not ckpt.get("network_weights") or bad:
        problems.append(f"network_weights missing or non-finite ({len(bad)} tensors, e.g. {bad[:3]})")

    log_file = os.path.join(out, "pgl_log.json")
    if not os.path.isfile(log_file):
        return problems + [f"no {log_file}"]
    with open(log_file) as f:
        log = json.load(f)
    if [r.get("epoch") for r in log] != list(range(args.epochs)):
        problems.append(f"pgl_log.json has epochs {[r.get('epoch') for r in log]}, expected 0-{args.epochs - 1}")
    for r in log:
        e = r.get("epoch")
        if not _finite(r.get("loss")):
            problems.append(f"epoch {e}: loss {r.get('loss')!r} is not a finite number")
        if "pgl" in args.method and not (r.get("level_losses") and all(_finite(v) for v in r["level_losses"])):
            problems.append(f"epoch {e}: level losses {r.get('level_losses')!r} missing or non-finite")
        if "byol" in args.method and not _finite(r.get("global_loss")):
            problems.append(f"epoch {e}: global loss {r.get('global_loss')!r} missing or non-finite")
        if r.get("bad_steps"):
            problems.append(f"epoch {e}: {r['bad_steps']} steps skipped for non-finite losses")
        if args.ddp and r.get("ranks_in_sync") is not True:
            problems.append(f"epoch {e}: ranks_in_sync is {r.get('ranks_in_sync')!r} (the DDP code did not run, "
                            "or the ranks differ)")
    if not os.path.isfile(os.path.join(out, "progress.png")):
        problems.append("no progress.png")
    for e in range(args.epochs):  # --save-every 1: one picture per epoch
        pic = os.path.join(out, "pictures", f"epoch_{e:04d}.png")
        if not os.path.isfile(pic):
            problems.append(f"no feature picture {pic}")
        else:
            with open(pic, "rb") as f:
                if f.read(8) != b"\x89PNG\r\n\x1a\n":
                    problems.append(f"{pic} is not a PNG file")
    text = _read_logs(list(args.log) + sorted(glob.glob(os.path.join(out, "training_log_*.txt"))))
    for needle in (PICTURE_ERROR, DDP_ERROR):
        if needle in text:
            line = next(ln for ln in text.splitlines() if needle in ln)
            problems.append(f"the log says: {line.strip()}")
    if not problems:
        losses = ", ".join(f"{r['loss']:.4f}" for r in log)
        print(f"ok: {args.method}, {len(log)} epochs, losses {losses}, {args.epochs} pictures, checkpoint at epoch "
              f"{ckpt['current_epoch']}" + (", ranks in sync" if args.ddp else ""))
    return problems


def finetune(args: argparse.Namespace) -> List[str]:
    problems: List[str] = []
    for f in ("checkpoint_final.pth", os.path.join("validation", "summary.json")):
        if not os.path.isfile(os.path.join(args.out, f)):
            problems.append(f"no {os.path.join(args.out, f)}")
    text = _read_logs(list(args.log) + sorted(glob.glob(os.path.join(args.out, "training_log_*.txt"))))
    want = f"PGL initialisation from {args.pgl_checkpoint}"
    if want not in text:
        problems.append(f"the log lacks the line '{want}'")
    if not problems:
        print(f"ok: {next(ln.strip() for ln in text.splitlines() if want in ln)}")
    return problems


def predict(args: argparse.Namespace) -> List[str]:
    import numpy as np
    import SimpleITK as sitk

    with open(args.dataset_json) as f:
        labels = set(json.load(f)["labels"].values())
    problems: List[str] = []
    inputs = sorted(f for f in os.listdir(args.inputs) if f.endswith("_0000.nii.gz"))
    if not inputs:
        return [f"no input images in {args.inputs}"]
    for f in inputs:
        pred = os.path.join(args.outputs, f.replace("_0000.nii.gz", ".nii.gz"))
        if not os.path.isfile(pred):
            problems.append(f"no prediction {pred}")
            continue
        img, seg = sitk.ReadImage(os.path.join(args.inputs, f)), sitk.ReadImage(pred)
        if img.GetSize() != seg.GetSize():
            problems.append(f"{pred}: size {seg.GetSize()}, image {img.GetSize()}")
        found = set(np.unique(sitk.GetArrayFromImage(seg)).tolist())
        if not found <= labels:
            problems.append(f"{pred}: labels {sorted(found - labels)} are not in dataset.json")
    if not problems:
        print(f"ok: {len(inputs)} predictions of the input size with the dataset's labels")
    return problems


def env(args: argparse.Namespace) -> List[str]:
    import platform

    import torch
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, {p.total_memory / 2 ** 30:.1f} GiB, capability {p.major}.{p.minor}")
    else:
        print("no CUDA device visible")
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("nnunetv2", "nnunet_pgl", "blosc2", "numpy"):
        try:
            print(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            print(f"{pkg} not installed as a distribution")
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--root", required=True)
    p.add_argument("--patch", type=int, nargs=3, required=True)
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--unlabeled", type=int, default=2)
    p = sub.add_parser("pretrain")
    p.add_argument("--out", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--log", nargs="*", default=[])
    p = sub.add_parser("finetune")
    p.add_argument("--out", required=True)
    p.add_argument("--pgl-checkpoint", required=True)
    p.add_argument("--log", nargs="*", default=[])
    p = sub.add_parser("predict")
    p.add_argument("--inputs", required=True)
    p.add_argument("--outputs", required=True)
    p.add_argument("--dataset-json", required=True)
    sub.add_parser("env")
    args = ap.parse_args()
    problems = {"prepare": prepare, "pretrain": pretrain, "finetune": finetune, "predict": predict,
                "env": env}[args.cmd](args)
    for p in problems:
        print(f"problem: {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
