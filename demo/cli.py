"""``pgl_demo``: PGL pretraining vs. training from scratch on a synthetic abdominal CT dataset, in one command.

The demo runs the project's whole story with stock commands, each in a subprocess whose output goes to
``<out>/logs/<stage>.log``:

1. ``dataset``: synthetic CT phantoms (:func:`nnunet_pgl.demo.synthetic.make_dataset`) in nnU-Net's raw
   layout, plus a separate folder of unlabeled volumes (NIfTI and NRRD);
2. ``plan_and_preprocess``: ``nnUNetv2_plan_and_preprocess -d D -c 3d_fullres``;
3. ``pretrain``: ``pgl_pretrain -d D --unlabeled <folder> --exclude-fold 0`` (fold 0's validation cases stay unseen);
4. ``finetune_pgl``: ``nnUNetv2_train D 3d_fullres 0 -tr nnUNetTrainerPGL_<schedule>`` (starts from the checkpoint
   of step 3, found by convention under ``$nnUNet_results``);
5. ``finetune_scratch``: the same with ``nnUNetTrainerScratch_<schedule>`` (random init, identical schedule);

then it prints and writes (``pgl_demo_report.md``, ``pgl_demo_report.json``) the dense linear probe of the
pretraining (random init vs the pretrained network, from its ``pgl_log.json``), the per-class validation Dice of
fold 0 for both arms and the time of each stage, each number with a sentence on what it does and does not show.
Fine-tuning is seeded (``nnUNet_pgl_seed`` = ``--seed``), so on CPU a rerun reproduces the numbers. nnU-Net's three
folders are subfolders of ``--out``: the user's ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` are never
read or written.

This module is the command (:func:`build_parser`, :func:`main` as its steps); the steps' work is in :mod:`.config`,
:mod:`.stages`, :mod:`.report` and :mod:`.synthetic`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

from .config import (DATASET_ID, DATASET_NAME, NNUNET_DIRS, PRESETS, REPORT_JSON, REPORT_MD,
                     STAGE_TITLES, STAGES, DemoConfig, DemoError, resolve)
from .report import (DemoOutcome, dice_table, duration, git_revision, number, probe_note, probe_table, read_dice,
                     read_probe, summary_path, time_table, write_reports)
from .stages import (StageFailed, demo_env, prepare_out, run_stage, stage_commands, stage_descriptions, stage_env,
                     tail)
from .synthetic import LABELS, make_dataset


def _presets_help() -> str:
    lines = ["presets (a flag overrides one value of the preset):"]
    for name, p in PRESETS.items():
        lines.append(f"  {name}: {p.cases} training cases + {p.unlabeled} unlabeled volumes of "
                     f"{'x'.join(map(str, p.shape))} voxels, spacing {'x'.join(map(str, p.spacing))} mm; pgl_pretrain "
                     f"{p.pretrain_epochs} epochs x {p.pretrain_iters} iterations; fine-tuning {p.trainers[0]} vs "
                     f"{p.trainers[1]}; -device {p.device}; {p.expected}.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgl_demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Demonstrate PGL end to end on a synthetic abdominal CT dataset: make the data, plan and "
                    "preprocess it with nnU-Net, pretrain with pgl_pretrain, then fine-tune fold 0 twice with stock "
                    "nnUNetv2_train (from the PGL checkpoint, and from scratch with the same schedule) and report "
                    "the validation Dice of both and the time of each stage. Everything, nnU-Net's folders "
                    "included, goes into --out; your nnUNet_raw/_preprocessed/_results are not used.",
        epilog=_presets_help() + "\n\nThe demo's numbers show that the pipeline works, not how much PGL helps: "
               "fold 0 validates on a few cases and the CPU schedule is minutes, not the paper's days. For a real "
               "comparison run pgl_pretrain and nnUNetv2_train -tr nnUNetTrainerPGL / nnUNetTrainerScratch on your "
               "data (README, Usage).")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="Folder for everything the demo writes (default: a new pgl_demo_<YYYYmmdd_HHMMSS> in the "
                        "current directory). Must be new, empty or a previous demo folder (whose outputs are "
                        "replaced).")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="Demo size (see below). Default: gpu if PyTorch sees a CUDA GPU, else cpu.")
    p.add_argument("--cases", type=int, default=None, metavar="N",
                   help="Labelled training cases (fold 0 validates on N/5 of them). At least 5 (nnU-Net's 5 folds).")
    p.add_argument("--unlabeled", type=int, default=None, metavar="N",
                   help="Extra unlabeled volumes for pretraining (alternately .nii.gz and .nrrd). 0 pretrains on the "
                        "training images alone; more unlabeled data is what pretraining is for.")
    p.add_argument("--pretrain-epochs", type=int, default=None, metavar="E",
                   help="pgl_pretrain --epochs. The paper pretrains 500 epochs x 250 iterations; the demo's few "
                        "minutes only show the pipeline at work. A PGL iteration costs ~1.5-2.5x a supervised one.")
    p.add_argument("--pretrain-iters", type=int, default=None, metavar="I", help="pgl_pretrain --iters-per-epoch.")
    p.add_argument("--finetune-trainers", nargs=2, default=None, metavar=("PGL", "SCRATCH"),
                   help="The two fine-tuning trainers, e.g. nnUNetTrainerPGL_smoke nnUNetTrainerScratch_smoke "
                        "(a minute each, for tests) or nnUNetTrainerPGL_100epochs nnUNetTrainerScratch_100epochs. "
                        "Compare twins of the same schedule only.")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the synthetic data, of pgl_pretrain and of the fine-tuning (the demo's trainers "
                        "seed their generators from nnUNet_pgl_seed): on CPU a rerun with the same seed prints the "
                        "same numbers. Another seed can flip the sign of a small Dice difference between the arms: "
                        "on a validation set this small a few Dice points are noise. Default: 0.")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None,
                   help="Device of pretraining and fine-tuning (default: the preset's).")
    return p


def configure(args: argparse.Namespace) -> Tuple[DemoConfig, List[str]]:
    """The configuration and a ready ``--out`` (with the previous outputs removed from it); a :class:`DemoError`
    is printed and exits with status 2."""
    import torch  # after parsing: --help stays quick

    try:
        cfg = resolve(args, torch.cuda.is_available())
        return cfg, prepare_out(cfg.out)
    except DemoError as e:
        print(f"pgl_demo: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def print_header(cfg: DemoConfig, revision: str, removed: Sequence[str]) -> None:
    """What is about to run, where it writes, and which of the user's nnU-Net folders it ignores."""
    print(f"pgl_demo (nnunet_pgl revision {revision}): preset {cfg.preset} ({PRESETS[cfg.preset].expected} with the "
          "preset's sizes)")
    print(f"  {cfg.cases} training cases + {cfg.unlabeled} unlabeled volumes of {'x'.join(map(str, cfg.shape))} "
          f"voxels; pgl_pretrain {cfg.pretrain_epochs} epochs x {cfg.pretrain_iters} iterations; fine-tuning "
          f"{cfg.pgl_trainer} vs {cfg.scratch_trainer}; device {cfg.device}; seed {cfg.seed}")
    print(f"  output: {cfg.out}" + (f" (previous demo outputs replaced: {', '.join(removed)})" if removed else ""))
    users = [d for d in NNUNET_DIRS if os.environ.get(d)]
    print(f"  nnU-Net folders: {os.path.join(cfg.out, 'nnUNet_{raw,preprocessed,results}')}"
          + (f" (your ${', $'.join(users)} {'is' if len(users) == 1 else 'are'} ignored)" if users else ""))


