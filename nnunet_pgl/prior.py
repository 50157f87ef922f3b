"""The view prior: where a network input patch (a *view*) lies in the region it was drawn from.

Coordinate frames (used throughout ``nnunet_pgl``):

* Arrays follow nnU-Net's preprocessed layout ``(C, Z, Y, X)``; batches are ``(B, C, Z, Y, X)``. Coordinates
  are ordered like the tensor axes: ``(z, y, x)``.
* A *voxel coordinate* is the position of a voxel's centre: voxel index ``k`` has coordinate ``k``; a voxel
  covers ``[k - 0.5, k + 0.5)``. An array of length ``N`` therefore spans ``[-0.5, N - 0.5]``.
* *View voxel coordinates* are voxel coordinates in the network input patch (``patch_size`` voxels per axis).
* *Region voxel coordinates* are voxel coordinates in the region tensor the CPU loader cropped from the case.
* *Case voxel coordinates* = region voxel coordinates + ``region_offset`` (the index of the region's first voxel
  in the preprocessed case; negative where the region was padded beyond the case).

A :class:`ViewPrior` holds, per batch item, the homogeneous affine ``to_region`` (``(B, 4, 4)``) that maps view
voxel coordinates to region voxel coordinates: ``[z_r, y_r, x_r, 1]^T = to_region @ [z_v, y_v, x_v, 1]^T``.
Crop, resize and flips are special cases; any affine (rotation, transpose) fits the same formulation.

*Note* (paper vs ours): the paper keeps "the spatial transformations as a prior" without saying how; this
project stores it as one affine per view so that composition and inversion are matrix products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

Triple = Tuple[int, int, int]
TensorLike = Union[torch.Tensor, Sequence[float], Sequence[Sequence[float]]]


def _as_batched(x: TensorLike, batch: Optional[int], device: Optional[torch.device],
                dtype: torch.dtype, name: str) -> torch.Tensor:
    """Turn ``x`` into a ``(B, 3)`` tensor; a single triple is broadcast to ``batch`` items."""
    t = torch.as_tensor(x, dtype=dtype, device=device)
    if t.ndim == 1:
        if t.shape[0] != 3:
            raise ValueError(f"{name} must have 3 entries (z, y, x) or shape (B, 3); got shape {tuple(t.shape)}")
        t = t.unsqueeze(0).expand(batch if batch is not None else 1, 3)
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3) or (3,); got shape {tuple(t.shape)}")
    return t


def check_patch_size(patch_size: Sequence[int]) -> Triple:
    """Validate a 3D patch size and return it as a tuple of 3 positive ints."""
    ps = tuple(int(p) for p in patch_size)
    if len(ps) != 3 or any(p < 1 for p in ps) or any(int(p) != p for p in patch_size):
        raise ValueError(f"patch_size must be 3 positive integers (z, y, x); got {tuple(patch_size)}")
    return (ps[0], ps[1], ps[2])


@dataclass(frozen=True)
class ViewPrior:
    """Per-item affine from view voxel coordinates to region voxel coordinates.

    Attributes:
        to_region: ``(B, 4, 4)`` float tensor; homogeneous affine, view voxel coords (z, y, x) → region voxel
            coords (z, y, x). Its last row is ``[0, 0, 0, 1]``.
        patch_size: the view's spatial size ``(Z, Y, X)`` in voxels (the network input patch).
        region_offset: ``(B, 3)`` int64 tensor; case voxel coordinate of region voxel ``(0, 0, 0)``, so that
            priors of different regions of the same case can be related (``to_case``).
    """

    to_region: torch.Tensor
    patch_size: Triple
    region_offset: torch.Tensor

    def __post_init__(self) -> None:
        m = self.to_region
        if m.ndim != 3 or tuple(m.shape[1:]) != (4, 4):
            raise ValueError(f"to_region must have shape (B, 4, 4); got {tuple(m.shape)}")
        if tuple(self.region_offset.shape) != (m.shape[0], 3):
            raise ValueError(f"region_offset must have shape (B, 3) = ({m.shape[0]}, 3); "
                             f"got {tuple(self.region_offset.shape)}")
        object.__setattr__(self, "patch_size", check_patch_size(self.patch_size))

    # ----------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_crop(cls, crop_start: TensorLike, crop_size: TensorLike, patch_size: Sequence[int],
                  flips: Optional[TensorLike] = None, region_offset: Optional[TensorLike] = None,
                  batch: Optional[int] = None, device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> "ViewPrior":
        """Prior of a view made by cropping a box from the region, resizing it to ``patch_size``, then flipping.

        The box is continuous: it spans region coordinates ``[crop_start, crop_start + crop_size]`` per axis
        (so a box of whole voxels ``k0 .. k0 + n - 1`` has ``crop_start = k0 - 0.5`` and ``crop_size = n``).
        Resizing maps the box onto the view's extent ``[-0.5, P - 0.5]`` (``align_corners=False`` semantics), so
        view voxel ``k`` has region coordinate ``crop_start + (k + 0.5) * crop_size / P``; a flip along an axis
        first maps ``k → P - 1 - k``.

        Args:
            crop_start: ``(B, 3)`` or ``(3,)`` lower edge of the box, region voxel coordinates (z, y, x).
            crop_size: ``(B, 3)`` or ``(3,)`` extent of the box in region voxels (> 0).
            patch_size: the view size ``(Z, Y, X)``.
            flips: ``(B, 3)`` or ``(3,)`` bool, which view axes are flipped. Default: none.
            region_offset: ``(B, 3)`` or ``(3,)`` case coordinate of region voxel 0. Default: zeros.
            batch: batch size when all per-item arguments are single triples.
            device, dtype: of the resulting matrices (default: device of ``crop_start``, float32).
        """
        ps = check_patch_size(patch_size)
        if device is None and isinstance(crop_start, torch.Tensor):
            device = crop_start.device
        start = _as_batched(crop_start, batch, device, dtype, "crop_start")
        b = start.shape[0]
        size = _as_batched(crop_size, b, device, dtype, "crop_size")
        if size.shape[0] != b:
            raise ValueError(f"crop_size has {size.shape[0]} items, crop_start has {b}")
        if bool((size <= 0).any()):
            raise ValueError(f"crop_size must be positive; got {size.tolist()}")
        flip = (torch.zeros(b, 3, dtype=torch.bool, device=device) if flips is None
                else _as_batched(flips, b, device, torch.bool, "flips"))
        if flip.shape[0] != b:
            raise ValueError(f"flips has {flip.shape[0]} items, crop_start has {b}")
        offset = (torch.zeros(b, 3, dtype=torch.long, device=device) if region_offset is None
                  else _as_batched(region_offset, b, device, torch.long, "region_offset"))
        p = torch.tensor(ps, dtype=dtype, device=device)
        scale = size / p                                          # region voxels per view voxel
        # unflipped: r = start + (k + 0.5) * scale ; flipped: r = start + (P - 1 - k + 0.5) * scale
        diag = torch.where(flip, -scale, scale)
        trans = torch.where(flip, start + (p - 0.5) * scale, start + 0.5 * scale)
        m = torch.zeros(b, 4, 4, dtype=dtype, device=device)
        m[:, [0, 1, 2], [0, 1, 2]] = diag
        m[:, :3, 3] = trans
        m[:, 3, 3] = 1.0
        return cls(m, ps, offset)

    @classmethod
    def identity(cls, patch_size: Sequence[int], batch: int = 1, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32) -> "ViewPrior":
        """The view *is* the region (no crop, no resize, no flip)."""
        eye = torch.eye(4, dtype=dtype, device=device).expand(batch, 4, 4).clone()
        return cls(eye, check_patch_size(patch_size), torch.zeros(batch, 3, dtype=torch.long, device=device))

    # ------------------------------------------------------------------------------------------------ algebra
    @property
    def batch_size(self) -> int:
        return int(self.to_region.shape[0])

    @property
    def to_view(self) -> torch.Tensor:
        """``(B, 4, 4)`` inverse affine: region voxel coordinates → view voxel coordinates."""
        inv: torch.Tensor = torch.linalg.inv(self.to_region)
        return inv

    def then(self, affine: torch.Tensor) -> "ViewPrior":
        """Compose with a further map of region coordinates: new ``to_region = affine @ to_region``.

        ``affine`` is ``(4, 4)`` or ``(B, 4, 4)``; e.g. a translation that re-expresses the region frame.
        """
        a = affine.to(self.to_region)
        if a.ndim == 2:
            a = a.expand_as(self.to_region)
        return ViewPrior(a @ self.to_region, self.patch_size, self.region_offset)

    def after(self, affine: torch.Tensor, patch_size: Optional[Sequence[int]] = None) -> "ViewPrior":
        """Compose with a map applied to the view first: new ``to_region = to_region @ affine``.

        ``affine`` maps the new view's voxel coordinates to this view's voxel coordinates (e.g. a further flip
        or crop of the view); ``patch_size`` is the new view's size (default: unchanged).
        """
        a = affine.to(self.to_region)
        if a.ndim == 2:
            a = a.expand_as(self.to_region)
        return ViewPrior(self.to_region @ a, tuple(patch_size or self.patch_size),  # type: ignore[arg-type]
                         self.region_offset)

    def relative_to(self, other: "ViewPrior") -> torch.Tensor:
        """``(B, 4, 4)`` map from this view's voxel coordinates to ``other``'s view voxel coordinates.

        Both priors must refer to the same case; their regions may differ (the offsets are accounted for).
        """
        shift = torch.eye(4, dtype=self.to_region.dtype, device=self.to_region.device).repeat(self.batch_size, 1, 1)
        shift[:, :3, 3] = (self.region_offset - other.region_offset).to(self.to_region.dtype)
        return other.to_view @ shift @ self.to_region

    def to_case(self) -> torch.Tensor:
        """``(B, 4, 4)`` map from view voxel coordinates to case voxel coordinates."""
        shift = torch.eye(4, dtype=self.to_region.dtype, device=self.to_region.device).repeat(self.batch_size, 1, 1)
        shift[:, :3, 3] = self.region_offset.to(self.to_region.dtype)
        return shift @ self.to_region

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Map view voxel coordinates ``(B, ..., 3)`` (z, y, x) to region voxel coordinates ``(B, ..., 3)``."""
        return transform_points(self.to_region, points)

    def to(self, device: Union[str, torch.device]) -> "ViewPrior":
        return ViewPrior(self.to_region.to(device), self.patch_size, self.region_offset.to(device))

    def __getitem__(self, idx: Union[int, slice, torch.Tensor]) -> "ViewPrior":
        if isinstance(idx, int):  # keep the batch axis; negative indices count from the end, as for tensors
            n = self.batch_size
            if not -n <= idx < n:
                raise IndexError(f"batch index {idx} out of range for a prior of {n} items")
            idx = slice(idx % n, idx % n + 1)
        return ViewPrior(self.to_region[idx], self.patch_size, self.region_offset[idx])

    @staticmethod
    def cat(priors: Sequence["ViewPrior"]) -> "ViewPrior":
        """Concatenate priors of views with the same patch size along the batch axis."""
        sizes = {p.patch_size for p in priors}
        if len(sizes) != 1:
            raise ValueError(f"cannot concatenate priors of different patch sizes {sorted(sizes)}")
        return ViewPrior(torch.cat([p.to_region for p in priors]), priors[0].patch_size,
                         torch.cat([p.region_offset for p in priors]))

    def footprint(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Axis-aligned bounding box of the view's extent in region coordinates: ``(lo, hi)``, each ``(B, 3)``.

        The view's extent is ``[-0.5, P - 0.5]`` per axis in view coordinates (its 8 corners are mapped).
        """
        return box_bounds(self.to_region, [-0.5] * 3, [p - 0.5 for p in self.patch_size])


def transform_points(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``(B, 4, 4)`` homogeneous affines to points ``(B, ..., 3)``; returns ``(B, ..., 3)``."""
    b = points.shape[0]
    flat = points.reshape(b, -1, 3)
    out = flat @ affine[:, :3, :3].transpose(1, 2).to(flat) + affine[:, None, :3, 3].to(flat)
    return out.reshape(points.shape)


def box_bounds(affine: torch.Tensor, lo: Sequence[float], hi: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bounding box ``(lo, hi)`` (each ``(B, 3)``) of the image of the box ``[lo, hi]`` under ``affine``."""
    corners = torch.tensor([[lo[0] if i & 4 == 0 else hi[0], lo[1] if i & 2 == 0 else hi[1],
                             lo[2] if i & 1 == 0 else hi[2]] for i in range(8)],
                           dtype=affine.dtype, device=affine.device)
    mapped = transform_points(affine, corners.expand(affine.shape[0], 8, 3))
    return mapped.amin(dim=1), mapped.amax(dim=1)
