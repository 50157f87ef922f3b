"""What ``pgl_demo`` does: its fixed names (dataset, folders, stages), the presets, and the configuration resolved
from a preset and the flags."""
from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

MARKER = ".pgl_demo"                       # written first into every demo folder; lets a re-run reuse the folder
REPORT_MD, REPORT_JSON = "pgl_demo_report.md", "pgl_demo_report.json"
DATASET_ID, DATASET_NAME = 990, "PGLDemo"
DATASET = f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
PLANS, CONFIGURATION, FOLD = "nnUNetPlans", "3d_fullres", 0
#: what the demo creates inside --out (and removes again when --out is a previous demo folder)
OWN_ENTRIES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "unlabeled", "logs", REPORT_MD, REPORT_JSON)
NNUNET_DIRS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
STAGES = ("dataset", "plan_and_preprocess", "pretrain", "finetune_pgl", "finetune_scratch")
STAGE_TITLES = {"dataset": "dataset generation", "plan_and_preprocess": "plan & preprocess", "pretrain": "pretrain",
                "finetune_pgl": "fine-tune PGL", "finetune_scratch": "fine-tune scratch", "total": "total"}


@dataclass(frozen=True)
class Preset:
    """A demo size. ``trainers`` = (PGL arm, scratch arm): twins with the same schedule, differing only in init."""

    cases: int
    unlabeled: int
    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    pretrain_epochs: int
    pretrain_iters: int
    trainers: Tuple[str, str]
    device: str
    expected: str


PRESETS: Dict[str, Preset] = {
    # Sized by measurement on 2 idle CPU cores (plans: 4 stages, patch = the whole 24x48x48 image, batch 2): ~1 s per
    # fine-tuning iteration (augmentation included), ~1.6 s per PGL iteration, 10-30 s start-up per command, ~12 s
    # for nnU-Net's final validation. A busy machine (other jobs on the same cores) can take twice as long.
    "cpu": Preset(cases=10, unlabeled=6, shape=(24, 48, 48), spacing=(2.5, 1.0, 1.0), pretrain_epochs=8,
                  pretrain_iters=10, trainers=("nnUNetTrainerPGL_demo", "nnUNetTrainerScratch_demo"), device="cpu",
                  expected="about 10 min on 2 idle CPU cores"),
    # Not measured (no GPU where the demo was built). Estimate: 2 x 12,500 fine-tuning iterations at ~0.1 s and
    # 5,000 PGL iterations at ~0.3 s, plus validation, planning and start-up.
    "gpu": Preset(cases=40, unlabeled=60, shape=(48, 128, 128), spacing=(2.5, 0.8, 0.8), pretrain_epochs=100,
                  pretrain_iters=50, trainers=("nnUNetTrainerPGL_50epochs", "nnUNetTrainerScratch_50epochs"),
                  device="cuda", expected="roughly 1-1.5 h on one recent GPU (estimate, not measured)"),
}


@dataclass
class DemoConfig:
    """Everything the demo does, resolved from the preset and the flags (saved in the report)."""

    preset: str
    out: str
    cases: int
    unlabeled: int
    shape: List[int]
    spacing: List[float]
    pretrain_epochs: int
    pretrain_iters: int
    pgl_trainer: str
    scratch_trainer: str
    device: str
    seed: int
    dataset: str = DATASET


class DemoError(RuntimeError):
    """A problem the user can fix (the message says how); ``main`` prints it and exits with status 2."""


def resolve(args: argparse.Namespace, cuda_available: bool, now: Optional[datetime.datetime] = None) -> DemoConfig:
    """The preset chosen by ``--preset`` (or by the hardware) with the flags applied on top."""
    name = args.preset or ("gpu" if cuda_available else "cpu")
    pre = PRESETS[name]
    device = args.device or pre.device
    if device == "cuda" and not cuda_available:
        raise DemoError(f"--preset {name} trains with -device cuda but PyTorch sees no CUDA GPU. Use --preset cpu "
                        "(the default without a GPU), or check CUDA_VISIBLE_DEVICES and your PyTorch build")
    out = args.out or f"pgl_demo_{(now or datetime.datetime.now()).strftime('%Y%m%d_%H%M%S')}"
    cfg = DemoConfig(
        preset=name, out=os.path.abspath(out),
        cases=pre.cases if args.cases is None else args.cases,
        unlabeled=pre.unlabeled if args.unlabeled is None else args.unlabeled,
        shape=list(pre.shape), spacing=list(pre.spacing),
        pretrain_epochs=pre.pretrain_epochs if args.pretrain_epochs is None else args.pretrain_epochs,
        pretrain_iters=pre.pretrain_iters if args.pretrain_iters is None else args.pretrain_iters,
        pgl_trainer=(args.finetune_trainers or pre.trainers)[0],
        scratch_trainer=(args.finetune_trainers or pre.trainers)[1],
        device=device, seed=args.seed)
    if cfg.cases < 5:
        raise DemoError(f"--cases {cfg.cases}: nnU-Net's 5-fold split needs at least 5 training cases")
    for flag, val in (("--unlabeled", cfg.unlabeled), ("--pretrain-epochs", cfg.pretrain_epochs - 1),
                      ("--pretrain-iters", cfg.pretrain_iters - 1)):
        if val < 0:
            raise DemoError(f"{flag} must be {'>= 0' if flag == '--unlabeled' else '>= 1'}")
    return cfg
