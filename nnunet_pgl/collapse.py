"""Collapse and shortcut statistics of a pretraining step, from the branch outputs it already computed.

Two ways a consistency loss can fall without the features learning anything:

* **Collapse**: every point gets (nearly) the same projection, or the projections fill only a few directions.
  Measured by :func:`projection_spread` (the std of the l2-normalised projections across points and batch, as in
  SimSiam, Chen & He 2021, Fig. 2, scaled by ``√D`` so that 1 is the spread of directions uniform on the sphere and 0
  is a single direction) and :func:`effective_rank` (RankMe, Garrido et al. 2023: ``exp`` of the entropy of the
  normalised singular values; 1 for a rank-one set of vectors, ``D`` for an isotropic one).
* **Position shortcut**: a U-Net with zero padding can tell where a voxel sits in its input. If the two views of a
  region sit at similar view positions, features that encode only that position already agree, and the loss drops.
  :func:`shortcut_r2` fits a linear map from the projections of view a to a point's coordinates and scores it on
  view b: once with *view* coordinates as the target (position in the network input), once with *region*
  coordinates (position in the region both views were cut from, which the alignment matches). Features that are
  equal at the same region point in both views, which is what the loss asks for, cannot predict the view
  coordinates of view b from a map fitted on view a when the views differ; position-encoding features can.
  A U-Net with zero padding encodes some view position from random init on, so what matters is a *rise* of the
  view R² during training (:func:`collapse_warnings` takes the first epoch as the baseline).

:class:`CollapseMonitor` collects these statistics from some training steps (the target branch's projections at
the aligned points, which the step computed anyway) and summarises them per level, e.g. once per epoch; a step's
bottleneck has too few points for a linear fit, so the shortcut fit pools the points of all collected steps.

*Note* (ours): the thresholds of :func:`collapse_warnings` are rules of thumb chosen for this project, not values
from the literature; the raw statistics are logged so that users can judge for themselves.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from .alignment import overlap_points
from .geometry import LevelGeometry
from .model import BranchOutput
from .prior import ViewPrior, transform_points

#: warn when the spread of the normalised projections falls below this (1 = uniform on the sphere)
SPREAD_WARN = 0.1
#: warn when the effective rank of the projections falls below this
RANK_WARN = 2.0
#: the same for the global (BYOL) projections: a step has only 2·B of them, all from views of the same few regions,
#: which are close at any time (at random init too); only near-identical vectors are flagged
GLOBAL_SPREAD_WARN = 0.01
#: warn when R² of the view coordinates is at least this and exceeds R² of the region coordinates by SHORTCUT_GAP
SHORTCUT_R2 = 0.5
SHORTCUT_GAP = 0.2
#: ... and has risen by at least this since the start of the run
SHORTCUT_RISE = 0.1


def projection_spread(z: torch.Tensor) -> torch.Tensor:
    """``√D ×`` the mean over dimensions of the (population) std of the l2-normalised rows of ``z``.

    Args:
        z: ``(N, D)`` projections (points of all batch items as rows).

    Returns:
        0-dim float32 tensor on ``z``'s device: 0 when all rows point the same way, about 1 for directions spread
        uniformly over the sphere.
    """
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be (N, D) with N >= 1; got {tuple(z.shape)}")
    zn = torch.nn.functional.normalize(z.float(), dim=1, eps=1e-12)
    return zn.std(dim=0, unbiased=False).mean() * math.sqrt(z.shape[1])


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """RankMe effective rank ``exp(−Σ p_k log p_k)``, ``p = σ / Σσ`` over the singular values ``σ`` of ``z``.

    Args:
        z: ``(N, D)`` projections, uncentred (as RankMe; a constant set of vectors has rank 1, not 0).

    Returns:
        0-dim float32 tensor in ``[1, min(N, D)]`` (0 for an all-zero ``z``).
    """
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be (N, D) with N >= 1; got {tuple(z.shape)}")
    s = torch.linalg.svdvals(z.float())
    total = s.sum()
    if float(total) <= 0:
        return torch.zeros((), device=z.device)
    p = s / total
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return torch.exp(ent)


def linear_r2(x_fit: torch.Tensor, y_fit: torch.Tensor, x_eval: torch.Tensor, y_eval: torch.Tensor,
              ridge: float = 1e-3) -> torch.Tensor:
    """R² per target of a ridge-regression map fitted on ``(x_fit, y_fit)`` and scored on ``(x_eval, y_eval)``.

    Features are standardised with the fit set's mean and std (constant features become 0), targets centred on the
    fit set's mean; ``W = (XᵀX + ridge·N·I)⁻¹ XᵀY``. On the eval set ``R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ_eval)²``.

    Args:
        x_fit: ``(N, D)``; y_fit: ``(N, T)``; x_eval: ``(M, D)``; y_eval: ``(M, T)``.
        ridge: relative ridge strength.

    Returns:
        ``(T,)`` float32 R² (can be negative: worse than predicting the eval mean); NaN where a target is constant
        on the eval set.
    """
    if x_fit.ndim != 2 or y_fit.ndim != 2 or x_fit.shape[0] != y_fit.shape[0] or x_fit.shape[0] == 0:
        raise ValueError(f"x_fit (N, D) and y_fit (N, T) must share N >= 1; got {tuple(x_fit.shape)}, "
                         f"{tuple(y_fit.shape)}")
    if x_eval.shape[0] != y_eval.shape[0] or x_eval.shape[1:] != x_fit.shape[1:] or y_eval.shape[1:] != y_fit.shape[1:]:
        raise ValueError(f"eval shapes {tuple(x_eval.shape)}, {tuple(y_eval.shape)} do not match the fit shapes "
                         f"{tuple(x_fit.shape)}, {tuple(y_fit.shape)}")
    with torch.autocast(x_fit.device.type, enabled=False):
        xf, yf = x_fit.float(), y_fit.float()
        mx, sx = xf.mean(0), xf.std(0, unbiased=False)
        keep = sx > 1e-6
        my = yf.mean(0)
        xs = torch.where(keep, (xf - mx) / sx.clamp_min(1e-6), torch.zeros_like(xf))
        gram = xs.t() @ xs + ridge * xs.shape[0] * torch.eye(xs.shape[1], device=xs.device)
        w = torch.linalg.solve(gram, xs.t() @ (yf - my))
        xe = torch.where(keep, (x_eval.float() - mx) / sx.clamp_min(1e-6), torch.zeros_like(x_eval.float()))
        ye = y_eval.float()
        sse = ((ye - (xe @ w + my)) ** 2).sum(0)
        sst = ((ye - ye.mean(0)) ** 2).sum(0)
        return torch.where(sst > 1e-12 * ye.shape[0], 1 - sse / sst.clamp_min(1e-30),
                           torch.full_like(sst, math.nan))


@dataclass
class LevelStats:
    """Collapse and shortcut statistics of one loss level (``level`` = -1: the global BYOL projections)."""

    level: int
    spread: float
    effective_rank: float
    r2_view: Optional[float] = None
    r2_region: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def _rows(x: torch.Tensor, mask: Optional[torch.Tensor], max_rows: int) -> torch.Tensor:
    """``(B, D, *S)`` → ``(N, D)`` rows at ``mask`` ``(B, 1, *S)``, thinned by a fixed stride to ≤ ``max_rows``."""
    r = x.movedim(1, -1).reshape(-1, x.shape[1])
    if mask is not None:
        r = r[mask.reshape(-1)]
    step = max(1, math.ceil(r.shape[0] / max_rows))
    return r[::step]


@dataclass
class ShortcutRows:
    """Aligned points of one level for :func:`shortcut_r2`: projections and coordinates, one row per point.

    Attributes:
        x_a, x_b: ``(N, D)`` projections of views a and b at the points.
        view_a, view_b: ``(N, 3)`` the points' view voxel coordinates in a and in b.
        region: ``(N, 3)`` the points' region voxel coordinates (frame of a's region).
    """

    x_a: torch.Tensor
    x_b: torch.Tensor
    view_a: torch.Tensor
    view_b: torch.Tensor
    region: torch.Tensor

    @staticmethod
    def cat(rows: Sequence["ShortcutRows"]) -> "ShortcutRows":
        return ShortcutRows(*(torch.cat([getattr(r, f) for r in rows]) for f in
                              ("x_a", "x_b", "view_a", "view_b", "region")))


def shortcut_rows(z_a: torch.Tensor, z_b: torch.Tensor, valid: torch.Tensor, prior_a: ViewPrior,
                  prior_b: ViewPrior, max_rows: int = 1024, geometry: Optional[LevelGeometry] = None,
                  ) -> ShortcutRows:
    """The aligned points of one level with their projections, view coordinates and region coordinates.

    The points are those of :func:`~nnunet_pgl.alignment.align_features` with its default grid (the feature map
    size of view a), in region coordinates of ``prior_a``'s region.

    Args:
        z_a, z_b: ``(B, D, *S)`` aligned projections of views a and b (e.g. ``BranchOutput.local[i]``).
        valid: ``(B, 1, *S)`` bool mask of the aligned points.
        prior_a, prior_b: the views' priors (same case).
        max_rows: points kept at most (a fixed stride through the valid points; no random draws).
        geometry: the level's geometry, as passed to the alignment (default: the average-pooling convention).
    """
    size = tuple(z_a.shape[2:])
    dev = z_a.device
    dtype = torch.float32 if prior_a.to_region.dtype != torch.float64 else torch.float64
    pa = ViewPrior(prior_a.to_region.to(dev, dtype), prior_a.patch_size, prior_a.region_offset.to(dev))
    pb = ViewPrior(prior_b.to_region.to(dev, dtype), prior_b.patch_size, prior_b.region_offset.to(dev))
    points, _ = overlap_points(pa, size, pb, size, size, geometry=geometry)    # (B, *S, 3), a's region frame
    view_a = transform_points(pa.to_view, points)
    view_b = transform_points(_region_to_view_b(pa, pb), points)
    mask = valid.reshape(-1)
    step = max(1, math.ceil(int(mask.sum()) / max_rows))

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 3)[mask][::step].float()

    return ShortcutRows(_rows(z_a.float(), valid, max_rows), _rows(z_b.float(), valid, max_rows), flat(view_a),
                        flat(view_b), flat(points))


def shortcut_r2(rows: ShortcutRows, min_rows_per_feature: float = 2.0) -> Dict[str, float]:
    """R² of view coordinates and of region coordinates predicted linearly from the projections.

    A ridge map is fitted on view a's projections and scored on view b's (the same points, another forward pass):
    once with the points' view coordinates as the target (a's to fit, b's to score), once with their region
    coordinates (the same for both views).

    Args:
        rows: the points (pool several steps with :meth:`ShortcutRows.cat`: one step's bottleneck has few points).
        min_rows_per_feature: below this many points per feature dimension the fit would mostly memorise the
            points: both R² are NaN then.

    Returns:
        ``{'r2_view': …, 'r2_region': …}``, each the mean R² over the three axes (axes without variance left out).
    """
    n, d = rows.x_a.shape
    if n < max(2.0, min_rows_per_feature * d):
        return {"r2_view": math.nan, "r2_region": math.nan}

    def mean_r2(y_fit: torch.Tensor, y_eval: torch.Tensor) -> float:
        r2 = linear_r2(rows.x_a, y_fit, rows.x_b, y_eval)
        r2 = r2[~torch.isnan(r2)]
        return float(r2.mean()) if r2.numel() else math.nan

    return {"r2_view": mean_r2(rows.view_a, rows.view_b), "r2_region": mean_r2(rows.region, rows.region)}


def _region_to_view_b(prior_a: ViewPrior, prior_b: ViewPrior) -> torch.Tensor:
    """``(B, 4, 4)``: region voxel coordinates of ``prior_a``'s region → view voxel coordinates of view b."""
    shift = torch.eye(4, dtype=prior_b.to_region.dtype, device=prior_b.to_region.device).repeat(
        prior_b.batch_size, 1, 1)
    shift[:, :3, 3] = (prior_a.region_offset - prior_b.region_offset).to(prior_b.to_region.dtype)
    return prior_b.to_view @ shift


class CollapseMonitor:
    """Collects the statistics of some training steps and summarises them per level (e.g. once per epoch).

    Memory is bounded: each :meth:`update` keeps at most ``rows_per_step`` points per level for the shortcut fit,
    and at most ``max_rows`` are kept in all (later steps are then only used for spread and rank).

    Args:
        rows_per_step: points per level and step (spread, rank and the shortcut rows).
        max_rows: points per level kept for the shortcut fit.
    """

    def __init__(self, rows_per_step: int = 1024, max_rows: int = 16384):
        self.rows_per_step = rows_per_step
        self.max_rows = max_rows
        self.reset()

    def reset(self) -> None:
        self._spread: Dict[int, List[torch.Tensor]] = {}
        self._rank: Dict[int, List[torch.Tensor]] = {}
        self._rows: Dict[int, List[ShortcutRows]] = {}

    @property
    def steps(self) -> int:
        return max((len(v) for v in self._spread.values()), default=0)

    def update(self, out: BranchOutput, levels: Sequence[int], prior_a: ViewPrior, prior_b: ViewPrior,
               geometry: Optional[Sequence[LevelGeometry]] = None) -> None:
        """Add one step.

        Args:
            out: the step's *target* branch output (projections, no predictor).
            levels: the loss levels of ``out.local``, in order.
            prior_a, prior_b: the step's priors.
            geometry: per level 0 … n − 1, the geometry the alignment used (``PGLBranch.geometry``); default:
                the average-pooling convention.
        """
        with torch.no_grad():
            for lvl, (za, zb), v in zip(levels, out.local, out.valid):
                geom = geometry[lvl] if geometry is not None else None
                rows = shortcut_rows(za, zb, v, prior_a, prior_b, self.rows_per_step, geom)
                if rows.x_a.shape[0] == 0:
                    continue
                both = torch.cat([rows.x_a, rows.x_b])
                self._spread.setdefault(int(lvl), []).append(projection_spread(both))
                self._rank.setdefault(int(lvl), []).append(effective_rank(both))
                kept = self._rows.setdefault(int(lvl), [])
                if sum(r.x_a.shape[0] for r in kept) < self.max_rows:
                    kept.append(rows)
            if out.global_ is not None:
                g = torch.cat(out.global_).float()
                self._spread.setdefault(-1, []).append(projection_spread(g))
                self._rank.setdefault(-1, []).append(effective_rank(g))

    def summary(self) -> List[LevelStats]:
        """Per level (loss levels ascending, then the global projections as level -1): the mean spread and rank
        over the steps, and the shortcut R² of all kept points together."""
        out: List[LevelStats] = []
        for lvl in sorted(self._spread, key=lambda x: (x < 0, x)):
            spread = float(torch.stack(self._spread[lvl]).mean())
            rank = float(torch.stack(self._rank[lvl]).mean())
            r2_view = r2_region = None
            if lvl >= 0 and self._rows.get(lvl):
                sc = shortcut_r2(ShortcutRows.cat(self._rows[lvl]))
                r2_view = None if math.isnan(sc["r2_view"]) else sc["r2_view"]
                r2_region = None if math.isnan(sc["r2_region"]) else sc["r2_region"]
            out.append(LevelStats(lvl, spread, rank, r2_view, r2_region))
        return out


def collapse_warnings(stats: Sequence[LevelStats], baseline: Optional[Sequence[LevelStats]] = None) -> List[str]:
    """Plain-word warnings for collapsed projections and for the position shortcut (empty if all is well).

    Args:
        stats: the statistics to judge (e.g. of the latest epoch).
        baseline: the same statistics at the start of the run (the first epoch). A U-Net with zero padding knows
            roughly where a voxel sits in its input from random init on, so the shortcut is only flagged when
            ``r2_view`` has risen by ``SHORTCUT_RISE`` over the baseline (and is high, and above ``r2_region`` by
            ``SHORTCUT_GAP``). Without a baseline the shortcut is not judged.
    """
    base = {b.level: b for b in baseline or []}
    msgs: List[str] = []
    for s in stats:
        name = "the global (BYOL) projections" if s.level < 0 else f"level {s.level}"
        if s.spread < (GLOBAL_SPREAD_WARN if s.level < 0 else SPREAD_WARN):
            msgs.append(f"{name}: the projections have collapsed: nearly every point gets the same vector (spread "
                        f"{s.spread:.3f}; about 1 when they point in all directions, 0 when they are all the same). "
                        "A low loss means nothing then. Lower --lr, or check that the views differ (augmentation)")
        elif s.level >= 0 and s.effective_rank < RANK_WARN:
            msgs.append(f"{name}: the projections use only about {s.effective_rank:.1f} directions (effective rank): "
                        "they are close to collapse")
        b = base.get(s.level)
        if (s.r2_view is not None and s.r2_region is not None and b is not None and b.r2_view is not None
                and s.r2_view >= SHORTCUT_R2 and s.r2_view - s.r2_region >= SHORTCUT_GAP
                and s.r2_view - b.r2_view >= SHORTCUT_RISE):
            msgs.append(f"{name}: the features have learned where a point sits in the network input (a linear map "
                        f"predicts its view coordinates with R² {s.r2_view:.2f}, {b.r2_view:.2f} at the start) "
                        f"better than where it sits in the region (R² {s.r2_region:.2f}): the views may be matched by "
                        "their position in the input, not by content")
    return msgs
