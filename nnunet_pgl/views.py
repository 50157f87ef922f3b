"""Two spatially augmented views of a case, made on the regions' device, with their priors.

The data's way: the CPU loader crops a *region* from a case, or two regions of the same case at a relative offset
(one per view, see :func:`pair_offset_feasible`); :func:`make_view_pair` draws one crop box per view, resizes each
to the network patch by trilinear sampling, flips axes, and returns the views together with their
:class:`~nnunet_pgl.prior.ViewPrior` (view voxel → region voxel affines; the regions' offsets relate them).
Everything is batched tensor code: one ``grid_sample`` per view, no Python loop over voxels or batch items.

Coordinate frames are those of :mod:`nnunet_pgl.prior`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .prior import ViewPrior, box_bounds, check_patch_size, transform_points

#: rejection-sampling rounds for the second crop before the guaranteed fallback placement
_OVERLAP_ROUNDS = 16


def voxel_grid(size: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(Z, Y, X, 3)`` tensor of the voxel coordinates (z, y, x) of an array of spatial ``size``."""
    axes = [torch.arange(int(n), device=device, dtype=dtype) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def to_grid_sample(coords: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``(..., 3)`` (z, y, x) of an array of spatial ``size`` → ``grid_sample`` grid.

    ``grid_sample(align_corners=False)`` puts -1 and +1 at the outer *edges* of the array, so coordinate ``c`` on
    an axis of length ``N`` becomes ``(2c + 1) / N - 1``. The last dimension is reversed to (x, y, z), the order
    ``grid_sample`` wants.
    """
    n = torch.tensor([float(s) for s in size], dtype=coords.dtype, device=coords.device)
    return ((2.0 * coords + 1.0) / n - 1.0).flip(-1)


def sample_view(region: torch.Tensor, prior: ViewPrior) -> torch.Tensor:
    """Resample ``region`` ``(B, C, Z, Y, X)`` at the view voxels of ``prior``; returns ``(B, C, *patch_size)``.

    Trilinear, ``padding_mode='border'``. Exact for fields that are linear in region coordinates wherever the
    view's voxel centres lie inside the hull of the region's voxel centres (true for crops inside the region with
    scale ≥ 1).
    """
    grid_dtype = torch.float32 if region.dtype in (torch.float16, torch.bfloat16) else region.dtype
    pts = voxel_grid(prior.patch_size, region.device, grid_dtype).expand(prior.batch_size, *prior.patch_size, 3)
    reg = transform_points(prior.to_region.to(device=region.device, dtype=grid_dtype), pts)
    grid = to_grid_sample(reg, region.shape[2:]).to(region.dtype)
    return F.grid_sample(region, grid, mode="bilinear", padding_mode="border", align_corners=False)


def overlap_fraction(lo_a: torch.Tensor, size_a: torch.Tensor, lo_b: torch.Tensor,
                     size_b: torch.Tensor) -> torch.Tensor:
    """Shared volume of two boxes divided by the volume of the larger one; inputs ``(B, 3)``, returns ``(B,)``.

    This is the smaller of the two fractions "how much of view i is also seen by the other view", so
    ``min_overlap = 0.1`` means each view shares at least 10 % of its content with the other.
    """
    inter = (torch.minimum(lo_a + size_a, lo_b + size_b) - torch.maximum(lo_a, lo_b)).clamp_min(0).prod(dim=1)
    return inter / torch.maximum(size_a.prod(dim=1), size_b.prod(dim=1))


def pair_overlap(prior_a: ViewPrior, prior_b: ViewPrior) -> torch.Tensor:
    """:func:`overlap_fraction` of two views' extents in the case, from their priors; returns ``(B,)`` float32.

    Each view's extent ``[-0.5, P - 0.5]`` per axis is mapped to case voxel coordinates (``to_case``, so the views
    may come from different regions of the same case) and its axis-aligned bounding box is taken: exact for
    crop/scale/flip priors, an upper bound of the true overlap for rotated views.
    """
    hi_v = [[p - 0.5 for p in prior.patch_size] for prior in (prior_a, prior_b)]
    lo_a, hi_a = box_bounds(prior_a.to_case().float(), [-0.5] * 3, hi_v[0])
    lo_b, hi_b = box_bounds(prior_b.to_case().float().to(lo_a.device), [-0.5] * 3, hi_v[1])
    return overlap_fraction(lo_a, hi_a - lo_a, lo_b, hi_b - lo_b)


def pair_offset_feasible(delta: torch.Tensor, region_size: Sequence[int], patch_size: Sequence[int],
                         scale_range: Tuple[float, float], min_overlap: float) -> torch.Tensor:
    """Whether two regions at relative offset ``delta`` admit every pair of crops at ``min_overlap``.

    Args:
        delta: ``(N, 3)`` case voxel offset of the second view's region relative to the first's
            (``region_offset_b − region_offset_a``), on any device.
        region_size: spatial size ``(Z, Y, X)`` of each of the two regions (both the same).
        patch_size: the view size ``(Z, Y, X)``.
        scale_range: ``(lo, hi)`` of the crops' scale ``u`` (crop = ``u · patch_size``).
        min_overlap: as in :func:`make_view_pair`.

    Returns:
        ``(N,)`` bool on ``delta``'s device: True where, for *any* two scales in ``scale_range``, the crops can be
        placed inside their regions so that they share at least ``min_overlap`` of the larger crop (then
        :func:`make_view_pair` never needs to go below ``min_overlap``).

    On an axis of region length ``R`` and offset ``d``, two crops of lengths ``s_a``, ``s_b`` share at most
    ``min(s_a, s_b, R − |d|)`` (with their centres as close as the regions allow). The worst scales are ``lo`` for
    one crop and ``hi`` for the other, so the condition is
    ``Π_i min(lo·P_i, R_i − |d_i|) ≥ min_overlap · hi³ · Π_i P_i`` with ``R_i − |d_i| > 0`` on every axis.
    Computed in float64 so that the loader (which draws ``delta``) and :func:`make_view_pair` (which checks it)
    agree exactly.
    """
    lo_u, hi_u = float(scale_range[0]), float(scale_range[1])
    d = delta.to(torch.float64).abs()
    r = torch.tensor([float(x) for x in region_size], dtype=torch.float64, device=delta.device)
    p = torch.tensor([float(x) for x in patch_size], dtype=torch.float64, device=delta.device)
    reach = r - d                                                     # (N, 3) longest shareable length per axis
    shared = torch.minimum(lo_u * p, reach).clamp_min(0).prod(dim=1)
    need = min_overlap * hi_u ** 3 * float(p.prod())
    return (reach > 0).all(dim=1) & (shared >= need * (1.0 - 1e-12))   # offset 0 passes at min_overlap = (lo/hi)³


def max_pair_offset(region_size: Sequence[int], patch_size: Sequence[int], scale_range: Tuple[float, float],
                    min_overlap: float) -> Tuple[int, int, int]:
    """Per axis, the largest ``|d_i|`` (whole voxels) of any offset :func:`pair_offset_feasible` accepts.

    Reached with the other two axes at offset 0, where each shares ``lo·P_j``: ``R_i − min_overlap·hi³·P_i/lo²``,
    and at most ``R_i − 1``. A bounding box for drawing offsets; not every offset inside it is feasible.
    """
    lo_u, hi_u = float(scale_range[0]), float(scale_range[1])
    out = [max(0, min(int(r) - 1, int(math.floor(r - min_overlap * hi_u ** 3 * p / lo_u ** 2 + 1e-9))))
           for r, p in zip(region_size, patch_size)]
    return (out[0], out[1], out[2])


#: candidate reference pairs drawn per item and round in :func:`draw_pair_offsets`
_OFFSET_CANDIDATES = 32


def draw_pair_offsets(batch: int, region_size: Sequence[int], patch_size: Sequence[int],
                      scale_range: Tuple[float, float] = (1.1, 1.4), min_overlap: float = 0.1,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(batch, 3)`` int64 offsets ``region_offset_b − region_offset_a`` of the two regions of view pairs.

    Each offset is the rounded centre displacement of a *reference pair*: scales ``u_a, u_b ~ U(lo, hi)``, the
    second crop placed uniformly among the placements that touch the first, kept if it shares at least
    ``min_overlap`` of the larger crop — two random crops of a case much larger than the crops, under the
    overlap constraint — and drawn again unless :func:`pair_offset_feasible`. :func:`make_view_pair` then draws
    its own scales and places the crops in the two regions, so the pairs' overlap follows the reference
    distribution closely (checked in ``tests/test_views.py``) and never falls below ``min_overlap``.

    Host-side code for the CPU loader: tensors live on ``generator``'s device (default CPU), and the rejection
    loop reads back a count per round.

    Args:
        batch: number of offsets.
        region_size: spatial size ``(Z, Y, X)`` of each region, at least ``ceil(hi · patch_size)``.
        patch_size, scale_range, min_overlap: as in :func:`make_view_pair`.
        generator: random generator (default: torch's global one).
    """
    lo_u, hi_u = float(scale_range[0]), float(scale_range[1])
    ps = check_patch_size(patch_size)
    need = [math.ceil(hi_u * p - 1e-9) for p in ps]
    if len(region_size) != 3 or any(int(r) < n for r, n in zip(region_size, need)):
        raise ValueError(f"region_size {tuple(region_size)} must hold the largest crop {tuple(need)} "
                         f"(= ceil({hi_u} x patch {ps})) on every axis")
    if not (0 < lo_u <= hi_u) or not (0.0 <= min_overlap <= (lo_u / hi_u) ** 3 + 1e-12):
        raise ValueError(f"scale_range {scale_range} and min_overlap {min_overlap} must satisfy 0 < lo <= hi and "
                         "0 <= min_overlap <= (lo/hi)^3 (see make_view_pair)")
    dev = generator.device if generator is not None else torch.device("cpu")
    p = torch.tensor([float(x) for x in ps], dtype=torch.float64, device=dev)
    out = torch.zeros(batch, 3, dtype=torch.long, device=dev)
    todo = torch.ones(batch, dtype=torch.bool, device=dev)
    k = _OFFSET_CANDIDATES
    for _ in range(10_000):
        n = int(todo.sum())
        if n == 0:
            return out
        u = lo_u + (hi_u - lo_u) * torch.rand((n, k, 2), generator=generator, dtype=torch.float64, device=dev)
        sa, sb = u[..., :1] * p, u[..., 1:] * p                               # (n, k, 3)
        lo_b = -sb + torch.rand((n, k, 3), generator=generator, dtype=torch.float64, device=dev) * (sa + sb)
        inter = (torch.minimum(sa, lo_b + sb) - lo_b.clamp_min(0)).clamp_min(0).prod(-1)
        keep = inter / torch.maximum(sa.prod(-1), sb.prod(-1)) >= min_overlap
        d = torch.round(lo_b + 0.5 * (sb - sa)).long()                        # centre of b minus centre of a
        keep &= pair_offset_feasible(d.view(-1, 3), region_size, ps, (lo_u, hi_u), min_overlap).view(n, k)
        first = keep.to(torch.uint8).argmax(dim=1)
        got = keep.any(dim=1)
        idx = torch.nonzero(todo).flatten()[got]
        out[idx] = d[torch.arange(n, device=dev)[got], first[got]]
        todo[idx] = False
    raise RuntimeError("draw_pair_offsets found no feasible offset in 10,000 rounds; this cannot happen for "
                       "valid arguments (offset 0 is always feasible): report it with the arguments used")


def _uniform(shape: Tuple[int, ...], lo: torch.Tensor | float, hi: torch.Tensor | float,
             generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    r = torch.rand(shape, generator=generator, device=device)
    return lo + r * (hi - lo)


def _check_draw_args(scale_range: Tuple[float, float], min_overlap: float, flip_prob: float) -> Tuple[float, float]:
    """``(lo, hi)`` of ``scale_range`` after checking :func:`make_view_pair`'s draw arguments (ValueError)."""
    lo_u, hi_u = float(scale_range[0]), float(scale_range[1])
    if not (0 < lo_u <= hi_u):
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi; got {scale_range}")
    if not (0.0 <= min_overlap <= 1.0):
        raise ValueError(f"min_overlap is a fraction in [0, 1]; got {min_overlap}")
    worst = (lo_u / hi_u) ** 3
    if min_overlap > worst + 1e-12:
        raise ValueError(f"impossible overlap: with scale_range={scale_range} two crops can be forced to share only "
                         f"(lo/hi)^3 = {worst:.3f} of the larger crop, below min_overlap={min_overlap}. Lower "
                         "min_overlap or narrow scale_range")
    if not (0.0 <= flip_prob <= 1.0):
        raise ValueError(f"flip_prob is a probability in [0, 1]; got {flip_prob}")
    return lo_u, hi_u


def _pair_offsets(b: int, region: torch.Tensor, region_offset: Optional[torch.Tensor],
                  region_b: Optional[torch.Tensor], region_offset_b: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3)`` int64 offsets of the two views' regions, on the device the offsets were given on (checked)."""
    dev = region.device
    odev = region_offset.device if region_offset is not None else dev   # offsets stay where given until checked
    offset = (torch.zeros(b, 3, dtype=torch.long, device=odev) if region_offset is None
              else region_offset.to(dtype=torch.long))
    if tuple(offset.shape) != (b, 3):
        raise ValueError(f"region_offset must be (B, 3) = ({b}, 3); got {tuple(offset.shape)}")
    if region_b is None:
        if region_offset_b is not None:
            raise ValueError("region_offset_b was given without region_b: pass the second view's region too, or "
                             "drop region_offset_b to crop both views from region")
        offset_b = offset
    else:
        if tuple(region_b.shape) != tuple(region.shape) or region_b.dtype != region.dtype or region_b.device != dev:
            raise ValueError(f"region_b must match region in shape, dtype and device; got {tuple(region_b.shape)} "
                             f"{region_b.dtype} {region_b.device} vs {tuple(region.shape)} {region.dtype} {dev}")
        offset_b = offset if region_offset_b is None else region_offset_b.to(device=odev, dtype=torch.long)
        if tuple(offset_b.shape) != (b, 3):
            raise ValueError(f"region_offset_b must be (B, 3) = ({b}, 3); got {tuple(offset_b.shape)}")
    return offset, offset_b


def _place_second_box(lo_a: torch.Tensor, size_a: torch.Tensor, size_b: torch.Tensor, shift: torch.Tensor,
                      rsize: torch.Tensor, min_overlap: float, generator: Optional[torch.Generator],
                      gdev: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lower corners ``(B, 3)`` of the two boxes in region a's frame: the second box placed against the first (see
    :func:`make_view_pair`); the first moves only in the far-apart fallback."""
    b, dev = lo_a.shape[0], lo_a.device
    # second box, in the frame of region a: its lower edge may range over [b_min, b_max] (inside its region);
    # uniform among those placements that touch the first box, then rejection against min_overlap
    b_min, b_max = shift - 0.5, shift + rsize - 0.5 - size_b
    win_lo = torch.maximum(b_min, lo_a - size_b)
    win_hi = torch.minimum(b_max, lo_a + size_a)
    reachable = (win_hi >= win_lo).all(dim=1)
    lo_b = torch.zeros_like(lo_a)
    placed = torch.zeros(b, dtype=torch.bool, device=dev)
    for _ in range(_OVERLAP_ROUNDS):
        cand = win_lo + torch.rand((b, 3), generator=generator, device=gdev).to(dev) * (win_hi - win_lo)
        frac = overlap_fraction(lo_a, size_a, cand, size_b)
        ok = (frac >= min_overlap) & (frac > 0) & reachable & ~placed
        lo_b = torch.where(ok[:, None], cand, lo_b)
        placed = placed | ok
    # fallback 1: the second box as close to centred on the first as its region allows (the first stays)
    centred = torch.minimum(torch.maximum(lo_a + 0.5 * size_a - 0.5 * size_b, b_min), b_max)
    frac = overlap_fraction(lo_a, size_a, centred, size_b)
    near = (frac >= min_overlap) & (frac > 0)
    # fallback 2 (regions far apart): both boxes with their centres as close as the two regions allow
    ca_lo, ca_hi = -0.5 + 0.5 * size_a, rsize - 0.5 - 0.5 * size_a
    cb_lo, cb_hi = b_min + 0.5 * size_b, b_max + 0.5 * size_b
    c = torch.minimum(torch.maximum(lo_a + 0.5 * size_a, torch.maximum(ca_lo, cb_lo)), torch.minimum(ca_hi, cb_hi))
    ca = torch.minimum(torch.maximum(c, ca_lo), ca_hi)
    cb = torch.minimum(torch.maximum(ca, cb_lo), cb_hi)
    lo_a = torch.where((placed | near)[:, None], lo_a, ca - 0.5 * size_a)
    lo_b = torch.where(placed[:, None], lo_b, torch.where(near[:, None], centred, cb - 0.5 * size_b))
    return lo_a, lo_b


def make_view_pair(region: torch.Tensor, patch_size: Sequence[int], *,
                   scale_range: Tuple[float, float] = (1.1, 1.4), min_overlap: float = 0.1,
                   flip_prob: float = 0.5, generator: Optional[torch.Generator] = None,
                   region_offset: Optional[torch.Tensor] = None, pad: bool = True, pad_value: float = 0.0,
                   region_b: Optional[torch.Tensor] = None, region_offset_b: Optional[torch.Tensor] = None,
                   ) -> Tuple[torch.Tensor, torch.Tensor, ViewPrior, ViewPrior]:
    """Draw two overlapping crops, resize each to ``patch_size``, flip; return views and priors.

    Both crops come from ``region``, or, with ``region_b``, view a's crop from ``region`` and view b's from
    ``region_b``, a second region of the same case at the relative offset ``region_offset_b − region_offset``
    (what the pretraining loader reads: see the *Note*).

    Args:
        region: ``(B, C, Z, Y, X)`` float tensor on any device (the CPU loader's crop of each case).
        patch_size: the view size ``(Z, Y, X)`` (the plans' patch size).
        scale_range: ``(lo, hi)``; each view draws its own ``u ~ U(lo, hi)``, **shared by the three axes**, and
            crops a box of ``u · patch_size`` region voxels, so the view is an isotropic zoom (in voxel space) of
            the region by ``1/u``. ``lo`` must be > 0; ``lo ≥ 1`` keeps sampling exact for linear fields.
        min_overlap: minimum shared volume of the two boxes divided by the volume of the larger box (see
            :func:`overlap_fraction`), in ``[0, 1]``. Must not exceed ``(lo / hi)^3``, the worst case of placing the
            smaller box inside the larger one.
        flip_prob: probability of flipping each axis of each view, independently.
        generator: random generator; parameters are drawn on its device (default: the region's device) and moved.
        region_offset: ``(B, 3)`` int64 case coordinate of region voxel 0 (default zeros); stored in the priors.
        pad: if the region is smaller than the largest possible crop on some axis, pad it (centred, with
            ``pad_value``; nnU-Net's loader pads images with 0 as well) and shift ``region_offset`` accordingly.
            With ``pad=False`` such a region is an error.
        pad_value: the constant used for padding.
        region_b: optional ``(B, C, Z, Y, X)`` region of view b, same shape, dtype and device as ``region`` (padded
            the same way). Its offset relative to ``region`` must pass :func:`pair_offset_feasible` (checked: one
            host synchronisation when the offsets live on an accelerator; pass them on the CPU, as the loader
            gives them, to avoid it). Default: view b is cropped from ``region`` too.
        region_offset_b: ``(B, 3)`` int64 case coordinate of ``region_b``'s voxel 0 (default: ``region_offset``).

    Returns:
        ``(view_a, view_b, prior_a, prior_b)``: views ``(B, C, *patch_size)`` with the region's dtype and device;
        ``prior_a`` maps view a's voxel coordinates to coordinates of the (padded) ``region``, ``prior_b`` view b's
        to those of the (padded) ``region_b`` (or ``region``); their ``region_offset`` relates the two frames.

    Each crop lies inside its region's extent ``[-0.5, N - 0.5]`` per axis. The first box is placed uniformly in
    ``region``; the second is drawn uniformly among placements in its region that touch the first,
    rejection-sampled against ``min_overlap`` and a non-empty overlap (a fixed number of rounds, no host
    synchronisation). Items still unplaced get the second box as close to centred on the first as its region
    allows, which always meets ``min_overlap`` within one region; where two regions are too far apart for that,
    both boxes move to the placement of largest overlap (closest centres), which meets ``min_overlap`` for every
    feasible offset.

    *Note* (paper vs ours): the paper draws ``u ∈ [1.1, 1.4]`` per view and requires ≥ 10 % overlap; it does not
    say whether ``u`` is per axis nor how the overlap is measured. We share ``u`` across axes (no anisotropic
    distortion of the already anisotropic-aware plans spacing) and measure overlap against the larger box.
    Within one region of ``ceil(hi · P)`` voxels the overlap never falls below ~38 % (``((2·lo − hi)/lo)³``):
    ``min_overlap`` would not bind, and where the case is smaller than the patch both views would see it at
    nearly the same place, letting the features learn their position in the view. A single cube admitting pairs
    down to 10 % would need ~``(2 − min_overlap^(1/3))·hi·P`` ≈ 2.15·P per axis (3.6× the voxels read and sent
    to the device of one ``ceil(hi·P)`` region; 3.5× its CPU read time at a 128³ patch, ``BENCHMARKS.md``), and
    still not hold pairs displaced mostly along one axis. Two regions of ``ceil(hi·P)`` at an offset drawn by the
    loader (:func:`draw_pair_offsets`) cost 2× (2.1× measured), reach up to ~1.2·P apart along one axis, and
    place a small case differently in the two views, so the pretraining loader reads two. Their overlaps then
    follow two random crops of a large case under the ``min_overlap`` constraint (mean ≈ 25 % for the defaults).
    """
    if region.ndim != 5:
        raise ValueError(f"region must be (B, C, Z, Y, X); got shape {tuple(region.shape)}. Add the batch and "
                         "channel axes, e.g. region[None, None] for a single (Z, Y, X) volume")
    ps = check_patch_size(patch_size)
    lo_u, hi_u = _check_draw_args(scale_range, min_overlap, flip_prob)

    b = region.shape[0]
    dev = region.device
    odev = region_offset.device if region_offset is not None else dev   # offsets stay where given until checked
    offset, offset_b = _pair_offsets(b, region, region_offset, region_b, region_offset_b)

    need = [math.ceil(hi_u * p - 1e-9) for p in ps]
    short = [max(0, n - r) for n, r in zip(need, region.shape[2:])]
    if any(short):
        if not pad:
            raise ValueError(f"region of spatial shape {tuple(region.shape[2:])} is smaller than the largest crop "
                             f"{tuple(need)} (= ceil({hi_u} x patch {ps})). Load a larger region, lower "
                             "scale_range[1], or pass pad=True")
        before = [s // 2 for s in short]
        pads: list[int] = []
        for s, bf in zip(reversed(short), reversed(before)):  # F.pad wants the last axis first
            pads += [bf, s - bf]
        region = F.pad(region, pads, mode="constant", value=pad_value)
        if region_b is not None:
            region_b = F.pad(region_b, pads, mode="constant", value=pad_value)
        shift_pad = torch.tensor(before, dtype=torch.long, device=odev)
        offset, offset_b = offset - shift_pad, offset_b - shift_pad
    if region_b is not None:
        feasible = pair_offset_feasible(offset_b - offset, region.shape[2:], ps, (lo_u, hi_u), min_overlap)
        if not bool(feasible.all()):
            items = torch.nonzero(~feasible).flatten().tolist()
            raise ValueError(f"the two regions of batch items {items} are too far apart (offsets "
                             f"{(offset_b - offset)[~feasible].tolist()}) for crops of scale {scale_range} to share "
                             f"min_overlap={min_overlap} within regions of {tuple(region.shape[2:])} voxels: draw "
                             "the offsets with pair_offset_feasible / max_pair_offset, or lower min_overlap")
    offset = offset.to(device=dev, non_blocking=True)
    offset_b = offset_b.to(device=dev, non_blocking=True)
    rsize = torch.tensor([float(s) for s in region.shape[2:]], device=dev)
    shift = (offset_b - offset).to(rsize.dtype)                       # (B, 3) region b's voxel 0 in a's frame

    gdev = generator.device if generator is not None else dev
    p = torch.tensor([float(s) for s in ps], device=dev)
    u = _uniform((b, 2), lo_u, hi_u, generator, gdev).to(dev)
    size_a, size_b = u[:, :1] * p, u[:, 1:] * p                       # (B, 3) crop extents, region voxels
    lo_a = -0.5 + torch.rand((b, 3), generator=generator, device=gdev).to(dev) * (rsize - size_a)

    lo_a, lo_b = _place_second_box(lo_a, size_a, size_b, shift, rsize, min_overlap, generator, gdev)

    flips = torch.rand((b, 2, 3), generator=generator, device=gdev).to(dev) < flip_prob
    prior_a = ViewPrior.from_crop(lo_a, size_a, ps, flips[:, 0], offset)
    prior_b = ViewPrior.from_crop(lo_b - shift, size_b, ps, flips[:, 1], offset_b)
    view_b = sample_view(region if region_b is None else region_b, prior_b)
    return sample_view(region, prior_a), view_b, prior_a, prior_b
