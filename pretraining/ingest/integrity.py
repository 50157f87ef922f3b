"""Integrity: hash every case's files in one pass that also checks them, reusing the hashes of unchanged files.

SimpleITK reads a truncated NIfTI without error and fills the missing voxels with zeros, so the pass that hashes
a file also checks that gzip streams decompress to their end and that a single-file NIfTI holds all the bytes its
header promises. Files whose (path, size, mtime_ns) match the index are not read at all.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import struct
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

from .discovery import Group
from .errors import VANISHED, IngestError, Skipped, format_skipped

if TYPE_CHECKING:
    from .pool import WorkerPool

_HASH_BLOCK = 4 * 1024 * 1024
_HEAD = 540  # bytes of a NIfTI-2 header (NIfTI-1: 348)


def nifti_expected_nbytes(hdr: bytes) -> Optional[int]:
    """Bytes a single-file NIfTI-1/2 (``n+1``/``n+2``) must have (uncompressed), from its header; else None."""
    for end in "<>":
        if len(hdr) < 348:
            return None
        n = struct.unpack(end + "i", hdr[:4])[0]
        if n == 348:
            if hdr[344:347] != b"n+1":
                return None
            dim = struct.unpack(end + "8h", hdr[40:56])
            bitpix = struct.unpack(end + "h", hdr[72:74])[0]
            vox_offset = int(struct.unpack(end + "f", hdr[108:112])[0])
        elif n == 540:
            if len(hdr) < 540 or hdr[4:7] != b"n+2":
                return None
            bitpix = struct.unpack(end + "h", hdr[14:16])[0]
            dim = struct.unpack(end + "8q", hdr[16:80])
            vox_offset = int(struct.unpack(end + "q", hdr[168:176])[0])
        else:
            continue
        if not 1 <= dim[0] <= 7 or bitpix <= 0:
            return None
        nvox = math.prod(max(1, int(d)) for d in dim[1:dim[0] + 1])
        return vox_offset + nvox * bitpix // 8
    return None


class HashingReader(io.RawIOBase):
    """Raw file wrapper that feeds every byte read into a hash (so gzip can be verified in the same pass)."""

    def __init__(self, f: Any, h: Any) -> None:
        self.f, self.h = f, h

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        self.h.update(data)
        b[:len(data)] = data
        return len(data)


def _hash_rest(f: Any, h: Any) -> None:
    for chunk in iter(lambda: f.read(_HASH_BLOCK), b""):
        h.update(chunk)


def _hash_gzip(p: str, f: Any, h: Any) -> Optional[str]:
    """Hash a ``.gz`` file's bytes while decompressing it to its end; the problem found, if any."""
    head = b""
    total = 0
    try:
        with gzip.GzipFile(fileobj=io.BufferedReader(HashingReader(f, h), _HASH_BLOCK)) as g:
            while True:
                chunk = g.read(_HASH_BLOCK)
                if not chunk:
                    break
                if len(head) < _HEAD:
                    head += chunk[:_HEAD - len(head)]
                total += len(chunk)
    except (OSError, EOFError, ValueError) as e:
        _hash_rest(f, h)  # whatever the gzip reader did not consume (the rest after an error)
        return f"truncated or corrupt gzip data ({e}): re-export or re-copy the file"
    _hash_rest(f, h)  # trailing bytes after the gzip stream
    expected = nifti_expected_nbytes(head) if p.lower().endswith(".nii.gz") else None
    if expected is not None and total < expected:
        return (f"truncated NIfTI: {total} bytes after decompression, the header needs {expected}; re-export or "
                f"re-copy the file")
    return None


def _hash_plain(p: str, f: Any, h: Any) -> Optional[str]:
    """Hash an uncompressed file; for ``.nii`` the problem if it is shorter than its header says."""
    head = f.read(_HEAD)
    h.update(head)
    _hash_rest(f, h)
    if p.lower().endswith(".nii"):
        expected = nifti_expected_nbytes(head)
        size = os.fstat(f.fileno()).st_size
        if expected is not None and size < expected:
            return f"truncated NIfTI: {size} bytes, the header needs {expected}; re-export or re-copy the file"
    return None


