"""Prior-guided alignment: sample the feature maps of two views at the same points of the region.

A feature map of a view at total stride ``s = (s_z, s_y, s_x)`` (``s = patch_size / S`` per axis for a map of
spatial size ``S``) has feature voxel ``i`` centred at view coordinate ``origin + i·s``; stride and origin form the
level's :class:`~nnunet_pgl.geometry.LevelGeometry`. The origin depends on how the network computes the level, so
the geometry is a parameter: :func:`~nnunet_pgl.geometry.level_geometry` measures it for a U-Net (encoder levels:
``origin = 0`` for nnU-Net's ``PlainConvUNet``, ``(s − 1)/4`` for ``ResidualEncoderUNet``; decoder levels: between
the skip and the upsampled level below), and without one the average-pooling convention ``origin = (s − 1)/2`` is
used (average-pooling a linear field by ``s`` gives exactly its value at that centre; the pure-math tests use it).

:func:`align_features` chooses a grid of points in region voxel coordinates covering the overlap of the two maps,
maps the points into each map's feature coordinates through the inverse prior and the geometry, and samples both
trilinearly. ``valid`` marks points inside the hull of feature-voxel centres of *both* maps, where trilinear
sampling of a linear field is exact. Coordinates, point transforms and the sampling grid are float32 (float64 for
float64 priors or features) whatever the feature dtype and autocast: half-precision coordinates would misplace the
points by ~0.1 voxel.

Exactness: for features linear in region coordinates, the alignment is exact (to float precision) at every point
where the geometry is the network's. That holds for average pooling with the default geometry, and for the
encoder levels and bottleneck of a linearised ``PlainConvUNet`` with :func:`~nnunet_pgl.geometry.level_geometry`
at points whose receptive field lies inside both views (zero padding bends the field near the edges; measured
≤ 2e-4 feature voxels). Decoder levels and ``ResidualEncoderUNet`` are approximate: where two paths of different
position meet, the geometry is their midpoint, and the misalignment left depends on how training weighs them
(linearised, opposite flips, scales 1.1–1.4: with equal weights ≤ 0.06 feature voxels on ``PlainConvUNet``'s
decoder, ≤ 0.26 on ``ResidualEncoderUNet``'s; the worst case over switching either path off is the smallest of
the conventions measured, e.g. 0.50 feature voxels at the ResEnc bottleneck against 0.99 for either path's own
position; ``BENCHMARKS.md``, "Feature geometry").

*Note* (paper vs ours): the paper aligns by "undoing flips, then crop/scale"; we resample both maps onto one grid
in the region frame, which does all three at once and also handles rotations.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .geometry import LevelGeometry, avg_pool_geometry
from .prior import ViewPrior, box_bounds, transform_points
from .views import to_grid_sample

#: one geometry for both maps, or one per map ``(geometry_a, geometry_b)``
GeometryArg = Union[LevelGeometry, Tuple[LevelGeometry, LevelGeometry], None]

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


def _resolve_geometry(geometry: GeometryArg, prior_a: ViewPrior, shape_a: Sequence[int], prior_b: ViewPrior,
                      shape_b: Sequence[int]) -> Tuple[LevelGeometry, LevelGeometry]:
    """The geometry of each map: given (one for both, or a pair), else the average-pooling convention.

    A given geometry's stride must be the map's ``patch_size / S``: a mismatch means the entry of another level.
    """
    if geometry is None:
        given: Tuple[Optional[LevelGeometry], Optional[LevelGeometry]] = (None, None)
    elif isinstance(geometry, LevelGeometry):
        given = (geometry, geometry)
    elif (isinstance(geometry, (tuple, list)) and len(geometry) == 2
          and all(isinstance(g, LevelGeometry) for g in geometry)):
        given = (geometry[0], geometry[1])
    else:
        raise ValueError(f"geometry must be a LevelGeometry, a pair of them (map a, map b) or None; got "
                         f"{type(geometry).__name__}")
    out = []
    for name, g, prior, shape in (("a", given[0], prior_a, shape_a), ("b", given[1], prior_b, shape_b)):
        stride = feature_stride(prior, shape)
        if g is None:
            out.append(avg_pool_geometry(stride))
            continue
        if any(abs(gs - s) > 1e-6 * s for gs, s in zip(g.stride, stride)):
            raise ValueError(f"geometry of map {name} has stride {g.stride}, but a map of spatial shape "
                             f"{tuple(shape)} for patch {prior.patch_size} has stride {stride}: pass the entry of "
                             "level_geometry(network) for the level these features come from")
        out.append(g)
    return out[0], out[1]


def _centre_hull(geom: LevelGeometry, size: Sequence[int]) -> Tuple[list[float], list[float]]:
    """Hull of feature-voxel centres in view voxel coordinates: ``[origin, origin + (S − 1)·s]`` per axis."""
    lo = list(geom.origin)
    hi = [o + (n - 1) * s for o, s, n in zip(geom.origin, geom.stride, size)]
    return lo, hi


def _autocast_off(device: torch.device) -> ContextManager[object]:
    """Disable autocast on ``device`` (coordinates must stay float32 under AMP); no-op where it cannot run."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if (available(device.type) if available is not None else device.type in ("cuda", "cpu")):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def overlap_points(prior_a: ViewPrior, shape_a: Sequence[int], prior_b: ViewPrior, shape_b: Sequence[int],
                   out_size: Sequence[int], *, geometry: GeometryArg = None,
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grid of region points covering the overlap of two feature maps' centre hulls.

    Args:
        prior_a, prior_b: priors of the two views (same case; regions may differ, see ``region_offset``).
        shape_a, shape_b: spatial shapes ``S`` of the two feature maps.
        out_size: number of points per axis.
        geometry: as in :func:`align_features` (default: the average-pooling convention).

    Returns:
        ``(points, nonempty)``: points ``(B, *out_size, 3)`` in region voxel coordinates of ``prior_a``'s region
        (dtype of ``prior_a.to_region``), placed at the cell centres of ``out_size`` cells tiling the bounding box
        of the overlap; ``nonempty`` ``(B,)`` bool, False where the two hulls' bounding boxes do not intersect.
    """
    ga, gb = _resolve_geometry(geometry, prior_a, shape_a, prior_b, shape_b)
    ma, mb = prior_a.to_region, _in_frame_of(prior_b, prior_a)
    with _autocast_off(ma.device):
        lo_a, hi_a = box_bounds(ma, *_centre_hull(ga, shape_a))
        lo_b, hi_b = box_bounds(mb, *_centre_hull(gb, shape_b))
        lo, hi = torch.maximum(lo_a, lo_b), torch.minimum(hi_a, hi_b)
        nonempty = (hi >= lo).all(dim=1)
        cells = [(torch.arange(n, device=ma.device, dtype=ma.dtype) + 0.5) / n for n in out_size]
        frac = torch.stack(torch.meshgrid(*cells, indexing="ij"), dim=-1)          # (*out, 3) in (0, 1)
        b = ma.shape[0]
        span = (hi - lo).view(b, 1, 1, 1, 3)
        return lo.view(b, 1, 1, 1, 3) + frac.unsqueeze(0) * span, nonempty


def _sample(feat: torch.Tensor, to_region: torch.Tensor, geom: LevelGeometry, points: torch.Tensor,
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``feat`` at region ``points``; return the samples (``feat``'s dtype) and the inside-the-hull mask.

    The coordinates stay in the dtype of ``points`` (float32/64) with autocast off; half-precision features are
    sampled as float32 with that grid (``grid_sample`` wants one dtype) and the result is cast back.
    """
    with _autocast_off(points.device):
        view = transform_points(torch.linalg.inv(to_region), points)           # (B, *out, 3) view voxel coords
        s = torch.tensor(geom.stride, dtype=view.dtype, device=view.device)
        o = torch.tensor(geom.origin, dtype=view.dtype, device=view.device)
        f = (view - o) / s                                                      # feature voxel coords
        size = feat.shape[2:]
        n = torch.tensor([float(x) for x in size], dtype=view.dtype, device=view.device)
        inside = ((f >= -HULL_EPS) & (f <= n - 1 + HULL_EPS)).all(dim=-1)
        work = torch.float64 if torch.float64 in (feat.dtype, view.dtype) else torch.float32
        grid = to_grid_sample(f, size).to(work)
        out = F.grid_sample(feat.to(work), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(feat.dtype), inside


def align_features(feat_a: torch.Tensor, prior_a: ViewPrior, feat_b: torch.Tensor, prior_b: ViewPrior,
                   out_size: Optional[Sequence[int]] = None, *, geometry: GeometryArg = None,
                   strict: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample the feature maps of two views at the same region points covering their overlap.

    Args:
        feat_a: ``(B, C, *S_a)`` features of view a at any level; stride ``patch_size / S_a`` per axis (may be
            anisotropic and non-integer). Any float dtype; the coordinates are float32 regardless.
        prior_a: the view prior of view a.
        feat_b: ``(B, C', *S_b)`` features of view b (``C'`` may differ from ``C``, e.g. a target projection).
        prior_b: the view prior of view b (same case; its region may differ from a's).
        out_size: points per axis of the common grid (default: ``S_a``).
        geometry: where the feature voxels sit in the view: one entry of
            :func:`~nnunet_pgl.geometry.level_geometry` (both maps from that level), or a pair
            ``(geometry_a, geometry_b)``. Default None: the average-pooling convention ``origin = (s − 1)/2``,
            right for average-pooled maps but not for nnU-Net's U-Nets (module docstring). Its stride must be
            ``patch_size / S`` of the map.
        strict: raise if the two *views* (not just these feature maps) share no region in some item. Costs one
            host synchronisation; training loops that already guarantee overlap pass ``False``.

    Returns:
        ``(a, b, valid)``: ``a`` ``(B, C, *out)`` and ``b`` ``(B, C', *out)`` (dtypes of ``feat_a`` and
        ``feat_b``) sampled at the same points in the frame of a's region; ``valid`` ``(B, 1, *out)`` bool, True
        where the point lies inside the hull of feature-voxel centres of both maps (there the samples are exact for
        a field linear in region coordinates, if ``geometry`` is the maps'). Points are cell centres of ``out``
        cells tiling the bounding box of the hulls' overlap; for crop/scale/flip priors every point of a
        non-empty overlap is valid.

    Raises:
        ValueError: wrong ranks, batch sizes, priors or geometry, or (``strict``) views that do not overlap.
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
    geoms = _resolve_geometry(geometry, prior_a, shape_a, prior_b, shape_b)

    dtype = torch.float64 if prior_a.to_region.dtype == torch.float64 else torch.float32
    pa = ViewPrior(prior_a.to_region.to(device=feat_a.device, dtype=dtype), prior_a.patch_size,
                   prior_a.region_offset.to(feat_a.device))
    pb = ViewPrior(prior_b.to_region.to(device=feat_a.device, dtype=dtype), prior_b.patch_size,
                   prior_b.region_offset.to(feat_a.device))
    if strict:
        with _autocast_off(feat_a.device):
            la, ha = pa.footprint()
            lb, hb = box_bounds(_in_frame_of(pb, pa), [-0.5] * 3, [p - 0.5 for p in pb.patch_size])
        disjoint = (torch.minimum(ha, hb) <= torch.maximum(la, lb)).any(dim=1)
        if bool(disjoint.any()):
            items = torch.nonzero(disjoint).flatten().tolist()
            raise ValueError(f"views do not overlap in batch items {items}: there is nothing to align. Draw the "
                             "pair with make_view_pair(min_overlap > 0) or pass priors of the same case")
    points, nonempty = overlap_points(pa, shape_a, pb, shape_b, out, geometry=geoms)
    a, in_a = _sample(feat_a, pa.to_region, geoms[0], points)
    bb, in_b = _sample(feat_b, _in_frame_of(pb, pa), geoms[1], points)
    valid = (in_a & in_b & nonempty.view(b, 1, 1, 1)).unsqueeze(1)
    return a, bb, valid
