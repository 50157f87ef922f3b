"""Ingest folders of extra *unlabeled* images into a dataset's nnU-Net training space.

nnU-Net has no unlabeled training cases, so this module runs nnU-Net's own preprocessing on them: each case is
read with the dataset's reader (``plans_manager.image_reader_writer_class``; files of another format, e.g. NRRD in
a NIfTI dataset, with ``SimpleITKIO``) and passed through the plans' preprocessor (``run_case_npy`` without a
segmentation: transpose, crop to nonzero, the plans' normalization, resampling to the plans' spacing), exactly as
``DefaultPreprocessor.run_case`` does for a test image. The result is written with nnU-Net's own blosc2 writer
(``nnUNetDatasetBlosc2.save_case`` with the chunks and blocks from ``comp_blosc2_params``, as in
``run_case_save``) into a folder **beside** the preprocessed data::

    $nnUNet_preprocessed/DatasetXXX_Name/
        nnUNetPlans_3d_fullres/                 <- nnU-Net's (deleted on re-preprocessing; never touched here)
        nnUNetPlans_3d_fullres_pgl_unlabeled/   <- unlabeled_folder(...)
            unl_<16 hex>.b2nd       float32 (C, Z, Y, X), training space
            unl_<16 hex>_seg.b2nd   int16, -1 outside the nonzero mask, 0 inside (what nnU-Net stores for an
                                    image without labels; lets the stock ``nnUNetDatasetBlosc2`` load the case)
            unl_<16 hex>.pkl        properties (spacing, bbox, shapes, 'class_locations': {}, 'pgl_source', ...)
            index.json              one entry per case (see below)
            .ingest.lock            serialises concurrent ingests (e.g. every DDP rank) on POSIX

Case ids are content hashes (``'unl_' + sha256[:16]`` of the source file(s)), so the same image under two names
is stored once. ``index.json`` is a list of entries ``{case_id, sha256, source, duplicates, files,
plans_fingerprint, shape, warnings}`` where ``files`` holds ``path``, ``size`` and ``mtime_ns`` of every file
hashed for the case (all channels of the source and of its duplicates, plus detached data files of ``.mhd`` /
``.nhdr`` / ``.hdr`` headers).

Caching: a case is reused when an index entry has its sha256 and the current :func:`plans_fingerprint` and its
three files exist. Files whose (path, size, mtime_ns) match the index are not re-hashed; a touched file is
re-hashed and re-done only if its content changed.

The folder holds the returned cases plus the cases of earlier calls whose sources lie in other folders and still
exist (another run, e.g. of another method, may be training on them). Cases whose source files disappeared or
changed, and cases made for other plans, are dropped from the index and their files deleted (the folder is a cache
derived from the sources; ingesting them again re-creates them).

Writes are atomic: a worker writes ``.pgltmp-<run>-<case_id>*`` in the same folder and fsyncs them; the parent
``os.replace``s them to their final names and only then adds the index entry (index rewritten atomically, at most
every few seconds and at the end). Entries whose files are about to be replaced are removed from the index
first. A killed run therefore leaves an index that points only to complete files of the recorded plans
fingerprint; its leftover temporary files are removed by the next run. Worker processes are killed by the kernel
when the ingesting process dies (Linux), so a SIGKILL leaves no orphaned worker.

Bad inputs. ``IngestError`` (a ``ValueError``) names the file or folder and the next step; warnings are
``IngestWarning``. Everything but the reader's own failures is found before anything is written.

- raise: a non-existent folder, a file instead of a folder, an empty list of folders; a folder without any usable
  image (the message lists what was skipped there); no usable case at all.
- skip + one warning listing the skipped files and why: files SimpleITK cannot read (non-images, corrupt
  headers); truncated NIfTI or gzip data (checked while hashing: SimpleITK would read zeros for the missing
  voxels); files nnU-Net's reader fails on; 2D images (also a single slice), 4D images, vector/RGB images,
  images of zeros only, images with NaN/Inf voxels; files that disappear while the ingest runs. Same policy for
  all: nothing usable is lost, nothing unusable is trained on.
- multi-channel datasets, raise: a readable file without the ``_XXXX`` channel suffix, a channel index >= k, a
  missing channel file, two files for one channel, channel files of different size or spacing. A case whose
  channel file was skipped (unreadable, 2D, ...) is skipped with the warning.
- warn: a CT-normalized channel whose raw intensities look like MR (1st percentile > -500 or max < 200).

Warnings scale with the corpus: each kind (skipped files, images that do not look like HU CT, reader messages) is
one warning per run with the count, the first few files and what to check; the full list goes to
:data:`REPORT_FILE` in ``report_dir`` (``pgl_pretrain``'s output folder).

Folders are scanned non-recursively; hidden files (``.*``) are ignored. Only one ingest runs per unlabeled
folder at a time (a POSIX ``flock``; none on Windows, where concurrent runs into one folder are unsupported).
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import struct
import sys
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Type

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, load_json

INDEX_FILE = "index.json"
LOCK_FILE = ".ingest.lock"
TMP_PREFIX = ".pgltmp-"
FOLDER_SUFFIX = "_pgl_unlabeled"
# bump when the layout or the preprocessing of ingested cases changes: it invalidates every cached case
INGEST_FORMAT_VERSION = 1
CASE_FILE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")
_CASE_FILE_RE = re.compile(r"^(unl_[0-9a-f]{16})(\.b2nd|_seg\.b2nd|\.pkl)$")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ext>\..+)$")
_INDEX_WRITE_INTERVAL_S = 5.0
_HASH_BLOCK = 4 * 1024 * 1024
_MAX_LISTED = 20
VANISHED = ("the file disappeared during ingestion (moved or deleted while this ran): put it back and rerun to "
            "include it")
NOT_HU = "does not look like CT in Hounsfield units"
#: written into the ``report_dir`` of :func:`ingest_unlabeled` (pgl_pretrain: its output folder) when a run skipped
#: files or has warnings: every file with its reason; the warnings themselves list the first :data:`_PREVIEW`
REPORT_FILE = "unlabeled_warnings.txt"
_PREVIEW = 5


class IngestError(ValueError):
    """A problem with the unlabeled inputs that the user can fix; the message names the file and the next step."""


class IngestWarning(UserWarning):
    """Skipped files and suspicious intensities found while ingesting unlabeled images: one warning per kind and
    run, whose ``entries`` attribute (where set) lists every file concerned."""


@dataclass(frozen=True)
class UnlabeledCase:
    """One ingested unlabeled case.

    Attributes:
        case_id: identifier of the preprocessed case, ``'unl_' + sha256[:16]``.
        data_file: absolute path of ``<case_id>.b2nd`` (blosc2, float32 ``(C, Z, Y, X)``, nnU-Net training space).
            ``<case_id>_seg.b2nd`` (nonzero mask, -1 outside) and ``<case_id>.pkl`` lie beside it.
        source: absolute paths of the source file(s), one per channel (the first copy found if duplicated).
        sha256: sha256 of the source file(s), channel files concatenated in channel order (see
            :func:`sha256_of_files`).
    """
    case_id: str
    data_file: str
    source: Tuple[str, ...]
    sha256: str


def unlabeled_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    """Folder of the ingested unlabeled cases: a sibling of ``<data_identifier>/``, never inside it.

    nnU-Net deletes ``<base>/<data_identifier>/`` when re-preprocessing, and every case in it joins the 5-fold split.
    """
    return join(preprocessed_dataset_folder_base, data_identifier + FOLDER_SUFFIX)


def sha256_of_files(paths: Sequence[str]) -> str:
    """Hex sha256 of the files' bytes concatenated in the given order (one pass, constant memory)."""
    return _hash_and_check(paths, check=False)[0]


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


