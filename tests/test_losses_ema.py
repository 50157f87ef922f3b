"""Losses (normalised MSE, masking, level averaging, global term) and the EMA target with its schedules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnunet_pgl.ema import cosine_schedule, ema_update_, tau_schedule, warmup_cosine_lr
from nnunet_pgl.losses import (global_consistency_loss, global_pool, local_consistency_loss, masked_mean,
                               mean_over_levels, normalized_mse)


def reference_nmse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``‖p/‖p‖ − z/‖z‖‖²`` per point, along the channel axis (float64)."""
    p, z = p.double(), z.double()
    pn = p / p.norm(dim=1, keepdim=True)
    zn = z / z.norm(dim=1, keepdim=True)
    return ((pn - zn) ** 2).sum(dim=1)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- losses
def test_normalized_mse_closed_form():
    theta = torch.tensor([0.0, math.pi / 3, math.pi / 2, math.pi])
    p = torch.stack([torch.ones(4), torch.zeros(4)], dim=1)                 # (4, 2): unit x
    z = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1) * 3.0      # scale must not matter
    torch.testing.assert_close(normalized_mse(p, z), 2 - 2 * torch.cos(theta), rtol=0, atol=1e-6)
    torch.testing.assert_close(normalized_mse(p, z), torch.tensor([0.0, 1.0, 2.0, 4.0]), rtol=0, atol=1e-6)


def test_local_loss_zero_for_identical_maps():
    p = rand(2, 16, 3, 4, 5)
    assert float(local_consistency_loss(p, p, p, p)) == pytest.approx(0.0, abs=1e-6)
    valid = rand(2, 1, 3, 4, 5, seed=1) > 0
    assert float(local_consistency_loss(p, p.clone(), p, p.clone(), valid)) == pytest.approx(0.0, abs=1e-6)


def test_local_loss_matches_reference_and_is_in_range():
    pa, za, pb, zb = (rand(2, 8, 3, 4, 5, seed=s) for s in range(4))
    got = local_consistency_loss(pa, za, pb, zb)
    expected = 0.5 * (reference_nmse(pa, zb).mean() + reference_nmse(pb, za).mean())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert 0.0 <= float(got) <= 4.0
    # opposite vectors: the maximum, 4
    assert float(local_consistency_loss(pa, -pb, pb, -pa)) == pytest.approx(4.0, abs=1e-5)


def test_local_loss_symmetric_in_the_views():
    pa, za, pb, zb = (rand(2, 8, 3, 4, 5, seed=s) for s in range(4))
    valid = rand(2, 1, 3, 4, 5, seed=9) > -0.5
    ab = local_consistency_loss(pa, za, pb, zb, valid)
    ba = local_consistency_loss(pb, zb, pa, za, valid)
    torch.testing.assert_close(ab, ba, rtol=1e-6, atol=1e-7)


def test_gradients_reach_the_online_side_only():
    pa, pb = rand(2, 8, 3, 3, 3, seed=0).requires_grad_(), rand(2, 8, 3, 3, 3, seed=1).requires_grad_()
    za, zb = rand(2, 8, 3, 3, 3, seed=2).requires_grad_(), rand(2, 8, 3, 3, 3, seed=3).requires_grad_()
    local_consistency_loss(pa, za, pb, zb).backward()
    assert pa.grad is not None and pb.grad is not None
    assert float(pa.grad.abs().sum()) > 0 and float(pb.grad.abs().sum()) > 0
    assert za.grad is None and zb.grad is None
    ga, gb = rand(4, 8, seed=4).requires_grad_(), rand(4, 8, seed=5).requires_grad_()
    ta, tb = rand(4, 8, seed=6).requires_grad_(), rand(4, 8, seed=7).requires_grad_()
    global_consistency_loss(ga, ta, gb, tb).backward()
    assert ga.grad is not None and gb.grad is not None
    assert ta.grad is None and tb.grad is None


