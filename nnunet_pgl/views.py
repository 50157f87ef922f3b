"""Two spatially augmented views of a region, made on the region's device, with their priors.

The data's way: the CPU loader crops a *region* from a case; :func:`make_view_pair` draws two crop boxes in it,
resizes each to the network patch by trilinear sampling, flips axes, and returns the views together with their
:class:`~nnunet_pgl.prior.ViewPrior` (view voxel → region voxel affines). Everything is batched tensor code: one
``grid_sample`` per view, no Python loop over voxels or batch items.

Coordinate frames are those of :mod:`nnunet_pgl.prior`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .prior import ViewPrior, check_patch_size, transform_points

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


def _uniform(shape: Tuple[int, ...], lo: torch.Tensor | float, hi: torch.Tensor | float,
             generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    r = torch.rand(shape, generator=generator, device=device)
    return lo + r * (hi - lo)


def make_view_pair(region: torch.Tensor, patch_size: Sequence[int], *,
                   scale_range: Tuple[float, float] = (1.1, 1.4), min_overlap: float = 0.1,
                   flip_prob: float = 0.5, generator: Optional[torch.Generator] = None,
                   region_offset: Optional[torch.Tensor] = None, pad: bool = True, pad_value: float = 0.0,
                   ) -> Tuple[torch.Tensor, torch.Tensor, ViewPrior, ViewPrior]:
    """Draw two overlapping crops of ``region``, resize each to ``patch_size``, flip; return views and priors.

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

    Returns:
        ``(view_a, view_b, prior_a, prior_b)``: views ``(B, C, *patch_size)`` with the region's dtype and device;
        priors map view voxel coordinates to coordinates of the (padded) region.

    Crops lie inside the region's extent ``[-0.5, N - 0.5]`` per axis. The first box is placed uniformly; the
    second is drawn uniformly among placements that touch the first, rejection-sampled against ``min_overlap``
    (a fixed number of rounds, no host synchronisation); items still unplaced get the second box centred on the
    first and clamped into the region, which always meets ``min_overlap`` under the constraint above.

    *Note* (paper vs ours): the paper draws ``u ∈ [1.1, 1.4]`` per view and requires ≥ 10 % overlap; it does not
    say whether ``u`` is per axis nor how the overlap is measured. We share ``u`` across axes (no anisotropic
    distortion of the already anisotropic-aware plans spacing) and measure overlap against the larger box.
    """
    if region.ndim != 5:
        raise ValueError(f"region must be (B, C, Z, Y, X); got shape {tuple(region.shape)}. Add the batch and "
                         "channel axes, e.g. region[None, None] for a single (Z, Y, X) volume")
    ps = check_patch_size(patch_size)
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

    b = region.shape[0]
    dev = region.device
    offset = (torch.zeros(b, 3, dtype=torch.long, device=dev) if region_offset is None
              else region_offset.to(device=dev, dtype=torch.long))
    if tuple(offset.shape) != (b, 3):
        raise ValueError(f"region_offset must be (B, 3) = ({b}, 3); got {tuple(offset.shape)}")

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
        offset = offset - torch.tensor(before, dtype=torch.long, device=dev)
    rsize = torch.tensor([float(s) for s in region.shape[2:]], device=dev)

    gdev = generator.device if generator is not None else dev
    p = torch.tensor([float(s) for s in ps], device=dev)
    u = _uniform((b, 2), lo_u, hi_u, generator, gdev).to(dev)
    size_a, size_b = u[:, :1] * p, u[:, 1:] * p                       # (B, 3) crop extents, region voxels
    lo_a = -0.5 + torch.rand((b, 3), generator=generator, device=gdev).to(dev) * (rsize - size_a)

    # second box: uniform among placements that touch the first box, then rejection against min_overlap
    win_lo = torch.maximum(torch.full_like(lo_a, -0.5), lo_a - size_b)
    win_hi = torch.minimum(rsize - 0.5 - size_b, lo_a + size_a)
    lo_b = torch.zeros_like(lo_a)
    placed = torch.zeros(b, dtype=torch.bool, device=dev)
    for _ in range(_OVERLAP_ROUNDS):
        cand = win_lo + torch.rand((b, 3), generator=generator, device=gdev).to(dev) * (win_hi - win_lo)
        ok = (overlap_fraction(lo_a, size_a, cand, size_b) >= min_overlap) & ~placed
        lo_b = torch.where(ok[:, None], cand, lo_b)
        placed = placed | ok
    centred = (lo_a + 0.5 * size_a - 0.5 * size_b).clamp(min=-0.5)
    centred = torch.minimum(centred, rsize - 0.5 - size_b)
    lo_b = torch.where(placed[:, None], lo_b, centred)

    flips = torch.rand((b, 2, 3), generator=generator, device=gdev).to(dev) < flip_prob
    prior_a = ViewPrior.from_crop(lo_a, size_a, ps, flips[:, 0], offset)
    prior_b = ViewPrior.from_crop(lo_b, size_b, ps, flips[:, 1], offset)
    return sample_view(region, prior_a), sample_view(region, prior_b), prior_a, prior_b
