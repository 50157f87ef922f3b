"""The cache of ingested cases: its folder, ``index.json``, the plans fingerprint, the lock, and atomic writes.

The folder is a cache derived from the sources. A case is reused when an index entry has its sha256 and the current
:func:`plans_fingerprint` and its three files exist. Case files are written by a worker under temporary names
(``.pgltmp-<run>-<case_id>*``, fsynced) and renamed into place by :func:`commit_case` before the index names them;
the index itself is rewritten atomically. Only one ingest holds a folder at a time (:func:`folder_lock`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set

from batchgenerators.utilities.file_and_folder_operations import join, load_json

from nnunet_pgl.pretraining.atomic import atomic_write_json, fsync_dir, remove_quietly
from .discovery import Group
from .errors import IngestWarning

INDEX_FILE = "index.json"
LOCK_FILE = ".ingest.lock"
TMP_PREFIX = ".pgltmp-"
FOLDER_SUFFIX = "_pgl_unlabeled"
# bump when the layout or the preprocessing of ingested cases changes: it invalidates every cached case
INGEST_FORMAT_VERSION = 1
CASE_FILE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")
CASE_FILE_RE = re.compile(r"^(unl_[0-9a-f]{16})(\.b2nd|_seg\.b2nd|\.pkl)$")


def unlabeled_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    """Folder of the ingested unlabeled cases: a sibling of ``<data_identifier>/``, never inside it.

    nnU-Net deletes ``<base>/<data_identifier>/`` when re-preprocessing, and every case in it joins the 5-fold split.
    """
    return join(preprocessed_dataset_folder_base, data_identifier + FOLDER_SUFFIX)


def case_id_of(sha256: str) -> str:
    """The id of the case whose source content has this sha256: ``'unl_' + sha256[:16]``."""
    return "unl_" + sha256[:16]


def plans_fingerprint(plans_manager, configuration_manager) -> str:
    """sha256 of every plans field that changes the preprocessed data of an image without labels.

    Covers the configuration's spacing, normalization schemes, ``use_mask_for_norm``, data resampling function and
    kwargs, ``transpose_forward``, the foreground intensity properties (CT normalization), the image reader,
    ``data_identifier``, ``preprocessor_name`` and this module's format version.
    *Note*: the segmentation resampling settings are left out: no labels are resampled here.
    """
    c = configuration_manager.configuration
    relevant = {
        "format_version": INGEST_FORMAT_VERSION,
        "spacing": [float(s) for s in c["spacing"]],
        "normalization_schemes": list(c["normalization_schemes"]),
        "use_mask_for_norm": [bool(u) for u in c["use_mask_for_norm"]],
        "resampling_fn_data": c["resampling_fn_data"],
        "resampling_fn_data_kwargs": c["resampling_fn_data_kwargs"],
        "transpose_forward": list(plans_manager.transpose_forward),
        "foreground_intensity_properties_per_channel":
            plans_manager.plans.get("foreground_intensity_properties_per_channel"),
        "image_reader_writer": plans_manager.plans.get("image_reader_writer"),
        "data_identifier": c["data_identifier"],
        "preprocessor_name": c["preprocessor_name"],
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def load_index(folder: str, quiet: bool = False) -> List[Dict[str, Any]]:
    """The entries of ``folder/index.json``; none (and, unless ``quiet``, a warning attributed to the caller of
    ``ingest_unlabeled``) when it is missing or unreadable."""
    path = join(folder, INDEX_FILE)
    if not os.path.isfile(path):
        return []
    try:
        entries = load_json(path)
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and {"case_id", "sha256", "source", "files"} <= e.keys()
                and all(isinstance(f, dict) and {"path", "size", "mtime_ns"} <= f.keys() for f in e["files"])
                for e in entries):
            raise ValueError("not a list of index entries")
        return entries
    except ValueError as e:
        if not quiet:
            warnings.warn(f"{path} is unreadable ({e}); every unlabeled case will be preprocessed again",
                          IngestWarning, stacklevel=3)
        return []


def write_index(folder: str, token: str, entries: List[Dict[str, Any]]) -> None:
    """Replace ``folder/index.json`` atomically (through ``.pgltmp-<token>-index.json``)."""
    atomic_write_json(join(folder, INDEX_FILE), entries, indent=1,
                      tmp=join(folder, f"{TMP_PREFIX}{token}-{INDEX_FILE}"))


@contextlib.contextmanager
def folder_lock(folder: str, verbose: bool) -> Iterator[None]:
    """Hold ``folder``'s ingest lock (a POSIX ``flock`` on :data:`LOCK_FILE`; none on Windows), waiting for
    another ingest that holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock (documented)
        yield
        return
    with open(join(folder, LOCK_FILE), "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"Waiting for another ingest into {folder} to finish ...")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def present_files(folder: str) -> Set[str]:
    """The names of the files in ``folder`` (one listing, not three stats per case), after removing the temporary
    files of killed runs. Call it holding the lock: then no other run is writing temporary files."""
    present = set()
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.name.startswith(TMP_PREFIX):
                remove_quietly([entry.path])
            elif entry.is_file():
                present.add(entry.name)
    return present


def has_case_files(case_id: str, present: Set[str]) -> bool:
    return all(case_id + s in present for s in CASE_FILE_SUFFIXES)


def commit_case(folder: str, tmp_prefix: str, case_id: str) -> None:
    """Rename a case's fsynced temporary files (``tmp_prefix`` + suffixes) to their final names, then fsync the
    folder: only after this may the index name the case."""
    for suffix in CASE_FILE_SUFFIXES:
        os.replace(tmp_prefix + suffix, join(folder, case_id + suffix))
    fsync_dir(folder)


def remove_own_tmp_files(folder: str, token: str) -> None:
    """Remove this run's temporary files (a failed or interrupted run)."""
    if os.path.isdir(folder):
        remove_quietly(join(folder, n) for n in os.listdir(folder) if n.startswith(f"{TMP_PREFIX}{token}-"))


def make_entry(sha: str, gs: Sequence[Group], stat_of: Dict[str, Dict[str, Any]], fingerprint: str,
               shape: Optional[Sequence[int]], warns: Sequence[str]) -> Dict[str, Any]:
    """The index entry of one case: its first source group, the duplicates, and every hashed file's stat."""
    return {
        "case_id": case_id_of(sha),
        "sha256": sha,
        "source": list(gs[0].files),
        "duplicates": [list(g.files) for g in gs[1:]],
        "files": [stat_of[p] for g in gs for p in g.hashed],
        "plans_fingerprint": fingerprint,
        "shape": list(shape) if shape is not None else None,
        "warnings": list(warns),
    }


def ordered(entries: Dict[str, Dict[str, Any]], by_sha: Dict[str, List[Group]]) -> List[Dict[str, Any]]:
    """Index entries in discovery order."""
    return [entries[s] for s in by_sha if s in entries]


def kept_from_other_folders(old_index: Sequence[Dict[str, Any]], done: Dict[str, Dict[str, Any]],
                            folders: Sequence[str], fingerprint: str, present: Set[str]) -> List[Dict[str, Any]]:
    """Cases of sources in other folders stay while their sources exist: another run may train on them."""
    return [e for e in old_index
            if e["sha256"] not in done and e.get("plans_fingerprint") == fingerprint
            and not any(os.path.dirname(p) in folders for p in e.get("source", []))
            and all(os.path.isfile(f["path"]) for f in e.get("files", []))
            and has_case_files(e["case_id"], present)]  # untouched by this run


def remove_unindexed_cases(folder: str, index: Sequence[Dict[str, Any]]) -> None:
    """The folder mirrors the index: remove the case files of cases it does not name (sources vanished or
    changed, other plans)."""
    keep = {e["case_id"] for e in index}
    matches = [(n, CASE_FILE_RE.match(n)) for n in os.listdir(folder)]
    remove_quietly(join(folder, n) for n, m in matches if m is not None and m.group(1) not in keep)
