"""Per-view intensity augmentation on the device: noise, blur, brightness, contrast, gamma.

Every transform is drawn independently per batch item and applied to all of its channels with batched tensor
operations (no Python loop over items). None of them moves a voxel: they are pointwise maps, except the blur,
which is a per-item separable Gaussian filter with a centred, symmetric kernel, so geometry (and therefore the
view prior) is untouched.

*Note* (paper vs ours): probabilities and ranges are the paper's as reported second-hand — noise variance
U(0, 0.1) p 0.1, blur σ U(0.5, 1) p 0.2, brightness/contrast ×U(0.75, 1.25) p 0.5, gamma U(0.7, 1.5) p 0.5. We
apply the multiplicative factor to brightness (``x·f``) and contrast (``(x − mean)·f + mean``) as two
independent draws, as nnU-Net's own pipeline does, and gamma on the item's [min, max] range (kept).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _draw(n: int, p: float, lo: float, hi: float, neutral: float, generator: Optional[torch.Generator],
          device: torch.device) -> torch.Tensor:
    """``(n,)`` values: ``U(lo, hi)`` with probability ``p``, else ``neutral``."""
    gdev = generator.device if generator is not None else device
    u = torch.rand(2, n, generator=generator, device=gdev).to(device)
    return torch.where(u[0] < p, lo + u[1] * (hi - lo), torch.full_like(u[1], neutral))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, truncate: float = 3.0) -> torch.Tensor:
    """Per-item separable Gaussian blur of ``x`` ``(B, C, Z, Y, X)`` with ``sigma`` ``(B,)`` in voxels.

    ``sigma == 0`` leaves an item unchanged. Borders are replicated. The kernel radius is
    ``ceil(truncate · max σ)``.
    """
    b, c = x.shape[:2]
    radius = int(math.ceil(truncate * float(sigma.max()))) if sigma.numel() else 0
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.to(device=x.device, dtype=torch.float32).clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = torch.where(sigma.to(x.device)[:, None] > 0, k, (t[None] == 0).float())
    k = (k / k.sum(dim=1, keepdim=True)).to(x.dtype)                     # (B, K)
    w = k.repeat_interleave(c, dim=0)                                     # (B·C, K): one filter per channel
    y = x.reshape(1, b * c, *x.shape[2:])
    for axis in range(3):
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        y = F.conv3d(F.pad(y, pad, mode="replicate"), w.view(shape), groups=b * c)
    return y.reshape_as(x)


@dataclass
class IntensityAugmentation:
    """Draw-and-apply intensity augmentation for a batch of views ``(B, C, Z, Y, X)`` on any device."""

    noise_p: float = 0.1
    noise_variance: Tuple[float, float] = (0.0, 0.1)
    blur_p: float = 0.2
    blur_sigma: Tuple[float, float] = (0.5, 1.0)
    brightness_p: float = 0.5
    brightness: Tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.5
    contrast: Tuple[float, float] = (0.75, 1.25)
    gamma_p: float = 0.5
    gamma: Tuple[float, float] = (0.7, 1.5)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"views must be (B, C, Z, Y, X); got shape {tuple(x.shape)}")
        b, dev = x.shape[0], x.device
        bc = (b, 1, 1, 1, 1)
        var = _draw(b, self.noise_p, *self.noise_variance, 0.0, generator, dev)
        sigma = _draw(b, self.blur_p, *self.blur_sigma, 0.0, generator, dev)
        bright = _draw(b, self.brightness_p, *self.brightness, 1.0, generator, dev)
        contr = _draw(b, self.contrast_p, *self.contrast, 1.0, generator, dev)
        gam = _draw(b, self.gamma_p, *self.gamma, 1.0, generator, dev)
        out = x
        if self.noise_p > 0:
            gdev = generator.device if generator is not None else dev
            noise = torch.randn(x.shape, generator=generator, device=gdev).to(dev, x.dtype)
            out = out + noise * var.sqrt().view(bc).to(x.dtype)
        if self.blur_p > 0:
            out = gaussian_blur(out, sigma)
        if self.brightness_p > 0:
            out = out * bright.view(bc).to(x.dtype)
        if self.contrast_p > 0:
            mean = out.mean(dim=(1, 2, 3, 4), keepdim=True)
            f = contr.view(bc).to(x.dtype)
            out = torch.where(f == 1, out, (out - mean) * f + mean)
        if self.gamma_p > 0:
            out = apply_gamma(out, gam)
        return out


def apply_gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-item gamma on the item's own range: ``lo + (hi − lo)·((x − lo)/(hi − lo))^γ``; ``γ`` is ``(B,)``.

    Keeps each item's min and max; γ = 1 is the identity.
    """
    b = x.shape[0]
    flat = x.reshape(b, -1)
    lo = flat.amin(dim=1).view(b, 1, 1, 1, 1)
    hi = flat.amax(dim=1).view(b, 1, 1, 1, 1)
    rng = (hi - lo).clamp_min(1e-8)
    g = gamma.view(b, 1, 1, 1, 1).to(x.dtype)
    y = lo + rng * ((x - lo) / rng).clamp(0, 1) ** g
    return torch.where(g == 1, x, y)
