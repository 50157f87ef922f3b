"""Discovery: which files of the unlabeled folders form which cases (channel grouping, detached data files).

Folders are scanned non-recursively; hidden files (``.*``) are ignored. Each file gets a header probe (SimpleITK)
unless the index of an earlier run says that it was a usable image and its size and mtime are unchanged.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .errors import VANISHED, IngestError, Skipped, format_skipped

CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ext>\..+)$")
#: a file's header as the probe found it: ``{'size', 'spacing'}``; None: unchanged since indexed, not probed
Header = Optional[Dict[str, Any]]


@dataclass
class Group:
    """The channel files of one source case (``files``) and every file its hash covers (``hashed``)."""
    folder: str
    files: Tuple[str, ...]
    hashed: Tuple[str, ...]
    sha256: Optional[str] = None


def check_folders(dirs: Sequence[str]) -> List[str]:
    """The folders as absolute paths, each once, in the given order; :class:`IngestError` for a missing folder, a
    file, or no folder."""
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


def companions(path: str) -> List[str]:
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


def probe(path: str) -> Tuple[Header, Optional[str]]:
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


@dataclass
class IndexedSources:
    """What an earlier run's index says about its source files: per channel file (of a cached case or of one of
    its duplicates) its ``(size, mtime_ns)`` and companion files, and the channel tuples that formed a case."""

    files: Dict[str, Tuple[Tuple[int, int], List[str]]] = field(default_factory=dict)
    groups: Set[Tuple[str, ...]] = field(default_factory=set)

    @classmethod
    def from_index(cls, index: Sequence[Dict[str, Any]]) -> "IndexedSources":
        """An entry's ``files`` are, per source tuple and channel in order, the channel file followed by its
        companions (:func:`discover`); an entry that does not read that way contributes nothing."""
        out = cls()
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
                    out.files.update(here)
                    out.groups.update(srcs)
        return out

    def unchanged_companions(self, path: str) -> Optional[List[str]]:
        """The indexed companions of ``path`` if it is unchanged since it was indexed, else None."""
        hit = self.files.get(path)
        if hit is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return hit[1] if (st.st_size, st.st_mtime_ns) == hit[0] else None


@dataclass
class _FolderScan:
    """One folder's files: the companions of each header, the files known unchanged, the probe results."""
    names: List[str]
    files: List[str]
    companions: Dict[str, List[str]] = field(default_factory=dict)
    unchanged: Set[str] = field(default_factory=set)
    readable: Dict[str, Header] = field(default_factory=dict)
    bad: Dict[str, str] = field(default_factory=dict)


