"""Collapse and shortcut statistics (``nnunet_pgl.collapse``) on constructed inputs with known answers, and on a
real (nnU-Net-built) network whose weights are zeroed: a collapsed network must be flagged."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_pgl.alignment import align_features
from nnunet_pgl.collapse import (SHORTCUT_GAP, CollapseMonitor, LevelStats, collapse_warnings, effective_rank,
                                 linear_r2, projection_spread, shortcut_r2, shortcut_rows)
from nnunet_pgl.model import PGLBranch, make_target
from nnunet_pgl.prior import ViewPrior
from nnunet_pgl.views import make_view_pair


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- spread and rank
def test_spread_of_constructed_sets():
    d = 8
    assert float(projection_spread(torch.eye(d))) == pytest.approx(math.sqrt((d - 1) / d), abs=1e-6)
    pm = torch.zeros(2, d)
    pm[0, 0], pm[1, 0] = 1.0, -1.0            # ±e1: std 1 in one of d dimensions
    assert float(projection_spread(pm)) == pytest.approx(1 / math.sqrt(d), abs=1e-6)
    same = torch.randn(1, d).repeat(50, 1) * torch.rand(50, 1).add(0.5)  # one direction, any lengths
    assert float(projection_spread(same)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        projection_spread(torch.zeros(0, 3))


def test_effective_rank_of_constructed_sets():
    assert float(effective_rank(torch.eye(6) * 3)) == pytest.approx(6.0, rel=1e-5)
    rank_one = torch.randn(40, 1) @ torch.randn(1, 16)
    assert float(effective_rank(rank_one)) == pytest.approx(1.0, abs=1e-3)
    # singular values (1, 1, 2): p = (1/4, 1/4, 1/2), entropy 1.5 ln 2, effective rank 2^1.5
    assert float(effective_rank(torch.diag(torch.tensor([1.0, 1.0, 2.0])))) == pytest.approx(2 ** 1.5, rel=1e-5)
    assert float(effective_rank(torch.zeros(5, 4))) == 0.0


def test_linear_r2_exact_cases():
    g = torch.Generator().manual_seed(0)
    x_fit, x_eval = torch.randn(200, 5, generator=g), torch.randn(100, 5, generator=g)
    a, b = torch.randn(5, 3, generator=g), torch.tensor([1.0, -2.0, 3.0])
    r2 = linear_r2(x_fit, x_fit @ a + b, x_eval, x_eval @ a + b, ridge=1e-6)
    assert torch.all(r2 > 0.9999)
    # constant features carry nothing: the prediction is the fit mean; with the same mean on the eval set R² = 0
    y = torch.randn(100, 2, generator=g)
    y = y - y.mean(0)
    r2 = linear_r2(torch.ones(100, 4), y, torch.ones(100, 4), y.flip(0))
    assert torch.allclose(r2, torch.zeros(2), atol=1e-6)
    # a constant target has no variance to explain: NaN, not a number that looks like a score
    r2 = linear_r2(x_fit, torch.ones(200, 1), x_eval, torch.ones(100, 1))
    assert math.isnan(float(r2[0]))
    with pytest.raises(ValueError, match="share N"):
        linear_r2(x_fit, torch.ones(3, 1), x_eval, torch.ones(100, 1))


# ----------------------------------------------------------------------------------------------- shortcut
def _two_views():
    """A pair of views of one region: b is shifted, rescaled and flipped in z and x relative to a."""
    patch = (8, 8, 8)
    pa = ViewPrior.from_crop(torch.tensor([[1.5, 2.5, 0.5]]), torch.tensor([[9.0, 10.0, 11.0]]), patch)
    pb = ViewPrior.from_crop(torch.tensor([[3.5, 1.5, 2.5]]), torch.tensor([[10.0, 9.0, 10.0]]), patch,
                             flips=torch.tensor([[True, False, True]]))
    return patch, pa, pb


def test_shortcut_r2_tells_position_in_the_view_from_position_in_the_region(coords):
    patch, pa, pb = _two_views()
    # features that are the view voxel coordinates themselves (what a padding-aware U-Net can learn)
    view_a, view_b = coords(patch), coords(patch)
    a, b, valid = align_features(view_a, pa, view_b, pb)
    pos = shortcut_r2(shortcut_rows(a, b, valid, pa, pb))
    assert pos["r2_view"] > 0.999
    # features that are the region coordinates (equal in both views at the same point: what the loss asks for)
    grid = coords(patch)[0].movedim(0, -1)[None]                       # (1, *patch, 3) view voxel coords
    reg_a = pa.apply(grid)[0].movedim(-1, 0)[None]
    reg_b = pb.apply(grid)[0].movedim(-1, 0)[None]
    a, b, valid = align_features(reg_a, pa, reg_b, pb)
    content = shortcut_r2(shortcut_rows(a, b, valid, pa, pb))
    assert content["r2_region"] > 0.999
    assert content["r2_view"] < content["r2_region"] - SHORTCUT_GAP   # b is flipped: view coords do not transfer
    start = [LevelStats(2, 1.0, 3.0, 0.3, 0.1)]
    warn_pos = collapse_warnings([LevelStats(2, 1.0, 3.0, pos["r2_view"], pos["r2_region"])], start)
    assert len(warn_pos) == 1 and "network input" in warn_pos[0] and "0.30 at the start" in warn_pos[0]
    assert collapse_warnings([LevelStats(2, 1.0, 3.0, content["r2_view"], content["r2_region"])], start) == []
    # position-encoding from the start (zero padding) is not something the run learned: no baseline, no rise
    assert collapse_warnings([LevelStats(2, 1.0, 3.0, pos["r2_view"], pos["r2_region"])]) == []
    same = [LevelStats(2, 1.0, 3.0, pos["r2_view"] - 0.05, pos["r2_region"])]
    assert collapse_warnings([LevelStats(2, 1.0, 3.0, pos["r2_view"], pos["r2_region"])], same) == []


def test_shortcut_rows_are_the_aligned_points(coords):
    """Rows hold each valid point's coordinates in view a, view b and the region, mutually consistent via the
    priors; too few points per feature dimension give NaN instead of a memorised R²."""
    patch, pa, pb = _two_views()
    a, b, valid = align_features(coords(patch), pa, coords(patch), pb)
    rows = shortcut_rows(a, b, valid, pa, pb)
    n = int(valid.sum())
    assert rows.x_a.shape == (n, 3) and rows.region.shape == (n, 3)
    assert torch.allclose(pa.apply(rows.view_a[None])[0], rows.region, atol=1e-4)
    assert torch.allclose(pb.apply(rows.view_b[None])[0], rows.region, atol=1e-4)
    assert torch.allclose(rows.x_a, rows.view_a, atol=1e-3)  # the features were the view coordinates
    thin = shortcut_rows(a, b, valid, pa, pb, max_rows=5)
    assert thin.x_a.shape[0] == 5
    assert math.isnan(shortcut_r2(thin, min_rows_per_feature=2.0)["r2_view"])


def test_collapse_warnings_in_plain_words():
    msgs = collapse_warnings([LevelStats(1, 0.01, 1.0, None, None), LevelStats(2, 0.5, 1.5),
                              LevelStats(-1, 0.005, 1.0)])
    assert len(msgs) == 3
    assert msgs[0].startswith("level 1: the projections have collapsed") and "--lr" in msgs[0]
    assert msgs[1].startswith("level 2: the projections use only about 1.5 directions")
    assert msgs[2].startswith("the global (BYOL) projections: the projections have collapsed")
    # a step's few pooled vectors are close at any time: only near-identity is flagged for the global projections
    assert collapse_warnings([LevelStats(-1, 0.05, 1.5)]) == []
    assert collapse_warnings([LevelStats(3, 0.8, 20.0, 0.2, 0.3)]) == []


# ----------------------------------------------------------------------------------------------- real network
@pytest.fixture(scope="module")
def net():
    from test_features import build
    return build("plain")[0]


def _step_stats(network, steps: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    online = PGLBranch(network, [2, 3], "pgl+byol", proj_dim=32, hidden_dim=64)
    target = make_target(online)
    g = torch.Generator().manual_seed(seed)
    monitor = CollapseMonitor()
    for _ in range(steps):
        region = torch.randn(2, 1, 20, 40, 40, generator=g)
        va, vb, pa, pb = make_view_pair(region, (16, 32, 32), generator=g)
        with torch.no_grad():
            out = target(torch.cat([va, vb]), pa, pb, use_predictor=False)
        monitor.update(out, online.loss_levels, pa, pb)
    assert monitor.steps == steps
    return monitor.summary()


def test_random_network_is_not_flagged_and_zeroed_network_is(net):
    """At random init the projections are spread; with every weight zero the network outputs one constant vector
    (instance norm of a constant is 0, the heads map 0 to their bias), which must be reported as collapse."""
    stats = _step_stats(net)
    assert [s.level for s in stats] == [2, 3, -1]
    assert not any("collapsed" in w for w in collapse_warnings(stats))
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
        collapsed = _step_stats(net)
        assert all(s.spread < 1e-3 for s in collapsed)
        msgs = collapse_warnings(collapsed)
        assert sum("collapsed" in m for m in msgs) == 3
    finally:
        net.load_state_dict(saved)
