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

This module is the command: :func:`compare` runs the steps in order over :mod:`.results` (reading nnU-Net's
results), :mod:`.stats` (paired statistics), :mod:`.leakage` (the guard), :mod:`.jobs` (the trainers and ``--run``)
and :mod:`.report` (Markdown, JSON, figure).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nnunet_pgl.evaluation.jobs import (fraction_suffix, is_pgl_trainer, resolve_trainers, run_jobs,
                                        training_jobs)
from nnunet_pgl.evaluation.leakage import conventional_checkpoint, leakage_guard
from nnunet_pgl.evaluation.report import FractionResult, Report, label_names, leakage_lines, write_report
from nnunet_pgl.evaluation.results import (OVERALL, CompareError, collect_arm, compare_arms, fold_dir,
                                           read_learning_curve, trainer_dir)
from nnunet_pgl.pretraining.helptext import DefaultsOnceFormatter

DEFAULT_PAIR = ("nnUNetTrainerPGL", "nnUNetTrainerScratch")
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
#: trainer class names per labeled fraction: {fraction: (name of A, name of B)}
Names = Dict[float, Tuple[str, str]]


def _load_json(path: str) -> Any:
    """The JSON file's content, or None when there is no such file."""
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def _dataset_name(dataset: str, pair: Sequence[str], n_boot: int) -> str:
    """The dataset's name, after checking the arguments and the environment."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if len(pair) != 2 or pair[0] == pair[1]:
        raise CompareError(f"--pair needs two different trainers, got {list(pair)}")
    if not nnUNet_results:
        raise CompareError("nnUNet_results is not set: export nnU-Net's three folders (nnUNet_raw, "
                           "nnUNet_preprocessed, nnUNet_results) as for nnUNetv2_train")
    if n_boot < 1:
        raise CompareError(f"--n-boot {n_boot}: need at least 1 resample (10000 is the default)")
    try:
        return maybe_convert_to_dataset_name(dataset)
    except Exception as e:
        raise CompareError(f"-d {dataset}: {e}") from None


def _plans_and_dataset_json(dataset: str, ds: str, pre_ds: Optional[str], res_ds: str, names: Names, plans: str,
                            configuration: str) -> Tuple[dict, dict]:
    """The plans and dataset.json: the preprocessed folder's, else a copy in a trainer's results folder."""
    plans_dict = _load_json(os.path.join(pre_ds, plans + ".json")) if pre_ds else None
    dataset_json = _load_json(os.path.join(pre_ds, "dataset.json")) if pre_ds else None
    for t in (t for ns in names.values() for t in ns):
        if plans_dict is not None and dataset_json is not None:
            break
        td = trainer_dir(res_ds, t, plans, configuration)
        plans_dict = plans_dict or _load_json(os.path.join(td, "plans.json"))
        dataset_json = dataset_json or _load_json(os.path.join(td, "dataset.json"))
    if plans_dict is None or dataset_json is None:
        raise CompareError(f"no plans '{plans}' for {ds}: looked in {pre_ds} and the trainers' result folders. Run "
                           f"nnUNetv2_plan_and_preprocess -d {dataset} (or pass the right -p)")
    return plans_dict, dataset_json


def _train_missing(classes: Dict[float, Tuple[Any, Any]], names: Names, res_ds: str, ds: str, plans_dict: dict,
                   plans: str, configuration: str, folds: Sequence[int], device: str, verbose: bool) -> None:
    """``--run``: train (or resume, or validate) every fold without a validation summary, one at a time."""
    jobs = training_jobs(res_ds, names, plans, configuration, folds)
    for ca, cb in classes.values():  # PGL arms: refuse early if a fold's checkpoint is missing
        for cls in (ca, cb):
            for j in jobs:
                if is_pgl_trainer(cls) and j.trainer == cls.__name__ and j.state == "train":
                    p, why_not = conventional_checkpoint(cls, plans_dict, configuration, j.fold)
                    if p is None:
                        raise CompareError(f"fold {j.fold}: {why_not}")
    if verbose:
        print(f"[pgl_compare] {len(jobs)} training run(s) to do" + (": " + ", ".join(
            f"{j.trainer} fold {j.fold}{'' if j.state == 'train' else ' (' + j.state + ')'}"
            for j in jobs) if jobs else ""), flush=True)
    run_jobs(jobs, ds, configuration, plans, device)


def _compare_fraction(fraction: float, names: Names, res_ds: str, plans: str, configuration: str,
                      folds: Sequence[int], file_ending: Optional[str], n_boot: int, seed: int) -> FractionResult:
    """Both arms at one labeled fraction, paired, with their learning curves."""
    ta, tb = names[fraction]
    arm_a = collect_arm(res_ds, ta, plans, configuration, folds, file_ending)
    arm_b = collect_arm(res_ds, tb, plans, configuration, folds, file_ending)
    result = FractionResult(fraction, [ta, tb], arm_a.summaries + arm_b.summaries)
    if arm_a.cases and arm_b.cases and set(arm_a.cases) & set(arm_b.cases):
        result.comparison = compare_arms(arm_a, arm_b, n_boot, seed)
        result.curves = {t: {k: read_learning_curve(fold_dir(res_ds, t, plans, configuration, k)) for k in folds}
                         for t in (ta, tb)}
    else:
        result.status = (f"{ta}: folds {arm_a.folds_found or 'none'}, {tb}: folds {arm_b.folds_found or 'none'} "
                         "have a validation summary.json")
    return result


def _validation_cases(splits: Optional[list], folds: Sequence[int], frac_results: List[FractionResult]
                      ) -> Dict[int, List[str]]:
    """The validation cases of each fold: ``splits_final.json``'s, else those the summaries hold."""
    val_by_fold: Dict[int, List[str]] = {}
    for k in folds:
        if splits is not None and k < len(splits):
            val_by_fold[k] = sorted(splits[k]["val"])
        else:
            ids = {x.case_id for fr in frac_results if fr.comparison
                   for x in fr.comparison.classes[OVERALL].cases if x.fold == k}
            if ids:
                val_by_fold[k] = sorted(ids)
    return val_by_fold


