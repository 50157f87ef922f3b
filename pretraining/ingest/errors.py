"""What ingestion reports: :class:`IngestError` (raised), :class:`IngestWarning`, and the list of skipped files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

#: the reason given for a file that disappears between two steps of a run
VANISHED = ("the file disappeared during ingestion (moved or deleted while this ran): put it back and rerun to "
            "include it")
#: how many skipped files an :class:`IngestError` lists
MAX_LISTED = 20


class IngestError(ValueError):
    """A problem with the unlabeled inputs that the user can fix; the message names the file and the next step."""


class IngestWarning(UserWarning):
    """Skipped files and suspicious intensities found while ingesting unlabeled images: one warning per kind and
    run, whose ``entries`` attribute (where set) lists every file concerned."""


@dataclass
class Skipped:
    """The files a run does not use, each with the reason, in the order found."""

    entries: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def add(self, path: str, reason: str) -> None:
        self.entries.append((path, reason))


def format_skipped(entries: Sequence[Tuple[str, str]]) -> str:
    """The first :data:`MAX_LISTED` ``path: reason`` lines of an :class:`IngestError`."""
    lines = [f"{p}: {r}" for p, r in entries[:MAX_LISTED]]
    if len(entries) > MAX_LISTED:
        lines.append(f"... and {len(entries) - MAX_LISTED} more")
    return "\n  " + "\n  ".join(lines)
