"""``pgl_demo``'s numbers and report: the Dice of both arms from nnU-Net's ``summary.json``, the probe from the
pretraining's ``pgl_log.json``, the Markdown tables, and ``pgl_demo_report.md`` / ``pgl_demo_report.json``."""
from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from nnunet_pgl.evaluation.results import fold_dir
from nnunet_pgl.pretraining.contract import METHODS

from .config import CONFIGURATION, DATASET, FOLD, PLANS, REPORT_JSON, REPORT_MD, STAGE_TITLES, STAGES, DemoConfig
from .synthetic import LABELS


@dataclass
class DemoOutcome:
    """What the stages measured: wall and CPU seconds per stage, the Dice of each arm (``'pgl'``, ``'scratch'``:
    :func:`read_dice`) and the probe of the pretraining (:func:`read_probe`)."""

    times: Dict[str, float] = field(default_factory=dict)
    cpu: Dict[str, float] = field(default_factory=dict)
    dice: Dict[str, Dict[str, float]] = field(default_factory=dict)
    probe: Optional[Dict[str, object]] = None


# ------------------------------------------------------------------------------------------------ reading results
def summary_path(results: str, trainer: str) -> str:
    """The ``summary.json`` of ``trainer``'s fold-0 validation under the demo's own results root ``results``
    (nnU-Net's ``get_output_folder`` reads ``$nnUNet_results``, which the demo leaves alone)."""
    return os.path.join(fold_dir(os.path.join(results, DATASET), trainer, PLANS, CONFIGURATION, FOLD), "validation",
                        "summary.json")


def read_dice(summary_file: str) -> Dict[str, float]:
    """``{label value as str: Dice, ..., 'foreground_mean': Dice}`` from an nnU-Net ``summary.json``."""
    with open(summary_file) as f:
        s = json.load(f)
    dice = {k: float(v["Dice"]) for k, v in s["mean"].items()}
    dice["foreground_mean"] = float(s["foreground_mean"]["Dice"])
    return dice


def read_probe(results: str) -> Optional[Dict[str, object]]:
    """The dense linear probe of the demo's pretraining from its ``pgl_log.json``: ``{'random_init': …, 'pgl': …,
    'epoch': …}`` (each ``{'levels': {…}, 'all': …, 'cases': …}``), or None where the log has no probe."""
    for fold in (FOLD, "all"):
        path = os.path.join(fold_dir(os.path.join(results, DATASET), METHODS["pgl"].pretrainer, PLANS, CONFIGURATION,
                                     fold), "pgl_log.json")
        if os.path.isfile(path):
            with open(path) as f:
                log = json.load(f)
            init = next((r["probe_random_init"] for r in log if r.get("probe_random_init")), None)
            last = next((r for r in reversed(log) if r.get("probe")), None)
            if init is None or last is None:
                return None
            return {"random_init": init, "pgl": last["probe"], "epoch": last["epoch"], "pgl_log": path}
    return None


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


# ------------------------------------------------------------------------------------------------ tables
def number(x: Optional[float], signed: bool = False) -> str:
    """``x`` with 4 decimals (and a sign if ``signed``); ``n/a`` for None and NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def duration(s: float) -> str:
    """``12.3 s`` or ``2 min 03.4 s``."""
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:04.1f} s"


def dice_table(pgl: Dict[str, float], scratch: Dict[str, float], labels: Dict[str, int]) -> str:
    """Markdown table: one row per class (by label value) and the foreground mean; PGL, Scratch, PGL − Scratch."""
    names = {str(v): k for k, v in labels.items()}
    keys = sorted((k for k in set(pgl) | set(scratch) if k != "foreground_mean"), key=lambda k: (len(k), k))
    rows = ["| class | PGL | Scratch | PGL − Scratch |", "|---|---|---|---|"]
    for key in keys + ["foreground_mean"]:
        a, b = pgl.get(key), scratch.get(key)
        diff = None if a is None or b is None else a - b
        name = "foreground mean" if key == "foreground_mean" else f"{key} {names.get(key, '')}".strip()
        rows.append(f"| {name} | {number(a)} | {number(b)} | {number(diff, signed=True)} |")
    return "\n".join(rows)


def probe_table(probe: Dict[str, object]) -> str:
    """Markdown table: the probe's mean foreground F1 per level and for all levels, random init vs PGL."""
    init, pgl = probe["random_init"], probe["pgl"]
    assert isinstance(init, dict) and isinstance(pgl, dict)
    rows = ["| features | random init | PGL | PGL − random init |", "|---|---|---|---|"]
    for key in list(pgl["levels"]) + ["all"]:
        a = pgl["all"] if key == "all" else pgl["levels"].get(key)
        b = init["all"] if key == "all" else init["levels"].get(key)
        diff = None if a is None or b is None else a - b
        rows.append(f"| {'all levels' if key == 'all' else f'level {key}'} | {number(b)} | {number(a)} | "
                    f"{number(diff, signed=True)} |")
    return "\n".join(rows)


def time_table(times: Dict[str, float], cpu: Optional[Dict[str, float]] = None) -> str:
    """Markdown table of the stage wall times (in STAGES order) and their total, with CPU seconds if given."""
    cpu = cpu or {}
    rows = ["| stage | wall time | wall s | CPU s |", "|---|---|---|---|"]
    for stage in [s for s in STAGES if s in times] + ["total"]:
        t = times[stage]
        c = sum(v for v in cpu.values()) if stage == "total" and cpu else cpu.get(stage)
        rows.append(f"| {STAGE_TITLES[stage]} | {duration(t)} | {t:.1f} | "
                    f"{'n/a' if c is None or math.isnan(c) else f'{c:.0f}'} |")
    return "\n".join(rows)


def probe_note(probe: Optional[Dict[str, object]]) -> str:
    """The end of the pretrain stage's progress line: the probe's score, all levels, PGL vs random init."""
    if probe is None:
        return ""
    pg, ri = probe["pgl"], probe["random_init"]
    assert isinstance(pg, dict) and isinstance(ri, dict)
    return f", probe (mean foreground F1, all levels) PGL {number(pg['all'])} vs random init {number(ri['all'])}"


# ------------------------------------------------------------------------------------------------ the report
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


def write_reports(cfg: DemoConfig, outcome: DemoOutcome, commands: Dict[str, List[str]], revision: str,
                  results: str) -> None:
    """``pgl_demo_report.md`` (:func:`render_report`) and ``pgl_demo_report.json`` (the raw numbers) in ``cfg.out``;
    ``results`` is the demo's nnU-Net results folder."""
    report = render_report(cfg, outcome.dice, outcome.times, outcome.cpu, LABELS, commands, revision, outcome.probe)
    with open(os.path.join(cfg.out, REPORT_MD), "w") as f:
        f.write(report)
    with open(os.path.join(cfg.out, REPORT_JSON), "w") as f:
        json.dump({"config": asdict(cfg), "revision": revision, "labels": LABELS, "dice": outcome.dice,
                   "probe": outcome.probe,
                   "times_s": outcome.times,
                   "cpu_s": outcome.cpu,
                   "commands": commands,
                   "summary_files": {"pgl": summary_path(results, cfg.pgl_trainer),
                                     "scratch": summary_path(results, cfg.scratch_trainer)}},
                  f, indent=2)