# ----------------------------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Group:
    """The channel files of one source case (``files``) and every file its hash covers (``hashed``)."""
    folder: str
    files: Tuple[str, ...]
    hashed: Tuple[str, ...]
    sha256: Optional[str] = None


@dataclass
class _Skipped:
    entries: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def add(self, path: str, reason: str) -> None:
        self.entries.append((path, reason))


def _check_folders(dirs: Sequence[str]) -> List[str]:
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [os.fspath(dirs)]
    if len(dirs) == 0:
        raise IngestError("ingest_unlabeled got no folder: pass at least one folder of unlabeled images")
    folders: List[str] = []
    for d in dirs:
        a = os.path.abspath(os.fspath(d))
        if not os.path.exists(a):
            raise IngestError(f"unlabeled folder {d!r} does not exist (resolved to {a}): check the path, or create it "
                              f"and put the unlabeled images (NIfTI, NRRD, MHA, ...) in it")
        if not os.path.isdir(a):
            raise IngestError(f"unlabeled folder {d!r} is a file, not a folder: pass the folder that contains the "
                              f"unlabeled images ({os.path.dirname(a)})")
        if a not in folders:
            folders.append(a)
    return folders


def _companions(path: str) -> List[str]:
    """Detached data files of a header (``.mhd`` ElementDataFile, ``.nhdr`` data file, ``.hdr`` + ``.img``)."""
    low = path.lower()
    folder = os.path.dirname(path)
    out: List[str] = []
    if low.endswith((".mhd", ".nhdr")):
        try:
            with open(path, "r", errors="replace") as f:
                text = f.read(65536)
        except OSError:
            return []
        pat = r"^\s*ElementDataFile\s*=\s*(.+?)\s*$" if low.endswith(".mhd") else r"^\s*data ?file\s*:\s*(.+?)\s*$"
        m = re.search(pat, text, re.M | re.I)
        if m:
            name = m.group(1)
            # LOCAL: data in the header file; LIST / printf patterns (several files): only the header is hashed
            if name.upper() != "LOCAL" and not name.upper().startswith("LIST") and "%" not in name \
                    and " " not in name:
                out.append(os.path.join(folder, name))
    elif low.endswith(".hdr"):
        stem = path[:-4]
        for ext in (".img", ".img.gz", ".IMG"):
            if os.path.isfile(stem + ext):
                out.append(stem + ext)
                break
    return [p for p in out if os.path.isfile(p)]


