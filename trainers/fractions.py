"""Label-fraction variants: train on a deterministic subset of each fold's training cases, validate on all of them.

``nnUNetTrainerPGL_frac10`` / ``nnUNetTrainerScratch_frac10`` (and ``_frac25``, ``_frac50``; ``_smoke_fracNN`` for
CPU tests) are the trainers of :mod:`nnunet_pgl.trainers.pgl` with one change, in the narrowest hook: ``do_split``
calls nnU-Net's (``splits_final.json``, created as nnU-Net does if missing) and keeps a subset of the training keys.
The validation keys are returned unchanged, so every fraction is scored on the same cases as the full run and
``pgl_compare`` can pair them.

The subset (:func:`label_subset`): the fold's training keys sorted, permuted with
``np.random.RandomState(12345 + fold)`` (nnU-Net's split seed plus the fold), and the first ``ceil(f · n)`` of that
permutation (at least one case), re-sorted. The permutation depends on the fold only, so the subsets are nested:
every case of ``_frac10`` is in ``_frac25`` and ``_frac50`` of the same fold. PGL and Scratch variants of one
fraction train on exactly the same cases.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import numpy as np

from nnunet_pgl.trainers.pgl import (nnUNetTrainerPGL, nnUNetTrainerPGL_smoke, nnUNetTrainerPGLBYOL,
                                     nnUNetTrainerScratch, nnUNetTrainerScratch_smoke)

SUBSET_SEED = 12345


def label_subset(train_keys: Sequence[str], fraction: float, fold: Union[int, str]) -> List[str]:
    """The deterministic subset of ``train_keys`` that a ``_fracNN`` trainer trains on (sorted).

    Args:
        train_keys: the fold's training case ids (any order; sorted first, so the order does not matter).
        fraction: in (0, 1]; the subset has ``max(1, ceil(fraction · n))`` cases.
        fold: the fold (``'all'`` counts as 0 for the seed).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction!r} must be in (0, 1]")
    keys = sorted(str(k) for k in train_keys)
    if not keys:
        return []
    n = max(1, math.ceil(round(fraction * len(keys), 9)))
    seed = SUBSET_SEED + (fold if isinstance(fold, int) else 0)
    perm = np.random.RandomState(seed).permutation(len(keys))
    return sorted(keys[i] for i in perm[:n])


class LabelFractionMixin:
    """``do_split``: nnU-Net's split, then only :func:`label_subset` of the training keys (validation unchanged)."""

    label_fraction: float = 1.0

    def do_split(self) -> Tuple[List[str], List[str]]:
        tr_keys, val_keys = super().do_split()  # type: ignore[misc]
        subset = label_subset(tr_keys, self.label_fraction, self.fold)  # type: ignore[attr-defined]
        self.print_to_log_file(  # type: ignore[attr-defined]
            f"Label fraction {self.label_fraction:g}: training on {len(subset)} of {len(tr_keys)} training cases "
            f"of fold {self.fold} ({', '.join(subset)}); validation unchanged ({len(val_keys)} cases)")  # type: ignore
        return subset, list(val_keys)


class nnUNetTrainerPGL_frac10(LabelFractionMixin, nnUNetTrainerPGL):
    label_fraction = 0.10


class nnUNetTrainerPGL_frac25(LabelFractionMixin, nnUNetTrainerPGL):
    label_fraction = 0.25


class nnUNetTrainerPGL_frac50(LabelFractionMixin, nnUNetTrainerPGL):
    label_fraction = 0.50


class nnUNetTrainerScratch_frac10(LabelFractionMixin, nnUNetTrainerScratch):
    label_fraction = 0.10


class nnUNetTrainerScratch_frac25(LabelFractionMixin, nnUNetTrainerScratch):
    label_fraction = 0.25


class nnUNetTrainerScratch_frac50(LabelFractionMixin, nnUNetTrainerScratch):
    label_fraction = 0.50


class nnUNetTrainerPGLBYOL_frac10(LabelFractionMixin, nnUNetTrainerPGLBYOL):
    label_fraction = 0.10


class nnUNetTrainerPGLBYOL_frac25(LabelFractionMixin, nnUNetTrainerPGLBYOL):
    label_fraction = 0.25


class nnUNetTrainerPGLBYOL_frac50(LabelFractionMixin, nnUNetTrainerPGLBYOL):
    label_fraction = 0.50


# ------------------------------------------------------------------------- CPU tests: the _smoke schedule
class nnUNetTrainerPGL_smoke_frac10(LabelFractionMixin, nnUNetTrainerPGL_smoke):
    label_fraction = 0.10


class nnUNetTrainerPGL_smoke_frac25(LabelFractionMixin, nnUNetTrainerPGL_smoke):
    label_fraction = 0.25


class nnUNetTrainerPGL_smoke_frac50(LabelFractionMixin, nnUNetTrainerPGL_smoke):
    label_fraction = 0.50


class nnUNetTrainerScratch_smoke_frac10(LabelFractionMixin, nnUNetTrainerScratch_smoke):
    label_fraction = 0.10


class nnUNetTrainerScratch_smoke_frac25(LabelFractionMixin, nnUNetTrainerScratch_smoke):
    label_fraction = 0.25


class nnUNetTrainerScratch_smoke_frac50(LabelFractionMixin, nnUNetTrainerScratch_smoke):
    label_fraction = 0.50


#: every trainer class defined here (the shim nnU-Net searches imports these)
__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, LabelFractionMixin) and obj is not LabelFractionMixin
           and obj.__module__ == __name__]
