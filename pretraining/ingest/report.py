"""The warnings of a run: one :class:`~.errors.IngestWarning` per kind of problem, and the full list in a file.

Warnings scale with the corpus: each kind (skipped files, images that do not look like HU CT, reader messages) is
one warning per run with the count, the first :data:`PREVIEW` files and what to check; the full list goes to
:data:`REPORT_FILE` in ``report_dir`` (``pgl_pretrain``'s output folder).
"""
from __future__ import annotations

import time
import warnings
from typing import List, Optional, Sequence, Tuple

from batchgenerators.utilities.file_and_folder_operations import join

from nnunet_pgl.pretraining.atomic import atomic_write_text, remove_quietly
from .errors import IngestWarning
from .preprocessing import NOT_HU

#: written into the ``report_dir`` of ``ingest_unlabeled`` (pgl_pretrain: its output folder) when a run skipped
#: files or has warnings: every file with its reason; the warnings themselves list the first :data:`PREVIEW`
REPORT_FILE = "unlabeled_warnings.txt"
PREVIEW = 5


def _write(path: str, sections: Sequence[Tuple[str, List[str]]], num_cases: int) -> None:
    """``path`` with every non-empty section, or no file at all (a clean run leaves no stale report)."""
    if not any(lines for _, lines in sections):
        remove_quietly([path])
        return
    text = f"# unlabeled ingestion of {time.strftime('%Y-%m-%d %H:%M:%S')}: {num_cases} case(s)\n"
    for title, lines in sections:
        if lines:
            text += f"\n## {title}\n" + "".join(line + "\n" for line in lines)
    atomic_write_text(path, text)


def _emit(head: str, lines: List[str], tail: str, path: Optional[str]) -> None:
    """One warning: ``head``, the first :data:`PREVIEW` lines, ``tail``, and where all of them are."""
    shown = [line if len(line) <= 300 else line[:297] + "..." for line in lines[:PREVIEW]]
    more = len(lines) - len(shown)
    msg = head + "\n  " + "\n  ".join(shown + ([f"... and {more} more"] if more else []))
    where = f"all {len(lines)} in {path}" if path else "all of them in this warning's .entries"
    w = IngestWarning(f"{msg}\n{tail} ({where})")
    w.entries = list(lines)  # type: ignore[attr-defined]
    warnings.warn(w, stacklevel=4)  # the caller of ingest_unlabeled (_emit <- report <- ingest_unlabeled)


def report(report_dir: Optional[str], skipped: Sequence[Tuple[str, str]], case_warnings: Sequence[str],
           duplicates: Sequence[str], ct_note: str, num_cases: int) -> None:
    """One :class:`IngestWarning` per kind of problem (skipped files, images that do not look like HU CT, reader
    messages) with the count, the first :data:`PREVIEW` entries and what to check, whatever the number of files;
    every entry goes to ``report_dir/REPORT_FILE`` (and to the warning's ``entries``). Called by
    ``ingest_unlabeled`` itself (the warnings' stack level counts on it)."""
    not_hu = [m for m in case_warnings if NOT_HU in m]
    said = [m for m in case_warnings if NOT_HU not in m]
    sections = [(f"skipped: {len(skipped)} file(s), not used", [f"{p}: {r}" for p, r in skipped]),
                (f"not like CT in Hounsfield units: {len(not_hu)} file(s), used", list(not_hu)),
                (f"image reader messages: {len(said)} case(s), used", list(said)),
                (f"duplicates: {len(duplicates)}, ingested once", list(duplicates))]
    path = join(report_dir, REPORT_FILE) if report_dir else None
    if path is not None:
        _write(path, sections, num_cases)
    if skipped:
        _emit(f"skipped {len(skipped)} unlabeled file(s):", sections[0][1],
              "Replace or remove these files to use them", path)
    if not_hu:
        _emit(f"{len(not_hu)} unlabeled image file(s) do not look like CT in Hounsfield units (CT has air near -1000 "
              f"and bone above 200):", not_hu,
              f"This dataset normalizes {ct_note}, which flattens other intensity ranges. These images are still "
              f"used: check that they are CT with HU values (rescale slope/intercept applied), or remove them from "
              f"the unlabeled folders", path)
    if said:
        _emit(f"the image reader printed messages for {len(said)} unlabeled case(s):", said,
              "The cases are used; check the messages", path)