def _probe(path: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Header of one file via SimpleITK: ``(info, None)`` for a usable 3D scalar volume, else ``(None, reason)``."""
    import SimpleITK as sitk
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except Exception:
        if not os.path.exists(path):
            return None, VANISHED
        return None, "SimpleITK cannot read it (not an image, or a corrupt file)"
    dim, size, comps = r.GetDimension(), tuple(r.GetSize()), r.GetNumberOfComponents()
    if comps > 1:
        return None, (f"vector image ({comps} components per voxel, e.g. RGB), size {size}: ingest scalar 3D "
                      f"volumes")
    if dim < 3 or (dim == 3 and min(size) == 1):
        hint = " (a DICOM series: convert it to one 3D file first, e.g. with dcm2niix)" \
            if path.lower().endswith(".dcm") or "." not in os.path.basename(path) else ""
        return None, f"2D image (size {size}){hint}: ingest 3D volumes"
    if dim > 3:
        return None, (f"{dim}D image (size {size}): split it into 3D volumes, one file per channel "
                      f"(<case>_0000, <case>_0001, ...)")
    return {"size": size, "spacing": tuple(r.GetSpacing())}, None


def _cached_sources(index: Sequence[Dict[str, Any]]) -> Tuple[Dict[str, Tuple[Tuple[int, int], List[str]]],
                                                                 set]:
    """What an earlier run's index says about its source files: per channel file (of a cached case or of one of its
    duplicates) its ``(size, mtime_ns)`` and companion files, and the channel tuples that formed a case.

    An entry's ``files`` are, per source tuple and channel in order, the channel file followed by its companions
    (:func:`_discover`); an entry that does not read that way contributes nothing."""
    files: Dict[str, Tuple[Tuple[int, int], List[str]]] = {}
    groups = set()
    for e in index:
        try:
            paths = [f["path"] for f in e["files"]]
            stats = {f["path"]: (int(f["size"]), int(f["mtime_ns"])) for f in e["files"]}
            srcs = [tuple(e["source"])] + [tuple(d) for d in e.get("duplicates", [])]
        except (KeyError, TypeError, ValueError):
            continue
        channels = [p for g in srcs for p in g]
        here: Dict[str, Tuple[Tuple[int, int], List[str]]] = {}
        i = 0
        for j, p in enumerate(channels):
            if i >= len(paths) or paths[i] != p:
                break
            i += 1
            nxt = channels[j + 1] if j + 1 < len(channels) else None
            comp = []
            while i < len(paths) and paths[i] != nxt:
                comp.append(paths[i])
                i += 1
            here[p] = (stats[p], comp)
        else:
            if i == len(paths):
                files.update(here)
                groups.update(srcs)
    return files, groups


def _discover(folders: Sequence[str], num_channels: int,
              cached: Optional[Tuple[Dict[str, Tuple[Tuple[int, int], List[str]]], set]] = None,
              ) -> Tuple[List[_Group], _Skipped, Dict[str, int]]:
    """Usable source groups in discovery order (folders as given, files sorted), the skipped files, and per folder
    the number of usable groups.

    ``cached`` (:func:`_cached_sources` of the index): a file whose path, size and mtime match is neither probed
    nor has its header parsed again (it was a usable 3D image when it was ingested), so a run that finds every case
    cached reads no image file; multi-channel cases are probed unless they are the indexed channel tuple."""
    known_files, known_groups = cached or ({}, set())

    def known(p: str) -> Optional[List[str]]:
        """The indexed companions of ``p`` if ``p`` is unchanged since it was indexed, else None."""
        hit = known_files.get(p)
        if hit is None:
            return None
        try:
            st = os.stat(p)
        except OSError:
            return None
        return hit[1] if (st.st_size, st.st_mtime_ns) == hit[0] else None

    groups: List[_Group] = []
    skipped = _Skipped()
    per_folder: Dict[str, int] = {}
    for folder in folders:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
        companions: Dict[str, List[str]] = {}
        claimed = set()
        unchanged = set()
        for p in files:
            c = known(p)
            if c is not None:
                unchanged.add(p)
                c = [q for q in c if os.path.isfile(q)]
            else:
                c = _companions(p)
            if c:
                companions[p] = c
                claimed.update(c)
        readable: Dict[str, Optional[Dict[str, Any]]] = {}  # None: unchanged since indexed, not probed
        bad_here: Dict[str, str] = {}
        for p in files:
            if p in claimed:
                continue
            if p in unchanged:
                readable[p] = None
                continue
            info, reason = _probe(p)
            if info is None:
                bad_here[p] = reason  # type: ignore[assignment]
            else:
                readable[p] = info
        folder_groups: List[_Group] = []
        if num_channels == 1:
            for p in readable:
                folder_groups.append(_Group(folder, (p,), tuple([p] + companions.get(p, []))))
        else:
            folder_groups = _group_channels(folder, files, readable, bad_here, companions, num_channels, skipped,
                                            known_groups)
        for p, reason in bad_here.items():
            skipped.add(p, reason)
        if not folder_groups:
            subdirs = [n for n in names if os.path.isdir(os.path.join(folder, n))]
            msg = f"unlabeled folder {folder} contains no usable 3D image"
            if bad_here:
                msg += ": " + _format_skipped(list(bad_here.items()))
            elif not files:
                msg += " (it has no files)"
            if subdirs:
                msg += (f". Subfolders are not searched ({', '.join(subdirs[:5])}{', ...' if len(subdirs) > 5 else ''})"
                        f": pass them as folders themselves")
            raise IngestError(msg + ". Put 3D images that SimpleITK reads (NIfTI, NRRD, MHA, ...) there, or remove "
                                    "the folder from the list")
        per_folder[folder] = len(folder_groups)
        groups.extend(folder_groups)
    return groups, skipped, per_folder


def _group_channels(folder: str, files: Sequence[str], readable: Dict[str, Optional[Dict[str, Any]]],
                    bad: Dict[str, str], companions: Dict[str, List[str]], k: int, skipped: _Skipped,
                    known_groups: Optional[set] = None) -> List[_Group]:
    """Multi-channel datasets: ``<case>_0000.<ext>`` ... ``<case>_{k-1:04d}.<ext>`` form one case. A file not
    probed (``readable[p] is None``: unchanged since indexed) is probed now unless its case is the indexed tuple."""
    cases: Dict[str, Dict[int, str]] = {}
    for p in files:
        if p not in readable and p not in bad:
            continue  # a companion data file
        m = _CHANNEL_RE.match(os.path.basename(p))
        if m is None:
            if p in bad:
                continue  # not an image anyway; reported as skipped
            raise IngestError(
                f"{p}: this dataset has {k} channels, so unlabeled files must be named <case>_0000<ext> ... "
                f"<case>_{k - 1:04d}<ext> (one file per channel, like imagesTr). Rename it, or move it out of "
                f"{folder}")
        ch = int(m.group("channel"))
        if ch >= k:
            if p in bad:
                continue
            raise IngestError(f"{p}: channel {ch} but this dataset has {k} channels (_0000 ... _{k - 1:04d}). "
                              f"Remove that file, or check that the folder belongs to this dataset")
        chans = cases.setdefault(m.group("case"), {})
        if ch in chans:
            raise IngestError(f"case {m.group('case')!r} in {folder} has two files for channel {ch}: {chans[ch]} and "
                              f"{p}. Keep one of them")
        chans[ch] = p
    groups: List[_Group] = []
    for case, chans in cases.items():
        missing = [c for c in range(k) if c not in chans]
        if missing:
            raise IngestError(
                f"case {case!r} in {folder} lacks channel file(s) {', '.join(f'{case}_{c:04d}<ext>' for c in missing)}"
                f" (found {', '.join(os.path.basename(chans[c]) for c in sorted(chans))}); this dataset has {k} "
                f"channels. Add the missing file(s) or move the case out of the folder")
        paths = tuple(chans[c] for c in range(k))
        bad_channels = [p for p in paths if p in bad]
        if bad_channels:
            for p in paths:
                if p not in bad:
                    skipped.add(p, f"case skipped: its channel file {os.path.basename(bad_channels[0])} is unusable")
            continue
        infos: List[Dict[str, Any]] = []
        if paths in (known_groups or set()) and all(readable[p] is None for p in paths):
            pass  # the same unchanged files formed this case when it was ingested: checked then
        else:
            for p in paths:
                if readable[p] is None:
                    info, reason = _probe(p)
                    if info is None:
                        del readable[p]
                        bad[p] = reason  # type: ignore[assignment]
                    else:
                        readable[p] = info
            bad_channels = [p for p in paths if p in bad]
            if bad_channels:
                for p in paths:
                    if p not in bad:
                        skipped.add(p, f"case skipped: its channel file {os.path.basename(bad_channels[0])} is "
                                       f"unusable")
                continue
            infos = [i for i in (readable[p] for p in paths) if i is not None]  # all probed by now
        if any(i["size"] != infos[0]["size"] for i in infos) or \
                any(not np.allclose(i["spacing"], infos[0]["spacing"], rtol=1e-5) for i in infos):
            raise IngestError(f"case {case!r} in {folder}: its channel files differ in size or spacing ("
                              + "; ".join(f"{os.path.basename(p)}: size {i['size']}, spacing {i['spacing']}"
                                          for p, i in zip(paths, infos))
                              + "). Resample the channels onto one grid, or move the case out of the folder")
        hashed: List[str] = []
        for p in paths:
            hashed += [p] + companions.get(p, [])
        groups.append(_Group(folder, paths, tuple(hashed)))
    return groups


def _format_skipped(entries: Sequence[Tuple[str, str]]) -> str:
    lines = [f"{p}: {r}" for p, r in entries[:_MAX_LISTED]]
    if len(entries) > _MAX_LISTED:
        lines.append(f"... and {len(entries) - _MAX_LISTED} more")
    return "\n  " + "\n  ".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# hashing + integrity
# ----------------------------------------------------------------------------------------------------------------

def _nifti_expected_nbytes(hdr: bytes) -> Optional[int]:
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


class _HashingReader(io.RawIOBase):
    """Raw file wrapper that feeds every byte read into a hash (so gzip can be verified in the same pass)."""

    def __init__(self, f, h) -> None:
        self.f, self.h = f, h

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.h.update(data)
        b[:len(data)] = data
        return len(data)


def _hash_and_check(paths: Sequence[str], check: bool = True) -> Tuple[str, List[Tuple[str, str]]]:
    """sha256 of the files concatenated (as :func:`sha256_of_files`) and, if ``check``, integrity problems.

    Checked: gzip streams decompress to their end (``*.gz``), and single-file NIfTI holds all the bytes its header
    promises. SimpleITK reads a truncated NIfTI without error and fills the missing voxels with zeros.
    """
    h = hashlib.sha256()
    problems: List[Tuple[str, str]] = []
    for p in paths:
        low = p.lower()
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            problems.append((p, VANISHED))
            continue
        with f:
            if check and low.endswith(".gz"):
                head = b""
                total = 0
                try:
                    with gzip.GzipFile(fileobj=io.BufferedReader(_HashingReader(f, h), _HASH_BLOCK)) as g:
                        while True:
                            chunk = g.read(_HASH_BLOCK)
                            if not chunk:
                                break
                            if len(head) < 540:
                                head += chunk[:540 - len(head)]
                            total += len(chunk)
                except (OSError, EOFError, ValueError) as e:
                    problems.append((p, f"truncated or corrupt gzip data ({e}): re-export or re-copy the file"))
                # whatever the gzip reader did not consume (trailing bytes, or the rest after an error)
                for chunk in iter(lambda: f.read(_HASH_BLOCK), b""):
                    h.update(chunk)
                if low.endswith(".nii.gz") and not any(q == p for q, _ in problems):
                    expected = _nifti_expected_nbytes(head)
                    if expected is not None and total < expected:
                        problems.append((p, f"truncated NIfTI: {total} bytes after decompression, the header "
                                            f"needs {expected}; re-export or re-copy the file"))
            else:
                head = f.read(540)
                h.update(head)
                for chunk in iter(lambda: f.read(_HASH_BLOCK), b""):
                    h.update(chunk)
                if check and low.endswith(".nii"):
                    expected = _nifti_expected_nbytes(head)
                    size = os.fstat(f.fileno()).st_size
                    if expected is not None and size < expected:
                        problems.append((p, f"truncated NIfTI: {size} bytes, the header needs {expected}; "
                                            f"re-export or re-copy the file"))
    return h.hexdigest(), problems


# ----------------------------------------------------------------------------------------------------------------
# the per-case work (runs in worker processes)
# ----------------------------------------------------------------------------------------------------------------

def _reader_class_for(files: Sequence[str], dataset_reader: Type) -> Type:
    """The dataset's reader when it supports every file's ending, else SimpleITK (with reorientation if the
    dataset's reader reorients, so that both give the same array orientation)."""
    endings = [e.lower() for e in getattr(dataset_reader, "supported_file_endings", [])]
    if all(any(f.lower().endswith(e) for e in endings) for f in files):
        return dataset_reader
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient
    return SimpleITKIOWithReorient if "Reorient" in dataset_reader.__name__ else SimpleITKIO


@functools.lru_cache(maxsize=None)
def _is_ct_normalization(scheme: str) -> bool:
    import nnunetv2
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    try:
        cls = recursive_find_python_class(join(nnunetv2.__path__[0], "preprocessing", "normalization"), scheme,
                                          "nnunetv2.preprocessing.normalization")
    except Exception:
        cls = None
    return (cls is not None and issubclass(cls, CTNormalization)) or scheme == "CTNormalization"


def _intensity_warnings(files: Sequence[str], data: np.ndarray, configuration_manager, plans_manager,
                        channel_names: Sequence[str]) -> List[str]:
    """One short line per CT-normalized channel whose raw intensities do not look like Hounsfield units (the
    explanation is added once per run, by :func:`_report`)."""
    out = []
    for c, scheme in enumerate(configuration_manager.normalization_schemes):
        if c >= data.shape[0] or not _is_ct_normalization(scheme):
            continue
        v = data[c].ravel()
        v = v[::max(1, v.size // 2_000_000)]
        p1, mx = float(np.percentile(v, 1)), float(data[c].max())
        if p1 > -500 or mx < 200:
            out.append(f"{files[c]}: channel {c} ({channel_names[c] if c < len(channel_names) else '?'}) "
                       f"{NOT_HU} (1st percentile {p1:.0f}, max {mx:.0f})")
    return out


def _ct_normalization_note(configuration_manager, plans_manager, channel_names: Sequence[str]) -> str:
    """How the dataset normalizes its CT channels, e.g. ``channel 0 (CT) with CTNormalization (clip to [-1000,
    400], then z-score)``: the reason why images in other intensity ranges are flattened."""
    fg = plans_manager.foreground_intensity_properties_per_channel
    parts = []
    for c, scheme in enumerate(configuration_manager.normalization_schemes):
        if not _is_ct_normalization(scheme):
            continue
        props = fg.get(str(c), {}) if isinstance(fg, dict) else {}
        clip = f" to [{props['percentile_00_5']:.0f}, {props['percentile_99_5']:.0f}]" \
            if "percentile_00_5" in props else ""
        parts.append(f"channel {c} ({channel_names[c] if c < len(channel_names) else '?'}) with {scheme} "
                     f"(clip{clip}, then z-score)")
    return ", ".join(parts)


def _remove_quietly(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _preprocess_case(files: Tuple[str, ...], case_id: str, sha256: str, out_folder: str, token: str,
                     plans_manager, configuration_manager, dataset_json: dict) -> Dict[str, Any]:
    """Read, preprocess and write one case under temporary names (fsynced).

    Returns ``{'status': 'ok', 'tmp_prefix', 'shape', 'warnings'}``, or ``{'status': 'skip', 'reason'}`` when the
    reader fails on the files (``reason`` is :data:`VANISHED` if a file no longer exists), the image is empty (all
    zeros) or has NaN/Inf voxels. Any other error propagates (after removing the temporary files).
    """
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    rw_cls = _reader_class_for(files, plans_manager.image_reader_writer_class)
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # nnU-Net's readers print their complaints before raising
            data, properties = rw_cls().read_images(list(files))
    except Exception as e:
        if not all(os.path.exists(p) for p in files):
            return {"status": "skip", "reason": VANISHED}
        detail = " ".join(said.getvalue().split())[:300]
        return {"status": "skip",
                "reason": f"{rw_cls.__name__} failed to read it ({type(e).__name__}: {e}{'; ' + detail if detail else ''})"}
    warn = []
    if said.getvalue().strip():
        warn.append(f"{', '.join(files)}: {rw_cls.__name__} said: {' '.join(said.getvalue().split())[:300]}")
    channel_names = list((dataset_json.get("channel_names") or dataset_json.get("modality") or {}).values())
    if data.ndim != 4 or data.shape[0] != len(files):
        return {"status": "skip",
                "reason": f"{rw_cls.__name__} read an array of shape {data.shape}, expected ({len(files)}, Z, Y, X)"}
    if not np.any(data):
        return {"status": "skip", "reason": "every voxel is 0 (an empty image)"}
    if not np.all(np.isfinite(data)):
        return {"status": "skip", "reason": f"{int(np.sum(~np.isfinite(data)))} voxel(s) are NaN or Inf: fix the "
                                            f"export (a NaN in the input makes every loss NaN)"}
    warn += _intensity_warnings(files, data, configuration_manager, plans_manager, channel_names)

    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case_npy(data, None, properties, plans_manager, configuration_manager,
                                                      dataset_json)
    properties["class_locations"] = {}
    properties["pgl_source"] = list(files)
    properties["pgl_sha256"] = sha256
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    # exactly as DefaultPreprocessor.run_case_save
    block_size_data, chunk_size_data = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size),
                                                          data.itemsize)
    block_size_seg, chunk_size_seg = comp_blosc2_params(seg.shape, tuple(configuration_manager.patch_size),
                                                        seg.itemsize)
    prefix = join(out_folder, f"{TMP_PREFIX}{token}-{case_id}")
    tmp_files = [prefix + s for s in CASE_FILE_SUFFIXES]
    try:
        nnUNetDatasetBlosc2.save_case(data, seg, properties, prefix, chunks=chunk_size_data, blocks=block_size_data,
                                      chunks_seg=chunk_size_seg, blocks_seg=block_size_seg)
        for p in tmp_files:
            _fsync_file(p)
    except BaseException:
        _remove_quietly(tmp_files)
        raise
    return {"status": "ok", "tmp_prefix": prefix, "shape": list(data.shape), "warnings": warn}


# ----------------------------------------------------------------------------------------------------------------
# index, lock, execution
# ----------------------------------------------------------------------------------------------------------------

def _load_index(folder: str, quiet: bool = False) -> List[Dict[str, Any]]:
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


def _write_index(folder: str, token: str, entries: List[Dict[str, Any]]) -> None:
    tmp = join(folder, f"{TMP_PREFIX}{token}-{INDEX_FILE}")
    try:
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, join(folder, INDEX_FILE))
    except BaseException:
        _remove_quietly([tmp])
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def _folder_lock(folder: str, verbose: bool) -> Iterator[None]:
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


def _stat(path: str) -> Dict[str, Any]:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills the worker when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    SIGKILLed ingest leaves no orphaned worker behind. Elsewhere the pool's own shutdown is all there is.

    Assumes a spawn (or fork) context, whose workers are children of the ingesting process, started from the thread
    that calls ``submit`` (the death signal follows the creating *thread*); a pool with ``max_tasks_per_child``
    would restart workers from its manager thread instead."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _executor(num_processes: int, ctx: Any) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=num_processes, mp_context=ctx, initializer=_die_with_parent,
                               initargs=(os.getpid(),))


