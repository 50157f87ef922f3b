"""Feature extraction from the U-Nets that real nnU-Net plans build (PlainConvUNet, ResidualEncoderUNet).

The networks are built by nnunetv2 itself (the test may import nnunetv2; ``nnunet_pgl`` must not), and the
features are checked against what the unmodified network computes: its deep-supervision outputs are the
segmentation layers applied to the decoder stages' outputs.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunet_pgl.ema import ema_update_
from nnunet_pgl.features import (UNetFeatures, check_levels, default_levels, extract_features, level_channels,
                                 level_strides, unwrap_network)
from nnunet_pgl.model import PGLBranch, make_target, pgl_loss
from nnunet_pgl.views import make_view_pair

DATA_DIR = Path(__file__).parent / "data"
PLANS = {"plain": "plans_plain.json", "resenc_m": "plans_resenc_m.json"}
SMALL = (16, 32, 32)          # divisible by the bottleneck stride (8, 16, 16); keeps CPU tests fast


pytestmark = pytest.mark.usefixtures("one_thread")


def load_plans(name: str) -> dict:
    with open(DATA_DIR / PLANS[name]) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def build(name: str) -> tuple[nn.Module, dict]:
    """The network of ``3d_fullres`` of the named plans, built once per test session (callers restore its mode)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = load_plans(name)
    with open(DATA_DIR / "dataset.json") as f:
        dataset = json.load(f)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    n_in = len(dataset["channel_names"])
    n_out = pm.get_label_manager(dataset).num_segmentation_heads
    assert (n_in, n_out) == (1, 4)
    torch.manual_seed(0)
    # nnunetv2 2.8.1: build_network_architecture(plans_manager, configuration_manager, n_in, n_out, deep_sup)
    net = nnUNetTrainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=True)
    return net, plans["configurations"]["3d_fullres"]


@pytest.fixture(scope="module", params=sorted(PLANS))
def built(request):
    net, conf = build(request.param)
    net.eval()
    return request.param, net, conf


@pytest.fixture(scope="module")
def plain():
    net, conf = build("plain")
    net.eval()
    return net, conf


def cumulative(strides):
    out, acc = [], [1, 1, 1]
    for s in strides:
        acc = [a * b for a, b in zip(acc, s)]
        out.append(tuple(acc))
    return out


def test_network_classes(built):
    name, net, conf = built
    expected = {"plain": "PlainConvUNet", "resenc_m": "ResidualEncoderUNet"}[name]
    assert type(net).__name__ == expected
    assert conf["architecture"]["network_class_name"].endswith(expected)


def test_level_strides_and_channels_follow_the_plans(built):
    _, net, conf = built
    arch = conf["architecture"]["arch_kwargs"]
    assert level_strides(net) == cumulative(arch["strides"])
    assert level_strides(net) == [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8), (8, 16, 16)]
    assert level_channels(net) == arch["features_per_stage"]


@pytest.fixture(scope="module")
def computed(built):
    """One forward of the unmodified network (capturing the skips and the last decoder stage's output) and one
    :func:`extract_features` of all levels, on the same input; shared by the tests below."""
    name, net, conf = built
    n = len(conf["architecture"]["arch_kwargs"]["strides"])
    x = torch.randn(1, 1, *SMALL, generator=torch.Generator().manual_seed(1))
    captured = {}
    hooks = [net.encoder.register_forward_hook(lambda m, i, o: captured.setdefault("skips", o)),
             net.decoder.stages[-1].register_forward_hook(lambda m, i, o: captured.setdefault("level0", o))]
    try:
        with torch.no_grad():
            out = net(x)                              # deep supervision: [full res, …, coarsest decoder level]
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        feats = extract_features(net, x, list(range(n)))
    return net, conf, x, out, captured, feats


