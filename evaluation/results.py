"""Reading nnU-Net's results for ``pgl_compare``: validation summaries, the arms they make, learning curves.

A trainer's results live in ``<results_dataset>/<trainer>__<plans>__<configuration>/fold_K/`` (nnU-Net's own
naming, :func:`trainer_dir`); each fold's ``validation/summary.json`` holds the metrics of its validation cases.
:func:`collect_arm` gathers one trainer's cases over the folds into an :class:`Arm`; :func:`compare_arms` pairs two
arms by case id into a :class:`Comparison`.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

from nnunet_pgl.evaluation.records import Record
from nnunet_pgl.evaluation.stats import PairedStats, paired_stats

OVERALL = "foreground mean"
MEAN_METRICS = ("Dice", "IoU", "FP", "FN")
#: metrics of one case: {label key: {metric: value}}
CaseMetrics = Dict[str, Dict[str, float]]


class CompareError(RuntimeError):
    """Something the user can fix (missing results, unknown trainer, ...); the message says what to run."""


# ================================================================================================ where
def trainer_dir(results_dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """``<results_dataset>/<trainer>__<plans>__<configuration>``: where nnU-Net writes a trainer's folds."""
    return os.path.join(results_dataset, convert_trainer_plans_config_to_identifier(trainer, plans, configuration))


def fold_dir(results_dataset: str, trainer: str, plans: str, configuration: str, fold: Any) -> str:
    """``fold_K`` of :func:`trainer_dir`."""
    return os.path.join(trainer_dir(results_dataset, trainer, plans, configuration), f"fold_{fold}")