def _scan(folder: str, indexed: IndexedSources) -> _FolderScan:
    """List ``folder``, find companions (the index's for unchanged files), probe every other image file."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    scan = _FolderScan(names, [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))])
    claimed = set()
    for p in scan.files:
        c = indexed.unchanged_companions(p)
        if c is not None:
            scan.unchanged.add(p)
            c = [q for q in c if os.path.isfile(q)]
        else:
            c = companions(p)
        if c:
            scan.companions[p] = c
            claimed.update(c)
    for p in scan.files:
        if p in claimed:
            continue
        if p in scan.unchanged:
            scan.readable[p] = None
            continue
        info, reason = probe(p)
        if info is None:
            scan.bad[p] = reason  # type: ignore[assignment]
        else:
            scan.readable[p] = info
    return scan


def _no_usable_image(folder: str, scan: _FolderScan) -> IngestError:
    subdirs = [n for n in scan.names if os.path.isdir(os.path.join(folder, n))]
    msg = f"unlabeled folder {folder} contains no usable 3D image"
    if scan.bad:
        msg += ": " + format_skipped(list(scan.bad.items()))
    elif not scan.files:
        msg += " (it has no files)"
    if subdirs:
        msg += (f". Subfolders are not searched ({', '.join(subdirs[:5])}{', ...' if len(subdirs) > 5 else ''})"
                f": pass them as folders themselves")
    return IngestError(msg + ". Put 3D images that SimpleITK reads (NIfTI, NRRD, MHA, ...) there, or remove the "
                             "folder from the list")


def discover(folders: Sequence[str], num_channels: int, indexed: Optional[IndexedSources] = None,
             ) -> Tuple[List[Group], Skipped, Dict[str, int]]:
    """Usable source groups in discovery order (folders as given, files sorted), the skipped files, and per folder
    the number of usable groups.

    ``indexed`` (:meth:`IndexedSources.from_index` of the index): a file whose path, size and mtime match is neither
    probed nor has its header parsed again (it was a usable 3D image when it was ingested), so a run that finds
    every case cached reads no image file; multi-channel cases are probed unless they are the indexed channel
    tuple."""
    indexed = indexed or IndexedSources()
    groups: List[Group] = []
    skipped = Skipped()
    per_folder: Dict[str, int] = {}
    for folder in folders:
        scan = _scan(folder, indexed)
        if num_channels == 1:
            folder_groups = [Group(folder, (p,), tuple([p] + scan.companions.get(p, []))) for p in scan.readable]
        else:
            folder_groups = group_channels(folder, scan.files, scan.readable, scan.bad, scan.companions,
                                           num_channels, skipped, indexed.groups)
        for p, reason in scan.bad.items():
            skipped.add(p, reason)
        if not folder_groups:
            raise _no_usable_image(folder, scan)
        per_folder[folder] = len(folder_groups)
        groups.extend(folder_groups)
    return groups, skipped, per_folder


def _cases_by_name(folder: str, files: Sequence[str], readable: Dict[str, Header], bad: Dict[str, str],
                   k: int) -> Dict[str, Dict[int, str]]:
    """``{case: {channel: file}}`` of the image files named ``<case>_XXXX<ext>``; :class:`IngestError` for a
    readable file without the suffix, a channel index >= k, or two files for one channel."""
    cases: Dict[str, Dict[int, str]] = {}
    for p in files:
        if p not in readable and p not in bad:
            continue  # a companion data file
        m = CHANNEL_RE.match(os.path.basename(p))
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
    return cases


def _skip_case_of_bad_channel(paths: Sequence[str], bad: Dict[str, str], skipped: Skipped) -> bool:
    """True (and the case's other files skipped) when one of its channel files is unusable."""
    bad_channels = [p for p in paths if p in bad]
    if not bad_channels:
        return False
    for p in paths:
        if p not in bad:
            skipped.add(p, f"case skipped: its channel file {os.path.basename(bad_channels[0])} is unusable")
    return True


def _probe_unprobed(paths: Sequence[str], readable: Dict[str, Header], bad: Dict[str, str]) -> None:
    """Probe the channel files not probed yet (unchanged since indexed), moving unusable ones to ``bad``."""
    for p in paths:
        if readable[p] is None:
            info, reason = probe(p)
            if info is None:
                del readable[p]
                bad[p] = reason  # type: ignore[assignment]
            else:
                readable[p] = info


def group_channels(folder: str, files: Sequence[str], readable: Dict[str, Header], bad: Dict[str, str],
                   companions_of: Dict[str, List[str]], k: int, skipped: Skipped,
                   known_groups: Optional[Set[Tuple[str, ...]]] = None) -> List[Group]:
    """Multi-channel datasets: ``<case>_0000.<ext>`` ... ``<case>_{k-1:04d}.<ext>`` form one case. A file not
    probed (``readable[p] is None``: unchanged since indexed) is probed now unless its case is the indexed tuple."""
    groups: List[Group] = []
    for case, chans in _cases_by_name(folder, files, readable, bad, k).items():
        missing = [c for c in range(k) if c not in chans]
        if missing:
            raise IngestError(
                f"case {case!r} in {folder} lacks channel file(s) {', '.join(f'{case}_{c:04d}<ext>' for c in missing)}"
                f" (found {', '.join(os.path.basename(chans[c]) for c in sorted(chans))}); this dataset has {k} "
                f"channels. Add the missing file(s) or move the case out of the folder")
        paths = tuple(chans[c] for c in range(k))
        if _skip_case_of_bad_channel(paths, bad, skipped):
            continue
        infos: List[Dict[str, Any]] = []
        if paths not in (known_groups or set()) or any(readable[p] is not None for p in paths):
            # (else the same unchanged files formed this case when it was ingested: checked then)
            _probe_unprobed(paths, readable, bad)
            if _skip_case_of_bad_channel(paths, bad, skipped):
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
            hashed += [p] + companions_of.get(p, [])
        groups.append(Group(folder, paths, tuple(hashed)))
    return groups
