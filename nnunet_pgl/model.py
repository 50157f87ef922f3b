"""Online and target branches of PGL: U-Net features → prior-guided alignment → projector (→ predictor).

One branch is an ``nn.Module`` whose forward takes the two views *as one batch* (``(2B, C, *patch)``: view a
items first, then view b) together with their priors, so that a single forward/backward of the U-Net serves both
views and DDP or ``torch.compile`` can wrap the whole feature path.

*Note* (paper vs ours): heads are built eagerly from the network's channel counts (never lazily) and applied
*after* alignment, pointwise on the aligned maps (a 1×1×1 MLP), so they only see points of the overlap.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .alignment import align_features
from .features import UNetFeatures
from .geometry import LevelGeometry, level_geometry
from .losses import global_consistency_loss, global_pool, local_consistency_loss, mean_over_levels
from .prior import ViewPrior

METHODS = ("pgl", "byol", "pgl+byol")


class MLPHead(nn.Module):
    """Pointwise MLP over the channel axis of ``(B, C, ...)``: Linear → LayerNorm → ReLU → Linear.

    *Note* (ours): LayerNorm instead of BYOL's BatchNorm, because batches of 3D patches are tiny (2 per GPU in
    nnU-Net's plans) and masked points must not influence the statistics of valid ones.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.net(x.movedim(1, -1))
        return y.movedim(-1, 1)


@dataclass
class BranchOutput:
    """What one branch produces for a pair of views.

    Attributes:
        local: per loss level, ``(a, b)`` head outputs ``(B, D, *out)`` at the same region points.
        valid: per loss level, ``(B, 1, *out)`` bool mask of points valid in both views.
        global_: ``(a, b)`` pooled bottleneck head outputs ``(B, D)``, or None without the global term.
    """

    local: List[Tuple[torch.Tensor, torch.Tensor]]
    valid: List[torch.Tensor]
    global_: Optional[Tuple[torch.Tensor, torch.Tensor]]


