"""IntensityAugmentation: each transform against an independent reference; geometry is never changed."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_pgl.intensity import IntensityAugmentation, apply_gamma, gaussian_blur

OFF = dict(noise_p=0.0, blur_p=0.0, brightness_p=0.0, contrast_p=0.0, gamma_p=0.0)


def only(**kw) -> IntensityAugmentation:
    """An augmentation with every transform off except those given."""
    return IntensityAugmentation(**{**OFF, **kw})


def views(b=6, c=2, shape=(6, 8, 7), seed=0) -> torch.Tensor:
    return torch.randn(b, c, *shape, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def gen(seed=1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_item_constant(r: torch.Tensor) -> torch.Tensor:
    """Assert every item of ``r`` ``(B, ...)`` holds one value; return those values ``(B,)``."""
    flat = r.reshape(r.shape[0], -1)
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat), rtol=1e-4, atol=1e-4)
    return flat[:, 0]


def test_shape_dtype_device_preserved():
    x = views()
    for dtype in (torch.float32, torch.float64):
        y = IntensityAugmentation(noise_p=1.0, blur_p=1.0, brightness_p=1.0, contrast_p=1.0, gamma_p=1.0)(
            x.to(dtype), gen())
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert bool(torch.isfinite(y).all())
    with pytest.raises(ValueError, match=r"views must be \(B, C, Z, Y, X\)"):
        IntensityAugmentation()(x[0])


def test_all_off_is_identity():
    x = views()
    y = IntensityAugmentation(**OFF)(x, gen())
    # the contrast step re-centres around the mean even with factor 1: equal up to float rounding
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    # without a generator too (default RNG, the views' device)
    torch.testing.assert_close(IntensityAugmentation(**OFF)(x), x, rtol=0, atol=1e-6)


def test_brightness_is_a_per_item_factor():
    x = views()
    y = only(brightness_p=1.0)(x, gen())
    f = per_item_constant(y / x)
    assert bool((f >= 0.75).all()) and bool((f <= 1.25).all())
    assert len(set(f.tolist())) == x.shape[0]                 # independent draws per item
    # a fixed factor: x · f exactly as in the reference formula
    y2 = only(brightness_p=1.0, brightness=(1.2, 1.2))(x, gen())
    torch.testing.assert_close(y2, x * 1.2)


def test_contrast_about_the_item_mean():
    x = views()
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    y = only(contrast_p=1.0)(x, gen())
    torch.testing.assert_close(y.mean(dim=(1, 2, 3, 4), keepdim=True), mean, rtol=1e-5, atol=1e-5)
    f = per_item_constant((y - mean) / (x - mean))
    assert bool((f >= 0.75).all()) and bool((f <= 1.25).all())
    assert len(set(f.tolist())) == x.shape[0]
    y2 = only(contrast_p=1.0, contrast=(0.8, 0.8))(x, gen())
    torch.testing.assert_close(y2, (x - mean) * 0.8 + mean)


def test_gamma_keeps_range_and_is_a_power_law():
    x = views()
    y = only(gamma_p=1.0)(x, gen())
    lo = x.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = x.amax(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(y.amin(dim=(1, 2, 3, 4), keepdim=True), lo, rtol=0, atol=1e-5)
    torch.testing.assert_close(y.amax(dim=(1, 2, 3, 4), keepdim=True), hi, rtol=0, atol=1e-5)
    # ((y − lo)/(hi − lo)) = ((x − lo)/(hi − lo))^γ: recover γ per item from interior values
    tx, ty = ((x - lo) / (hi - lo)).double(), ((y - lo) / (hi - lo)).double()
    ok = (tx > 0.05) & (tx < 0.95)
    g = torch.log(ty) / torch.log(tx)
    gammas = []
    for i in range(x.shape[0]):
        gi = g[i][ok[i]]
        torch.testing.assert_close(gi, gi[:1].expand_as(gi), rtol=1e-3, atol=1e-3)
        gammas.append(float(gi[0]))
    assert all(0.7 - 1e-3 <= v <= 1.5 + 1e-3 for v in gammas)
    assert len({round(v, 4) for v in gammas}) == x.shape[0]
    # a fixed γ = 2 against the formula
    y2 = only(gamma_p=1.0, gamma=(2.0, 2.0))(x, gen())
    torch.testing.assert_close(y2, lo + (hi - lo) * ((x - lo) / (hi - lo)) ** 2, rtol=1e-5, atol=1e-5)


def test_apply_gamma_one_is_identity():
    x = views(b=2)
    assert torch.equal(apply_gamma(x, torch.ones(2)), x)


def test_noise_statistics():
    x = torch.zeros(4, 1, 16, 16, 16)
    y = only(noise_p=1.0, noise_variance=(0.09, 0.09))(x, gen())
    std = y.std(dim=(1, 2, 3, 4))
    assert bool(((std - 0.3).abs() < 0.02).all()), std           # 4096 samples per item
    assert bool((y.mean(dim=(1, 2, 3, 4)).abs() < 0.03).all())
    # zero variance adds nothing
    x2 = views()
    torch.testing.assert_close(only(noise_p=1.0, noise_variance=(0.0, 0.0))(x2, gen()), x2, rtol=0, atol=1e-6)


def test_gaussian_blur_sigma_zero_is_identity():
    x = views()
    assert torch.equal(gaussian_blur(x, torch.zeros(x.shape[0])), x)
    # mixed batch: items with σ = 0 come out unchanged, the others blurred
    sigma = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 0.5])
    y = gaussian_blur(x, sigma)
    for i in (0, 2, 4):
        torch.testing.assert_close(y[i], x[i], rtol=0, atol=1e-6)
    for i in (1, 3, 5):
        assert not torch.allclose(y[i], x[i], atol=1e-3)


def reference_kernel(sigma: float, truncate: float = 3.0) -> list[float]:
    r = math.ceil(truncate * sigma)
    k = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-r, r + 1)]
    s = sum(k)
    return [v / s for v in k]


def test_gaussian_blur_of_a_delta_is_the_separable_kernel():
    sigma = 0.8
    n, c = 15, 7
    x = torch.zeros(1, 1, n, n, n, dtype=torch.float64)
    x[0, 0, c, c, c] = 1.0
    y = gaussian_blur(x, torch.tensor([sigma]))
    k = reference_kernel(sigma)
    r = len(k) // 2
    expected = torch.zeros(n, n, n, dtype=torch.float64)
    for i, a in enumerate(k):
        for j, b in enumerate(k):
            for m, d in enumerate(k):
                expected[c - r + i, c - r + j, c - r + m] = a * b * d
    # (the kernel is built in float32, hence the tolerance)
    torch.testing.assert_close(y[0, 0], expected, rtol=0, atol=1e-6)
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-6)
    # a centred symmetric kernel: the result is symmetric under the flip of each axis about the delta
    for ax in range(3):
        torch.testing.assert_close(y, y.flip(2 + ax), rtol=0, atol=1e-9)


def test_blur_never_moves_a_blob():
    # an off-centre anisotropic blob away from the borders: its centre of mass is unchanged by blurring
    shape = (20, 24, 22)
    g = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    centre = torch.tensor([8.3, 13.7, 10.2], dtype=torch.float64).view(3, 1, 1, 1)
    scale = torch.tensor([1.5, 2.0, 1.2], dtype=torch.float64).view(3, 1, 1, 1)
    blob = torch.exp(-(((g - centre) / scale) ** 2).sum(0))[None, None].expand(2, 1, *shape).contiguous()
    y = gaussian_blur(blob, torch.tensor([1.0, 0.6], dtype=torch.float64))
    w0 = blob[0, 0]
    com0 = (g * w0).flatten(1).sum(1) / w0.sum()
    torch.testing.assert_close(com0, centre.flatten(), rtol=0, atol=1e-4)     # sampled blob ≈ its centre
    for i in range(2):
        w = y[i, 0]
        com = (g * w).flatten(1).sum(1) / w.sum()
        torch.testing.assert_close(com, com0, rtol=0, atol=1e-5)
        assert float(w.sum()) == pytest.approx(float(w0.sum()), rel=1e-6)


def test_augmentation_with_blur_keeps_geometry():
    x = torch.zeros(3, 1, 15, 15, 15)
    x[:, :, 7, 7, 7] = 1.0
    y = only(blur_p=1.0)(x, gen())
    for i in range(3):
        assert int(y[i, 0].argmax()) == 7 * 225 + 7 * 15 + 7
        for ax in range(3):
            torch.testing.assert_close(y[i], y[i].flip(1 + ax), rtol=0, atol=1e-6)
    # two items with different σ differ
    assert not torch.allclose(y[0], y[1])


def test_per_item_independence_and_determinism():
    x = views(b=8)
    aug = IntensityAugmentation(brightness_p=1.0, contrast_p=0.0, gamma_p=0.0, noise_p=0.0, blur_p=0.0)
    y1, y2 = aug(x, gen(3)), aug(x, gen(3))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, aug(x, gen(4)))
    # identical items get different draws
    same = x[:1].expand(8, *x.shape[1:]).contiguous()
    out = IntensityAugmentation(noise_p=0.0, blur_p=0.0, brightness_p=1.0, contrast_p=1.0, gamma_p=1.0)(same, gen())
    flat = out.flatten(1)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.allclose(flat[i], flat[j])


def test_probabilities_are_respected():
    # brightness with p = 0.5 over many items: roughly half of them change
    x = torch.ones(400, 1, 2, 2, 2)
    y = only(brightness_p=0.5)(x, gen(5))
    changed = (y.flatten(1)[:, 0] != 1.0).float().mean().item()
    assert abs(changed - 0.5) < 0.1