def test_feature_shapes_are_patch_over_stride(computed):
    _, conf, x, _, _, feats = computed
    strides = cumulative(conf["architecture"]["arch_kwargs"]["strides"])
    channels = conf["architecture"]["arch_kwargs"]["features_per_stage"]
    assert len(feats) == len(strides)
    for f, s, c in zip(feats, strides, channels):
        assert tuple(f.shape) == (1, c, *(p // si for p, si in zip(SMALL, s)))


def test_feature_shapes_at_the_plans_patch(plain):
    net, conf = plain
    patch = tuple(conf["patch_size"])
    strides = cumulative(conf["architecture"]["arch_kwargs"]["strides"])
    channels = conf["architecture"]["arch_kwargs"]["features_per_stage"]
    levels = default_levels(strides)
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = extract_features(net, x, levels)
    assert len(feats) == len(levels)
    for f, lvl in zip(feats, levels):
        assert all(p % si == 0 for p, si in zip(patch, strides[lvl]))
        assert tuple(f.shape) == (1, channels[lvl], *(p // si for p, si in zip(patch, strides[lvl])))


def test_levels_equal_what_the_network_computes(computed):
    net, conf, x, out, captured, feats = computed
    n = len(conf["architecture"]["arch_kwargs"]["strides"])
    with torch.no_grad():
        # level 0 is the input of the final segmentation layer, bit for bit
        assert torch.equal(feats[0], captured["level0"])
        assert torch.equal(net.decoder.seg_layers[-1](feats[0]), out[0])
        # decoder level L is the input of seg_layers[n − 2 − L], whose output is deep-supervision output L
        for lvl in range(n - 1):
            assert torch.equal(net.decoder.seg_layers[n - 2 - lvl](feats[lvl]), out[lvl]), lvl
        assert torch.equal(feats[n - 1], captured["skips"][-1])   # bottleneck
        # a subset of levels gives the same tensors, in sorted order, without duplicates
        sub = extract_features(net, x, [4, 2, -1, 3])
    assert len(sub) == 3
    for got, lvl in zip(sub, (2, 3, 4)):
        assert torch.equal(got, feats[lvl])


def test_default_levels():
    plans = load_plans("plain")["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert default_levels(cumulative(plans["strides"])) == [2, 3, 4]
    # z never pooled: only y and x count
    assert default_levels([(1, 1, 1), (1, 2, 2), (1, 4, 4)]) == [1, 2]
    assert default_levels([(1, 1, 1), (1, 1, 2), (2, 2, 4), (4, 4, 8)]) == [2, 3]
    # nothing pooled: the bottleneck alone
    assert default_levels([(1, 1, 1), (1, 1, 1)]) == [1]


def test_default_levels_of_the_built_networks(built):
    _, net, _ = built
    assert default_levels(level_strides(net)) == [2, 3, 4]


def test_check_levels():
    assert check_levels([3, 1, 1, -1], 5) == [1, 3, 4]
    for bad in ([5], [-6], []):
        with pytest.raises(ValueError, match="out of range"):
            check_levels(bad, 5)


def test_unused_modules_are_exactly_the_modules_without_gradients(plain):
    net, _ = plain
    for levels in ([2, 3, 4], [0]):
        feats = UNetFeatures(net, levels)
        net.zero_grad(set_to_none=True)
        x = torch.randn(1, 1, *SMALL, generator=torch.Generator().manual_seed(2))
        sum(f.sum() for f in feats(x)).backward()
        no_grad = {id(p) for p in net.parameters() if p.grad is None}
        unused = {id(p) for m in feats.unused_modules() for p in m.parameters()}
        assert unused == no_grad, levels
        n_seg = sum(1 for m in net.decoder.seg_layers for _ in m.parameters())
        assert len(unused) >= n_seg
    net.zero_grad(set_to_none=True)


def test_unet_features_module(plain):
    net, _ = plain
    f = UNetFeatures(net, [-1, 2])
    assert f.levels == [2, 4]
    assert f.strides == [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8), (8, 16, 16)]
    assert f.channels == [32, 64, 128, 256, 320]
    x = torch.randn(1, 1, *SMALL)
    with torch.no_grad():
        out = f(x)
    assert [tuple(t.shape[1:]) for t in out] == [(128, 8, 8, 8), (320, 2, 2, 2)]
    with pytest.raises(ValueError, match="out of range"):
        UNetFeatures(net, [7])


class FakeCompiled(nn.Module):
    """Stands for what ``torch.compile`` returns: the original module under ``_orig_mod``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self._orig_mod = net

    def forward(self, x):
        return self._orig_mod(x)


def test_wrapped_networks_are_unwrapped(plain):
    net, _ = plain
    compiled = FakeCompiled(net)
    dp = nn.DataParallel(net)                          # on a CPU-only machine this just holds .module
    nested = FakeCompiled(nn.DataParallel(FakeCompiled(net)))
    for w in (compiled, dp, nested):
        assert unwrap_network(w) is net
        assert level_strides(w) == level_strides(net)
    assert unwrap_network(net) is net
    x = torch.randn(1, 1, *SMALL, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = extract_features(net, x, [2, 3])
        for w in (compiled, nested):
            for got, exp in zip(extract_features(w, x, [2, 3]), ref):
                assert torch.equal(got, exp)
    assert UNetFeatures(compiled, [2]).network is net


def test_not_a_unet_is_rejected():
    with pytest.raises(ValueError, match="is not a U-Net of dynamic-network-architectures"):
        extract_features(nn.Conv3d(1, 1, 1), torch.zeros(1, 1, 4, 4, 4), [0])
    with pytest.raises(ValueError, match="is not a U-Net"):
        level_strides(nn.Sequential(nn.Conv3d(1, 1, 1)))

    class Enc(nn.Module):
        strides = [[1, 1], [2, 2]]
        output_channels = [4, 8]
        return_skips = True

    class Dec(nn.Module):
        stages = nn.ModuleList()
        transpconvs = nn.ModuleList()

    class Net2D(nn.Module):
        def __init__(self, return_skips=True):
            super().__init__()
            self.encoder, self.decoder = Enc(), Dec()
            self.encoder.return_skips = return_skips

    with pytest.raises(ValueError, match="PGL is 3D"):
        level_strides(Net2D())
    with pytest.raises(ValueError, match="return_skips=False"):
        level_strides(Net2D(return_skips=False))


@pytest.mark.parametrize("method", ["pgl", "byol", "pgl+byol"])
def test_pgl_branch_step_trains_the_online_branch_only(plain, method):
    net, _ = plain
    net.train()
    try:
        levels = default_levels(level_strides(net))
        online = PGLBranch(net, levels, method=method, proj_dim=16, hidden_dim=32)
        target = make_target(online)
        assert all(not p.requires_grad for p in target.parameters())
        assert target.network is not online.network
        g = torch.Generator().manual_seed(4)
        region = torch.randn(1, 1, 24, 48, 48, generator=g)
        va, vb, pa, pb = make_view_pair(region, SMALL, generator=g)
        views = torch.cat([va, vb])
        out_o = online(views, pa, pb)
        with torch.no_grad():
            out_t = target(views, pa, pb, use_predictor=False)
        total, per_level, glob = pgl_loss(out_o, out_t)
        assert total.ndim == 0 and bool(torch.isfinite(total))
        assert 0.0 <= total.item() <= 8.0
        if method == "byol":
            assert per_level == [] and glob is not None
        else:
            assert len(per_level) == len(levels)
            assert all(0.0 <= v.item() <= 4.0 for v in per_level)
            for (a, b), v, lvl in zip(out_o.local, out_o.valid, levels):
                assert a.shape[1] == b.shape[1] == 16
                assert v.shape[0] == 1 and bool(v.any())
            if method == "pgl":
                assert glob is None
        online.zero_grad(set_to_none=True)
        total.backward()
        assert all(p.grad is None for p in target.parameters())
        grads = [p.grad for p in online.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(gr).all()) for gr in grads)
        # the encoder's first convolution is on every path: it must learn
        first = next(online.network.encoder.parameters())
        assert first.grad is not None and float(first.grad.abs().sum()) > 0
        # and an EMA step with τ = 0 makes the target a copy of the online branch
        ema_update_(target, online, 0.0)
        for pt, po in zip(target.parameters(), online.parameters()):
            assert torch.equal(pt, po)
    finally:
        net.zero_grad(set_to_none=True)
        net.eval()


def test_pgl_branch_rejects_bad_input(plain):
    net, _ = plain
    with pytest.raises(ValueError, match="method must be one of"):
        PGLBranch(net, [2], method="simclr")
    online = PGLBranch(net, [4], proj_dim=8, hidden_dim=8)
    va = torch.zeros(1, 1, *SMALL)
    from nnunet_pgl.prior import ViewPrior
    p = ViewPrior.identity(SMALL, batch=1)
    with pytest.raises(ValueError, match="view a then view b"):
        online(va, p, p)
