"""Prior-guided alignment: sample the feature maps of two views at the same points of the region.

A feature map of a view at total stride ``s = (s_z, s_y, s_x)`` (``s = patch_size / S`` per axis for a map of
spatial size ``S``) has feature voxel ``i`` standing for the view voxels ``[i·s, (i+1)·s)``; its centre lies at
view coordinate ``i·s + (s − 1)/2`` (the average-pooling convention: average-pooling a linear field by ``s`` gives
exactly its value at that centre). :func:`align_features` chooses a grid of points in region voxel coordinates
covering the overlap of the two maps, maps the points into each map's feature coordinates through the inverse
prior, and samples both trilinearly. ``valid`` marks points inside the hull of feature-voxel centres of *both*
maps, where trilinear sampling of a linear field is exact.

*Note* (paper vs ours): the paper aligns by "undoing flips, then crop/scale"; we resample both maps onto one grid
in the region frame, which does all three at once and also handles rotations.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .prior import ViewPrior, box_bounds, transform_points
from .views import to_grid_sample

#: tolerance, in feature voxels, for a point on the hull boundary to count as inside
HULL_EPS = 1e-4


def feature_stride(prior: ViewPrior, feat_shape: Sequence[int]) -> Tuple[float, float, float]:
    """Per-axis total stride ``patch_size / S`` of a feature map of spatial shape ``S`` for a view of ``prior``."""
    if len(feat_shape) != 3:
        raise ValueError(f"feature maps must have 3 spatial axes; got spatial shape {tuple(feat_shape)}")
    return tuple(p / s for p, s in zip(prior.patch_size, feat_shape))  # type: ignore[return-value]


def _in_frame_of(prior: ViewPrior, frame: ViewPrior) -> torch.Tensor:
    """``(B, 4, 4)``: ``prior``'s view voxel coords → region voxel coords of ``frame``'s region."""
    m = prior.to_region.clone()
    m[:, :3, 3] += (prior.region_offset - frame.region_offset).to(m.dtype)
    return m


def _centre_hull(stride: Sequence[float], size: Sequence[int]) -> Tuple[list[float], list[float]]:
    """Hull of feature-voxel centres in view voxel coordinates: ``[(s-1)/2, (S-1)s + (s-1)/2]`` per axis."""
    lo = [(s - 1) / 2 for s in stride]
    hi = [(n - 1) * s + (s - 1) / 2 for s, n in zip(stride, size)]
    return lo, hi


def overlap_points(prior_a: ViewPrior, shape_a: Sequence[int], prior_b: ViewPrior, shape_b: Sequence[int],
                   out_size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grid of region points covering the overlap of two feature maps' centre hulls.

    Args:
        prior_a, prior_b: priors of the two views (same case; regions may differ, see ``region_offset``).
        shape_a, shape_b: spatial shapes ``S`` of the two feature maps.
        out_size: number of points per axis.

    Returns:
        ``(points, nonempty)``: points ``(B, *out_size, 3)`` in region voxel coordinates of ``prior_a``'s region,
        placed at the cell centres of ``out_size`` cells tiling the bounding box of the overlap; ``nonempty``
        ``(B,)`` bool, False where the two hulls' bounding boxes do not intersect.
    """
    ma, mb = prior_a.to_region, _in_frame_of(prior_b, prior_a)
    lo_a, hi_a = box_bounds(ma, *_centre_hull(feature_stride(prior_a, shape_a), shape_a))
    lo_b, hi_b = box_bounds(mb, *_centre_hull(feature_stride(prior_b, shape_b), shape_b))
    lo, hi = torch.maximum(lo_a, lo_b), torch.minimum(hi_a, hi_b)
    nonempty = (hi >= lo).all(dim=1)
    cells = [(torch.arange(n, device=ma.device, dtype=ma.dtype) + 0.5) / n for n in out_size]
    frac = torch.stack(torch.meshgrid(*cells, indexing="ij"), dim=-1)          # (*out, 3) in (0, 1)
    b = ma.shape[0]
    span = (hi - lo).view(b, 1, 1, 1, 3)
    return lo.view(b, 1, 1, 1, 3) + frac.unsqueeze(0) * span, nonempty


