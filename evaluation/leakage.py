"""The leakage guard of ``pgl_compare``: which validation cases a PGL checkpoint saw during pretraining.

A checkpoint's ``pgl_meta['cases']`` lists its pretraining cases: labeled ones by case id (and the sha256 of their
preprocessed file), unlabeled ones by the sha256 of their raw image files. A validation case leaked when its id is
among the labeled ones, or when its raw image files hash like an unlabeled one (byte-identical copies only).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, TypedDict

from nnunet_pgl.evaluation.records import Record
from nnunet_pgl.evaluation.results import fold_dir, training_log_lines

_INIT_LINE = re.compile(r"PGL initialisation from (.+?): loaded \d+ tensors")


class UnlabeledCopy(TypedDict):
    """A validation case whose raw files are byte-identical to an unlabeled pretraining case."""

    case_id: str
    pretrain_case_id: str
    source: List[str]


@dataclass
class FoldLeaks(Record):
    """The validation cases of one fold that a checkpoint saw in pretraining.

    Attributes:
        n_val: validation cases of the fold.
        labeled: those among the checkpoint's labeled pretraining cases.
        unlabeled: those whose raw files are an unlabeled pretraining case.
        unchecked: those without raw files, whose unlabeled copies could not be checked.
        leaked: ``labeled`` and ``unlabeled`` together, sorted.
    """

    n_val: int
    labeled: List[str]
    unlabeled: List[UnlabeledCopy]
    unchecked: List[str]
    leaked: List[str]


@dataclass
class LeakReport(Record):
    """One PGL checkpoint that fine-tuning arms used (or would use), and what it saw.

    Attributes:
        pretrainer: the pretrainer class that wrote it.
        checkpoint: its path (None when the lookup found none).
        arms: the fine-tuning trainers that use it.
        found_by: ``'training log'`` (the line a fine-tuning run logged) and/or ``'lookup'`` (what the trainer
            would choose now).
        folds: ``{fold: FoldLeaks}``; empty when the checkpoint cannot be checked.
        error: why it cannot be checked, or None.
        method: its pretraining method (``pgl_meta['method']``); not in the JSON when ``error`` is set.
        n_pretrain_cases: its pretraining cases; not in the JSON when ``error`` is set.
        n_unlabeled: how many of them are unlabeled; not in the JSON when ``error`` is set.
    """

    pretrainer: str
    checkpoint: Optional[str]
    arms: List[str] = field(default_factory=list)
    found_by: List[str] = field(default_factory=list)
    folds: Dict[int, FoldLeaks] = field(default_factory=dict)
    error: Optional[str] = None
    method: Optional[str] = None
    n_pretrain_cases: Optional[int] = None
    n_unlabeled: Optional[int] = None

    def json_fields(self) -> List[str]:
        unchecked = ("method", "n_pretrain_cases", "n_unlabeled") if self.error else ()
        return [name for name in super().json_fields() if name not in unchecked]


def checkpoint_from_training_log(folder: str) -> Optional[str]:
    """The PGL checkpoint a fine-tuning run loaded, from its ``PGL initialisation from <path>`` log line."""
    for line in training_log_lines(folder):
        m = _INIT_LINE.search(line)
        if m:
            return m.group(1)
    return None


def conventional_checkpoint(trainer_cls: Any, plans: dict, configuration: str, fold: Any
                            ) -> Tuple[Optional[str], Optional[str]]:
    """``(path, None)`` of the checkpoint the PGL trainer would choose for this fold now (``$nnUNet_pgl_weights``,
    else ``fold_K``, ``fold_all``, a ``pgl_transfer`` record:
    :func:`~nnunet_pgl.pretraining.contract.choose_pgl_checkpoint`), or ``(None, why not)``."""
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
    from nnunet_pgl.pretraining.ingest import companions
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
        out[cid] = [q for p in files for q in [p] + companions(p) if os.path.isfile(q)]
    return {c: f for c, f in out.items() if f}


def find_leaks(meta: Dict[str, Any], dataset_name: str, val_by_fold: Dict[int, List[str]],
               raw_files: Dict[str, List[str]], preprocessed_files: Optional[Dict[str, str]] = None,
               sha_cache: Optional[Dict[str, str]] = None) -> Dict[int, FoldLeaks]:
    """Validation cases a checkpoint saw in pretraining, per fold.

    Args:
        meta: the checkpoint's ``pgl_meta`` (``cases``: ``{case_id, kind, sha256, source?}``; ``dataset_name``).
        dataset_name: the dataset being compared.
        val_by_fold: validation case ids per fold.
        raw_files: :func:`raw_image_files` of (at least) the validation cases; unlabeled pretraining cases are
            matched by ``sha256_of_files`` of these. A case without raw files cannot be checked (``unchecked``).
        preprocessed_files: ``{case_id: <case>.b2nd}``; used only when the checkpoint was pretrained on another
            dataset, to match its labeled cases by hash instead of by case id.
        sha_cache: hashes already computed (``'raw:<case>'``/``'pre:<case>'`` → sha256), updated; share one between
            the checkpoints of one comparison so that each validation image is read once.

    Returns:
        ``{fold: FoldLeaks}``.
    """
    from nnunet_pgl.pretraining.contract import sha256_of_files
    cases = meta.get("cases") or []
    same_dataset = meta.get("dataset_name") in (None, dataset_name)
    labeled_ids = {c["case_id"] for c in cases if c.get("kind") == "labeled"}
    labeled_sha = {c["sha256"]: c["case_id"] for c in cases if c.get("kind") == "labeled" and c.get("sha256")}
    unlabeled = {c["sha256"]: c for c in cases if c.get("kind") == "unlabeled" and c.get("sha256")}
    cache: Dict[str, str] = {} if sha_cache is None else sha_cache

    def sha(key: str, files: List[str]) -> str:
        if key not in cache:
            cache[key] = sha256_of_files(files)
        return cache[key]

    out: Dict[int, FoldLeaks] = {}
    for fold, val in val_by_fold.items():
        lab: List[str] = []
        unl: List[UnlabeledCopy] = []
        unchecked: List[str] = []
        for cid in val:
            if same_dataset and cid in labeled_ids:
                lab.append(cid)
            elif not same_dataset and labeled_sha and preprocessed_files and cid in preprocessed_files:
                if sha("pre:" + cid, [preprocessed_files[cid]]) in labeled_sha:
                    lab.append(cid)
            if unlabeled:
                if cid not in raw_files:
                    unchecked.append(cid)
                    continue
                digest = sha("raw:" + cid, raw_files[cid])
                if digest in unlabeled:
                    u = unlabeled[digest]
                    unl.append(UnlabeledCopy(case_id=cid, pretrain_case_id=u["case_id"], source=u.get("source", [])))
        leaked = sorted(set(lab) | {u["case_id"] for u in unl})
        out[fold] = FoldLeaks(n_val=len(val), labeled=lab, unlabeled=unl, unchecked=unchecked, leaked=leaked)
    return out


def _checkpoints_used(trainers: Sequence[Any], results_dataset: str, plans: dict, plans_name: str,
                      configuration: str, folds: Sequence[int]) -> List[Tuple[LeakReport, Optional[str], List[int]]]:
    """One ``(report, why no checkpoint was found, folds)`` per (pretrainer, checkpoint) that the trainers use."""
    found: Dict[Tuple[str, str], Tuple[LeakReport, Optional[str], List[int]]] = {}
    for cls in trainers:
        name = cls.__name__
        for fold in folds:
            path, how, why_not = checkpoint_from_training_log(
                fold_dir(results_dataset, name, plans_name, configuration, fold)), "training log", None
            if path is None:
                (path, why_not), how = conventional_checkpoint(cls, plans, configuration, fold), "lookup"
            report, _, report_folds = found.setdefault((cls.pretrainer(), str(path)),
                                                       (LeakReport(cls.pretrainer(), path), why_not, []))
            if name not in report.arms:
                report.arms.append(name)
            if how not in report.found_by:
                report.found_by = sorted(report.found_by + [how])
            if fold not in report_folds:
                report_folds.append(fold)
    return list(found.values())


def _pretraining_meta(report: LeakReport, why_not: Optional[str]) -> Optional[Dict[str, Any]]:
    """The checkpoint's ``pgl_meta``, or None with ``report.error`` saying why it cannot be checked."""
    from nnunet_pgl.pretraining.contract import PGLCheckpointError, read_pgl_checkpoint
    path = report.checkpoint
    if path is None or not os.path.isfile(path):
        report.error = why_not or f"checkpoint not found at {path}"
        return None
    try:
        meta = read_pgl_checkpoint(path).get("pgl_meta") or {}
    except PGLCheckpointError as ex:
        report.error = str(ex)
        return None
    if "cases" not in meta:
        report.error = f"{path} has no pgl_meta['cases'] (written by an older pgl_pretrain?): cannot check"
        return None
    return meta


