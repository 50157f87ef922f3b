"""Dense linear probe: features read at sampled voxels, a multinomial logistic regression, per-class F1 (Dice).

The probe answers "do these frozen features already separate the classes?" without fine-tuning. For a crop with
a voxel-wise label map it samples voxels per class (:func:`sample_voxels`), reads each level's feature map at those
voxels (:func:`features_at`), fits a linear classifier on the samples of some crops (:func:`fit_linear_probe`) and
scores it on the samples of other crops (:func:`f1_scores`).

Coordinates are voxel coordinates ``(z, y, x)`` of the crop (the network input). A feature map of spatial size
``S`` for an input of size ``P`` has stride ``s = P / S`` per axis, and its voxel ``i`` sits at input coordinate
``origin + i·s`` (the level's :class:`~nnunet_pgl.geometry.LevelGeometry`, as in the alignment; default: the
average-pooling convention ``origin = (s − 1)/2``).

*Note* (ours): the samples are stratified by class (at most ``num_per_class`` per class and crop) and every sample
carries the weight ``n_c / k_c`` (voxels of its class in the crop over samples drawn of it). Weighted sums over the
samples are then unbiased estimates of the sums over all voxels of the crops, so the fitted probe approximates the
logistic regression on every voxel, and the weighted F1 estimates the Dice of the probe's dense prediction, while
small classes are still represented by up to ``num_per_class`` samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .views import to_grid_sample


def sample_voxels(labels: torch.Tensor, num_per_class: int, generator: Optional[torch.Generator] = None,
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified random voxels of a label map, with weights that make weighted sums estimate sums over all voxels.

    Args:
        labels: ``(Z, Y, X)`` integer class indices; negative values (outside the image, ignore label) are never
            sampled.
        num_per_class: at most this many voxels per class (all of them if the class has fewer).
        generator: CPU generator of the draws (``labels`` may live on any device; the draws are made on the CPU
            so that a seed gives the same voxels on every device).

    Returns:
        ``(points, classes, weights)``: ``points`` ``(P, 3)`` int64 voxel coordinates (z, y, x), ``classes``
        ``(P,)`` int64, ``weights`` ``(P,)`` float32 = (voxels of the class) / (samples of the class), all on
        ``labels``' device. Classes appear in increasing order.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X); got shape {tuple(labels.shape)}")
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be >= 1; got {num_per_class}")
    flat = labels.reshape(-1).cpu()
    idx, cls, wts = [], [], []
    for c in torch.unique(flat[flat >= 0]).tolist():
        where = torch.nonzero(flat == c).flatten()
        n = where.numel()
        k = min(num_per_class, n)
        pick = where[torch.randperm(n, generator=generator)[:k]] if k < n else where
        idx.append(pick)
        cls.append(torch.full((k,), int(c), dtype=torch.long))
        wts.append(torch.full((k,), n / k, dtype=torch.float32))
    if not idx:
        return (torch.zeros(0, 3, dtype=torch.long, device=labels.device),
                torch.zeros(0, dtype=torch.long, device=labels.device),
                torch.zeros(0, dtype=torch.float32, device=labels.device))
    flat_idx = torch.cat(idx)
    z, rest = flat_idx // (labels.shape[1] * labels.shape[2]), flat_idx % (labels.shape[1] * labels.shape[2])
    points = torch.stack([z, rest // labels.shape[2], rest % labels.shape[2]], dim=1)
    return points.to(labels.device), torch.cat(cls).to(labels.device), torch.cat(wts).to(labels.device)


def features_at(feat: torch.Tensor, input_size: Sequence[int], points: torch.Tensor,
                origin: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Trilinear samples of one feature map at input voxels.

    Args:
        feat: ``(C, S_z, S_y, S_x)`` features of one input of spatial size ``input_size`` (stride
            ``s = input_size / S`` per axis, possibly 1).
        input_size: spatial size ``(Z, Y, X)`` of the network input the features were computed from.
        points: ``(P, 3)`` input voxel coordinates (z, y, x), integer or float.
        origin: input coordinate of the centre of feature voxel 0 (the level's
            :class:`~nnunet_pgl.geometry.LevelGeometry` ``origin``); default: the average-pooling convention
            ``(s − 1)/2``.

    Returns:
        ``(P, C)`` float32. Points between feature-voxel centres are interpolated; points beyond the outermost
        centres take the border value. At stride 1 (origin 0) the samples are the feature voxels themselves.
    """
    if feat.ndim != 4 or points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"feat must be (C, Z, Y, X) and points (P, 3); got {tuple(feat.shape)} and "
                         f"{tuple(points.shape)}")
    size = feat.shape[1:]
    stride = torch.tensor([p / s for p, s in zip(input_size, size)], dtype=torch.float32, device=feat.device)
    o = (stride - 1) / 2 if origin is None else torch.tensor([float(x) for x in origin], dtype=torch.float32,
                                                             device=feat.device)
    f = (points.to(device=feat.device, dtype=torch.float32) - o) / stride
    grid = to_grid_sample(f, size).view(1, 1, 1, -1, 3)
    out = F.grid_sample(feat[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(feat.shape[0], -1).t()


@dataclass
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features.

    Attributes:
        mean, std: ``(C,)`` per-feature standardisation (``std`` ≥ 1e-6; a constant feature becomes 0).
        weight: ``(C, K)``; bias: ``(K,)``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` features → ``(N, K)`` float32 logits."""
        return ((x.float() - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` features → ``(N,)`` int64 class indices."""
        return self.logits(x).argmax(dim=1)


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     sample_weight: Optional[torch.Tensor] = None, l2: float = 1e-3, max_iter: int = 100,
                     ) -> LinearProbe:
    """Fit a multinomial logistic regression (softmax classifier) by L-BFGS, in float32 whatever autocast does.

    Minimises ``Σ w_i · CE(x_i, y_i) / Σ w_i + l2/2 · ‖W‖²`` over standardised features (the bias is not
    penalised). Deterministic for a given device.

    Args:
        x: ``(N, C)`` features; y: ``(N,)`` class indices in ``[0, num_classes)``.
        num_classes: ``K``, the number of classes (classes without samples keep a low bias).
        sample_weight: ``(N,)`` non-negative weights (default: all 1).
        l2: weight decay on ``W``.
        max_iter: L-BFGS iterations.

    Returns:
        The :class:`LinearProbe` on ``x``'s device.
    """
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"x must be (N, C) with N >= 1 and y (N,); got {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(x.device.type, enabled=False), torch.enable_grad():
        xf = x.detach().float()
        mean = xf.mean(dim=0)
        std = xf.std(dim=0, unbiased=False).clamp_min(1e-6)
        xs = (xf - mean) / std
        w = (torch.ones(x.shape[0], device=x.device) if sample_weight is None
             else sample_weight.detach().to(device=x.device, dtype=torch.float32))
        w = w / w.sum().clamp_min(1e-12)
        weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
        target = y.to(x.device)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            ce = F.cross_entropy(xs @ weight + bias, target, reduction="none")
            loss = (w * ce).sum() + 0.5 * l2 * (weight * weight).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def f1_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
              sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-class F1 (= Dice) ``2·TP / (2·TP + FP + FN)`` from weighted counts.

    Args:
        pred, target: ``(N,)`` class indices; sample_weight: ``(N,)`` (default 1).

    Returns:
        ``(K,)`` float64 on the CPU; NaN for a class absent from both ``target`` and ``pred`` (as nnU-Net's
        summary does for Dice).
    """
    w = (torch.ones(pred.shape[0], dtype=torch.float64) if sample_weight is None
         else sample_weight.detach().double().cpu())
    p, t = pred.cpu(), target.cpu()
    out = torch.full((num_classes,), math.nan, dtype=torch.float64)
    for c in range(num_classes):
        tp = w[(p == c) & (t == c)].sum()
        fp = w[(p == c) & (t != c)].sum()
        fn = w[(p != c) & (t == c)].sum()
        den = 2 * tp + fp + fn
        if den > 0:
            out[c] = 2 * tp / den
    return out


def foreground_mean(scores: torch.Tensor) -> float:
    """Mean of the per-class scores of classes 1 … K−1 that are not NaN; NaN if there is none."""
    fg = scores[1:]
    fg = fg[~torch.isnan(fg)]
    return float(fg.mean()) if fg.numel() else math.nan
