"""The records of ``pgl_compare``: dataclasses written as its JSON, field by field."""
from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, Dict, List

import numpy as np


class Record:
    """Base of ``pgl_compare``'s dataclasses.

    :meth:`to_json` writes :meth:`json_fields` in their declared order, which is the order of the JSON's keys (the
    field names: ``stats.mean_diff`` is written as ``"mean_diff"``).
    """

    def json_fields(self) -> List[str]:
        """The fields the JSON holds, in order: all of them, unless a record leaves some out."""
        return [f.name for f in fields(self)] if is_dataclass(self) else []

    def to_json(self) -> Dict[str, Any]:
        """The record as JSON values (:func:`jsonable`)."""
        return {name: jsonable(getattr(self, name)) for name in self.json_fields()}


def jsonable(x: Any) -> Any:
    """``x`` as JSON values: records via :meth:`Record.to_json`, dict keys as strings, sets sorted, numpy scalars
    as Python numbers, NaN as None (``null``)."""
    if isinstance(x, Record):
        return x.to_json()
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(jsonable(v) for v in x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