def leakage_guard(trainers: Sequence[Any], results_dataset: str, plans: dict, plans_name: str, configuration: str,
                  dataset_json: dict, val_by_fold: Dict[int, List[str]], raw_dataset: Optional[str],
                  preprocessed_folder: Optional[str]) -> List[LeakReport]:
    """One :class:`LeakReport` per (pretrainer, checkpoint) that the PGL-initialised ``trainers`` use.

    The checkpoint of each fold is the one its training log says it loaded; folds without that line (not trained
    yet, or resumed logs) use the one the trainer would choose now for that fold (``$nnUNet_pgl_weights``, else
    ``fold_K``, ``fold_all``, a ``pgl_transfer`` record).
    """
    found = _checkpoints_used(trainers, results_dataset, plans, plans_name, configuration, list(val_by_fold))
    raw: Optional[Dict[str, List[str]]] = None
    sha_cache: Dict[str, str] = {}  # one per comparison: the checkpoints share the validation images' hashes
    for report, why_not, folds in found:
        meta = _pretraining_meta(report, why_not)
        if meta is None:
            continue
        if raw is None:
            all_val = [c for v in val_by_fold.values() for c in v]
            raw = raw_image_files(raw_dataset, dataset_json, all_val) if raw_dataset and os.path.isdir(raw_dataset) \
                else {}
        pre = None
        if meta.get("dataset_name") not in (None, plans.get("dataset_name")) and preprocessed_folder:
            pre = {c: os.path.join(preprocessed_folder, c + ".b2nd") for v in val_by_fold.values() for c in v
                   if os.path.isfile(os.path.join(preprocessed_folder, c + ".b2nd"))}
        report.method = meta.get("method")
        report.n_pretrain_cases = len(meta["cases"])
        report.n_unlabeled = sum(c.get("kind") == "unlabeled" for c in meta["cases"])
        report.folds = find_leaks(meta, plans.get("dataset_name", ""), {k: val_by_fold[k] for k in sorted(folds)},
                                  raw, pre, sha_cache)
    return [report for report, _, _ in found]
