"""Paired statistics of per-case values: percentile-bootstrap CI, Wilcoxon signed-rank test, win/loss/tie counts.

Pure functions of numbers (numpy, and scipy for the Wilcoxon test); :func:`paired_stats` gathers them in a
:class:`PairedStats`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from nnunet_pgl.evaluation.records import Record


@dataclass
class PairedStats(Record):
    """Paired comparison of per-case values of arm A and arm B; pairs with a NaN on either side are left out.

    Attributes:
        n: pairs compared.
        n_nan: pairs left out (NaN in A or B).
        mean_a: mean of A over the ``n`` pairs (NaN when ``n`` is 0).
        mean_b: mean of B over the ``n`` pairs.
        mean_diff: mean of ``A − B``.
        median_diff: median of ``A − B``.
        ci_low: lower end of the bootstrap 95 % CI of ``mean_diff`` (:func:`bootstrap_ci`).
        ci_high: upper end of that CI.
        p: two-sided Wilcoxon signed-rank p-value (:func:`wilcoxon_p`); None = n/a.
        wins: pairs with ``A > B``.
        losses: pairs with ``A < B``.
        ties: pairs with ``A == B``.
    """

    n: int
    n_nan: int
    mean_a: float
    mean_b: float
    mean_diff: float
    median_diff: float
    ci_low: float
    ci_high: float
    p: Optional[float]
    wins: int
    losses: int
    ties: int


def bootstrap_ci(diffs: ArrayLike, n_boot: int = 10000, seed: int = 0, alpha: float = 0.05
                 ) -> Tuple[float, float]:
    """Percentile-bootstrap ``1 − alpha`` CI of the mean of ``diffs`` (NaN, NaN for no data).

    ``n_boot`` resamples of ``len(diffs)`` values with replacement from ``np.random.default_rng(seed)``; the CI is
    the ``alpha/2`` and ``1 − alpha/2`` percentiles of the resampled means (numpy's linear interpolation).
    """
    d = np.asarray(diffs, dtype=float)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: need at least 1 bootstrap resample (10000 is a good default)")
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // d.size)  # bounded memory for large n
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        means[start:start + m] = d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def wilcoxon_p(diffs: ArrayLike) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; None ('n/a') if n < 2 or all are zero."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2 or not np.any(d != 0):
        return None
    from scipy.stats import wilcoxon
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-n / ties notes of scipy
        return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def win_loss_tie(diffs: ArrayLike) -> Tuple[int, int, int]:
    """Counts of differences > 0 (A wins), < 0 (A loses) and == 0."""
    d = np.asarray(diffs, dtype=float)
    return int(np.sum(d > 0)), int(np.sum(d < 0)), int(np.sum(d == 0))


def paired_stats(a: ArrayLike, b: ArrayLike, n_boot: int = 10000, seed: int = 0) -> PairedStats:
    """Paired comparison of per-case values ``a`` and ``b`` (same order); pairs with a NaN on either side dropped."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_stats needs the same number of values on both sides, got {x.shape} and {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    d = x[ok] - y[ok]
    lo, hi = bootstrap_ci(d, n_boot, seed)
    wins, losses, ties = win_loss_tie(d)
    return PairedStats(n=int(d.size), n_nan=int((~ok).sum()),
                       mean_a=float(x[ok].mean()) if d.size else math.nan,
                       mean_b=float(y[ok].mean()) if d.size else math.nan,
                       mean_diff=float(d.mean()) if d.size else math.nan,
                       median_diff=float(np.median(d)) if d.size else math.nan,
                       ci_low=lo, ci_high=hi, p=wilcoxon_p(d), wins=wins, losses=losses, ties=ties)