def _run_tasks(fn: Callable, tasks: Sequence[tuple], executor: Optional[ProcessPoolExecutor], desc: str,
               verbose: bool) -> Iterator[Tuple[int, Any]]:
    """Yield ``(task index, result)`` as tasks finish: in-process without an executor, else in the pool.
    Worker exceptions propagate; on any exit the not-yet-started tasks are cancelled."""
    from tqdm import tqdm
    with tqdm(total=len(tasks), desc=desc, disable=not verbose or not tasks) as bar:
        if executor is None:
            for i, t in enumerate(tasks):
                res = fn(*t)
                bar.update()
                yield i, res
            return
        futures: Dict[Future, int] = {executor.submit(fn, *t): i for i, t in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    res = fut.result()
                    bar.update()
                    yield futures[fut], res
        finally:
            for fut in pending:
                fut.cancel()


# ----------------------------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------------------------

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
            :func:`unlabeled_folder` there.
        num_processes: worker processes (spawn) for hashing and preprocessing; ``<= 1`` runs in-process.
        verbose: print a summary and show progress bars.
        report_dir: an existing folder (``pgl_pretrain``: its output folder) for :data:`REPORT_FILE`, the full list
            of skipped files, duplicates and warnings of this run (removed when the run has none). Whatever the
            number of files, each kind of problem is one :class:`IngestWarning` with the count and the first few
            (the full list also in its ``entries``).

    Returns:
        One :class:`UnlabeledCase` per distinct image content, in discovery order. These cases are in the folder
        and its ``index.json`` afterwards, beside cached cases of other folders (see the module docstring for
        caching, atomicity and the policy on bad inputs).

    Raises:
        IngestError: a folder is missing or has no usable image, multi-channel files do not form complete cases,
            no case at all is usable, or the plans do not match ``dataset_json``.
    """
    if isinstance(dataset_json, str):
        dataset_json = load_json(dataset_json)
    folders = _check_folders(dirs)
    channel_names = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not channel_names:
        raise IngestError("dataset_json has no 'channel_names': pass the dataset's dataset.json")
    k = len(channel_names)
    if len(configuration_manager.normalization_schemes) != k:
        raise IngestError(f"dataset_json has {k} channel(s) but configuration {configuration_manager.data_identifier}"
                          f" normalizes {len(configuration_manager.normalization_schemes)}: the plans and the "
                          f"dataset.json belong to different datasets")
    base = os.path.abspath(preprocessed_dataset_folder_base)
    if not os.path.isdir(base):
        raise IngestError(f"preprocessed dataset folder {base} does not exist: run nnUNetv2_plan_and_preprocess "
                          f"(or nnUNetv2_extract_fingerprint + nnUNetv2_plan_experiment) for this dataset first")
    out = unlabeled_folder(base, configuration_manager.data_identifier)
    fingerprint = plans_fingerprint(plans_manager, configuration_manager)

    old_index = _load_index(out, quiet=True) if os.path.isdir(out) else []  # for the stat cache only
    groups, skipped, per_folder = _discover(folders, k, _cached_sources(old_index))

    ctx = multiprocessing.get_context("spawn")
    executor: Optional[ProcessPoolExecutor] = None
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        # ---- hashes: reuse the index's when every file's (path, size, mtime) is unchanged ----
        known: Dict[Tuple[str, ...], str] = {}
        for e in old_index:
            stats = {s["path"]: (s["size"], s["mtime_ns"]) for s in e.get("files", [])}
            for src in [e.get("source", [])] + list(e.get("duplicates", [])):
                known[tuple(src)] = e["sha256"]
            e["_stats"] = stats
        stat_of: Dict[str, Dict[str, Any]] = {}
        to_hash: List[int] = []
        stat_by_sha = {e["sha256"]: e["_stats"] for e in old_index}
        bad_groups = set()
        for i, g in enumerate(groups):
            try:
                for p in g.hashed:
                    stat_of[p] = _stat(p)
            except FileNotFoundError:
                bad_groups.add(i)
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
        if num_processes > 1 and len(to_hash) > 1:
            executor = _executor(num_processes, ctx)
        for j, (sha, problems) in _run_tasks(_hash_and_check, [(groups[i].hashed,) for i in to_hash], executor,
                                             "Hashing unlabeled images", verbose):
            g = groups[to_hash[j]]
            if problems:
                bad_groups.add(to_hash[j])
                for p, reason in problems:
                    skipped.add(p, reason)
                for p in g.files:
                    if not any(p == q for q, _ in problems):
                        skipped.add(p, "case skipped: another of its files is unusable (see its reason)")
            else:
                g.sha256 = sha
        if bad_groups:
            groups = [g for i, g in enumerate(groups) if i not in bad_groups]
            for folder in folders:
                if not any(g.folder == folder for g in groups):
                    raise IngestError(f"unlabeled folder {folder} contains no usable 3D image:"
                                      + _format_skipped([s for s in skipped.entries
                                                         if os.path.dirname(s[0]) == folder])
                                      + ". Replace or restore these files, or remove the folder from the list")

        # ---- dedup by content ----
        by_sha: Dict[str, List[_Group]] = {}
        for g in groups:
            by_sha.setdefault(g.sha256, []).append(g)  # type: ignore[arg-type]
        duplicates_msgs = []
        for sha, gs in by_sha.items():
            for d in gs[1:]:
                duplicates_msgs.append(f"{', '.join(d.files)} has the same content as {', '.join(gs[0].files)}: "
                                       f"ingested once")

        # ---- from here on the folder is written ----
        os.makedirs(out, exist_ok=True)
        with _folder_lock(out, verbose):
            present = set()  # the case files in the folder: one listing, not three stats per case
            with os.scandir(out) as listing:
                for entry in listing:
                    if entry.name.startswith(TMP_PREFIX):  # leftovers of killed runs (only one run holds the lock)
                        _remove_quietly([entry.path])
                    elif entry.is_file():
                        present.add(entry.name)
            old_index = _load_index(out)
            old_by_sha = {e["sha256"]: e for e in old_index}
            entries: Dict[str, Dict[str, Any]] = {}  # sha -> entry, for the index
            to_do: List[str] = []
            for sha, gs in by_sha.items():
                case_id = "unl_" + sha[:16]
                old = old_by_sha.get(sha)
                files_ok = all(case_id + s in present for s in CASE_FILE_SUFFIXES)
                if old is not None and old.get("plans_fingerprint") == fingerprint and files_ok:
                    entries[sha] = _entry(case_id, sha, gs, stat_of, fingerprint, old.get("shape"),
                                          old.get("warnings", []))
                else:
                    to_do.append(sha)
            if verbose:
                print(f"Unlabeled images: {len(groups)} case(s) in {len(folders)} folder(s)"
                      f" ({', '.join(f'{os.path.basename(f) or f}: {n}' for f, n in per_folder.items())}), "
                      f"{len(by_sha)} distinct, {len(entries)} already preprocessed, {len(to_do)} to preprocess, "
                      f"{len(skipped.entries)} file(s) skipped -> {out}")
                for m in duplicates_msgs[:_PREVIEW]:
                    print(f"Duplicate skipped: {m}")
                if len(duplicates_msgs) > _PREVIEW:
                    print(f"... and {len(duplicates_msgs) - _PREVIEW} more duplicate(s)"
                          + (f" (all in {join(report_dir, REPORT_FILE)})" if report_dir else ""))
            # entries whose files will be replaced must leave the index before their files change
            replaced = [s for s in to_do if s in old_by_sha]
            if replaced:
                _write_index(out, token, _ordered(entries, by_sha))

            case_warnings: List[str] = []
            for e in entries.values():
                case_warnings += e.get("warnings", [])
            last_write = time.monotonic()
            tasks = [(by_sha[s][0].files, "unl_" + s[:16], s, out, token, plans_manager, configuration_manager,
                      dataset_json) for s in to_do]
            if executor is None and num_processes > 1 and len(tasks) > 1:
                executor = _executor(num_processes, ctx)
            failed = set()
            def accept(sha: str, res: Dict[str, Any]) -> None:
                case_id = "unl_" + sha[:16]
                for suffix in CASE_FILE_SUFFIXES:
                    os.replace(res["tmp_prefix"] + suffix, join(out, case_id + suffix))
                _fsync_dir(out)
                entries[sha] = _entry(case_id, sha, by_sha[sha], stat_of, fingerprint, res["shape"],
                                      res["warnings"])
                case_warnings.extend(res["warnings"])

            def fail(sha: str, gs: Sequence[_Group], reason: str) -> None:
                failed.add(sha)
                for g in gs:
                    for p in g.files:
                        skipped.add(p, reason)

            retry: List[str] = []
            for j, res in _run_tasks(_preprocess_case, tasks, executor, "Preprocessing unlabeled images", verbose):
                sha = to_do[j]
                if res["status"] == "ok":
                    accept(sha, res)
                elif res["reason"] == VANISHED and len(by_sha[sha]) > 1:
                    retry.append(sha)  # a duplicate of the vanished file can stand in for it
                else:
                    fail(sha, by_sha[sha], res["reason"])
                if time.monotonic() - last_write > _INDEX_WRITE_INTERVAL_S:
                    _write_index(out, token, _ordered(entries, by_sha))
                    last_write = time.monotonic()
            for sha in retry:  # rare: in this process, one duplicate after the other
                while by_sha[sha]:
                    g = by_sha[sha][0]
                    if all(os.path.exists(p) for p in g.files):
                        res = _preprocess_case(g.files, "unl_" + sha[:16], sha, out, token, plans_manager,
                                               configuration_manager, dataset_json)
                        if res["status"] == "ok":
                            accept(sha, res)
                            break
                        if res["reason"] != VANISHED:
                            fail(sha, by_sha[sha], res["reason"])
                            break
                    for p in g.files:
                        skipped.add(p, VANISHED if not os.path.exists(p) else
                                    "case skipped: another of its files disappeared during ingestion")
                    by_sha[sha] = by_sha[sha][1:]
                else:
                    failed.add(sha)

            if not entries:
                raise IngestError("no unlabeled image could be used:" + _format_skipped(skipped.entries)
                                  + "\nReplace or remove these files")
            index = _ordered(entries, by_sha)
            # cases of sources in other folders stay while their sources exist: another run may train on them
            others = [e for e in old_index
                      if e["sha256"] not in entries and e.get("plans_fingerprint") == fingerprint
                      and not any(os.path.dirname(p) in folders for p in e.get("source", []))
                      and all(os.path.isfile(f["path"]) for f in e.get("files", []))
                      and all(e["case_id"] + x in present for x in CASE_FILE_SUFFIXES)]  # untouched by this run
            full = index + others
            if full != old_index or not os.path.isfile(join(out, INDEX_FILE)):  # a no-op run writes nothing
                _write_index(out, token, full)
            # the folder mirrors the index: remove cases of vanished or changed sources, or of other plans
            keep = {e["case_id"] for e in full}
            matches = [(n, _CASE_FILE_RE.match(n)) for n in os.listdir(out)]
            _remove_quietly(join(out, n) for n, m in matches if m is not None and m.group(1) not in keep)
            dropped = {e["case_id"] for e in old_index} - keep
            if verbose and dropped:
                print(f"Removed {len(dropped)} cached case(s) whose source is gone or changed, or that were made "
                      f"for other plans")
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if os.path.isdir(out):
            _remove_quietly(join(out, n) for n in os.listdir(out) if n.startswith(f"{TMP_PREFIX}{token}-"))

    channel_names = list((dataset_json.get("channel_names") or dataset_json.get("modality") or {}).values())
    _report(report_dir, skipped.entries, case_warnings, duplicates_msgs,
            _ct_normalization_note(configuration_manager, plans_manager, channel_names), len(index))
    if verbose:
        print(f"Unlabeled cases ready: {len(index)} ({len(to_do) - len(failed)} preprocessed now)")
    return [UnlabeledCase(e["case_id"], join(out, e["case_id"] + ".b2nd"), tuple(e["source"]), e["sha256"])
            for e in index]


def _report(report_dir: Optional[str], skipped: Sequence[Tuple[str, str]], case_warnings: Sequence[str],
            duplicates: Sequence[str], ct_note: str, num_cases: int) -> None:
    """One :class:`IngestWarning` per kind of problem (skipped files, images that do not look like HU CT, reader
    messages) with the count, the first :data:`_PREVIEW` entries and what to check, whatever the number of files;
    every entry goes to ``report_dir/REPORT_FILE`` (and to the warning's ``entries``)."""
    not_hu = [m for m in case_warnings if NOT_HU in m]
    said = [m for m in case_warnings if NOT_HU not in m]
    sections = [(f"skipped: {len(skipped)} file(s), not used", [f"{p}: {r}" for p, r in skipped]),
                (f"not like CT in Hounsfield units: {len(not_hu)} file(s), used", list(not_hu)),
                (f"image reader messages: {len(said)} case(s), used", list(said)),
                (f"duplicates: {len(duplicates)}, ingested once", list(duplicates))]
    path = join(report_dir, REPORT_FILE) if report_dir else None
    if path is not None:
        if any(lines for _, lines in sections):
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(f"# unlabeled ingestion of {time.strftime('%Y-%m-%d %H:%M:%S')}: {num_cases} case(s)\n")
                for title, lines in sections:
                    if lines:
                        f.write(f"\n## {title}\n" + "".join(line + "\n" for line in lines))
            os.replace(tmp, path)
        else:  # a clean run leaves no stale report of an earlier one
            _remove_quietly([path])

    def emit(head: str, lines: List[str], tail: str) -> None:
        shown = [line if len(line) <= 300 else line[:297] + "..." for line in lines[:_PREVIEW]]
        more = len(lines) - len(shown)
        msg = head + "\n  " + "\n  ".join(shown + ([f"... and {more} more"] if more else []))
        where = f"all {len(lines)} in {path}" if path else "all of them in this warning's .entries"
        w = IngestWarning(f"{msg}\n{tail} ({where})")
        w.entries = list(lines)  # type: ignore[attr-defined]
        warnings.warn(w, stacklevel=4)  # the caller of ingest_unlabeled

    if skipped:
        emit(f"skipped {len(skipped)} unlabeled file(s):", sections[0][1],
             "Replace or remove these files to use them")
    if not_hu:
        emit(f"{len(not_hu)} unlabeled image file(s) do not look like CT in Hounsfield units (CT has air near -1000 "
             f"and bone above 200):", not_hu,
             f"This dataset normalizes {ct_note}, which flattens other intensity ranges. These images are still used: "
             f"check that they are CT with HU values (rescale slope/intercept applied), or remove them from the "
             f"unlabeled folders")
    if said:
        emit(f"the image reader printed messages for {len(said)} unlabeled case(s):", said,
             "The cases are used; check the messages")


def _entry(case_id: str, sha: str, gs: Sequence[_Group], stat_of: Dict[str, Dict[str, Any]], fingerprint: str,
           shape: Optional[Sequence[int]], warns: Sequence[str]) -> Dict[str, Any]:
    return {
        "case_id": case_id,
        "sha256": sha,
        "source": list(gs[0].files),
        "duplicates": [list(g.files) for g in gs[1:]],
        "files": [stat_of[p] for g in gs for p in g.hashed],
        "plans_fingerprint": fingerprint,
        "shape": list(shape) if shape is not None else None,
        "warnings": list(warns),
    }


def _ordered(entries: Dict[str, Dict[str, Any]], by_sha: Dict[str, List[_Group]]) -> List[Dict[str, Any]]:
    """Index entries in discovery order."""
    return [entries[s] for s in by_sha if s in entries]
