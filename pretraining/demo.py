"""``pgl_demo``: PGL pretraining vs. training from scratch on a synthetic abdominal CT dataset, in one command.

The demo runs the project's whole story with stock commands, each in a subprocess whose output goes to
``<out>/logs/<stage>.log``:

1. ``dataset``: synthetic CT phantoms (:func:`nnunet_pgl.pretraining.synthetic.make_dataset`) in nnU-Net's raw
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
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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
        prog="pgl_demo",
        description="Demonstrate PGL end to end on a synthetic abdominal CT dataset: make the data, plan and "
                    "preprocess it with nnU-Net, pretrain with pgl_pretrain, then fine-tune fold 0 twice with stock "
                    "nnUNetv2_train (from the PGL checkpoint, and from scratch with the same schedule) and report "
                    "the validation Dice of both and the time of each stage. Everything, nnU-Net's folders "
                    "included, goes into --out; your nnUNet_raw/_preprocessed/_results are not used.",
        epilog=_presets_help() + "\n\nThe demo's numbers show that the pipeline works, not how much PGL helps: "
               "fold 0 validates on a few cases and the CPU schedule is minutes, not the paper's days. For a real "
               "comparison run pgl_pretrain and nnUNetv2_train -tr nnUNetTrainerPGL / nnUNetTrainerScratch on your "
               "data (README, Usage).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
                        "on a validation set this small a few Dice points are noise.")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None,
                   help="Device of pretraining and fine-tuning (default: the preset's).")
    return p


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


def prepare_out(out: str) -> List[str]:
    """Make ``out`` ready (new, empty, or a previous demo folder); return the previous outputs removed.

    Raises:
        DemoError: ``out`` is a file, or a non-empty folder that no demo made (nothing is touched then).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise DemoError(f"--out {out} is a file. Give a new or empty folder, or leave --out out for a new "
                        "pgl_demo_<date_time> folder")
    removed: List[str] = []
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MARKER)):
            raise DemoError(f"--out {out} is not empty and is not a pgl_demo folder (it has no {MARKER} file), so "
                            "the demo will not write into it. Give a new or empty folder, or leave --out out for a "
                            "new pgl_demo_<date_time> folder in the current directory")
        for entry in OWN_ENTRIES:
            path = os.path.join(out, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
                removed.append(entry)
            elif os.path.exists(path):
                os.remove(path)
                removed.append(entry)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("made by pgl_demo (nnunet_pgl); pgl_demo may replace this folder's outputs\n")
    return removed


def demo_env(cfg: DemoConfig, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of the subprocesses: nnU-Net's folders inside ``--out``, our trainers findable, CPU-sized pools."""
    from nnunet_pgl.trainers.discovery import EXT_ENV, ext_trainer_value

    env = dict(os.environ if base is None else base)
    for d in NNUNET_DIRS:
        env[d] = os.path.join(cfg.out, d)
    env[EXT_ENV] = ext_trainer_value(env.get(EXT_ENV, ""))
    env.pop("nnUNet_pgl_weights", None)   # the PGL arm must start from this demo's checkpoint
    env.pop("nnUNet_pgl_config", None)
    env["nnUNet_pgl_seed"] = str(cfg.seed)  # the fine-tuning trainers seed their generators with it (trainers/pgl.py)
    if cfg.device == "cpu":
        env["nnUNet_def_n_proc"] = "1"    # final validation would spawn 8 workers, ~35 s each to import torch
        env["nnUNet_n_proc_DA"] = "0"     # augmentation in the training process: 2 cores are busy with the model
    return env


def stage_commands(cfg: DemoConfig, bin_dir: Optional[str] = None) -> Dict[str, List[str]]:
    """The stock command line of every subprocess stage (what a user would type, minus the environment)."""
    b = bin_dir or os.path.dirname(sys.executable)
    d = str(DATASET_ID)
    n_proc = "2" if cfg.device == "cpu" else str(max(1, min(8, os.cpu_count() or 1)))
    pretrain = [os.path.join(b, "pgl_pretrain"), "-d", d, "-c", CONFIGURATION, "-device", cfg.device,
                "--epochs", str(cfg.pretrain_epochs), "--iters-per-epoch", str(cfg.pretrain_iters),
                "--seed", str(cfg.seed), "--exclude-fold", str(FOLD), "-np", n_proc]
    if cfg.unlabeled:
        pretrain += ["--unlabeled", os.path.join(cfg.out, "unlabeled")]
    train = [os.path.join(b, "nnUNetv2_train"), d, CONFIGURATION, str(FOLD)]
    return {
        "plan_and_preprocess": [os.path.join(b, "nnUNetv2_plan_and_preprocess"), "-d", d, "-c", CONFIGURATION,
                                "-npfp", n_proc, "-np", n_proc],
        "pretrain": pretrain,
        "finetune_pgl": train + ["-tr", cfg.pgl_trainer, "-device", cfg.device],
        "finetune_scratch": train + ["-tr", cfg.scratch_trainer, "-device", cfg.device],
    }


def stage_env(stage: str, env: Dict[str, str]) -> Dict[str, str]:
    if stage == "plan_and_preprocess":  # planning calls torch.set_num_threads(nnUNet_n_proc_DA): 0 would fail
        return {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    return env


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, log: str):
        super().__init__(f"stage {stage} failed with exit status {returncode}; log: {log}")
        self.stage, self.returncode, self.log = stage, returncode, log


def _children_cpu_s() -> float:
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_stage(stage: str, cmd: Sequence[str], env: Dict[str, str], log: str) -> Tuple[float, float]:
    """Run ``cmd`` with stdout and stderr streamed into ``log``; return (wall s, CPU s) or raise StageFailed.

    The CPU seconds (all cores, the command and the processes it waited for) tell a busy machine apart from a slow
    stage: on an idle 2-core machine wall ≈ CPU / 2 for the training stages.
    """
    t0, c0 = time.perf_counter(), _children_cpu_s()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(list(cmd), env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise StageFailed(stage, rc, log)
    return time.perf_counter() - t0, _children_cpu_s() - c0


def tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def summary_path(results: str, trainer: str) -> str:
    return os.path.join(results, DATASET, f"{trainer}__{PLANS}__{CONFIGURATION}", f"fold_{FOLD}", "validation",
                        "summary.json")


def read_dice(summary_file: str) -> Dict[str, float]:
    """``{label value as str: Dice, ..., 'foreground_mean': Dice}`` from an nnU-Net ``summary.json``."""
    with open(summary_file) as f:
        s = json.load(f)
    dice = {k: float(v["Dice"]) for k, v in s["mean"].items()}
    dice["foreground_mean"] = float(s["foreground_mean"]["Dice"])
    return dice


def _num(x: Optional[float], signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def dice_table(pgl: Dict[str, float], scratch: Dict[str, float], labels: Dict[str, int]) -> str:
    """Markdown table: one row per class (by label value) and the foreground mean; PGL, Scratch, PGL − Scratch."""
    names = {str(v): k for k, v in labels.items()}
    keys = sorted((k for k in set(pgl) | set(scratch) if k != "foreground_mean"), key=lambda k: (len(k), k))
    rows = ["| class | PGL | Scratch | PGL − Scratch |", "|---|---|---|---|"]
    for key in keys + ["foreground_mean"]:
        a, b = pgl.get(key), scratch.get(key)
        diff = None if a is None or b is None else a - b
        name = "foreground mean" if key == "foreground_mean" else f"{key} {names.get(key, '')}".strip()
        rows.append(f"| {name} | {_num(a)} | {_num(b)} | {_num(diff, signed=True)} |")
    return "\n".join(rows)


def read_probe(results: str) -> Optional[Dict[str, object]]:
    """The dense linear probe of the demo's pretraining from its ``pgl_log.json``: ``{'random_init': …, 'pgl': …,
    'epoch': …}`` (each ``{'levels': {…}, 'all': …, 'cases': …}``), or None where the log has no probe."""
    for fold in (f"fold_{FOLD}", "fold_all"):
        path = os.path.join(results, DATASET, f"nnUNetPretrainerPGL__{PLANS}__{CONFIGURATION}", fold, "pgl_log.json")
        if os.path.isfile(path):
            with open(path) as f:
                log = json.load(f)
            init = next((r["probe_random_init"] for r in log if r.get("probe_random_init")), None)
            last = next((r for r in reversed(log) if r.get("probe")), None)
            if init is None or last is None:
                return None
            return {"random_init": init, "pgl": last["probe"], "epoch": last["epoch"], "pgl_log": path}
    return None


def probe_table(probe: Dict[str, object]) -> str:
    """Markdown table: the probe's mean foreground F1 per level and for all levels, random init vs PGL."""
    init, pgl = probe["random_init"], probe["pgl"]
    assert isinstance(init, dict) and isinstance(pgl, dict)
    rows = ["| features | random init | PGL | PGL − random init |", "|---|---|---|---|"]
    for key in list(pgl["levels"]) + ["all"]:
        a = pgl["all"] if key == "all" else pgl["levels"].get(key)
        b = init["all"] if key == "all" else init["levels"].get(key)
        diff = None if a is None or b is None else a - b
        rows.append(f"| {'all levels' if key == 'all' else f'level {key}'} | {_num(b)} | {_num(a)} | "
                    f"{_num(diff, signed=True)} |")
    return "\n".join(rows)


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:04.1f} s"


def time_table(times: Dict[str, float], cpu: Optional[Dict[str, float]] = None) -> str:
    """Markdown table of the stage wall times (in STAGES order) and their total, with CPU seconds if given."""
    cpu = cpu or {}
    rows = ["| stage | wall time | wall s | CPU s |", "|---|---|---|---|"]
    for stage in [s for s in STAGES if s in times] + ["total"]:
        t = times[stage]
        c = sum(v for v in cpu.values()) if stage == "total" and cpu else cpu.get(stage)
        rows.append(f"| {STAGE_TITLES[stage]} | {_duration(t)} | {t:.1f} | "
                    f"{'n/a' if c is None or math.isnan(c) else f'{c:.0f}'} |")
    return "\n".join(rows)


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+dirty" if dirty else "")) if rev else "unknown"


def render_report(cfg: DemoConfig, dice: Dict[str, Dict[str, float]], times: Dict[str, float],
                  cpu: Dict[str, float], labels: Dict[str, int], commands: Dict[str, List[str]],
                  revision: str, probe: Optional[Dict[str, object]] = None) -> str:
    """The Markdown report: configuration, probe and Dice tables (one sentence per number on what it shows), time
    table and the exact commands."""
    lines = [
        "# pgl_demo report", "",
        f"Preset `{cfg.preset}`: {cfg.cases} training cases + {cfg.unlabeled} unlabeled volumes of "
        f"{'x'.join(map(str, cfg.shape))} voxels ({'x'.join(map(str, cfg.spacing))} mm); pgl_pretrain "
        f"{cfg.pretrain_epochs} epochs x {cfg.pretrain_iters} iterations; fine-tuning `{cfg.pgl_trainer}` vs "
        f"`{cfg.scratch_trainer}` on `{cfg.device}`; seed {cfg.seed}; nnunet_pgl revision {revision}.", "",
        f"## Dense linear probe of the pretrained features ({DATASET}, {CONFIGURATION})", "",
        *(_probe_section(probe) if probe is not None else [
            "Not available: the pretraining log has no probe (pgl_pretrain --no-probe, or too few labeled cases).",
            ""]),
        f"## Validation Dice, {DATASET} fold {FOLD} ({CONFIGURATION})", "",
        dice_table(dice["pgl"], dice["scratch"], labels), "",
        "- **Dice, PGL**: the network fine-tuned from the pgl_pretrain checkpoint, on fold 0's validation cases, "
        "which pretraining did not see (--exclude-fold 0); it shows that the pipeline works end to end, not that PGL "
        "helps.",
        "- **Dice, Scratch**: the same schedule from random init, the baseline of the difference.",
        "- **Dice, PGL − Scratch**: rests on a few validation cases and a minutes-long schedule, so it can change "
        f"sign from one seed to the next. Fine-tuning is seeded (--seed {cfg.seed}, nnUNet_pgl_seed): on CPU the same "
        "command gives the same numbers.", "",
        "## Time per stage", "", time_table(times, cpu), "",
        "CPU s: processor seconds over all cores. Wall time well above CPU s / cores means that the machine was "
        "busy with other work.", "",
        "## Commands", "",
        "Environment: nnUNet_raw, nnUNet_preprocessed and nnUNet_results in the demo folder"
        + (", nnUNet_def_n_proc=1, nnUNet_n_proc_DA=0 (not for planning)" if cfg.device == "cpu" else "") + ".", "",
        "```",
    ]
    lines += [" ".join([os.path.basename(c[0])] + c[1:]) for c in commands.values()]
    lines += ["```", ""]
    return "\n".join(lines)


def _probe_section(probe: Dict[str, object]) -> List[str]:
    pgl = probe["pgl"]
    assert isinstance(pgl, dict)
    cases = pgl.get("cases") or {}
    n_fit, n_score = len(cases.get("fit", [])), len(cases.get("score", []))
    return [
        probe_table(probe), "",
        f"Score: mean foreground F1 of a linear classifier fitted on the frozen features of {n_fit or 'a few'} "
        f"training cases and scored on {n_score or 'a few other'} others (never fold {FOLD}'s validation cases); "
        f"PGL is the network after the last pretraining epoch ({probe['epoch']}).", "",
        "- **Probe, random init**: how far the untrained network's features already separate the organs "
        "(intensity alone does much of it on these phantoms); it is the floor that pretraining has to beat.",
        "- **Probe, PGL**: the same probe on the pretrained features, same cases and voxels; it shows whether the "
        "pretraining made the features more linearly separable, not whether fine-tuning will be better.",
        "- **Probe, PGL − random init**: the change that pretraining made, measured on the same samples, so it is "
        "less noisy than the Dice difference below; after the demo's few minutes of pretraining it is small and may "
        "be negative.", ""]


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    import torch  # after parsing: --help stays quick

    try:
        cfg = resolve(args, torch.cuda.is_available())
        removed = prepare_out(cfg.out)
    except DemoError as e:
        print(f"pgl_demo: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    env = demo_env(cfg)
    commands = stage_commands(cfg)
    revision = git_revision()
    logs = os.path.join(cfg.out, "logs")
    pre = PRESETS[cfg.preset]

    print(f"pgl_demo (nnunet_pgl revision {revision}): preset {cfg.preset} ({pre.expected} with the preset's "
          "sizes)")
    print(f"  {cfg.cases} training cases + {cfg.unlabeled} unlabeled volumes of {'x'.join(map(str, cfg.shape))} "
          f"voxels; pgl_pretrain {cfg.pretrain_epochs} epochs x {cfg.pretrain_iters} iterations; fine-tuning "
          f"{cfg.pgl_trainer} vs {cfg.scratch_trainer}; device {cfg.device}; seed {cfg.seed}")
    print(f"  output: {cfg.out}" + (f" (previous demo outputs replaced: {', '.join(removed)})" if removed else ""))
    users = [d for d in NNUNET_DIRS if os.environ.get(d)]
    print(f"  nnU-Net folders: {os.path.join(cfg.out, 'nnUNet_{raw,preprocessed,results}')}"
          + (f" (your ${', $'.join(users)} {'is' if len(users) == 1 else 'are'} ignored)" if users else ""))

    times: Dict[str, float] = {}
    cpu: Dict[str, float] = {}
    t_start = time.perf_counter()
    n = len(STAGES)

    def announce(i: int, stage: str, what: str) -> None:
        print(f"[{i}/{n}] {STAGE_TITLES[stage]:<18} {what} ... ", end="", flush=True)

    # 1. data (in this process; short)
    announce(1, "dataset", f"{cfg.cases} + {cfg.unlabeled} phantoms")
    t0, c0 = time.perf_counter(), time.process_time()
    from nnunet_pgl.pretraining.synthetic import LABELS, make_dataset
    made = make_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID, name=DATASET_NAME, num_train=cfg.cases,
                        num_unlabeled=cfg.unlabeled, unlabeled_dir=os.path.join(cfg.out, "unlabeled"),
                        shape=tuple(cfg.shape), spacing=tuple(cfg.spacing), seed=cfg.seed,
                        unlabeled_formats=(".nii.gz", ".nrrd"))
    times["dataset"], cpu["dataset"] = time.perf_counter() - t0, time.process_time() - c0
    with open(os.path.join(logs, "dataset.log"), "w") as f:
        json.dump({"config": asdict(cfg), "written": made}, f, indent=2)
    print(f"{times['dataset']:.1f} s")

    # 2-5. stock commands
    what = {"plan_and_preprocess": f"nnUNetv2_plan_and_preprocess -d {DATASET_ID} -c {CONFIGURATION}",
            "pretrain": f"pgl_pretrain, {cfg.pretrain_epochs} x {cfg.pretrain_iters} iterations",
            "finetune_pgl": f"nnUNetv2_train -tr {cfg.pgl_trainer}",
            "finetune_scratch": f"nnUNetv2_train -tr {cfg.scratch_trainer}"}
    dice: Dict[str, Dict[str, float]] = {}
    probe: Optional[Dict[str, object]] = None
    for i, stage in enumerate(STAGES[1:], start=2):
        announce(i, stage, what[stage])
        log = os.path.join(logs, f"{stage}.log")
        try:
            times[stage], cpu[stage] = run_stage(stage, commands[stage], stage_env(stage, env), log)
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
        extra = ""
        if stage == "pretrain":
            probe = read_probe(env["nnUNet_results"])
            if probe is not None:
                pg, ri = probe["pgl"], probe["random_init"]
                assert isinstance(pg, dict) and isinstance(ri, dict)
                extra = (f", probe (mean foreground F1, all levels) PGL {_num(pg['all'])} vs random init "
                         f"{_num(ri['all'])}")
        if stage.startswith("finetune"):
            arm = "pgl" if stage == "finetune_pgl" else "scratch"
            trainer = cfg.pgl_trainer if arm == "pgl" else cfg.scratch_trainer
            dice[arm] = read_dice(summary_path(env["nnUNet_results"], trainer))
            extra = f", foreground Dice {_num(dice[arm]['foreground_mean'])}"
        print(f"{_duration(times[stage])}{extra}")
    times["total"] = time.perf_counter() - t_start

    report = render_report(cfg, dice, times, cpu, LABELS, commands, revision, probe)
    with open(os.path.join(cfg.out, REPORT_MD), "w") as f:
        f.write(report)
    with open(os.path.join(cfg.out, REPORT_JSON), "w") as f:
        json.dump({"config": asdict(cfg), "revision": revision, "labels": LABELS, "dice": dice, "probe": probe,
                   "times_s": times,
                   "cpu_s": cpu,
                   "commands": commands,
                   "summary_files": {"pgl": summary_path(env["nnUNet_results"], cfg.pgl_trainer),
                                     "scratch": summary_path(env["nnUNet_results"], cfg.scratch_trainer)}},
                  f, indent=2)
    print()
    if probe is not None:
        print(probe_table(probe))
        print()
    print(dice_table(dice["pgl"], dice["scratch"], LABELS))
    print()
    print(time_table(times, cpu))
    print()
    print(f"Report: {os.path.join(cfg.out, REPORT_MD)} (raw numbers: {REPORT_JSON}; logs: {logs})")


if __name__ == "__main__":
    main()
