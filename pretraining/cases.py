"""Which cases a pretraining reads: the dataset's labeled images minus the excluded fold's validation cases, plus
the ingested unlabeled cases; and the record of them that ``pgl_meta`` keeps (what the leakage checks read)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence


@dataclass(frozen=True)
class PretrainCase:
    """One pretraining case.

    Attributes:
        case_id: nnU-Net's case identifier (labeled) or ``unl_<sha256[:16]>`` (unlabeled).
        kind: ``'labeled'`` or ``'unlabeled'``.
        sha256: of the preprocessed image (labeled) or of the source files (unlabeled).
        data_file: the preprocessed ``.b2nd`` the loader reads.
        source: the unlabeled case's source files (empty for labeled cases).
    """

    case_id: str
    kind: str
    sha256: str
    data_file: str
    source: List[str] = field(default_factory=list)

    def meta(self) -> Dict[str, Any]:
        """The entry of ``pgl_meta['cases']``: id, kind, hash (and the source files of an unlabeled case)."""
        out: Dict[str, Any] = {"case_id": self.case_id, "kind": self.kind, "sha256": self.sha256}
        if self.kind == "unlabeled":
            out["source"] = list(self.source)
        return out


def select_cases(labeled_ids: Iterable[str], excluded: Optional[Iterable[str]], data_folder: str,
                 labeled_hashes: Mapping[str, str], unlabeled: Sequence[Mapping[str, Any]]) -> List[PretrainCase]:
    """The pretraining's cases, labeled first (sorted by id), then the unlabeled ones in their given order.

    Args:
        labeled_ids: the dataset's preprocessed case ids (empty with ``--no-labeled-images``).
        excluded: the ids left out (fold K's validation cases with ``--exclude-fold K``), or None.
        data_folder: nnU-Net's preprocessed folder of the configuration (``<id>.b2nd`` inside).
        labeled_hashes: sha256 per labeled id (at least the kept ones).
        unlabeled: the ingested cases (``pgl_config.unlabeled_cases``: case_id, sha256, data_file, source).
    """
    skip = set(excluded or ())
    cases = [PretrainCase(i, "labeled", labeled_hashes[i], os.path.join(data_folder, i + ".b2nd"))
             for i in sorted(labeled_ids) if i not in skip]
    cases += [PretrainCase(u["case_id"], "unlabeled", u["sha256"], u["data_file"], list(u.get("source", [])))
              for u in unlabeled]
    return cases