def _announce(i: int, stage: str, what: str) -> None:
    print(f"[{i}/{len(STAGES)}] {STAGE_TITLES[stage]:<18} {what} ... ", end="", flush=True)


def make_data(cfg: DemoConfig, env: Dict[str, str], outcome: DemoOutcome) -> None:
    """Stage 1, in this process (it is short): the phantoms; the configuration and the folders written go to
    ``logs/dataset.log``."""
    _announce(1, "dataset", f"{cfg.cases} + {cfg.unlabeled} phantoms")
    t0, c0 = time.perf_counter(), time.process_time()
    made = make_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID, name=DATASET_NAME, num_train=cfg.cases,
                        num_unlabeled=cfg.unlabeled, unlabeled_dir=os.path.join(cfg.out, "unlabeled"),
                        shape=tuple(cfg.shape), spacing=tuple(cfg.spacing), seed=cfg.seed,
                        unlabeled_formats=(".nii.gz", ".nrrd"))
    outcome.times["dataset"], outcome.cpu["dataset"] = time.perf_counter() - t0, time.process_time() - c0
    with open(os.path.join(cfg.out, "logs", "dataset.log"), "w") as f:
        json.dump({"config": asdict(cfg), "written": made}, f, indent=2)
    print(f"{outcome.times['dataset']:.1f} s")


