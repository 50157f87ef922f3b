"""``ingest_unlabeled``: the phases of one ingestion, in order.

1. check the inputs (folders, ``dataset.json`` against the plans, the preprocessed folder);
2. discover the cases in the folders (:mod:`.discovery`);
3. hash and check their files, reusing the index's hashes of unchanged files (:mod:`.integrity`);
4. group them by content (one case per distinct sha256, the others are its duplicates);
5. holding the folder's lock (:mod:`.cache`): reuse the cached cases, preprocess the others in the worker pool
   (:mod:`.pool`, :mod:`.preprocessing`), commit each one and keep the index current;
6. write the index, remove the cases it no longer names;
7. report the warnings (:mod:`.report`).
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from batchgenerators.utilities.file_and_folder_operations import join, load_json

from . import cache, discovery, integrity, preprocessing
from .cache import case_id_of
from .discovery import Group
from .errors import VANISHED, IngestError, Skipped, format_skipped
from .pool import WorkerPool
from .report import PREVIEW, REPORT_FILE, report

#: how often (seconds) the index is rewritten while cases are preprocessed (and once at the end)
INDEX_WRITE_INTERVAL_S = 5.0


@dataclass(frozen=True)
class UnlabeledCase:
    """One ingested unlabeled case.

    Attributes:
        case_id: identifier of the preprocessed case, ``'unl_' + sha256[:16]``.
        data_file: absolute path of ``<case_id>.b2nd`` (blosc2, float32 ``(C, Z, Y, X)``, nnU-Net training space).
            ``<case_id>_seg.b2nd`` (nonzero mask, -1 outside) and ``<case_id>.pkl`` lie beside it.
        source: absolute paths of the source file(s), one per channel (the first copy found if duplicated).
        sha256: sha256 of the source file(s), channel files concatenated in channel order (see
            ``contract.sha256_of_files``).
    """
    case_id: str
    data_file: str
    source: Tuple[str, ...]
    sha256: str


def _check_inputs(dataset_json: dict, configuration_manager, preprocessed_dataset_folder_base: str) -> int:
    """The number of channels; :class:`IngestError` when the plans and ``dataset_json`` disagree or the
    preprocessed folder is missing."""
    channel_names = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not channel_names:
        raise IngestError("dataset_json has no 'channel_names': pass the dataset's dataset.json")
    k = len(channel_names)
    if len(configuration_manager.normalization_schemes) != k:
        raise IngestError(f"dataset_json has {k} channel(s) but configuration {configuration_manager.data_identifier}"
                          f" normalizes {len(configuration_manager.normalization_schemes)}: the plans and the "
                          f"dataset.json belong to different datasets")
    if not os.path.isdir(os.path.abspath(preprocessed_dataset_folder_base)):
        raise IngestError(f"preprocessed dataset folder {os.path.abspath(preprocessed_dataset_folder_base)} does not "
                          f"exist: run nnUNetv2_plan_and_preprocess (or nnUNetv2_extract_fingerprint + "
                          f"nnUNetv2_plan_experiment) for this dataset first")
    return k


def _by_content(groups: Sequence[Group]) -> Tuple[Dict[str, List[Group]], List[str]]:
    """The groups per sha256 (discovery order; the first is the source, the others its duplicates), and one
    message per duplicate."""
    by_sha: Dict[str, List[Group]] = {}
    for g in groups:
        by_sha.setdefault(g.sha256, []).append(g)  # type: ignore[arg-type]
    duplicates = [f"{', '.join(d.files)} has the same content as {', '.join(gs[0].files)}: ingested once"
                  for gs in by_sha.values() for d in gs[1:]]
    return by_sha, duplicates


@dataclass
class _Run:
    """The cases of one run in the locked folder ``out``: those done (``entries``, sha256 -> index entry), what
    failed, and the per-case warnings. Its methods preprocess, commit and index cases."""

    out: str
    token: str
    fingerprint: str
    by_sha: Dict[str, List[Group]]
    stat_of: Dict[str, Dict[str, Any]]
    skipped: Skipped
    entries: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    failed: Set[str] = field(default_factory=set)
    case_warnings: List[str] = field(default_factory=list)

    def add(self, sha: str, shape: Optional[Sequence[int]], warns: Sequence[str]) -> None:
        self.entries[sha] = cache.make_entry(sha, self.by_sha[sha], self.stat_of, self.fingerprint, shape, warns)
        self.case_warnings.extend(warns)

    def reuse_cached(self, old_by_sha: Dict[str, Dict[str, Any]], present: Set[str]) -> List[str]:
        """Take the cases whose entry has the current fingerprint and whose files exist; the others, to do."""
        to_do = []
        for sha in self.by_sha:
            old = old_by_sha.get(sha)
            if old is not None and old.get("plans_fingerprint") == self.fingerprint \
                    and cache.has_case_files(case_id_of(sha), present):
                self.add(sha, old.get("shape"), old.get("warnings", []))
            else:
                to_do.append(sha)
        return to_do

    def write_index(self) -> None:
        cache.write_index(self.out, self.token, cache.ordered(self.entries, self.by_sha))

    def preprocess(self, files: Tuple[str, ...], sha: str, managers: Tuple[Any, Any, dict]) -> Dict[str, Any]:
        return preprocessing.preprocess_case(files, case_id_of(sha), sha, self.out, self.token, *managers)

    def accept(self, sha: str, res: Dict[str, Any]) -> None:
        cache.commit_case(self.out, res["tmp_prefix"], case_id_of(sha))
        self.add(sha, res["shape"], res["warnings"])

    def fail(self, sha: str, reason: str) -> None:
        self.failed.add(sha)
        for g in self.by_sha[sha]:
            for p in g.files:
                self.skipped.add(p, reason)

    def preprocess_all(self, to_do: Sequence[str], managers: Tuple[Any, Any, dict], pool: WorkerPool,
                       verbose: bool) -> None:
        """Preprocess ``to_do`` in the pool, committing each case as it finishes (the index rewritten every
        :data:`INDEX_WRITE_INTERVAL_S`); a case whose file vanished is retried from a duplicate."""
        tasks = [(self.by_sha[s][0].files, case_id_of(s), s, self.out, self.token, *managers) for s in to_do]
        retry: List[str] = []
        last_write = time.monotonic()
        for j, res in pool.run(preprocessing.preprocess_case, tasks, "Preprocessing unlabeled images", verbose):
            sha = to_do[j]
            if res["status"] == "ok":
                self.accept(sha, res)
            elif res["reason"] == VANISHED and len(self.by_sha[sha]) > 1:
                retry.append(sha)  # a duplicate of the vanished file can stand in for it
            else:
                self.fail(sha, res["reason"])
            if time.monotonic() - last_write > INDEX_WRITE_INTERVAL_S:
                self.write_index()
                last_write = time.monotonic()
        for sha in retry:  # rare: in this process, one duplicate after the other
            self.retry_from_duplicates(sha, managers)

    def retry_from_duplicates(self, sha: str, managers: Tuple[Any, Any, dict]) -> None:
        """Preprocess the first duplicate whose files all exist; the vanished groups are skipped and dropped."""
        while self.by_sha[sha]:
            g = self.by_sha[sha][0]
            if all(os.path.exists(p) for p in g.files):
                res = self.preprocess(g.files, sha, managers)
                if res["status"] == "ok":
                    self.accept(sha, res)
                    return
                if res["reason"] != VANISHED:
                    self.fail(sha, res["reason"])
                    return
            for p in g.files:
                self.skipped.add(p, VANISHED if not os.path.exists(p) else
                                 "case skipped: another of its files disappeared during ingestion")
            self.by_sha[sha] = self.by_sha[sha][1:]
        self.failed.add(sha)


def _print_plan(run: _Run, groups: Sequence[Group], per_folder: Dict[str, int], to_do: Sequence[str],
                duplicates: Sequence[str], report_dir: Optional[str]) -> None:
    print(f"Unlabeled images: {len(groups)} case(s) in {len(per_folder)} folder(s)"
          f" ({', '.join(f'{os.path.basename(f) or f}: {n}' for f, n in per_folder.items())}), "
          f"{len(run.by_sha)} distinct, {len(run.entries)} already preprocessed, {len(to_do)} to preprocess, "
          f"{len(run.skipped.entries)} file(s) skipped -> {run.out}")
    for m in duplicates[:PREVIEW]:
        print(f"Duplicate skipped: {m}")
    if len(duplicates) > PREVIEW:
        print(f"... and {len(duplicates) - PREVIEW} more duplicate(s)"
              + (f" (all in {join(report_dir, REPORT_FILE)})" if report_dir else ""))


def _finish_index(run: _Run, old_index: List[Dict[str, Any]], folders: Sequence[str], present: Set[str],
                  verbose: bool) -> List[Dict[str, Any]]:
    """Write the index (this run's cases, then those of other folders that stay) unless unchanged, remove the
    cases it no longer names, and return this run's entries in discovery order."""
    if not run.entries:
        raise IngestError("no unlabeled image could be used:" + format_skipped(run.skipped.entries)
                          + "\nReplace or remove these files")
    index = cache.ordered(run.entries, run.by_sha)
    full = index + cache.kept_from_other_folders(old_index, run.entries, folders, run.fingerprint, present)
    if full != old_index or not os.path.isfile(join(run.out, cache.INDEX_FILE)):  # a no-op run writes nothing
        cache.write_index(run.out, run.token, full)
    cache.remove_unindexed_cases(run.out, full)
    dropped = {e["case_id"] for e in old_index} - {e["case_id"] for e in full}
    if verbose and dropped:
        print(f"Removed {len(dropped)} cached case(s) whose source is gone or changed, or that were made "
              f"for other plans")
    return index


def ingest_unlabeled(dirs: Sequence[str], plans_manager, configuration_manager, dataset_json: dict,
                     preprocessed_dataset_folder_base: str, num_processes: int = 2, verbose: bool = True,
                     report_dir: Optional[str] = None) -> List[UnlabeledCase]:
    """Preprocess every image in ``dirs`` into the training space of ``configuration_manager`` (cached).

    Args:
        dirs: folders of unlabeled images (non-recursive; hidden files ignored). Single-channel datasets: every
            3D image SimpleITK reads is one case (a ``_0000`` suffix is allowed, not required). Datasets with k > 1
            channels: ``<case>_0000.<ext>`` ... ``<case>_{k-1:04d}.<ext>`` form one case.
        plans_manager, configuration_manager: the dataset's plans and the configuration to preprocess for.
        dataset_json: the dataset's ``dataset.json`` (dict or path).
        preprocessed_dataset_folder_base: ``$nnUNet_preprocessed/DatasetXXX_Name``; output goes to
            :func:`~.cache.unlabeled_folder` there.
        num_processes: worker processes (spawn) for hashing and preprocessing; ``<= 1`` runs in-process.
        verbose: print a summary and show progress bars.
        report_dir: an existing folder (``pgl_pretrain``: its output folder) for :data:`~.report.REPORT_FILE`, the
            full list of skipped files, duplicates and warnings of this run (removed when the run has none).
            Whatever the number of files, each kind of problem is one :class:`~.errors.IngestWarning` with the
            count and the first few (the full list also in its ``entries``).

    Returns:
        One :class:`UnlabeledCase` per distinct image content, in discovery order. These cases are in the folder
        and its ``index.json`` afterwards, beside cached cases of other folders (see the package docstring for
        caching, atomicity and the policy on bad inputs).

    Raises:
        IngestError: a folder is missing or has no usable image, multi-channel files do not form complete cases,
            no case at all is usable, or the plans do not match ``dataset_json``.
    """
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    folders = discovery.check_folders(dirs)
    k = _check_inputs(dataset_json, configuration_manager, preprocessed_dataset_folder_base)
    out = cache.unlabeled_folder(os.path.abspath(preprocessed_dataset_folder_base),
                                 configuration_manager.data_identifier)
    fingerprint = cache.plans_fingerprint(plans_manager, configuration_manager)
    managers = (plans_manager, configuration_manager, dataset_json)

    old_index = cache.load_index(out, quiet=True) if os.path.isdir(out) else []  # for the stat cache only
    groups, skipped, per_folder = discovery.discover(folders, k, discovery.IndexedSources.from_index(old_index))
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with WorkerPool(num_processes) as pool:
            groups, stat_of = integrity.hash_groups(groups, folders, old_index, skipped, pool, verbose)
            by_sha, duplicates = _by_content(groups)
            run = _Run(out, token, fingerprint, by_sha, stat_of, skipped)
            os.makedirs(out, exist_ok=True)  # from here on the folder is written
            with cache.folder_lock(out, verbose):
                present = cache.present_files(out)  # (also removes the leftovers of killed runs)
                old_index = cache.load_index(out)
                old_by_sha = {e["sha256"]: e for e in old_index}
                to_do = run.reuse_cached(old_by_sha, present)
                if verbose:
                    _print_plan(run, groups, per_folder, to_do, duplicates, report_dir)
                if any(s in old_by_sha for s in to_do):  # entries whose files will be replaced leave the index
                    run.write_index()                    # before their files change
                run.preprocess_all(to_do, managers, pool, verbose)
                index = _finish_index(run, old_index, folders, present, verbose)
    finally:
        cache.remove_own_tmp_files(out, token)

    report(report_dir, skipped.entries, run.case_warnings, duplicates, preprocessing.ct_normalization_note(
        configuration_manager, plans_manager, preprocessing.channel_names_of(dataset_json)), len(index))
    if verbose:
        print(f"Unlabeled cases ready: {len(index)} ({len(to_do) - len(run.failed)} preprocessed now)")
    return [UnlabeledCase(e["case_id"], join(out, e["case_id"] + ".b2nd"), tuple(e["source"]), e["sha256"])
            for e in index]
