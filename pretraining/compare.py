"""``pgl_compare``: does PGL pretraining help on this dataset? Paired evidence from nnU-Net's own validation.

For a pair of trainers (default ``nnUNetTrainerPGL`` vs its scratch twin ``nnUNetTrainerScratch``) the command reads
the ``validation/summary.json`` that nnU-Net writes after training each fold
(``$nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>/fold_K/validation/summary.json``; with ``--run`` it
first trains what is missing, one ``nnUNetv2_train`` at a time, resumable), pairs the validation cases of the two
arms by case id (each case is validated in exactly one fold), and reports per class and for the foreground mean:

* mean Dice, IoU, FP and FN per arm (nnU-Net's definitions: class means ignore NaN, i.e. cases where a class is
  absent from reference and prediction; the foreground mean is the mean of the class means);
* the paired per-case Dice differences ``Δ = A − B``: mean, a percentile-bootstrap 95 % CI of the mean (seeded),
  the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``: exact for n ≤ 50 without ties, normal
  approximation otherwise; zero differences dropped; ``n/a`` when fewer than 2 pairs or all differences are 0;
  not adjusted for the number of classes) and win/loss/tie counts. A case whose Dice is NaN in either arm for a
  class is left out of that class's paired test; the per-case foreground value is the mean of its non-NaN classes;
* per fold, the foreground Dice of both arms (the variance the mean hides);
* with ``--fractions``, the same for each labeled fraction (``<trainer>_fracNN`` variants, see
  :mod:`nnunet_pgl.trainers.fractions`) and a Dice-vs-fraction table;
* a **leakage guard**: which validation cases the PGL checkpoint(s) saw during pretraining (``pgl_meta['cases']``):
  labeled ones by case id, unlabeled ones by the sha256 of the raw image files (byte-identical copies only).

Outputs: Markdown (printed and written), JSON and a PNG figure in ``-o`` (default
``$nnUNet_results/<Dataset>/pgl_compare/``), named ``pgl_compare_<Dataset>.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_PAIR = ("nnUNetTrainerPGL", "nnUNetTrainerScratch")
OVERALL = "foreground mean"
PAIRED_METRICS = ("Dice", "IoU")
MEAN_METRICS = ("Dice", "IoU", "FP", "FN")
_INIT_LINE = re.compile(r"PGL initialisation from (.+?): loaded \d+ tensors")


class CompareError(RuntimeError):
    """Something the user can fix (missing results, unknown trainer, ...); the message says what to run."""


# ================================================================================================ statistics
def bootstrap_ci(diffs: ArrayLike, n_boot: int = 10000, seed: int = 0, alpha: float = 0.05
                 ) -> Tuple[float, float]:
    """Percentile-bootstrap ``1 − alpha`` CI of the mean of ``diffs`` (NaN, NaN for no data).

    ``n_boot`` resamples of ``len(diffs)`` values with replacement from ``np.random.default_rng(seed)``; the CI is
    the ``alpha/2`` and ``1 − alpha/2`` percentiles of the resampled means (numpy's linear interpolation).
    """
    d = np.asarray(diffs, dtype=float)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: need at least 1 bootstrap resample (10000 is a good default)")
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // d.size)  # bounded memory for large n
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        means[start:start + m] = d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def wilcoxon_p(diffs: ArrayLike) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; None ('n/a') if n < 2 or all are zero."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2 or not np.any(d != 0):
        return None
    from scipy.stats import wilcoxon
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-n / ties notes of scipy
        return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def win_loss_tie(diffs: ArrayLike) -> Tuple[int, int, int]:
    """Counts of differences > 0 (A wins), < 0 (A loses) and == 0."""
    d = np.asarray(diffs, dtype=float)
    return int(np.sum(d > 0)), int(np.sum(d < 0)), int(np.sum(d == 0))


def paired_stats(a: ArrayLike, b: ArrayLike, n_boot: int = 10000, seed: int = 0) -> Dict[str, Any]:
    """Paired comparison of per-case values ``a`` and ``b`` (same order); pairs with a NaN on either side dropped.

    Returns ``n``, ``n_nan`` (pairs dropped), ``mean_a``, ``mean_b``, ``mean_diff`` (of ``a − b``),
    ``median_diff``, ``ci_low``/``ci_high`` (:func:`bootstrap_ci`), ``p`` (:func:`wilcoxon_p`, None = n/a) and
    ``wins``/``losses``/``ties`` (:func:`win_loss_tie`).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_stats needs the same number of values on both sides, got {x.shape} and {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    d = x[ok] - y[ok]
    lo, hi = bootstrap_ci(d, n_boot, seed)
    w, lo_, t = win_loss_tie(d)
    return {"n": int(d.size), "n_nan": int((~ok).sum()),
            "mean_a": float(x[ok].mean()) if d.size else math.nan,
            "mean_b": float(y[ok].mean()) if d.size else math.nan,
            "mean_diff": float(d.mean()) if d.size else math.nan,
            "median_diff": float(np.median(d)) if d.size else math.nan,
            "ci_low": lo, "ci_high": hi, "p": wilcoxon_p(d), "wins": w, "losses": lo_, "ties": t}


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


def read_summary(path: str, file_ending: Optional[str] = None) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{case_id: {label_key: {metric: value}}}`` from an nnU-Net ``summary.json`` (``metric_per_case``)."""
    with open(path) as f:
        s = json.load(f)
    if "metric_per_case" not in s:
        raise CompareError(f"{path} has no 'metric_per_case': not an nnU-Net validation summary.json")
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for entry in s["metric_per_case"]:
        cid = case_id_from_file(entry.get("reference_file") or entry["prediction_file"], file_ending)
        out[cid] = {str(k): {m: (math.nan if v is None else float(v)) for m, v in mv.items()}
                    for k, mv in entry["metrics"].items()}
    return out


def trainer_dir(results_dataset: str, trainer: str, plans: str, configuration: str) -> str:
    return os.path.join(results_dataset, f"{trainer}__{plans}__{configuration}")


def collect_arm(results_dataset: str, trainer: str, plans: str, configuration: str, folds: Sequence[int],
                file_ending: Optional[str] = None) -> Dict[str, Any]:
    """Every validation case of ``trainer`` over ``folds``: ``{'cases': {case_id: {'fold', 'metrics'}},
    'folds_found', 'folds_missing', 'summaries'}``. A case validated in two folds is an error (pairs would count
    twice)."""
    cases: Dict[str, Dict[str, Any]] = {}
    found, missing, files = [], [], []
    for k in folds:
        path = os.path.join(trainer_dir(results_dataset, trainer, plans, configuration), f"fold_{k}", "validation",
                            "summary.json")
        if not os.path.isfile(path):
            missing.append(k)
            continue
        found.append(k)
        files.append(path)
        for cid, metrics in read_summary(path, file_ending).items():
            if cid in cases:
                raise CompareError(f"{trainer}: case {cid} is validated in fold {cases[cid]['fold']} and fold {k}; "
                                   "pgl_compare pairs each case once. Check splits_final.json (validation sets of "
                                   "the folds must not overlap)")
            cases[cid] = {"fold": k, "metrics": metrics}
    return {"trainer": trainer, "cases": cases, "folds_found": found, "folds_missing": missing, "summaries": files}


def _fg_keys(keys: Iterable[str]) -> List[str]:
    return [k for k in keys if k not in ("0", "(0,)")]


def _class_means(cases: Dict[str, Dict[str, Any]], ids: Sequence[str], labels: Sequence[str], metric: str
                 ) -> Dict[str, float]:
    out = {}
    for lab in labels:
        v = np.array([cases[c]["metrics"].get(lab, {}).get(metric, math.nan) for c in ids], dtype=float)
        out[lab] = float(np.nanmean(v)) if np.any(~np.isnan(v)) else math.nan
    fg = [out[k] for k in _fg_keys(labels)]
    out[OVERALL] = float(np.mean(fg)) if fg else math.nan  # nnU-Net: mean of the class means
    return out


def _per_case(cases: Dict[str, Dict[str, Any]], ids: Sequence[str], lab: str, metric: str) -> np.ndarray:
    if lab == OVERALL:
        vals = []
        for c in ids:
            m = cases[c]["metrics"]
            v = np.array([m[k].get(metric, math.nan) for k in _fg_keys(m)], dtype=float)
            vals.append(float(np.nanmean(v)) if np.any(~np.isnan(v)) else math.nan)
        return np.array(vals, dtype=float)
    return np.array([cases[c]["metrics"].get(lab, {}).get(metric, math.nan) for c in ids], dtype=float)


def compare_arms(arm_a: Dict[str, Any], arm_b: Dict[str, Any], n_boot: int = 10000, seed: int = 0
                 ) -> Dict[str, Any]:
    """Pair two :func:`collect_arm` results by case id and compute per-class and overall statistics."""
    a, b = arm_a["cases"], arm_b["cases"]
    common = sorted(set(a) & set(b))
    fold_mismatch = sorted(c for c in common if a[c]["fold"] != b[c]["fold"])
    labels = sorted({k for c in common for k in a[c]["metrics"]} | {k for c in common for k in b[c]["metrics"]},
                    key=label_sort_key)
    classes: Dict[str, Any] = {}
    means = {m: (_class_means(a, common, labels, m), _class_means(b, common, labels, m)) for m in MEAN_METRICS}
    for lab in list(labels) + [OVERALL]:
        entry: Dict[str, Any] = {"mean_a": {m: means[m][0][lab] for m in MEAN_METRICS},
                                 "mean_b": {m: means[m][1][lab] for m in MEAN_METRICS}}
        for m in PAIRED_METRICS:
            va, vb = _per_case(a, common, lab, m), _per_case(b, common, lab, m)
            entry[m] = paired_stats(va, vb, n_boot, seed)
            if m == "Dice":
                entry["cases"] = [{"case_id": c, "fold": a[c]["fold"], "a": _nan_to_none(x), "b": _nan_to_none(y),
                                   "diff": _nan_to_none(x - y)} for c, x, y in zip(common, va, vb)]
        classes[lab] = entry
    per_fold = []
    for k in sorted({a[c]["fold"] for c in common}):
        ids = [c for c in common if a[c]["fold"] == k]
        da = _class_means(a, ids, labels, "Dice")[OVERALL]
        db = _class_means(b, ids, labels, "Dice")[OVERALL]
        per_fold.append({"fold": k, "n": len(ids), "dice_a": da, "dice_b": db, "diff": da - db})
    return {"trainer_a": arm_a["trainer"], "trainer_b": arm_b["trainer"], "n_cases": len(common),
            "labels": labels, "classes": classes, "per_fold": per_fold,
            "only_a": sorted(set(a) - set(b)), "only_b": sorted(set(b) - set(a)), "fold_mismatch": fold_mismatch,
            "folds_a": arm_a["folds_found"], "folds_b": arm_b["folds_found"],
            "missing_a": arm_a["folds_missing"], "missing_b": arm_b["folds_missing"]}


def _nan_to_none(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) or np.isnan(x) else float(x)


# ================================================================================================ trainers
def fraction_suffix(fraction: float) -> str:
    """``0.1 → '_frac10'``, ``0.25 → '_frac25'``, ``1.0 → ''`` (the base trainer)."""
    if not 0 < fraction <= 1:
        raise CompareError(f"--fractions {fraction:g}: a labeled fraction must be in (0, 1] (1.0 = all cases)")
    pct = fraction * 100
    if abs(pct - round(pct)) > 1e-6:
        raise CompareError(f"--fractions {fraction:g}: use whole percentages (0.1, 0.25, 0.5, ...); the trainer "
                           "variants are named <trainer>_fracNN")
    return "" if round(pct) == 100 else f"_frac{int(round(pct))}"


def find_trainer_class(name: str):
    """The trainer class nnU-Net would use for ``-tr name`` (built-ins, then ``nnUNet_extTrainer``), or None."""
    from nnunet_pgl.trainers.discovery import ensure_ext_trainer_env
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    ensure_ext_trainer_env()
    with contextlib.redirect_stdout(io.StringIO()):  # the search prints every folder it scans
        try:
            return recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            return None


def _available_fraction_variants(base: str) -> List[str]:
    from nnunet_pgl.trainers import fractions
    return sorted((n[len(base):] for n in dir(fractions) if n.startswith(base + "_frac")
                   and n[len(base) + 5:].isdigit()), key=lambda s: int(s[5:]))


def resolve_trainers(pair: Sequence[str], fractions: Sequence[float]) -> Dict[float, Tuple[Any, Any]]:
    """``{fraction: (class_a, class_b)}``; CompareError naming the missing class and the variants that exist."""
    out = {}
    for f in fractions:
        classes = []
        for base in pair:
            name = base + fraction_suffix(f)
            cls = find_trainer_class(name)
            if cls is None:
                if f < 1:
                    have = _available_fraction_variants(base)
                    raise CompareError(
                        f"--fractions {f:g} needs the trainer class {name}, which does not exist. Label-fraction "
                        f"variants of {base}: {', '.join(have) if have else 'none'} (defined in "
                        "nnunet_pgl/trainers/fractions.py: add a subclass with LabelFractionMixin and "
                        "label_fraction, and re-export it in trainers/ext/nnunet_pgl_trainers.py)")
                raise CompareError(f"trainer {name} not found by nnU-Net (built-ins or nnUNet_extTrainer="
                                   f"{os.environ.get('nnUNet_extTrainer', '')}): check the name")
            classes.append(cls)
        out[f] = (classes[0], classes[1])
    return out


def is_pgl_trainer(cls) -> bool:
    """A trainer initialised from a PGL checkpoint (declares ``pgl_method``)."""
    return isinstance(getattr(cls, "pgl_method", None), str)


# ================================================================================================ training
def fold_state(fold_dir: str) -> str:
    """'done' (summary.json), 'val' (final checkpoint, no summary), 'continue' (latest only) or 'train'."""
    if os.path.isfile(os.path.join(fold_dir, "validation", "summary.json")):
        return "done"
    if os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
        return "val"
    if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")):
        return "continue"
    return "train"


def training_jobs(results_dataset: str, trainers_by_fraction: Dict[float, Tuple[str, str]], plans: str,
                  configuration: str, folds: Sequence[int]) -> List[Dict[str, Any]]:
    """What ``--run`` does, in order (fraction, fold, arm: so that finished pairs accumulate early)."""
    jobs = []
    for f, pair in trainers_by_fraction.items():
        for k in folds:
            for t in pair:
                state = fold_state(os.path.join(trainer_dir(results_dataset, t, plans, configuration), f"fold_{k}"))
                if state != "done":
                    jobs.append({"trainer": t, "fold": k, "state": state, "fraction": f})
    return jobs


def train_command(dataset: str, configuration: str, fold: int, trainer: str, plans: str, device: str,
                  state: str) -> List[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    if not os.path.isfile(exe):
        exe = shutil.which("nnUNetv2_train") or "nnUNetv2_train"
    cmd = [exe, dataset, configuration, str(fold), "-tr", trainer, "-p", plans, "-device", device]
    return cmd + {"val": ["--val"], "continue": ["--c"]}.get(state, [])


def run_jobs(jobs: List[Dict[str, Any]], dataset: str, configuration: str, plans: str, device: str) -> None:
    """Run ``nnUNetv2_train`` for each job, sequentially, output passed through; CompareError on a failure."""
    from nnunet_pgl.trainers.discovery import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    for i, j in enumerate(jobs):
        cmd = train_command(dataset, configuration, j["fold"], j["trainer"], plans, device, j["state"])
        print(f"[pgl_compare] {i + 1}/{len(jobs)}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env=dict(os.environ))
        if rc != 0:
            raise CompareError(f"{shlex.join(cmd)} failed (exit {rc}); its output is above. Fix it and re-run "
                               "pgl_compare --run: finished folds are kept, a run with a checkpoint_latest resumes")


# ================================================================================================ learning curves
def read_learning_curve(fold_dir: str) -> Optional[Dict[str, Any]]:
    """Per-epoch ``train_losses``, ``val_losses``, ``ema_fg_dice`` of a fold, or None.

    From the ``logging`` of ``checkpoint_final.pth`` (else ``checkpoint_latest.pth``), nnU-Net's own record; if no
    checkpoint is readable, parsed from ``training_log_*.txt`` (train/val loss and the pseudo Dice mean; the EMA is
    recomputed as nnU-Net does: ``0.9·ema + 0.1·dice``).
    """
    import torch
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        p = os.path.join(fold_dir, name)
        if not os.path.isfile(p):
            continue
        try:
            log = torch.load(p, map_location="cpu", weights_only=False).get("logging", {})
        except Exception:
            continue
        n = min(len(log.get("train_losses", [])), len(log.get("val_losses", [])), len(log.get("ema_fg_dice", [])))
        if n:
            return {"source": name, "train_losses": [float(x) for x in log["train_losses"][:n]],
                    "val_losses": [float(x) for x in log["val_losses"][:n]],
                    "ema_fg_dice": [float(x) for x in log["ema_fg_dice"][:n]]}
    return _parse_training_logs(fold_dir)


def _parse_training_logs(fold_dir: str) -> Optional[Dict[str, Any]]:
    epochs: Dict[int, Dict[str, float]] = {}
    cur = None
    for path in sorted(glob.glob(os.path.join(fold_dir, "training_log_*.txt"))):
        with open(path, errors="replace") as f:
            for line in f:
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
    ema, out = None, []
    for e in full:
        ema = epochs[e]["dice"] if ema is None else 0.9 * ema + 0.1 * epochs[e]["dice"]
        out.append(ema)
    return {"source": "training_log", "train_losses": [epochs[e]["train_loss"] for e in full],
            "val_losses": [epochs[e]["val_loss"] for e in full], "ema_fg_dice": out}


# ================================================================================================ leakage guard
def checkpoint_from_training_log(fold_dir: str) -> Optional[str]:
    """The PGL checkpoint a fine-tuning run loaded, from its ``PGL initialisation from <path>`` log line."""
    for path in sorted(glob.glob(os.path.join(fold_dir, "training_log_*.txt"))):
        with open(path, errors="replace") as f:
            for line in f:
                m = _INIT_LINE.search(line)
                if m:
                    return m.group(1)
    return None


def conventional_checkpoint(trainer_cls, plans: dict, configuration: str, fold: Any
                            ) -> Tuple[Optional[str], Optional[str]]:
    """``(path, None)`` of the checkpoint the PGL trainer would choose for this fold now (``$nnUNet_pgl_weights``,
    else ``fold_K``, ``fold_all``, a ``pgl_transfer`` record: :func:`~nnunet_pgl.trainers.pgl.choose_pgl_checkpoint`),
    or ``(None, why not)``."""
    from nnunet_pgl.pretraining.contract import PGLCheckpointError, choose_pgl_checkpoint
    try:
        return choose_pgl_checkpoint(plans, configuration, fold, trainer_cls.pretrainer(),
                                     trainer_cls.__name__).path, None
    except PGLCheckpointError as e:
        return None, str(e)


def raw_image_files(raw_dataset: str, dataset_json: dict, case_ids: Iterable[str]) -> Dict[str, List[str]]:
    """``{case_id: [channel files in channel order (+ detached data files)]}`` of raw training images.

    The same files, in the same order, that ingestion hashes for an unlabeled case: channel files ``_0000``,
    ``_0001``, … each followed by its detached data file (``.mhd``/``.nhdr``/``.hdr`` headers). Cases whose files
    are not found are left out.
    """
    from nnunet_pgl.pretraining.ingest import _companions
    ids = set(case_ids)
    out: Dict[str, List[str]] = {}
    if "dataset" in dataset_json:  # nnU-Net's explicit file lists
        for cid, e in dataset_json["dataset"].items():
            if cid in ids:
                out[cid] = [p if os.path.isabs(p) else os.path.abspath(os.path.join(raw_dataset, p))
                            for p in (os.path.expandvars(i) for i in e["images"])]
    else:
        ending = dataset_json.get("file_ending", ".nii.gz")
        folder = os.path.join(raw_dataset, "imagesTr")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for cid in ids:
            pat = re.compile(re.escape(cid) + r"_\d{4}" + re.escape(ending))
            files = [os.path.join(folder, n) for n in names if pat.fullmatch(n)]
            if files:
                out[cid] = files
    for cid, files in out.items():
        out[cid] = [q for p in files for q in [p] + _companions(p) if os.path.isfile(q)]
    return {c: f for c, f in out.items() if f}


def find_leaks(meta: Dict[str, Any], dataset_name: str, val_by_fold: Dict[int, List[str]],
               raw_files: Dict[str, List[str]], preprocessed_files: Optional[Dict[str, str]] = None,
               ) -> Dict[int, Dict[str, Any]]:
    """Validation cases a checkpoint saw in pretraining, per fold.

    Args:
        meta: the checkpoint's ``pgl_meta`` (``cases``: ``{case_id, kind, sha256, source?}``; ``dataset_name``).
        dataset_name: the dataset being compared.
        val_by_fold: validation case ids per fold.
        raw_files: :func:`raw_image_files` of (at least) the validation cases; unlabeled pretraining cases are
            matched by ``sha256_of_files`` of these. A case without raw files cannot be checked (``unchecked``).
        preprocessed_files: ``{case_id: <case>.b2nd}``; used only when the checkpoint was pretrained on another
            dataset, to match its labeled cases by hash instead of by case id.

    Returns:
        ``{fold: {'n_val', 'labeled': [case ids], 'unlabeled': [{case_id, pretrain_case_id, source}],
        'unchecked': [case ids], 'leaked': sorted case ids}}``.
    """
    from nnunet_pgl.pretraining.ingest import sha256_of_files
    cases = meta.get("cases") or []
    same_dataset = meta.get("dataset_name") in (None, dataset_name)
    labeled_ids = {c["case_id"] for c in cases if c.get("kind") == "labeled"}
    labeled_sha = {c["sha256"]: c["case_id"] for c in cases if c.get("kind") == "labeled" and c.get("sha256")}
    unlabeled = {c["sha256"]: c for c in cases if c.get("kind") == "unlabeled" and c.get("sha256")}
    sha_cache: Dict[str, str] = {}
    out: Dict[int, Dict[str, Any]] = {}
    for fold, val in val_by_fold.items():
        lab, unl, unchecked = [], [], []
        for cid in val:
            if same_dataset and cid in labeled_ids:
                lab.append(cid)
            elif not same_dataset and labeled_sha and preprocessed_files and cid in preprocessed_files:
                sha = sha_cache.setdefault("pre:" + cid, sha256_of_files([preprocessed_files[cid]]))
                if sha in labeled_sha:
                    lab.append(cid)
            if unlabeled:
                if cid not in raw_files:
                    unchecked.append(cid)
                    continue
                sha = sha_cache.setdefault("raw:" + cid, sha256_of_files(raw_files[cid]))
                if sha in unlabeled:
                    u = unlabeled[sha]
                    unl.append({"case_id": cid, "pretrain_case_id": u["case_id"], "source": u.get("source", [])})
        leaked = sorted(set(lab) | {u["case_id"] for u in unl})
        out[fold] = {"n_val": len(val), "labeled": lab, "unlabeled": unl, "unchecked": unchecked, "leaked": leaked}
    return out


def leakage_guard(arms: Dict[float, Tuple[Any, Any]], results_dataset: str, plans: dict, plans_name: str,
                  configuration: str, dataset_json: dict, val_by_fold: Dict[int, List[str]],
                  raw_dataset: Optional[str], preprocessed_folder: Optional[str]) -> List[Dict[str, Any]]:
    """One entry per (PGL-type arm, checkpoint): the checkpoint path, how it was found, and :func:`find_leaks`.

    The checkpoint of each fold is the one its training log says it loaded; folds without that line (not trained
    yet, or resumed logs) use the one the trainer would choose now for that fold (``$nnUNet_pgl_weights``, else
    ``fold_K``, ``fold_all``, a ``pgl_transfer`` record).
    """
    from nnunet_pgl.pretraining.contract import PGLCheckpointError, read_pgl_checkpoint
    entries: Dict[Tuple[str, str], Dict[str, Any]] = {}
    raw: Optional[Dict[str, List[str]]] = None
    for f, classes in arms.items():
        for cls in classes:
            if not is_pgl_trainer(cls):
                continue
            name = cls.__name__
            for fold in val_by_fold:
                fd = os.path.join(trainer_dir(results_dataset, name, plans_name, configuration), f"fold_{fold}")
                path, how, why_not = checkpoint_from_training_log(fd), "training log", None
                if path is None:
                    (path, why_not), how = conventional_checkpoint(cls, plans, configuration, fold), "lookup"
                key = (cls.pretrainer(), str(path))
                e = entries.setdefault(key, {"pretrainer": cls.pretrainer(), "checkpoint": path, "arms": [],
                                             "found_by": set(), "folds": {}, "error": None, "why_not": why_not})
                if name not in e["arms"]:
                    e["arms"].append(name)
                e["found_by"].add(how)
                e["folds"][fold] = None
    for e in entries.values():
        folds = sorted(e["folds"])
        e["found_by"] = sorted(e["found_by"])
        path = e["checkpoint"]
        why_not = e.pop("why_not", None)
        if path is None or not os.path.isfile(path):
            e["error"] = why_not or f"checkpoint not found at {path}"
            e["folds"] = {}
            continue
        try:
            meta = read_pgl_checkpoint(path).get("pgl_meta") or {}
        except PGLCheckpointError as ex:
            e["error"] = str(ex)
            e["folds"] = {}
            continue
        if "cases" not in meta:
            e["error"] = f"{path} has no pgl_meta['cases'] (written by an older pgl_pretrain?): cannot check"
            e["folds"] = {}
            continue
        if raw is None:
            all_val = [c for v in val_by_fold.values() for c in v]
            raw = raw_image_files(raw_dataset, dataset_json, all_val) if raw_dataset and os.path.isdir(raw_dataset) \
                else {}
        pre = None
        if meta.get("dataset_name") not in (None, plans.get("dataset_name")) and preprocessed_folder:
            pre = {c: os.path.join(preprocessed_folder, c + ".b2nd") for v in val_by_fold.values() for c in v
                   if os.path.isfile(os.path.join(preprocessed_folder, c + ".b2nd"))}
        e["method"] = meta.get("method")
        e["n_pretrain_cases"] = len(meta["cases"])
        e["n_unlabeled"] = sum(c.get("kind") == "unlabeled" for c in meta["cases"])
        e["folds"] = find_leaks(meta, plans.get("dataset_name", ""), {k: val_by_fold[k] for k in folds}, raw, pre)
    return list(entries.values())


# ================================================================================================ rendering
def _f(x: Optional[float], nd: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _p(p: Optional[float]) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def label_names(dataset_json: dict) -> Dict[str, str]:
    """summary.json label keys → names from ``dataset.json['labels']`` (labels and regions)."""
    out = {}
    for name, v in (dataset_json.get("labels") or {}).items():
        if isinstance(v, int):
            out[str(v)] = name
        elif isinstance(v, (list, tuple)):
            out[str(tuple(int(i) for i in v))] = name
            if len(v) == 1:
                out[str(int(v[0]))] = name
    return out


def _name(lab: str, names: Dict[str, str]) -> str:
    return f"**{OVERALL}**" if lab == OVERALL else f"{names.get(lab, lab)} ({lab})"


def _frac_label(f: float) -> str:
    return f"{f * 100:g} % labeled"


def leakage_lines(guard: List[Dict[str, Any]], dataset: str, configuration: str, plans: str) -> List[str]:
    """The prominent lines at the top of the report: one per leaking (checkpoint, fold) and how to fix it, or
    'no leakage'."""
    from nnunet_pgl.pretraining.contract import pretrain_command
    lines = []
    checked_any = False
    fixes = []
    for e in guard:
        if e["error"]:
            lines.append(f"**Leakage guard: could not check {', '.join(e['arms'])}: {e['error']}.**")
            continue
        who = f"{e['pretrainer']} checkpoint of {', '.join(e['arms'])}" if len(guard) > 1 else ""
        leaked_folds = []
        for fold, r in sorted(e["folds"].items()):
            checked_any = True
            if not r["leaked"]:
                continue
            leaked_folds.append(fold)
            k, n = len(r["leaked"]), r["n_val"]
            parts = ([who] if who else []) + ([f"labeled images: {', '.join(r['labeled'])}"] if r["labeled"] else [])
            if r["unlabeled"]:
                parts.append("unlabeled copies: " + "; ".join(
                    f"{u['case_id']} = {', '.join(u['source']) or u['pretrain_case_id']}" for u in r["unlabeled"]))
            lines.append(f"**LEAKAGE: {k} of {n} validation cases of fold {fold} were seen in pretraining; rerun "
                         f"pgl_pretrain --exclude-fold {fold}** ({'; '.join(parts)})")
        if leaked_folds:
            fix = (f"To fix ({e['pretrainer']}): `{pretrain_command(dataset, configuration, plans, e['pretrainer'])} "
                   f"--folds {' '.join(map(str, leaked_folds))}` (one pretraining per fold, each written to its own "
                   "fold_K folder, which the PGL trainers then use for fold K without `nnUNet_pgl_weights`), then "
                   "train those folds again (delete their fold_K result folders first)")
            if any(r["unlabeled"] for r in e["folds"].values()):
                fix += ("; --exclude-fold leaves out labeled images only: remove the listed copies from the "
                        "--unlabeled folders")
            fixes.append(fix + ".")
    lines += fixes
    if checked_any and not any(ln.startswith("**LEAKAGE") for ln in lines):
        n_by_fold = {k: r["n_val"] for e in guard if not e["error"] for k, r in e["folds"].items()}
        ckpts = [f"`{e['checkpoint']}`" for e in guard if not e["error"]]
        lines.append(f"**Leakage guard: no leakage** — none of the {sum(n_by_fold.values())} validation cases of "
                     f"fold{'s' if len(n_by_fold) > 1 else ''} {' '.join(map(str, sorted(n_by_fold)))} was seen in "
                     f"pretraining ({', '.join(ckpts)}).")
    for e in guard:
        unchecked = sorted({c for r in e["folds"].values() for c in r["unchecked"]})
        if unchecked:
            lines.append(f"**Leakage guard: raw images of {len(unchecked)} validation case(s) not found "
                         f"({', '.join(unchecked[:10])}{', ...' if len(unchecked) > 10 else ''}): their unlabeled "
                         f"copies could not be checked.**")
    if not guard:
        lines.append("Leakage guard: neither arm is initialised from a PGL checkpoint: nothing to check.")
    return lines


def render_markdown(result: Dict[str, Any]) -> str:
    a, b = result["pair"]
    names = result["label_names"]
    L = [f"# Does pretraining help? {a} vs {b} on {result['dataset']}", ""]
    L += [ln + "\n" for ln in result["leakage_lines"]]
    L += [f"`{result['command']}`  ", f"configuration `{result['configuration']}`, plans `{result['plans']}`, folds "
          f"{' '.join(map(str, result['folds']))}; {result['created']}; nnunet_pgl {result['versions']['nnunet_pgl']}, "
          f"nnunetv2 {result['versions']['nnunetv2']}", ""]
    L += [f"A = `{a}`, B = `{b}`. Δ = A − B per validation case, paired by case id across folds (positive: A is "
          f"better); Dice A/B and n: the means over those pairs. 95 % CI: percentile bootstrap of the mean Δ "
          f"({result['n_boot']} resamples, seed {result['seed']}). p: two-sided Wilcoxon signed-rank, not adjusted "
          "for the number of classes. W/L/T: cases where A's Dice is higher / lower / equal. A case whose Dice is NaN "
          "for a class (class absent in reference and prediction) is left out of that class, as in nnU-Net's means; "
          "a case's foreground value is the mean of its other classes. FP/FN: mean voxel counts per case.", ""]
    for fr in result["fractions"]:
        c = fr.get("comparison")
        ta, tb = fr["trainers"]
        title = f"## {_frac_label(fr['fraction'])}: {ta} vs {tb}"
        if c is None:
            L += [title, "", f"No paired results yet ({fr['status']}).", ""]
            continue
        L += [title + f" — {c['n_cases']} paired cases", ""]
        L += ["| class | n | Dice A | Dice B | mean Δ Dice | 95 % CI | Wilcoxon p | W/L/T |",
              "|---|---|---|---|---|---|---|---|"]
        for lab in [OVERALL] + c["labels"]:
            s = c["classes"][lab]["Dice"]
            L.append(f"| {_name(lab, names)} | {s['n']} | {_f(s['mean_a'])} | {_f(s['mean_b'])} | "
                     f"{_f(s['mean_diff'], sign=True)} | [{_f(s['ci_low'], sign=True)}, {_f(s['ci_high'], sign=True)}] "
                     f"| {_p(s['p'])} | {s['wins']}/{s['losses']}/{s['ties']} |")
        L += ["", f"nnU-Net's means over the {c['n_cases']} cases (as its summary.json computes them):", "",
              "| class | Dice A | Dice B | IoU A | IoU B | FP A | FP B | FN A | FN B |",
              "|---|---|---|---|---|---|---|---|---|"]
        for lab in [OVERALL] + c["labels"]:
            ma, mb = c["classes"][lab]["mean_a"], c["classes"][lab]["mean_b"]
            L.append(f"| {_name(lab, names)} | {_f(ma['Dice'])} | {_f(mb['Dice'])} | {_f(ma['IoU'])} | {_f(mb['IoU'])} "
                     f"| {_f(ma['FP'], 1)} | {_f(mb['FP'], 1)} | {_f(ma['FN'], 1)} | {_f(mb['FN'], 1)} |")
        L += ["", "| fold | n | foreground Dice A | foreground Dice B | Δ |", "|---|---|---|---|---|"]
        for pf in c["per_fold"]:
            L.append(f"| {pf['fold']} | {pf['n']} | {_f(pf['dice_a'])} | {_f(pf['dice_b'])} | "
                     f"{_f(pf['diff'], sign=True)} |")
        notes = []
        if c["missing_a"] or c["missing_b"]:
            notes.append(f"missing folds: {ta}: {c['missing_a'] or 'none'}, {tb}: {c['missing_b'] or 'none'} "
                         "(add --run to train them)")
        if c["only_a"] or c["only_b"]:
            notes.append(f"unpaired cases left out: {len(c['only_a'])} only in {ta}, {len(c['only_b'])} only in {tb}")
        if c["fold_mismatch"]:
            notes.append(f"{len(c['fold_mismatch'])} cases validated in different folds by the two arms (different "
                         "splits?)")
        L += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    done = [fr for fr in result["fractions"] if fr.get("comparison")]
    if len(done) > 1:
        L += ["## Dice vs labeled fraction (foreground mean)", "",
              f"| labeled | n | Dice {a} | Dice {b} | mean Δ | 95 % CI | Wilcoxon p | W/L/T |",
              "|---|---|---|---|---|---|---|---|"]
        for fr in done:
            s = fr["comparison"]["classes"][OVERALL]["Dice"]
            L.append(f"| {fr['fraction'] * 100:g} % | {s['n']} | {_f(s['mean_a'])} | {_f(s['mean_b'])} "
                     f"| {_f(s['mean_diff'], sign=True)} | [{_f(s['ci_low'], sign=True)}, "
                     f"{_f(s['ci_high'], sign=True)}] "
                     f"| {_p(s['p'])} | {s['wins']}/{s['losses']}/{s['ties']} |")
        L.append("")
    if result["leakage"]:
        L += ["## Leakage guard", ""]
        for e in result["leakage"]:
            head = (f"- `{e['checkpoint']}` ({e['pretrainer']}; used by {', '.join(e['arms'])}; found via "
                    f"{' and '.join(e['found_by'])})")
            if e["error"]:
                L.append(head + f": {e['error']}")
                continue
            L.append(head + f": {e['n_pretrain_cases']} pretraining cases ({e['n_unlabeled']} unlabeled)")
            for fold, r in sorted(e["folds"].items()):
                L.append(f"  - fold {fold}: {len(r['leaked'])} of {r['n_val']} validation cases seen"
                         + (f" ({', '.join(r['leaked'])})" if r["leaked"] else ""))
        L.append("")
    if result.get("figure"):
        L += ["## Figure", "", f"![pgl_compare]({os.path.basename(result['figure'])})", "",
              "Per-class paired Dice differences (points: cases; bar: mean and 95 % CI), learning curves from the "
              "checkpoints' logs (train/validation loss, EMA pseudo Dice; one line per fold)"
              + (", Dice vs labeled fraction." if len(done) > 1 else "."), ""]
    return "\n".join(L)


def plot_figure(result: Dict[str, Any], path: str) -> None:
    """PNG: per-class paired differences, learning curves and (with several fractions) Dice vs labeled fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a, b = result["pair"]
    done = [fr for fr in result["fractions"] if fr.get("comparison")]
    main = max(done, key=lambda fr: fr["fraction"])
    c = main["comparison"]
    from matplotlib.ticker import MaxNLocator, NullFormatter
    if len(done) > 1:
        fig, grid = plt.subplots(2, 2, figsize=(11.5, 9))
        axes = [grid[0, 0], grid[1, 0], grid[1, 1], grid[0, 1]]
    else:
        fig, grid = plt.subplots(1, 3, figsize=(16, 4.8))
        axes = list(grid)
    ax = axes[0]
    labs = [OVERALL] + c["labels"]
    rng = np.random.default_rng(0)
    for i, lab in enumerate(labs):
        e = c["classes"][lab]
        d = np.array([x["diff"] for x in e["cases"] if x["diff"] is not None], dtype=float)
        ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d, s=12, alpha=0.6, color="tab:gray")
        s = e["Dice"]
        if s["n"]:
            ax.errorbar(i + 0.3, s["mean_diff"], yerr=[[s["mean_diff"] - s["ci_low"]], [s["ci_high"] - s["mean_diff"]]],
                        fmt="o", color="tab:red", capsize=4)
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(labs)))
    ax.set_xticklabels([OVERALL if lab == OVERALL else result["label_names"].get(lab, lab) for lab in labs],
                       rotation=30, ha="right")
    ax.set_ylabel("Δ Dice = A − B")
    ax.set_title(f"A − B per case ({_frac_label(main['fraction'])}, n={c['n_cases']})\nA = {main['trainers'][0]}\n"
                 f"B = {main['trainers'][1]}", fontsize=9)
    colors = {a: "tab:blue", b: "tab:orange"}
    for arm, curves in main["curves"].items():
        col = colors[a] if arm == main["trainers"][0] else colors[b]
        for j, (fold, cur) in enumerate(sorted(curves.items())):
            if cur is None:
                continue
            ep = np.arange(len(cur["train_losses"]))
            lbl = arm if j == 0 else None
            axes[1].plot(ep, cur["train_losses"], color=col, lw=1, label=lbl, marker="." if len(ep) < 5 else None)
            axes[1].plot(ep, cur["val_losses"], color=col, lw=1, ls="--", marker="." if len(ep) < 5 else None)
            axes[2].plot(ep, cur["ema_fg_dice"], color=col, lw=1, label=lbl, marker="." if len(ep) < 5 else None)
    axes[1].set_title("loss (solid: train, dashed: validation)")
    axes[1].set_xlabel("epoch")
    axes[2].set_title("EMA pseudo Dice (nnU-Net's checkpoint_best criterion)")
    axes[2].set_xlabel("epoch")
    for x in axes[1:3]:
        x.xaxis.set_major_locator(MaxNLocator(integer=True))
        if x.get_xlim()[1] - x.get_xlim()[0] < 1:  # a single epoch
            x.set_xlim(-0.5, 0.5)
            x.set_xticks([0])
        if x.get_legend_handles_labels()[0]:
            x.legend(fontsize=8)
    if len(done) > 1:
        ax = axes[3]
        fx = [fr["fraction"] * 100 for fr in done]
        for side, arm, key in ((0, a, "a"), (1, b, "b")):
            ys, lo, hi = [], [], []
            for fr in done:
                e = fr["comparison"]["classes"][OVERALL]
                vals = np.array([x[key] for x in e["cases"] if x[key] is not None], dtype=float)
                m = float(vals.mean()) if vals.size else math.nan
                ci = bootstrap_ci(vals, result["n_boot"], result["seed"]) if vals.size else (math.nan, math.nan)
                ys.append(m)
                lo.append(m - ci[0])
                hi.append(ci[1] - m)
            shift = 0.97 if side == 0 else 1.03  # keep the two arms' error bars apart
            ax.errorbar([x * shift for x in fx], ys, yerr=[lo, hi], marker="o", capsize=4, label=arm,
                        color=colors[arm])
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(fx)
        ax.set_xticklabels([f"{v:g}" for v in fx])
        ax.set_xlabel("labeled fraction of each fold's training cases (%)")
        ax.set_ylabel("foreground Dice (mean, 95 % CI)")
        ax.set_title("Dice vs labeled fraction")
        ax.legend(fontsize=8)
    fig.suptitle(f"pgl_compare: {result['dataset']} ({result['configuration']}, {result['plans']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(_jsonable(v) for v in x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ================================================================================================ the command
def _load_json(path: str) -> Optional[dict]:
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def compare(dataset: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
            folds: Sequence[int] = (0, 1, 2, 3, 4), pair: Sequence[str] = DEFAULT_PAIR,
            fractions: Sequence[float] = (1.0,), run: bool = False, device: str = "cuda",
            out_dir: Optional[str] = None, n_boot: int = 10000, seed: int = 0, command: Optional[str] = None,
            verbose: bool = True) -> Dict[str, Any]:
    """Everything ``pgl_compare`` does; returns the result dict (also written as JSON) with the output paths."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    import nnunet_pgl

    if len(pair) != 2 or pair[0] == pair[1]:
        raise CompareError(f"--pair needs two different trainers, got {list(pair)}")
    if not nnUNet_results:
        raise CompareError("nnUNet_results is not set: export nnU-Net's three folders (nnUNet_raw, "
                           "nnUNet_preprocessed, nnUNet_results) as for nnUNetv2_train")
    if n_boot < 1:
        raise CompareError(f"--n-boot {n_boot}: need at least 1 resample (10000 is the default)")
    try:
        ds = maybe_convert_to_dataset_name(dataset)
    except Exception as e:
        raise CompareError(f"-d {dataset}: {e}") from None
    res_ds = os.path.join(str(nnUNet_results), ds)
    pre_ds = os.path.join(str(nnUNet_preprocessed), ds) if nnUNet_preprocessed else None
    fractions = sorted({float(f) for f in fractions})
    for f in fractions:
        fraction_suffix(f)
    names_by_fraction = {f: (pair[0] + fraction_suffix(f), pair[1] + fraction_suffix(f)) for f in fractions}

    # plans and dataset.json: the preprocessed folder's, else a results folder's copy
    plans_dict = _load_json(os.path.join(pre_ds, plans + ".json")) if pre_ds else None
    dataset_json = _load_json(os.path.join(pre_ds, "dataset.json")) if pre_ds else None
    for t in (t for ns in names_by_fraction.values() for t in ns):
        if plans_dict is not None and dataset_json is not None:
            break
        td = trainer_dir(res_ds, t, plans, configuration)
        plans_dict = plans_dict or _load_json(os.path.join(td, "plans.json"))
        dataset_json = dataset_json or _load_json(os.path.join(td, "dataset.json"))
    if plans_dict is None or dataset_json is None:
        raise CompareError(f"no plans '{plans}' for {ds}: looked in {pre_ds} and the trainers' result folders. Run "
                           f"nnUNetv2_plan_and_preprocess -d {dataset} (or pass the right -p)")
    classes = resolve_trainers(pair, fractions)
    file_ending = dataset_json.get("file_ending")

    if run:
        jobs = training_jobs(res_ds, names_by_fraction, plans, configuration, folds)
        for f, (ca, cb) in classes.items():  # PGL arms: refuse early if a fold's checkpoint is missing
            for cls in (ca, cb):
                for j in jobs:
                    if is_pgl_trainer(cls) and j["trainer"] == cls.__name__ and j["state"] == "train":
                        p, why_not = conventional_checkpoint(cls, plans_dict, configuration, j["fold"])
                        if p is None:
                            raise CompareError(f"fold {j['fold']}: {why_not}")
        if verbose:
            print(f"[pgl_compare] {len(jobs)} training run(s) to do" + (": " + ", ".join(
                f"{j['trainer']} fold {j['fold']}{'' if j['state'] == 'train' else ' (' + j['state'] + ')'}"
                for j in jobs) if jobs else ""), flush=True)
        run_jobs(jobs, ds, configuration, plans, device)

    frac_results = []
    for f in fractions:
        ta, tb = names_by_fraction[f]
        arm_a = collect_arm(res_ds, ta, plans, configuration, folds, file_ending)
        arm_b = collect_arm(res_ds, tb, plans, configuration, folds, file_ending)
        entry: Dict[str, Any] = {"fraction": f, "trainers": [ta, tb],
                                 "summaries": arm_a["summaries"] + arm_b["summaries"]}
        if arm_a["cases"] and arm_b["cases"] and set(arm_a["cases"]) & set(arm_b["cases"]):
            entry["comparison"] = compare_arms(arm_a, arm_b, n_boot, seed)
            entry["curves"] = {t: {k: read_learning_curve(os.path.join(trainer_dir(res_ds, t, plans, configuration),
                                                                       f"fold_{k}"))
                                   for k in folds} for t in (ta, tb)}
        else:
            entry["comparison"] = None
            entry["status"] = (f"{ta}: folds {arm_a['folds_found'] or 'none'}, {tb}: folds "
                               f"{arm_b['folds_found'] or 'none'} have a validation summary.json")
        frac_results.append(entry)
    if not any(fr["comparison"] for fr in frac_results):
        raise CompareError(
            "no paired validation results for "
            + "; ".join(f"{fr['trainers'][0]} vs {fr['trainers'][1]} ({fr['status']})" for fr in frac_results)
            + f" in {res_ds}. Train them: add --run (sequential nnUNetv2_train runs), or run nnUNetv2_train "
              f"{dataset} {configuration} FOLD -tr TRAINER -p {plans} for each fold and trainer")

    # leakage guard: the validation cases of each fold (splits_final.json, else what the summaries hold)
    splits = _load_json(os.path.join(pre_ds, "splits_final.json")) if pre_ds else None
    val_by_fold: Dict[int, List[str]] = {}
    for k in folds:
        if splits is not None and k < len(splits):
            val_by_fold[k] = sorted(splits[k]["val"])
        else:
            ids = {cid for fr in frac_results if fr["comparison"] for x in fr["comparison"]["classes"][OVERALL]["cases"]
                   if x["fold"] == k for cid in [x["case_id"]]}
            if ids:
                val_by_fold[k] = sorted(ids)
    data_identifier = plans_dict.get("configurations", {}).get(configuration, {}).get("data_identifier")
    guard = leakage_guard(classes, res_ds, plans_dict, plans, configuration, dataset_json, val_by_fold,
                          os.path.join(str(nnUNet_raw), ds) if nnUNet_raw else None,
                          os.path.join(pre_ds, data_identifier) if pre_ds and data_identifier else None)

    out_dir = out_dir or os.path.join(res_ds, "pgl_compare")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"pgl_compare_{ds}")
    old = _load_json(stem + ".json")
    if old and (old.get("pair") != list(pair) or old.get("configuration") != configuration
                or old.get("plans") != plans) and verbose:
        print(f"[pgl_compare] note: replacing {stem}.json, the report of {' vs '.join(old.get('pair', []))} "
              f"({old.get('configuration')}, {old.get('plans')}); use -o to keep comparisons apart", flush=True)
    from nnunet_pgl.pretraining.contract import dist_version
    result: Dict[str, Any] = {
        "dataset": ds, "configuration": configuration, "plans": plans, "folds": list(folds), "pair": list(pair),
        "fractions": frac_results, "n_boot": n_boot, "seed": seed,
        "command": command or f"pgl_compare -d {dataset} -c {configuration} -p {plans} -f "
                              f"{' '.join(map(str, folds))} --pair {pair[0]} {pair[1]} --fractions "
                              f"{' '.join(f'{f:g}' for f in fractions)}",
        "created": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "versions": {"nnunet_pgl": nnunet_pgl.__version__, "nnunetv2": dist_version("nnunetv2")},
        "label_names": label_names(dataset_json), "leakage": guard,
        "leakage_lines": leakage_lines(guard, ds, configuration, plans),
        "markdown": stem + ".md", "json": stem + ".json", "figure": stem + ".png",
    }
    try:
        plot_figure(result, result["figure"])
    except Exception as e:  # a figure problem must not cost the numbers
        print(f"[pgl_compare] figure not written: {type(e).__name__}: {e}", file=sys.stderr)
        result["figure"] = None
    md = render_markdown(result)
    with open(result["markdown"], "w") as fh:
        fh.write(md)
    with open(result["json"], "w") as fh:
        json.dump(_jsonable(result), fh, indent=1)
    if verbose:
        print(md)
        print(f"[pgl_compare] wrote {result['markdown']}, {result['json']}"
              + (f", {result['figure']}" if result["figure"] else ""), flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgl_compare",
        description="Does PGL pretraining help on this dataset? Pairs the nnU-Net validation results of two trainers "
                    "case by case over the folds and reports mean Dice/IoU/FP/FN per class, the paired Dice "
                    "differences with a bootstrap 95% CI and a Wilcoxon p-value, win/loss counts, learning curves, "
                    "Dice vs labeled fraction, and which validation cases the PGL checkpoint saw in pretraining "
                    "(leakage). Markdown (printed and written), JSON and PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or ID")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="nnU-Net configuration")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-f", dest="folds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="folds to pool (each validation case is in exactly one fold; all 5 give every case once)")
    p.add_argument("--pair", nargs=2, default=list(DEFAULT_PAIR), metavar=("A", "B"),
                   help="the two trainers; differences are A − B. The default baseline is the scratch twin "
                        "nnUNetTrainerScratch, not stock nnUNetTrainer: the PGL trainers warm the learning rate up "
                        "(1%% of the epochs) before nnU-Net's poly decay and the twin uses the identical schedule, so "
                        "only the initialisation differs. Any pair works, e.g. 'nnUNetTrainerPGL nnUNetTrainer' "
                        "(against stock nnU-Net) or the ablation 'nnUNetTrainerPGL nnUNetTrainerPGLBYOL' (local vs "
                        "global consistency; both checkpoints are leakage-checked). For CPU tests: "
                        "'nnUNetTrainerPGL_smoke nnUNetTrainerScratch_smoke'")
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0],
                   help="labeled fractions: 1.0 = the pair itself, f < 1 = <trainer>_fracNN of both trainers "
                        "(deterministic subset of each fold's training cases, validation unchanged; variants exist "
                        "for 0.1, 0.25, 0.5). SSL tends to matter most at small fractions")
    p.add_argument("--run", action="store_true",
                   help="first train what is missing with nnUNetv2_train, one run at a time (resumable: finished "
                        "folds are skipped, --c for a run with only checkpoint_latest, --val for one without "
                        "validation)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device of the --run trainings")
    p.add_argument("-o", dest="out", default=None,
                   help="output folder (default $nnUNet_results/<Dataset>/pgl_compare/); files are "
                        "pgl_compare_<Dataset>.{md,json,png}: give each comparison (e.g. the BYOL ablation) its own -o")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples for the 95%% CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    command = "pgl_compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        compare(args.dataset, args.configuration, args.plans, args.folds, args.pair, args.fractions, args.run,
                args.device, args.out, args.n_boot, args.seed, command=command)
    except CompareError as e:
        print(f"pgl_compare: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