def hash_and_check(paths: Sequence[str]) -> Tuple[str, List[Tuple[str, str]]]:
    """sha256 of the files concatenated (as ``contract.sha256_of_files``) and their integrity problems.

    Checked: gzip streams decompress to their end (``*.gz``), and single-file NIfTI holds all the bytes its header
    promises. A file that no longer exists is a problem (:data:`~.errors.VANISHED`).
    """
    h = hashlib.sha256()
    problems: List[Tuple[str, str]] = []
    for p in paths:
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            problems.append((p, VANISHED))
            continue
        with f:
            problem = _hash_gzip(p, f, h) if p.lower().endswith(".gz") else _hash_plain(p, f, h)
        if problem is not None:
            problems.append((p, problem))
    return h.hexdigest(), problems


def file_stat(path: str) -> Dict[str, Any]:
    """``{path, size, mtime_ns}``: an index entry's record of one hashed file."""
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stat_and_reuse(groups: Sequence[Group], index: Sequence[Dict[str, Any]], skipped: Skipped,
                    ) -> Tuple[Dict[str, Dict[str, Any]], List[int], Set[int]]:
    """Stat every hashed file; give a group the index's sha256 when all its files are unchanged. Returns the stats,
    the groups still to hash and the groups with a vanished file (skipped)."""
    known: Dict[Tuple[str, ...], str] = {}
    stat_by_sha: Dict[str, Dict[str, Tuple[Any, Any]]] = {}
    for e in index:
        for src in [e.get("source", [])] + list(e.get("duplicates", [])):
            known[tuple(src)] = e["sha256"]
        stat_by_sha[e["sha256"]] = {s["path"]: (s["size"], s["mtime_ns"]) for s in e.get("files", [])}
    stat_of: Dict[str, Dict[str, Any]] = {}
    to_hash: List[int] = []
    vanished: Set[int] = set()
    for i, g in enumerate(groups):
        try:
            for p in g.hashed:
                stat_of[p] = file_stat(p)
        except FileNotFoundError:
            vanished.add(i)
            gone = [p for p in g.hashed if not os.path.exists(p)]
            for p in gone:
                skipped.add(p, VANISHED)
            for p in g.files:
                if p not in gone:
                    skipped.add(p, "case skipped: another of its files disappeared during ingestion")
            continue
        sha = known.get(g.files)
        if sha is not None and all((stat_of[p]["size"], stat_of[p]["mtime_ns"]) == stat_by_sha[sha].get(p)
                                   for p in g.hashed):
            g.sha256 = sha
        else:
            to_hash.append(i)
    return stat_of, to_hash, vanished


def hash_groups(groups: List[Group], folders: Sequence[str], index: Sequence[Dict[str, Any]], skipped: Skipped,
                pool: "WorkerPool", verbose: bool) -> Tuple[List[Group], Dict[str, Dict[str, Any]]]:
    """Give every group its sha256 (from ``index`` where its files are unchanged, else hashed and checked in
    ``pool``). Returns the usable groups and every hashed file's :func:`file_stat`; groups with a vanished or
    damaged file are skipped, and a folder left without a usable group raises :class:`IngestError`."""
    stat_of, to_hash, bad = _stat_and_reuse(groups, index, skipped)
    for j, (sha, problems) in pool.run(hash_and_check, [(groups[i].hashed,) for i in to_hash],
                                       "Hashing unlabeled images", verbose):
        g = groups[to_hash[j]]
        if problems:
            bad.add(to_hash[j])
            for p, reason in problems:
                skipped.add(p, reason)
            for p in g.files:
                if not any(p == q for q, _ in problems):
                    skipped.add(p, "case skipped: another of its files is unusable (see its reason)")
        else:
            g.sha256 = sha
    if bad:
        groups = [g for i, g in enumerate(groups) if i not in bad]
        for folder in folders:
            if not any(g.folder == folder for g in groups):
                raise IngestError(f"unlabeled folder {folder} contains no usable 3D image:"
                                  + format_skipped([s for s in skipped.entries if os.path.dirname(s[0]) == folder])
                                  + ". Replace or restore these files, or remove the folder from the list")
    return groups, stat_of