def _output_stem(out_dir: Optional[str], res_ds: str, ds: str, pair: Sequence[str], configuration: str, plans: str,
                 verbose: bool) -> str:
    """``<out>/pgl_compare_<Dataset>`` (the folder made); a note when it replaces another comparison's report."""
    out_dir = out_dir or os.path.join(res_ds, "pgl_compare")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"pgl_compare_{ds}")
    old = _load_json(stem + ".json")
    if old and (old.get("pair") != list(pair) or old.get("configuration") != configuration
                or old.get("plans") != plans) and verbose:
        print(f"[pgl_compare] note: replacing {stem}.json, the report of {' vs '.join(old.get('pair', []))} "
              f"({old.get('configuration')}, {old.get('plans')}); use -o to keep comparisons apart", flush=True)
    return stem


def compare(dataset: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
            folds: Sequence[int] = DEFAULT_FOLDS, pair: Sequence[str] = DEFAULT_PAIR,
            fractions: Sequence[float] = (1.0,), run: bool = False, device: str = "cuda",
            out_dir: Optional[str] = None, n_boot: int = 10000, seed: int = 0, command: Optional[str] = None,
            verbose: bool = True) -> Report:
    """Everything ``pgl_compare`` does; returns the :class:`~.report.Report` (also written as JSON)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results

    import nnunet_pgl
    from nnunet_pgl.pretraining.contract import dist_version

    ds = _dataset_name(dataset, pair, n_boot)
    res_ds = os.path.join(str(nnUNet_results), ds)
    pre_ds = os.path.join(str(nnUNet_preprocessed), ds) if nnUNet_preprocessed else None
    fractions = sorted({float(f) for f in fractions})
    names = {f: (pair[0] + fraction_suffix(f), pair[1] + fraction_suffix(f)) for f in fractions}
    plans_dict, dataset_json = _plans_and_dataset_json(dataset, ds, pre_ds, res_ds, names, plans, configuration)
    classes = resolve_trainers(pair, fractions)
    if run:
        _train_missing(classes, names, res_ds, ds, plans_dict, plans, configuration, folds, device, verbose)

    frac_results = [_compare_fraction(f, names, res_ds, plans, configuration, folds,
                                      dataset_json.get("file_ending"), n_boot, seed) for f in fractions]
    if not any(fr.comparison for fr in frac_results):
        raise CompareError(
            "no paired validation results for "
            + "; ".join(f"{fr.trainers[0]} vs {fr.trainers[1]} ({fr.status})" for fr in frac_results)
            + f" in {res_ds}. Train them: add --run (sequential nnUNetv2_train runs), or run nnUNetv2_train "
              f"{dataset} {configuration} FOLD -tr TRAINER -p {plans} for each fold and trainer")

    splits = _load_json(os.path.join(pre_ds, "splits_final.json")) if pre_ds else None
    val_by_fold = _validation_cases(splits, folds, frac_results)
    data_identifier = plans_dict.get("configurations", {}).get(configuration, {}).get("data_identifier")
    guard = leakage_guard([cls for pair_classes in classes.values() for cls in pair_classes if is_pgl_trainer(cls)],
                          res_ds, plans_dict, plans, configuration, dataset_json, val_by_fold,
                          os.path.join(str(nnUNet_raw), ds) if nnUNet_raw else None,
                          os.path.join(pre_ds, data_identifier) if pre_ds and data_identifier else None)

    stem = _output_stem(out_dir, res_ds, ds, pair, configuration, plans, verbose)
    result = Report(
        dataset=ds, configuration=configuration, plans=plans, folds=list(folds), pair=list(pair),
        fractions=frac_results, n_boot=n_boot, seed=seed,
        command=command or f"pgl_compare -d {dataset} -c {configuration} -p {plans} -f "
                           f"{' '.join(map(str, folds))} --pair {pair[0]} {pair[1]} --fractions "
                           f"{' '.join(f'{f:g}' for f in fractions)}",
        created=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        versions={"nnunet_pgl": nnunet_pgl.__version__, "nnunetv2": dist_version("nnunetv2")},
        label_names=label_names(dataset_json), leakage=guard,
        leakage_lines=leakage_lines(guard, ds, configuration, plans),
        markdown=stem + ".md", json=stem + ".json", figure=stem + ".png")
    write_report(result, verbose)
    return result


DESCRIPTION = ("Does PGL pretraining help on this dataset? Pairs the nnU-Net validation results of two trainers case "
               "by case over the folds and reports mean Dice/IoU/FP/FN per class, the paired Dice differences with a "
               "bootstrap 95% CI and a Wilcoxon p-value, win/loss counts, learning curves, Dice vs labeled fraction, "
               "and which validation cases the PGL checkpoint saw in pretraining (leakage). Markdown (printed and "
               "written), JSON and PNG.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgl_compare", description=DESCRIPTION, formatter_class=DefaultsOnceFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or ID")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="nnU-Net configuration")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-f", dest="folds", nargs="+", type=int, default=list(DEFAULT_FOLDS),
                   help="folds to pool (each validation case is in exactly one fold; all 5 give every case once; "
                        f"default: {' '.join(map(str, DEFAULT_FOLDS))})")
    p.add_argument("--pair", nargs=2, default=list(DEFAULT_PAIR), metavar=("A", "B"),
                   help=f"the two trainers; differences are A − B (default: {' '.join(DEFAULT_PAIR)}). The default "
                        "baseline is the scratch twin nnUNetTrainerScratch, not stock nnUNetTrainer: the PGL trainers "
                        "warm the learning rate up (1%% of the epochs) before nnU-Net's poly decay and the twin uses "
                        "the identical schedule, so only the initialisation differs. Any pair works, e.g. "
                        "'nnUNetTrainerPGL nnUNetTrainer' (against stock nnU-Net) or the ablation 'nnUNetTrainerPGL "
                        "nnUNetTrainerPGLBYOL' (local vs global consistency; both checkpoints are leakage-checked). "
                        "For CPU tests: 'nnUNetTrainerPGL_smoke nnUNetTrainerScratch_smoke'")
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0],
                   help="labeled fractions: 1.0 = the pair itself, f < 1 = <trainer>_fracNN of both trainers "
                        "(deterministic subset of each fold's training cases, validation unchanged; variants exist "
                        "for 0.1, 0.25, 0.5). SSL tends to matter most at small fractions (default: 1.0)")
    p.add_argument("--run", action="store_true",
                   help="first train what is missing with nnUNetv2_train, one run at a time (resumable: finished "
                        "folds are skipped, --c for a run with only checkpoint_latest, --val for one without "
                        "validation)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device of the --run trainings")
    p.add_argument("-o", dest="out", default=None,
                   help="output folder (default: $nnUNet_results/<Dataset>/pgl_compare/); files are "
                        "pgl_compare_<Dataset>.{md,json,png}: give each comparison (e.g. the BYOL ablation) its own -o")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples for the 95%% CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
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