# ================================================================================================ summaries
def case_id_from_file(path: str, file_ending: Optional[str] = None) -> str:
    """Case id of a ``reference_file``/``prediction_file`` entry: its basename without the dataset's file ending."""
    name = os.path.basename(path)
    if file_ending and name.endswith(file_ending):
        return name[: -len(file_ending)]
    for ext in (".nii.gz", ".nrrd", ".mha", ".nii", ".tif", ".tiff", ".png", ".gz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def label_sort_key(key: str) -> Tuple[int, Any]:
    """Order of summary.json label keys: labels numerically ("1" < "2" < "10"), then regions ("(1, 2)")."""
    try:
        return 0, int(key)
    except ValueError:
        return 1, tuple(int(i) for i in re.findall(r"-?\d+", key))


def read_summary(path: str, file_ending: Optional[str] = None) -> Dict[str, CaseMetrics]:
    """``{case_id: {label_key: {metric: value}}}`` from an nnU-Net ``summary.json`` (``metric_per_case``)."""
    with open(path) as f:
        s = json.load(f)
    if "metric_per_case" not in s:
        raise CompareError(f"{path} has no 'metric_per_case': not an nnU-Net validation summary.json")
    out: Dict[str, CaseMetrics] = {}
    for entry in s["metric_per_case"]:
        cid = case_id_from_file(entry.get("reference_file") or entry["prediction_file"], file_ending)
        out[cid] = {str(k): {m: (math.nan if v is None else float(v)) for m, v in mv.items()}
                    for k, mv in entry["metrics"].items()}
    return out


# ================================================================================================ arms
@dataclass
class ArmCase:
    """One validation case of an arm: the fold that validated it and its metrics."""

    fold: int
    metrics: CaseMetrics


@dataclass
class Arm(Record):
    """Every validation case of one trainer over the folds asked for.

    Attributes:
        trainer: the trainer class name.
        cases: ``{case_id: ArmCase}``.
        folds_found: folds with a ``validation/summary.json``.
        folds_missing: folds without one.
        summaries: the ``summary.json`` files read.
    """

    trainer: str
    cases: Dict[str, ArmCase] = field(default_factory=dict)
    folds_found: List[int] = field(default_factory=list)
    folds_missing: List[int] = field(default_factory=list)
    summaries: List[str] = field(default_factory=list)


def collect_arm(results_dataset: str, trainer: str, plans: str, configuration: str, folds: Sequence[int],
                file_ending: Optional[str] = None) -> Arm:
    """Every validation case of ``trainer`` over ``folds``. A case validated in two folds is an error (pairs would
    count twice)."""
    arm = Arm(trainer)
    for k in folds:
        path = os.path.join(fold_dir(results_dataset, trainer, plans, configuration, k), "validation", "summary.json")
        if not os.path.isfile(path):
            arm.folds_missing.append(k)
            continue
        arm.folds_found.append(k)
        arm.summaries.append(path)
        for cid, metrics in read_summary(path, file_ending).items():
            if cid in arm.cases:
                raise CompareError(f"{trainer}: case {cid} is validated in fold {arm.cases[cid].fold} and fold {k}; "
                                   "pgl_compare pairs each case once. Check splits_final.json (validation sets of "
                                   "the folds must not overlap)")
            arm.cases[cid] = ArmCase(k, metrics)
    return arm


# ================================================================================================ pairing
@dataclass
class CaseDiff(Record):
    """One paired case of a class: its fold, the Dice of A and B and ``A − B`` (None where NaN)."""

    case_id: str
    fold: int
    a: Optional[float]
    b: Optional[float]
    diff: Optional[float]


@dataclass
class ClassComparison(Record):
    """One class (or the foreground mean) of a :class:`Comparison`.

    Attributes:
        mean_a: nnU-Net's means of arm A over the paired cases, per metric of ``MEAN_METRICS`` (NaN ignored).
        mean_b: the same for arm B.
        Dice: paired statistics of the per-case Dice (field named as nnU-Net's metric, as in the JSON).
        cases: the per-case Dice pairs.
        IoU: paired statistics of the per-case IoU.
    """

    mean_a: Dict[str, float]
    mean_b: Dict[str, float]
    Dice: PairedStats
    cases: List[CaseDiff]
    IoU: PairedStats


@dataclass
class FoldDice(Record):
    """The foreground Dice of both arms over the paired cases of one fold."""

    fold: int
    n: int
    dice_a: float
    dice_b: float
    diff: float


@dataclass
class Comparison(Record):
    """Two arms paired by case id: per class and for the foreground mean (``classes[OVERALL]``), and per fold.

    Attributes:
        trainer_a: arm A's trainer; differences are ``A − B``.
        trainer_b: arm B's trainer.
        n_cases: cases validated in both arms.
        labels: the summary.json label keys, in :func:`label_sort_key` order.
        classes: ``{label key or OVERALL: ClassComparison}``.
        per_fold: the foreground Dice per fold.
        only_a: cases only arm A validated (left out).
        only_b: cases only arm B validated.
        fold_mismatch: paired cases the two arms validated in different folds.
        folds_a: folds of A with results.
        folds_b: folds of B with results.
        missing_a: folds of A without results.
        missing_b: folds of B without results.
    """

    trainer_a: str
    trainer_b: str
    n_cases: int
    labels: List[str]
    classes: Dict[str, ClassComparison]
    per_fold: List[FoldDice]
    only_a: List[str]
    only_b: List[str]
    fold_mismatch: List[str]
    folds_a: List[int]
    folds_b: List[int]
    missing_a: List[int]
    missing_b: List[int]


def _fg_keys(keys: Iterable[str]) -> List[str]:
    return [k for k in keys if k not in ("0", "(0,)")]


def _class_means(cases: Dict[str, ArmCase], ids: Sequence[str], labels: Sequence[str], metric: str
                 ) -> Dict[str, float]:
    out = {}
    for lab in labels:
        v = np.array([cases[c].metrics.get(lab, {}).get(metric, math.nan) for c in ids], dtype=float)
        out[lab] = float(np.nanmean(v)) if np.any(~np.isnan(v)) else math.nan
    fg = [out[k] for k in _fg_keys(labels)]
    out[OVERALL] = float(np.mean(fg)) if fg else math.nan  # nnU-Net: mean of the class means
    return out


def _per_case(cases: Dict[str, ArmCase], ids: Sequence[str], lab: str, metric: str) -> np.ndarray:
    if lab == OVERALL:
        vals = []
        for c in ids:
            m = cases[c].metrics
            v = np.array([m[k].get(metric, math.nan) for k in _fg_keys(m)], dtype=float)
            vals.append(float(np.nanmean(v)) if np.any(~np.isnan(v)) else math.nan)
        return np.array(vals, dtype=float)
    return np.array([cases[c].metrics.get(lab, {}).get(metric, math.nan) for c in ids], dtype=float)


def _nan_to_none(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) or np.isnan(x) else float(x)


def _compare_class(a: Dict[str, ArmCase], b: Dict[str, ArmCase], common: List[str], lab: str,
                   means: Dict[str, Tuple[Dict[str, float], Dict[str, float]]], n_boot: int, seed: int
                   ) -> ClassComparison:
    dice_a, dice_b = _per_case(a, common, lab, "Dice"), _per_case(b, common, lab, "Dice")
    cases = [CaseDiff(c, a[c].fold, _nan_to_none(x), _nan_to_none(y), _nan_to_none(x - y))
             for c, x, y in zip(common, dice_a, dice_b)]
    return ClassComparison(mean_a={m: means[m][0][lab] for m in MEAN_METRICS},
                           mean_b={m: means[m][1][lab] for m in MEAN_METRICS},
                           Dice=paired_stats(dice_a, dice_b, n_boot, seed), cases=cases,
                           IoU=paired_stats(_per_case(a, common, lab, "IoU"), _per_case(b, common, lab, "IoU"),
                                            n_boot, seed))


def compare_arms(arm_a: Arm, arm_b: Arm, n_boot: int = 10000, seed: int = 0) -> Comparison:
    """Pair two :func:`collect_arm` results by case id and compute per-class and overall statistics."""
    a, b = arm_a.cases, arm_b.cases
    common = sorted(set(a) & set(b))
    labels = sorted({k for c in common for k in a[c].metrics} | {k for c in common for k in b[c].metrics},
                    key=label_sort_key)
    means = {m: (_class_means(a, common, labels, m), _class_means(b, common, labels, m)) for m in MEAN_METRICS}
    per_fold = []
    for k in sorted({a[c].fold for c in common}):
        ids = [c for c in common if a[c].fold == k]
        da = _class_means(a, ids, labels, "Dice")[OVERALL]
        db = _class_means(b, ids, labels, "Dice")[OVERALL]
        per_fold.append(FoldDice(k, len(ids), da, db, da - db))
    return Comparison(
        trainer_a=arm_a.trainer, trainer_b=arm_b.trainer, n_cases=len(common), labels=labels,
        classes={lab: _compare_class(a, b, common, lab, means, n_boot, seed) for lab in labels + [OVERALL]},
        per_fold=per_fold, only_a=sorted(set(a) - set(b)), only_b=sorted(set(b) - set(a)),
        fold_mismatch=sorted(c for c in common if a[c].fold != b[c].fold),
        folds_a=arm_a.folds_found, folds_b=arm_b.folds_found, missing_a=arm_a.folds_missing,
        missing_b=arm_b.folds_missing)


# ================================================================================================ learning curves
@dataclass
class LearningCurve(Record):
    """Per-epoch losses and EMA pseudo Dice of one fold, and where they were read (a checkpoint or the logs)."""

    source: str
    train_losses: List[float]
    val_losses: List[float]
    ema_fg_dice: List[float]


def training_log_lines(folder: str) -> Iterator[str]:
    """The lines of a fold's ``training_log_*.txt`` files, oldest log first."""
    for path in sorted(glob.glob(os.path.join(folder, "training_log_*.txt"))):
        with open(path, errors="replace") as f:
            yield from f


def read_learning_curve(folder: str) -> Optional[LearningCurve]:
    """Per-epoch ``train_losses``, ``val_losses``, ``ema_fg_dice`` of a fold, or None.

    From the ``logging`` of ``checkpoint_final.pth`` (else ``checkpoint_latest.pth``), nnU-Net's own record; if no
    checkpoint is readable, parsed from ``training_log_*.txt`` (train/val loss and the pseudo Dice mean; the EMA is
    recomputed as nnU-Net does: ``0.9·ema + 0.1·dice``).
    """
    import torch
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            continue
        try:
            # memory-mapped: only the small logging record is read, not the weights and optimiser state
            log = torch.load(p, map_location="cpu", weights_only=False, mmap=True).get("logging", {})
        except Exception:
            continue
        n = min(len(log.get("train_losses", [])), len(log.get("val_losses", [])), len(log.get("ema_fg_dice", [])))
        if n:
            return LearningCurve(name, [float(x) for x in log["train_losses"][:n]],
                                 [float(x) for x in log["val_losses"][:n]],
                                 [float(x) for x in log["ema_fg_dice"][:n]])
    return _parse_training_logs(folder)


def _parse_training_logs(folder: str) -> Optional[LearningCurve]:
    epochs: Dict[int, Dict[str, float]] = {}
    cur = None
    for line in training_log_lines(folder):
        m = re.search(r"Epoch (\d+)\s*$", line)
        if m:
            cur = int(m.group(1))
            epochs.setdefault(cur, {})
            continue
        if cur is None:
            continue
        m = re.search(r"(train_loss|val_loss) (-?[\d.]+(?:e-?\d+)?|nan)", line)
        if m:
            epochs[cur][m.group(1)] = float(m.group(2))
        m = re.search(r"Pseudo dice \[(.*)\]", line)
        if m:
            vals = [float(v) for v in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", re.sub(r"np\.\w+", "", m.group(1)))]
            if vals:
                epochs[cur]["dice"] = float(np.mean(vals))
    full = [e for e in sorted(epochs) if {"train_loss", "val_loss", "dice"} <= set(epochs[e])]
    if not full:
        return None
    ema: Optional[float] = None
    out = []
    for e in full:
        ema = epochs[e]["dice"] if ema is None else 0.9 * ema + 0.1 * epochs[e]["dice"]
        out.append(ema)
    return LearningCurve("training_log", [epochs[e]["train_loss"] for e in full],
                         [epochs[e]["val_loss"] for e in full], out)
