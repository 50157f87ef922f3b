"""Pictures of what pretraining learned: a fixed region, its two views with their overlap, and a PCA-RGB projection
of each loss level's features, as mid-slices (written by the pretrainer every few epochs).

Aligned regions that look alike in both views' PCA colours are what the local consistency loss asks for; a map of
one flat colour means collapsed features.
"""
from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np
import torch

from nnunet_pgl import ViewPrior, make_view_pair
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
def feature_picture(branch: torch.nn.Module, region: torch.Tensor, patch_size: Sequence[int], levels: List[int],
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
        lo, hi = p.footprint()
        lo, hi = lo[0].cpu().numpy(), hi[0].cpu().numpy()
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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
