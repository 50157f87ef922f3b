"""Consistency losses of PGL (local, voxel-wise) and of the BYOL baseline (global), as pure functions.

All losses are the normalised MSE of BYOL: for unit vectors, ``‖p̂ − ẑ‖² = 2 − 2·cos(p, z)``. The online side
provides predictions ``p`` (projector → predictor), the target side projections ``z`` (EMA projector), which are
detached here so that gradients reach the online branch only.

*Note* (paper vs ours): the paper minimises "the voxel-wise discrepancy" (MSE) of aligned features; we take the
normalised MSE on predictor/projector outputs as BYOL does, symmetrised over the two views.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def normalized_mse(p: torch.Tensor, z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``2 − 2·cos(p, z)`` along ``dim`` (channels); ``z`` is detached. Shapes ``(B, C, ...)`` → ``(B, ...)``."""
    return 2.0 - 2.0 * F.cosine_similarity(p.float(), z.detach().float(), dim=dim, eps=1e-6)


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` ``(B, ...)`` over the True entries of ``mask`` (broadcastable bool); 0 if none.

    Masked entries contribute nothing, not even NaN/Inf (they are replaced, not multiplied).
    """
    if mask is None:
        return values.mean()
    m = mask.expand_as(values) if mask.shape != values.shape else mask
    total = torch.where(m, values, torch.zeros_like(values)).sum()
    return total / m.sum().clamp_min(1).to(values.dtype)


def local_consistency_loss(p_a: torch.Tensor, z_a: torch.Tensor, p_b: torch.Tensor, z_b: torch.Tensor,
                           valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric voxel-wise PGL loss of one level on aligned maps.

    Args:
        p_a, p_b: ``(B, D, *out)`` online predictions for views a and b, aligned to the same region points.
        z_a, z_b: ``(B, D, *out)`` target projections for views a and b at the same points (detached here).
        valid: ``(B, 1, *out)`` bool mask from :func:`~nnunet_pgl.alignment.align_features`; None = all valid.

    Returns:
        Scalar ``½·(mean_valid[2 − 2cos(p_a, z_b)] + mean_valid[2 − 2cos(p_b, z_a)])``; in ``[0, 4]``.
    """
    mask = None if valid is None else valid[:, 0]
    return 0.5 * (masked_mean(normalized_mse(p_a, z_b), mask) + masked_mean(normalized_mse(p_b, z_a), mask))


def mean_over_levels(losses: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """(Weighted) mean of per-level scalar losses; equal weights by default."""
    if len(losses) == 0:
        raise ValueError("no loss levels given: configure at least one feature level")
    w = [1.0] * len(losses) if weights is None else list(weights)
    if len(w) != len(losses):
        raise ValueError(f"{len(w)} weights for {len(losses)} levels")
    return sum(wi * li for wi, li in zip(w, losses)) / float(sum(w))  # type: ignore[return-value]


def global_consistency_loss(p_a: torch.Tensor, z_a: torch.Tensor, p_b: torch.Tensor,
                            z_b: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss on pooled vectors ``(B, D)``: ``½·(mean[2 − 2cos(p_a, z_b)] + mean[2 − 2cos(p_b, z_a)])``."""
    for name, t in (("p_a", p_a), ("z_a", z_a), ("p_b", p_b), ("z_b", z_b)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be pooled (B, D); got shape {tuple(t.shape)}. Pool the bottleneck first "
                             "(global_pool)")
    return 0.5 * (normalized_mse(p_a, z_b).mean() + normalized_mse(p_b, z_a).mean())


def global_pool(feat: torch.Tensor) -> torch.Tensor:
    """Global average pool ``(B, C, *S)`` → ``(B, C)`` (the BYOL baseline's representation)."""
    return feat.flatten(2).mean(dim=2)
