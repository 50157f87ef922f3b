"""nnunet_pgl: PGL (Prior-Guided Local self-supervised learning) for nnU-Net v2.

This package (``nnunet_pgl`` proper) is the method as pure tensor code: it imports torch and numpy only, never
nnunetv2. The nnU-Net glue lives in ``nnunet_pgl.pretraining`` and ``nnunet_pgl.trainers``.

Data's way: region → :func:`make_view_pair` (views + :class:`ViewPrior`) → :class:`IntensityAugmentation` →
:func:`extract_features` → :func:`align_features` (at the network's :func:`level_geometry`) → heads →
:func:`local_consistency_loss`; the target branch is an EMA copy (:func:`ema_update_`, :func:`tau_schedule`).
"""
from .alignment import align_features, feature_stride, overlap_points
from .ema import cosine_schedule, ema_update_, rewarm, rewarm_steps, tau_schedule, warmup_cosine_lr
from .features import (UNetFeatures, default_levels, extract_features, level_channels, level_strides,
                       unwrap_network)
from .geometry import LevelGeometry, avg_pool_geometry, level_geometry
from .intensity import IntensityAugmentation, apply_gamma, gaussian_blur
from .losses import (global_consistency_loss, global_pool, local_consistency_loss, masked_mean, mean_over_levels,
                     normalized_mse)
from .model import METHODS, BranchOutput, MLPHead, PGLBranch, make_target, pgl_loss
from .prior import ViewPrior
from .views import (draw_pair_offsets, make_view_pair, overlap_fraction, pair_offset_feasible, pair_overlap,
                    sample_view, voxel_grid)

__version__ = "0.1.0"

__all__ = [
    "ViewPrior", "make_view_pair", "sample_view", "overlap_fraction", "voxel_grid", "pair_overlap",
    "draw_pair_offsets", "pair_offset_feasible",
    "IntensityAugmentation", "gaussian_blur", "apply_gamma",
    "align_features", "overlap_points", "feature_stride", "LevelGeometry", "level_geometry", "avg_pool_geometry",
    "normalized_mse", "masked_mean", "local_consistency_loss", "mean_over_levels", "global_consistency_loss",
    "global_pool",
    "ema_update_", "tau_schedule", "cosine_schedule", "warmup_cosine_lr", "rewarm", "rewarm_steps",
    "extract_features", "UNetFeatures", "level_strides", "level_channels", "default_levels", "unwrap_network",
    "MLPHead", "PGLBranch", "BranchOutput", "make_target", "pgl_loss", "METHODS",
    "__version__",
]
