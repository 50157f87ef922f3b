"""The report of ``pgl_compare``: a :class:`Report` written as Markdown, JSON and a PNG figure (:mod:`.figure`).

The Markdown opens with the leakage guard's verdict (:func:`leakage_lines`), then per labeled fraction the paired
Dice table, nnU-Net's means and the per-fold Dice; the JSON is :meth:`Report.to_json`.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_pgl.evaluation.leakage import LeakReport
from nnunet_pgl.evaluation.records import Record
from nnunet_pgl.evaluation.results import OVERALL, Comparison, LearningCurve
from nnunet_pgl.evaluation.stats import PairedStats


@dataclass
class FractionResult(Record):
    """The comparison at one labeled fraction.

    Attributes:
        fraction: the labeled fraction (1.0: the pair itself).
        trainers: the two trainer classes compared at this fraction (``<trainer>_fracNN`` below 1).
        summaries: the ``summary.json`` files read.
        comparison: the paired results, or None when the arms share no validated case.
        curves: ``{trainer: {fold: LearningCurve or None}}``; only with a comparison.
        status: which folds have results; only without a comparison.
    """

    fraction: float
    trainers: List[str]
    summaries: List[str]
    comparison: Optional[Comparison] = None
    curves: Optional[Dict[str, Dict[int, Optional[LearningCurve]]]] = None
    status: Optional[str] = None

    def json_fields(self) -> List[str]:
        left_out = "status" if self.comparison is not None else "curves"
        return [name for name in super().json_fields() if name != left_out]


@dataclass
class Report(Record):
    """Everything ``pgl_compare`` found, as written to ``pgl_compare_<Dataset>.json``.

    Attributes:
        dataset: the dataset name.
        configuration: the nnU-Net configuration.
        plans: the plans identifier.
        folds: the folds pooled.
        pair: the two base trainers (A, B).
        fractions: one :class:`FractionResult` per labeled fraction, ascending.
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap.
        command: the command line that made the report.
        created: date and time (``YYYY-mm-dd HH:MM``).
        versions: ``{'nnunet_pgl': ..., 'nnunetv2': ...}``.
        label_names: summary.json label keys → class names.
        leakage: the leakage guard's findings.
        leakage_lines: the verdict lines at the top of the Markdown.
        markdown: path of the Markdown report.
        json: path of the JSON report.
        figure: path of the PNG figure (None when it could not be drawn).
    """

    dataset: str
    configuration: str
    plans: str
    folds: List[int]
    pair: List[str]
    fractions: List[FractionResult]
    n_boot: int
    seed: int
    command: str
    created: str
    versions: Dict[str, str]
    label_names: Dict[str, str]
    leakage: List[LeakReport]
    leakage_lines: List[str]
    markdown: str
    json: str
    figure: Optional[str]

    def paired(self) -> List[Tuple[FractionResult, Comparison]]:
        """The fractions with paired results, each with its comparison."""
        return [(fr, fr.comparison) for fr in self.fractions if fr.comparison is not None]


# ================================================================================================ Markdown
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


def fraction_label(f: float) -> str:
    """``0.5 → '50 % labeled'``."""
    return f"{f * 100:g} % labeled"


def _stats_row(first: str, s: PairedStats) -> str:
    """A table row: ``first``, n, Dice A and B, mean Δ, its 95 % CI, the Wilcoxon p and W/L/T."""
    return (f"| {first} | {s.n} | {_f(s.mean_a)} | {_f(s.mean_b)} | {_f(s.mean_diff, sign=True)} | "
            f"[{_f(s.ci_low, sign=True)}, {_f(s.ci_high, sign=True)}] | {_p(s.p)} | {s.wins}/{s.losses}/{s.ties} |")


def leakage_lines(guard: Sequence[LeakReport], dataset: str, configuration: str, plans: str) -> List[str]:
    """The prominent lines at the top of the report: one per leaking (checkpoint, fold) and how to fix it, or
    'no leakage'."""
    from nnunet_pgl.pretraining.contract import pretrain_command
    lines = []
    checked_any = False
    fixes = []
    for e in guard:
        if e.error:
            lines.append(f"**Leakage guard: could not check {', '.join(e.arms)}: {e.error}.**")
            continue
        who = f"{e.pretrainer} checkpoint of {', '.join(e.arms)}" if len(guard) > 1 else ""
        leaked_folds = []
        for fold, r in sorted(e.folds.items()):
            checked_any = True
            if not r.leaked:
                continue
            leaked_folds.append(fold)
            k, n = len(r.leaked), r.n_val
            parts = ([who] if who else []) + ([f"labeled images: {', '.join(r.labeled)}"] if r.labeled else [])
            if r.unlabeled:
                parts.append("unlabeled copies: " + "; ".join(
                    f"{u['case_id']} = {', '.join(u['source']) or u['pretrain_case_id']}" for u in r.unlabeled))
            lines.append(f"**LEAKAGE: {k} of {n} validation cases of fold {fold} were seen in pretraining; rerun "
                         f"pgl_pretrain --exclude-fold {fold}** ({'; '.join(parts)})")
        if leaked_folds:
            fix = (f"To fix ({e.pretrainer}): `{pretrain_command(dataset, configuration, plans, e.pretrainer)} "
                   f"--folds {' '.join(map(str, leaked_folds))}` (one pretraining per fold, each written to its own "
                   "fold_K folder, which the PGL trainers then use for fold K without `nnUNet_pgl_weights`), then "
                   "train those folds again (delete their fold_K result folders first)")
            if any(r.unlabeled for r in e.folds.values()):
                fix += ("; --exclude-fold leaves out labeled images only: remove the listed copies from the "
                        "--unlabeled folders")
            fixes.append(fix + ".")
    lines += fixes
    if checked_any and not any(ln.startswith("**LEAKAGE") for ln in lines):
        n_by_fold = {k: r.n_val for e in guard if not e.error for k, r in e.folds.items()}
        ckpts = [f"`{e.checkpoint}`" for e in guard if not e.error]
        lines.append(f"**Leakage guard: no leakage** — none of the {sum(n_by_fold.values())} validation cases of "
                     f"fold{'s' if len(n_by_fold) > 1 else ''} {' '.join(map(str, sorted(n_by_fold)))} was seen in "
                     f"pretraining ({', '.join(ckpts)}).")
    for e in guard:
        unchecked = sorted({c for r in e.folds.values() for c in r.unchecked})
        if unchecked:
            lines.append(f"**Leakage guard: raw images of {len(unchecked)} validation case(s) not found "
                         f"({', '.join(unchecked[:10])}{', ...' if len(unchecked) > 10 else ''}): their unlabeled "
                         f"copies could not be checked.**")
    if not guard:
        lines.append("Leakage guard: neither arm is initialised from a PGL checkpoint: nothing to check.")
    return lines


def _header(result: Report) -> List[str]:
    a, b = result.pair
    L = [f"# Does pretraining help? {a} vs {b} on {result.dataset}", ""]
    L += [ln + "\n" for ln in result.leakage_lines]
    L += [f"`{result.command}`  ", f"configuration `{result.configuration}`, plans `{result.plans}`, folds "
          f"{' '.join(map(str, result.folds))}; {result.created}; nnunet_pgl {result.versions['nnunet_pgl']}, "
          f"nnunetv2 {result.versions['nnunetv2']}", ""]
    L += [f"A = `{a}`, B = `{b}`. Δ = A − B per validation case, paired by case id across folds (positive: A is "
          f"better); Dice A/B and n: the means over those pairs. 95 % CI: percentile bootstrap of the mean Δ "
          f"({result.n_boot} resamples, seed {result.seed}). p: two-sided Wilcoxon signed-rank, not adjusted "
          "for the number of classes. W/L/T: cases where A's Dice is higher / lower / equal. A case whose Dice is NaN "
          "for a class (class absent in reference and prediction) is left out of that class, as in nnU-Net's means; "
          "a case's foreground value is the mean of its other classes. FP/FN: mean voxel counts per case.", ""]
    return L


def _notes(c: Comparison, ta: str, tb: str) -> List[str]:
    notes = []
    if c.missing_a or c.missing_b:
        notes.append(f"missing folds: {ta}: {c.missing_a or 'none'}, {tb}: {c.missing_b or 'none'} "
                     "(add --run to train them)")
    if c.only_a or c.only_b:
        notes.append(f"unpaired cases left out: {len(c.only_a)} only in {ta}, {len(c.only_b)} only in {tb}")
    if c.fold_mismatch:
        notes.append(f"{len(c.fold_mismatch)} cases validated in different folds by the two arms (different "
                     "splits?)")
    return [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])


def _fraction_section(fr: FractionResult, names: Dict[str, str]) -> List[str]:
    c = fr.comparison
    ta, tb = fr.trainers
    title = f"## {fraction_label(fr.fraction)}: {ta} vs {tb}"
    if c is None:
        return [title, "", f"No paired results yet ({fr.status}).", ""]
    L = [title + f" — {c.n_cases} paired cases", ""]
    L += ["| class | n | Dice A | Dice B | mean Δ Dice | 95 % CI | Wilcoxon p | W/L/T |",
          "|---|---|---|---|---|---|---|---|"]
    L += [_stats_row(_name(lab, names), c.classes[lab].Dice) for lab in [OVERALL] + c.labels]
    L += ["", f"nnU-Net's means over the {c.n_cases} cases (as its summary.json computes them):", "",
          "| class | Dice A | Dice B | IoU A | IoU B | FP A | FP B | FN A | FN B |",
          "|---|---|---|---|---|---|---|---|---|"]
    for lab in [OVERALL] + c.labels:
        ma, mb = c.classes[lab].mean_a, c.classes[lab].mean_b
        L.append(f"| {_name(lab, names)} | {_f(ma['Dice'])} | {_f(mb['Dice'])} | {_f(ma['IoU'])} | {_f(mb['IoU'])} "
                 f"| {_f(ma['FP'], 1)} | {_f(mb['FP'], 1)} | {_f(ma['FN'], 1)} | {_f(mb['FN'], 1)} |")
    L += ["", "| fold | n | foreground Dice A | foreground Dice B | Δ |", "|---|---|---|---|---|"]
    L += [f"| {pf.fold} | {pf.n} | {_f(pf.dice_a)} | {_f(pf.dice_b)} | {_f(pf.diff, sign=True)} |"
          for pf in c.per_fold]
    return L + _notes(c, ta, tb)


def _leakage_section(guard: Sequence[LeakReport]) -> List[str]:
    if not guard:
        return []
    L = ["## Leakage guard", ""]
    for e in guard:
        head = f"- `{e.checkpoint}` ({e.pretrainer}; used by {', '.join(e.arms)}; found via {' and '.join(e.found_by)})"
        if e.error:
            L.append(head + f": {e.error}")
            continue
        L.append(head + f": {e.n_pretrain_cases} pretraining cases ({e.n_unlabeled} unlabeled)")
        for fold, r in sorted(e.folds.items()):
            L.append(f"  - fold {fold}: {len(r.leaked)} of {r.n_val} validation cases seen"
                     + (f" ({', '.join(r.leaked)})" if r.leaked else ""))
    return L + [""]


def render_markdown(result: Report) -> str:
    """The Markdown report."""
    a, b = result.pair
    L = _header(result)
    for fr in result.fractions:
        L += _fraction_section(fr, result.label_names)
    done = result.paired()
    if len(done) > 1:
        L += ["## Dice vs labeled fraction (foreground mean)", "",
              f"| labeled | n | Dice {a} | Dice {b} | mean Δ | 95 % CI | Wilcoxon p | W/L/T |",
              "|---|---|---|---|---|---|---|---|"]
        L += [_stats_row(f"{fr.fraction * 100:g} %", c.classes[OVERALL].Dice) for fr, c in done]
        L.append("")
    L += _leakage_section(result.leakage)
    if result.figure:
        L += ["## Figure", "", f"![pgl_compare]({os.path.basename(result.figure)})", "",
              "Per-class paired Dice differences (points: cases; bar: mean and 95 % CI), learning curves from the "
              "checkpoints' logs (train/validation loss, EMA pseudo Dice; one line per fold)"
              + (", Dice vs labeled fraction." if len(done) > 1 else "."), ""]
    return "\n".join(L)


# ================================================================================================ writing
def write_report(result: Report, verbose: bool = True) -> None:
    """Write the figure (a failure costs only the figure), the Markdown and the JSON; print the Markdown."""
    from nnunet_pgl.evaluation.figure import plot_figure  # figure.py imports this module
    try:
        if result.figure:
            plot_figure(result, result.figure)
    except Exception as e:  # a figure problem must not cost the numbers
        print(f"[pgl_compare] figure not written: {type(e).__name__}: {e}", file=sys.stderr)
        result.figure = None
    md = render_markdown(result)
    with open(result.markdown, "w") as fh:
        fh.write(md)
    with open(result.json, "w") as fh:
        json.dump(result.to_json(), fh, indent=1)
    if verbose:
        print(md)
        print(f"[pgl_compare] wrote {result.markdown}, {result.json}"
              + (f", {result.figure}" if result.figure else ""), flush=True)