def test_masked_points_contribute_nothing():
    pa, za, pb, zb = (rand(2, 8, 3, 4, 5, seed=s) for s in range(4))
    valid = rand(2, 1, 3, 4, 5, seed=5) > 0
    m = valid[:, 0]
    # reference: only the valid points, gathered explicitly
    ref = 0.5 * (reference_nmse(pa, zb)[m].mean() + reference_nmse(pb, za)[m].mean())
    clean = local_consistency_loss(pa, za, pb, zb, valid)
    torch.testing.assert_close(clean.double(), ref, rtol=1e-5, atol=1e-6)
    inv = (~valid).expand_as(pa)
    for junk in (float("nan"), float("inf"), 1e6, -1e6):
        dirty = [torch.where(inv, torch.full_like(t, junk), t) for t in (pa, za, pb, zb)]
        got = local_consistency_loss(*dirty, valid)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, clean, rtol=1e-6, atol=1e-7)
    # finite junk: gradients at masked points are exactly zero
    big = torch.where(inv, torch.full_like(pa, 1e6), pa).requires_grad_()
    local_consistency_loss(big, za, pb, zb, valid).backward()
    assert big.grad is not None
    assert bool((big.grad[inv] == 0).all()) and float(big.grad[~inv].abs().sum()) > 0


def test_masked_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert float(masked_mean(v, None)) == pytest.approx(3.5)
    assert float(masked_mean(v, torch.tensor([[True, False, True], [False, False, True]]))) == pytest.approx(10 / 3)
    # broadcast mask (B, 1)
    assert float(masked_mean(v, torch.tensor([[False], [True]]))) == pytest.approx(5.0)
    empty = masked_mean(torch.tensor([[float("nan"), 1.0]]), torch.zeros(1, 2, dtype=torch.bool))
    assert float(empty) == 0.0


def test_local_loss_with_empty_mask_is_zero():
    pa, za, pb, zb = (rand(1, 4, 2, 2, 2, seed=s) for s in range(4))
    assert float(local_consistency_loss(pa, za, pb, zb, torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool))) == 0.0


def test_mean_over_levels():
    ls = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(6.0)]
    assert float(mean_over_levels(ls)) == pytest.approx(3.0)
    assert float(mean_over_levels(ls, [1.0, 0.0, 1.0])) == pytest.approx(3.5)
    assert float(mean_over_levels([torch.tensor(0.0), torch.tensor(4.0)], [3.0, 1.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no loss levels given"):
        mean_over_levels([])
    with pytest.raises(ValueError, match="2 weights for 3 levels"):
        mean_over_levels(ls, [1.0, 1.0])


def test_global_loss_closed_form_and_shape_errors():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # pairs: (p_a, z_b) = (p, z): cos 1/√2 and −1 → 2 − √2, 4; (p_b, z_a) = (z, p): the same
    expected = ((2 - math.sqrt(2)) + 4.0) / 2
    assert float(global_consistency_loss(p, p, z, z)) == pytest.approx(expected, abs=1e-6)
    for bad in (torch.zeros(2, 3, 4), torch.zeros(3)):
        with pytest.raises(ValueError, match=r"must be pooled \(B, D\)"):
            global_consistency_loss(bad, p, p, p)
        with pytest.raises(ValueError, match=r"z_b must be pooled \(B, D\)"):
            global_consistency_loss(p, p, p, bad)


def test_global_pool():
    f = torch.arange(2 * 3 * 2 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2, 2)
    torch.testing.assert_close(global_pool(f), f.view(2, 3, 8).mean(-1))
    assert global_pool(f).shape == (2, 3)


# -------------------------------------------------------------------------------------------------------- EMA
def make_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1))
    target = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1))
    online.train()
    with torch.no_grad():
        for _ in range(3):                      # move running stats and num_batches_tracked away from target
            online(torch.randn(2, 2, 5, 5, 5))
    return target, online


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_ema_tau_one_leaves_target_unchanged():
    target, online = make_pair()
    before = snapshot(target)
    ema_update_(target, online, 1.0)
    after = target.state_dict()
    for k, v in before.items():
        if v.is_floating_point():
            assert torch.equal(after[k], v), k
    # integer buffers are copied from the online module whatever τ is
    assert int(after["1.num_batches_tracked"]) == 3