class PGLBranch(nn.Module):
    """U-Net features at the loss levels, aligned, then projected (and predicted on the online branch).

    Args:
        network: the U-Net (``PlainConvUNet`` / ``ResidualEncoderUNet``; wrappers are stripped).
        levels: loss levels (see :mod:`nnunet_pgl.features`).
        method: ``'pgl'`` (local loss), ``'byol'`` (global loss on the pooled bottleneck) or ``'pgl+byol'``.
        proj_dim, hidden_dim: head widths. Per-level hidden width is ``min(hidden_dim, 4·C_level)`` (≥ proj_dim).
        predictor: build predictor heads (online branch); the target branch uses projections only.
        geometry: per level 0 … n − 1, where its feature voxels sit in the view (the alignment's geometry).
            Default: :func:`~nnunet_pgl.geometry.level_geometry` of ``network``, measured once here (exact for
            ``PlainConvUNet``'s bottleneck; the midpoint of the two paths for its decoder levels and for
            ``ResidualEncoderUNet``; see :mod:`nnunet_pgl.alignment`). Pass
            ``[avg_pool_geometry(s) for s in level_strides(network)]`` for the average-pooling convention.

    Attributes:
        geometry: the list of :class:`~nnunet_pgl.geometry.LevelGeometry` the alignment uses.
    """

    def __init__(self, network: nn.Module, levels: Sequence[int], method: str = "pgl", proj_dim: int = 128,
                 hidden_dim: int = 512, predictor: bool = True,
                 geometry: Optional[Sequence[LevelGeometry]] = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        self.method = method
        self.features = UNetFeatures(network, levels)
        strides = self.features.strides
        self.geometry: List[LevelGeometry] = (level_geometry(self.features.network) if geometry is None
                                              else list(geometry))
        if len(self.geometry) != len(strides) or any(
                not isinstance(g, LevelGeometry) or g.stride != tuple(float(x) for x in s)
                for g, s in zip(self.geometry, strides)):
            raise ValueError(f"geometry must hold one LevelGeometry per level with the network's strides {strides}; "
                             f"got {self.geometry}")
        self.use_local = method in ("pgl", "pgl+byol")
        self.use_global = method in ("byol", "pgl+byol")
        bottleneck = len(self.features.strides) - 1
        self.loss_levels: List[int] = list(self.features.levels) if self.use_local else []
        self.features.levels = sorted(set(self.loss_levels) | ({bottleneck} if self.use_global else set()))
        ch = self.features.channels

        def hid(c: int) -> int:
            return max(proj_dim, min(hidden_dim, 4 * c))

        self.projectors = nn.ModuleList([MLPHead(ch[lv], hid(ch[lv]), proj_dim) for lv in self.loss_levels])
        self.predictors = nn.ModuleList([MLPHead(proj_dim, hid(ch[lv]), proj_dim) for lv in self.loss_levels]
                                        if predictor else [])
        cb = ch[bottleneck]
        self.global_projector = MLPHead(cb, hid(cb), proj_dim) if self.use_global else None
        self.global_predictor = (MLPHead(proj_dim, hid(cb), proj_dim)
                                 if self.use_global and predictor else None)
        self._bottleneck = bottleneck

    @property
    def network(self) -> nn.Module:
        return self.features.network

    def forward(self, views: torch.Tensor, prior_a: ViewPrior, prior_b: ViewPrior,
                use_predictor: bool = True) -> BranchOutput:
        """``views`` ``(2B, C, *patch)`` = ``cat([view_a, view_b])``; priors of ``B`` items each."""
        b = prior_a.batch_size
        if views.shape[0] != 2 * b:
            raise ValueError(f"views must hold view a then view b, 2·B = {2 * b} items; got {views.shape[0]}")
        feats = dict(zip(self.features.levels, self.features(views)))
        local: List[Tuple[torch.Tensor, torch.Tensor]] = []
        valid: List[torch.Tensor] = []
        for i, lv in enumerate(self.loss_levels):
            f = feats[lv]
            a, bb, v = align_features(f[:b], prior_a, f[b:], prior_b, geometry=self.geometry[lv], strict=False)
            pa, pb = self.projectors[i](a), self.projectors[i](bb)
            if use_predictor and len(self.predictors):
                pa, pb = self.predictors[i](pa), self.predictors[i](pb)
            local.append((pa, pb))
            valid.append(v)
        glob = None
        if self.global_projector is not None:
            g = global_pool(feats[self._bottleneck])
            g = self.global_projector(g)
            if use_predictor and self.global_predictor is not None:
                g = self.global_predictor(g)
            glob = (g[:b], g[b:])
        return BranchOutput(local, valid, glob)


def make_target(online: PGLBranch) -> PGLBranch:
    """A frozen deep copy of the online branch (the EMA target); update it with :func:`~nnunet_pgl.ema.ema_update_`."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def pgl_loss(online: BranchOutput, target: BranchOutput, global_weight: float = 1.0,
             ) -> Tuple[torch.Tensor, List[torch.Tensor], Optional[torch.Tensor]]:
    """Total loss, per-level local losses and the global loss (None if unused) of one step.

    Local: :func:`~nnunet_pgl.losses.local_consistency_loss` per level, averaged over levels. Global:
    :func:`~nnunet_pgl.losses.global_consistency_loss`, weighted by ``global_weight`` and added.
    """
    per_level = [local_consistency_loss(pa, za, pb, zb, v)
                 for (pa, pb), (za, zb), v in zip(online.local, target.local, online.valid)]
    total = mean_over_levels(per_level) if per_level else None
    glob = None
    if online.global_ is not None and target.global_ is not None:
        glob = global_consistency_loss(online.global_[0], target.global_[0], online.global_[1], target.global_[1])
        total = glob * global_weight if total is None else total + global_weight * glob
    if total is None:
        raise ValueError("nothing to optimise: the branches produced neither local nor global outputs")
    return total, per_level, glob