def run_or_exit(stage: str, cmd: List[str], env: Dict[str, str], log: str) -> Tuple[float, float]:
    """:func:`run_stage`; a failed stage prints its log's tail and exits with status 1, Ctrl-C exits with 130."""
    try:
        return run_stage(stage, cmd, stage_env(stage, env), log)
    except StageFailed as e:
        print("FAILED")
        print(f"--- last lines of {log} ---\n{tail(log)}--- end of {log} ---", file=sys.stderr)
        status = f"killed by signal {-e.returncode}" if e.returncode < 0 else f"exit status {e.returncode}"
        print(f"pgl_demo: stage '{stage}' failed ({status}). Full log: {log}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted")
        print(f"pgl_demo: interrupted during stage '{stage}'. Its log so far: {log}. Run again with the same "
              f"--out to start over", file=sys.stderr)
        raise SystemExit(130)


def collect(stage: str, cfg: DemoConfig, results: str, outcome: DemoOutcome) -> str:
    """Read what ``stage`` produced into ``outcome`` (the probe after pretraining, an arm's Dice after fine-tuning);
    return the end of its progress line."""
    if stage == "pretrain":
        outcome.probe = read_probe(results)
        return probe_note(outcome.probe)
    if stage.startswith("finetune"):
        arm = "pgl" if stage == "finetune_pgl" else "scratch"
        trainer = cfg.pgl_trainer if arm == "pgl" else cfg.scratch_trainer
        outcome.dice[arm] = read_dice(summary_path(results, trainer))
        return f", foreground Dice {number(outcome.dice[arm]['foreground_mean'])}"
    return ""


def run_stock_stages(cfg: DemoConfig, env: Dict[str, str], commands: Dict[str, List[str]],
                     outcome: DemoOutcome) -> None:
    """Stages 2-5, each a stock command in a subprocess, with one progress line each."""
    what = stage_descriptions(cfg)
    for i, stage in enumerate(STAGES[1:], start=2):
        _announce(i, stage, what[stage])
        log = os.path.join(cfg.out, "logs", f"{stage}.log")
        outcome.times[stage], outcome.cpu[stage] = run_or_exit(stage, commands[stage], env, log)
        extra = collect(stage, cfg, env["nnUNet_results"], outcome)
        print(f"{duration(outcome.times[stage])}{extra}")


def print_tables(cfg: DemoConfig, outcome: DemoOutcome) -> None:
    """The probe, Dice and time tables, and where the report is."""
    print()
    if outcome.probe is not None:
        print(probe_table(outcome.probe))
        print()
    print(dice_table(outcome.dice["pgl"], outcome.dice["scratch"], LABELS))
    print()
    print(time_table(outcome.times, outcome.cpu))
    print()
    print(f"Report: {os.path.join(cfg.out, REPORT_MD)} (raw numbers: {REPORT_JSON}; logs: "
          f"{os.path.join(cfg.out, 'logs')})")


def main(argv: Optional[List[str]] = None) -> None:
    """``pgl_demo``: configure, make the data, run the stock stages, write and print the report."""
    cfg, removed = configure(build_parser().parse_args(argv))
    env, commands, revision = demo_env(cfg), stage_commands(cfg), git_revision()
    print_header(cfg, revision, removed)
    outcome = DemoOutcome()
    t_start = time.perf_counter()
    make_data(cfg, env, outcome)
    run_stock_stages(cfg, env, commands, outcome)
    outcome.times["total"] = time.perf_counter() - t_start
    write_reports(cfg, outcome, commands, revision, env["nnUNet_results"])
    print_tables(cfg, outcome)


if __name__ == "__main__":
    main()