def test_ema_tau_zero_copies_online():
    target, online = make_pair()
    ema_update_(target, online, 0.0)
    on = online.state_dict()
    for k, v in target.state_dict().items():
        assert torch.equal(v, on[k]), k


def test_ema_tau_half_averages():
    target, online = make_pair()
    before, on = snapshot(target), online.state_dict()
    ema_update_(target, online, 0.5)
    after = target.state_dict()
    for k, v in before.items():
        if v.is_floating_point():
            torch.testing.assert_close(after[k], (v + on[k]) / 2, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(after[k], on[k]), k
    assert int(after["1.num_batches_tracked"]) == 3
    assert not torch.equal(after["1.running_mean"], before["1.running_mean"])


def test_ema_general_tau_and_no_grad():
    target, online = make_pair()
    for p in target.parameters():
        p.requires_grad_(False)
    before, on = snapshot(target), online.state_dict()
    ema_update_(target, online, 0.9)
    w = "0.weight"
    torch.testing.assert_close(target.state_dict()[w], 0.9 * before[w] + 0.1 * on[w], rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in online.parameters())


def test_ema_errors():
    with pytest.raises(ValueError, match="differ in structure"):
        ema_update_(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), 0.5)
    with pytest.raises(ValueError, match="differ in structure"):
        ema_update_(nn.Sequential(nn.Conv3d(1, 1, 1), nn.BatchNorm3d(1)),
                    nn.Sequential(nn.Conv3d(1, 1, 1), nn.InstanceNorm3d(1, affine=True)), 0.5)
    for tau in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
            ema_update_(nn.Linear(3, 3), nn.Linear(3, 3), tau)


# -------------------------------------------------------------------------------------------------- schedules
def test_tau_schedule_end_points_and_monotone():
    k = 1000
    assert tau_schedule(0, k) == pytest.approx(0.996, abs=1e-12)
    assert tau_schedule(k, k) == pytest.approx(1.0, abs=1e-12)
    assert tau_schedule(k // 2, k) == pytest.approx(0.998, abs=1e-12)     # cos(π/2) = 0: halfway
    assert tau_schedule(2 * k, k) == pytest.approx(1.0, abs=1e-12)
    # BYOL's closed form
    for step in (1, 250, 999):
        assert tau_schedule(step, k) == pytest.approx(1 - 0.004 * (math.cos(math.pi * step / k) + 1) / 2)
    vals = [tau_schedule(s, k) for s in range(k + 1)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_cosine_schedule_clamps():
    assert cosine_schedule(-5, 10, 2.0, 1.0) == pytest.approx(2.0)
    assert cosine_schedule(0, 10, 2.0, 1.0) == pytest.approx(2.0)
    assert cosine_schedule(5, 10, 2.0, 1.0) == pytest.approx(1.5)
    assert cosine_schedule(10, 10, 2.0, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(50, 10, 2.0, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(3, 0, 2.0, 1.0) == pytest.approx(1.0)


def test_warmup_cosine_lr_end_points():
    base, final, warm, total = 0.2, 0.01, 10, 110
    assert warmup_cosine_lr(0, total, base, warm, final) == pytest.approx(base / warm)
    assert warmup_cosine_lr(4, total, base, warm, final) == pytest.approx(base * 5 / warm)
    assert warmup_cosine_lr(warm - 1, total, base, warm, final) == pytest.approx(base)
    assert warmup_cosine_lr(warm, total, base, warm, final) == pytest.approx(base)
    assert warmup_cosine_lr(warm + 50, total, base, warm, final) == pytest.approx((base + final) / 2)
    assert warmup_cosine_lr(total, total, base, warm, final) == pytest.approx(final)
    assert warmup_cosine_lr(total + 7, total, base, warm, final) == pytest.approx(final)
    vals = [warmup_cosine_lr(s, total, base, warm, final) for s in range(total + 1)]
    assert all(b >= a for a, b in zip(vals[:warm], vals[1:warm]))          # warm-up rises
    assert all(b <= a for a, b in zip(vals[warm:], vals[warm + 1:]))       # then decays
    # no warm-up: plain cosine from base_lr
    assert warmup_cosine_lr(0, 100, 1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(100, 100, 1.0) == pytest.approx(0.0)
