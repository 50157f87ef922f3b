"""Pictures of a pretraining run: ``progress.png`` (:func:`plot_pgl_progress`: losses, schedules, speed, overlap and
the probe per epoch), and what it learned: a fixed region, its two views with their overlap, and a PCA-RGB
projection of each loss level's features, as mid-slices (written by the pretrainer every few epochs).

Aligned regions that look alike in both views' PCA colours are what the local consistency loss asks for; a map of
one flat colour means collapsed features.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from nnunet_pgl import PGLBranch, ViewPrior, make_view_pair
from nnunet_pgl.pretraining.atomic import save_figure
from nnunet_pgl.prior import box_bounds


def pca_rgb(feats: torch.Tensor) -> np.ndarray:
    """``(N, C, Y, X)`` features (any device) → ``(N, Y, X, 3)`` in [0, 1]: the first 3 principal components,
    fitted jointly. Computed on the host in float64 (one copy of the slice; MPS has no float64)."""
    n, c, y, x = feats.shape
    flat = feats.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, c)
    flat = flat - flat.mean(0, keepdim=True)
    k = min(3, c, flat.shape[0])
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ v[:k].T
    if k < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - k)], 1)
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return proj.reshape(n, y, x, 3).float().numpy()


def _box_in_view(prior_from: ViewPrior, prior_to: ViewPrior) -> np.ndarray:
    """Bounding box ``(2, 3)`` of view ``prior_from``'s extent in the view coordinates of ``prior_to``."""
    m = prior_from.relative_to(prior_to)
    lo, hi = box_bounds(m, [-0.5] * 3, [p - 0.5 for p in prior_from.patch_size])
    return torch.stack([lo[0], hi[0]]).cpu().numpy()


@torch.no_grad()
def feature_picture(branch: PGLBranch, region: torch.Tensor, patch_size: Sequence[int], levels: List[int],
                    path: str, title: str, seed: int = 0) -> None:
    """Write the picture for ``region`` ``(1, C, *R)`` (on the branch's device) to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    gen = torch.Generator(device=region.device).manual_seed(seed)
    va, vb, pa, pb = make_view_pair(region, patch_size, generator=gen, flip_prob=0.0)
    was_training = branch.training
    branch.eval()
    feats = dict(zip(branch.features.levels, branch.features(torch.cat([va, vb]))))
    branch.train(was_training)
    zr, zp = region.shape[2] // 2, patch_size[0] // 2
    cols = 3
    rows = 1 + len(levels)
    fig, ax = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows))
    ax = np.atleast_2d(ax)
    ax[0, 0].imshow(region[0, 0, zr].float().cpu().numpy(), cmap="gray")
    for p, col in ((pa, "r"), (pb, "c")):
        lo, hi = (b[0].cpu().numpy() for b in p.footprint())
        ax[0, 0].add_patch(Rectangle((lo[2], lo[1]), hi[2] - lo[2], hi[1] - lo[1], fill=False, ec=col, lw=1.5))
    ax[0, 0].set_title("region (mid z), view a red, b cyan")
    for j, (v, p, q, name) in enumerate(((va, pa, pb, "a"), (vb, pb, pa, "b"))):
        ax[0, 1 + j].imshow(v[0, 0, zp].float().cpu().numpy(), cmap="gray")
        box = _box_in_view(q, p)
        ax[0, 1 + j].add_patch(Rectangle((box[0, 2], box[0, 1]), box[1, 2] - box[0, 2], box[1, 1] - box[0, 1],
                                         fill=False, ec="y", lw=1.5))
        ax[0, 1 + j].set_title(f"view {name} (mid z), overlap in yellow")
    for i, lv in enumerate(levels):
        f = feats[lv].float()
        z = f.shape[2] // 2
        rgb = pca_rgb(f[:, :, z])
        for j, name in enumerate("ab"):
            ax[1 + i, j].imshow(rgb[j], interpolation="nearest")
            ax[1 + i, j].set_title(f"level {lv} {tuple(f.shape[2:])}: view {name}, PCA-RGB")
        ax[1 + i, 2].axis("off")
    for a in ax.ravel():
        a.set_xticks([]), a.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def _plot_probe(ax: Any, probed: List[Dict[str, Any]], init: Optional[Dict[str, Any]]) -> None:
    """Probe panel: mean foreground F1 per level and for all levels against epoch, the random-initialised network
    at epoch -1 (and dotted across, for all levels)."""
    runs = ([init] if init is not None else []) + [r["probe"] for r in probed]
    ep = ([-1] if init is not None else []) + [r["epoch"] for r in probed]

    def val(v: Optional[float]) -> float:
        return np.nan if v is None else v

    for i, lvl in enumerate(probed[-1]["probe"]["levels"]):
        ax.plot(ep, [val(p["levels"].get(lvl)) for p in runs], "o--", color=f"C{i}", label=f"level {lvl}")
    ax.plot(ep, [val(p["all"]) for p in runs], "ko-", label="all levels")
    if init is not None and init.get("all") is not None:
        ax.axhline(init["all"], color="k", linestyle=":", label="all levels, random init")
    ax.set_ylabel("probe: mean foreground F1"), ax.set_xlabel("epoch (-1: random init)"), ax.legend()


def plot_pgl_progress(log: List[Dict[str, Any]], path: str) -> None:
    """``progress.png``: total/per-level loss, lr and τ, epoch time and data-wait fraction, views/s and the mean
    view overlap, and the dense linear probe (when it ran) against the random-init score."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    if not log:
        return
    ep = [r["epoch"] for r in log]
    probed = [r for r in log if r.get("probe")]
    fig, ax = plt.subplots(5 if probed else 4, 1, figsize=(10, 17.5 if probed else 14))
    ax[0].plot(ep, [np.nan if r["loss"] is None else r["loss"] for r in log], "b-", label="total")
    for i, lvl in enumerate(log[-1]["levels"]):
        ax[0].plot(ep, [r["level_losses"][i] if r["level_losses"] and i < len(r["level_losses"]) else np.nan
                        for r in log], "--", label=f"level {lvl}")
    if log[-1].get("global_loss") is not None:
        ax[0].plot(ep, [np.nan if r.get("global_loss") is None else r["global_loss"] for r in log], ":",
                   label="global (BYOL)")
    ax[0].set_ylabel("loss"), ax[0].legend()
    ax[1].plot(ep, [r["lr"] for r in log], "g-", label="learning rate")
    ax[1].set_ylabel("learning rate")
    ax1b = ax[1].twinx()
    ax1b.plot(ep, [r["tau"] for r in log], "r-", label="tau")
    ax1b.set_ylabel("EMA tau")
    ax[2].plot(ep, [r["epoch_time_s"] for r in log], "k-")
    ax[2].set_ylabel("epoch time [s]")
    ax2b = ax[2].twinx()
    ax2b.plot(ep, [100 * r["data_wait_fraction"] for r in log], "m-")
    ax2b.set_ylabel("data wait [%]")
    ax[3].plot(ep, [r["views_per_s"] for r in log], "c-")
    ax[3].set_ylabel("views / s"), ax[3].set_xlabel("epoch")
    ax3b = ax[3].twinx()
    ax3b.plot(ep, [np.nan if r.get("mean_overlap") is None else 100 * r["mean_overlap"] for r in log], "y-")
    ax3b.set_ylabel("mean view overlap [%]")
    if probed:
        _plot_probe(ax[4], probed, next((r["probe_random_init"] for r in log if r.get("probe_random_init")), None))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