def _sample(feat: torch.Tensor, to_region: torch.Tensor, stride: Sequence[float], points: torch.Tensor,
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``feat`` at region ``points``; return the samples and the inside-the-centre-hull mask."""
    view = transform_points(torch.linalg.inv(to_region), points)               # (B, *out, 3) view voxel coords
    s = torch.tensor(stride, dtype=view.dtype, device=view.device)
    f = (view - (s - 1) / 2) / s                                                # feature voxel coords
    size = feat.shape[2:]
    n = torch.tensor([float(x) for x in size], dtype=view.dtype, device=view.device)
    inside = ((f >= -HULL_EPS) & (f <= n - 1 + HULL_EPS)).all(dim=-1)
    grid = to_grid_sample(f, size).to(feat.dtype)
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out, inside


def align_features(feat_a: torch.Tensor, prior_a: ViewPrior, feat_b: torch.Tensor, prior_b: ViewPrior,
                   out_size: Optional[Sequence[int]] = None, *, strict: bool = True,
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample the feature maps of two views at the same region points covering their overlap.

    Args:
        feat_a: ``(B, C, *S_a)`` features of view a at any level; stride ``patch_size / S_a`` per axis (may be
            anisotropic and non-integer).
        prior_a: the view prior of view a.
        feat_b: ``(B, C', *S_b)`` features of view b (``C'`` may differ from ``C``, e.g. a target projection).
        prior_b: the view prior of view b (same case; its region may differ from a's).
        out_size: points per axis of the common grid (default: ``S_a``).
        strict: raise if the two *views* (not just these feature maps) share no region in some item. Costs one
            host synchronisation; training loops that already guarantee overlap pass ``False``.

    Returns:
        ``(a, b, valid)``: ``a`` ``(B, C, *out)`` and ``b`` ``(B, C', *out)`` sampled at the same points in the
        frame of a's region; ``valid`` ``(B, 1, *out)`` bool, True where the point lies inside the hull of
        feature-voxel centres of both maps (there the samples are exact for a field linear in region
        coordinates). Points are cell centres of ``out`` cells tiling the bounding box of the hulls' overlap;
        for crop/scale/flip priors every point of a non-empty overlap is valid.

    Raises:
        ValueError: wrong ranks, batch sizes or priors, or (``strict``) views that do not overlap.
    """
    for name, f in (("feat_a", feat_a), ("feat_b", feat_b)):
        if f.ndim != 5:
            raise ValueError(f"{name} must be (B, C, Z, Y, X); got shape {tuple(f.shape)}")
    b = feat_a.shape[0]
    if feat_b.shape[0] != b or prior_a.batch_size != b or prior_b.batch_size != b:
        raise ValueError(f"batch sizes differ: feat_a {feat_a.shape[0]}, feat_b {feat_b.shape[0]}, "
                         f"prior_a {prior_a.batch_size}, prior_b {prior_b.batch_size}")
    shape_a, shape_b = tuple(feat_a.shape[2:]), tuple(feat_b.shape[2:])
    out = tuple(int(x) for x in (out_size if out_size is not None else shape_a))
    if len(out) != 3 or any(x < 1 for x in out):
        raise ValueError(f"out_size must be 3 positive integers; got {out_size}")
    if strict:
        la, ha = prior_a.footprint()
        lb, hb = box_bounds(_in_frame_of(prior_b, prior_a), [-0.5] * 3, [p - 0.5 for p in prior_b.patch_size])
        disjoint = (torch.minimum(ha, hb) <= torch.maximum(la, lb)).any(dim=1)
        if bool(disjoint.any()):
            items = torch.nonzero(disjoint).flatten().tolist()
            raise ValueError(f"views do not overlap in batch items {items}: there is nothing to align. Draw the "
                             "pair with make_view_pair(min_overlap > 0) or pass priors of the same case")

    dtype = torch.float32 if prior_a.to_region.dtype != torch.float64 else torch.float64
    pa = ViewPrior(prior_a.to_region.to(device=feat_a.device, dtype=dtype), prior_a.patch_size,
                   prior_a.region_offset.to(feat_a.device))
    pb = ViewPrior(prior_b.to_region.to(device=feat_a.device, dtype=dtype), prior_b.patch_size,
                   prior_b.region_offset.to(feat_a.device))
    points, nonempty = overlap_points(pa, shape_a, pb, shape_b, out)
    a, in_a = _sample(feat_a, pa.to_region, feature_stride(pa, shape_a), points)
    bb, in_b = _sample(feat_b, _in_frame_of(pb, pa), feature_stride(pb, shape_b), points)
    valid = (in_a & in_b & nonempty.view(b, 1, 1, 1)).unsqueeze(1)
    return a, bb, valid
