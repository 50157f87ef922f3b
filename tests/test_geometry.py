"""Feature geometry of nnU-Net's U-Nets, and the alignment through linearised networks (issue: alignment that
matches nnU-Net's convolutions).

A *linearised* network is the U-Net of dynamic-network-architectures built without normalisation and
nonlinearity, with box kernels (every convolution averages its window over all input channels; the transposed
convolutions copy the coarse voxel) and every gain 1. It maps a field that is linear in view coordinates to the
positions its voxels stand for wherever no zero padding is reached; feeding it the coordinate ramps and a
constant, and dividing, gives those positions. The views' outermost voxels are NaN: a feature voxel is finite
exactly when its receptive field lies inside the view. Expected values are derived from the architecture:

* kernel-3, stride-2, padding-1 convolution: output ``i`` centred at input ``2i`` → ``PlainConvUNet`` encoder
  origin 0;
* average pool by ``t``: centred at ``t·i + (t − 1)/2``; ResEnc's strided block weighs its two paths equally →
  origin ``Σ S_{k−1}(t_k − 1)/4 = (s − 1)/4``;
* decoder level: the equal-weight mean of its skip and of the nearest-neighbour copy of the level below, which
  lags by ``(t − 1)/2`` fine voxels on average → ``(o_skip + o_below)/2 − S(t − 1)/4``.
"""
from __future__ import annotations

import json
import math
import pydoc
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunet_pgl import (LevelGeometry, PGLBranch, align_features, avg_pool_geometry, extract_features,
                        level_geometry, level_strides, overlap_points)
from nnunet_pgl.prior import ViewPrior
from nnunet_pgl.views import sample_view

DATA_DIR = Path(__file__).parent / "data"
NONE, ALL = (False, False, False), (True, True, True)
SAME_FLIPS = [(1.1, 1.4, NONE, NONE), (1.4, 1.2, ALL, ALL)]
OPPOSITE_FLIPS = [(1.1, 1.4, NONE, ALL), (1.3, 1.1, (True, False, True), (False, True, False))]
EXACT = 0.05          # feature voxels


pytestmark = pytest.mark.usefixtures("one_thread")


def plans_arch(name: str) -> dict:
    conf = json.loads((DATA_DIR / f"plans_{name}.json").read_text())["configurations"]["3d_fullres"]
    return conf["architecture"]


def build_plans_network(name: str) -> nn.Module:
    """The network of the plans' 3d_fullres, as nnU-Net builds it (norm, nonlinearity, real channel counts)."""
    arch = plans_arch(name)
    kw = dict(arch["arch_kwargs"])
    for k in arch["_kw_requires_import"]:
        if kw[k] is not None:
            kw[k] = pydoc.locate(kw[k])
    return pydoc.locate(arch["network_class_name"])(input_channels=1, num_classes=4, **kw)


def linear_unet(kind: str, strides, kernels, per_stage, decoder, shortcut: float = 0.5, skip: float = 0.5
                ) -> nn.Module:
    """A linearised U-Net with every gain 1; where two paths meet, their weights sum to 1.

    Channels 1, 2, 3, … per stage (few, and changing at every stage as in the plans, so that every strided
    residual block has its 1×1 projection after the average pool). ResEnc: a strided block weighs its shortcut
    ``shortcut`` and its convolution path ``1 − shortcut``; other blocks keep only their shortcut (no centre moves).
    Decoder: the first convolution of a stage weighs the skip ``skip`` and the upsampled path ``1 − skip``.
    """
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    cls = PlainConvUNet if kind == "plain" else ResidualEncoderUNet
    n = len(strides)
    net = cls(1, n, list(range(1, n + 1)), nn.Conv3d, kernels, strides, per_stage, 1, decoder, conv_bias=False,
              norm_op=None, nonlin=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.ConvTranspose3d):
                m.weight.fill_(1.0 / m.in_channels)
            elif isinstance(m, nn.Conv3d):
                m.weight.fill_(1.0 / (m.in_channels * math.prod(m.kernel_size)))
        for m in net.modules():
            if hasattr(m, "conv2") and hasattr(m, "skip"):                     # BasicBlockD
                if isinstance(m.skip, nn.Sequential) and isinstance(m.skip[0], nn.AvgPool3d):
                    m.skip[-1].conv.weight.mul_(shortcut)
                    m.conv2.conv.weight.mul_(1 - shortcut)
                else:
                    m.conv2.conv.weight.zero_()
        for stage in net.decoder.stages:                                         # input: cat(upsampled, skip)
            w = stage.convs[0].conv.weight
            w[:, : w.shape[1] // 2].mul_(2 * (1 - skip))
            w[:, w.shape[1] // 2:].mul_(2 * skip)
    return net.eval()


def plans_linear_unet(name: str, stages: int, **kw) -> nn.Module:
    a = plans_arch(name)["arch_kwargs"]
    per = a["n_conv_per_stage"] if name == "plain" else [1] * stages
    return linear_unet("plain" if name == "plain" else "resenc", a["strides"][:stages], a["kernel_sizes"][:stages],
                       per[:stages], a["n_conv_per_stage_decoder"][:stages - 1], **kw)


#: isotropic strides, one convolution per stage (a receptive field that fits a 48³ patch at the bottleneck)
ISO = dict(strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernels=[[3, 3, 3]] * 4, per_stage=[1, 1, 1, 1],
           decoder=[1, 1, 1])


def positions(net: nn.Module, patch, pairs, part: str):
    """Per pair: priors and per level the position maps ``(1, 3, *S)`` of both views (NaN outside the interior)."""
    region = [math.ceil(1.45 * p) + 2 for p in patch]
    axes = [torch.arange(n, dtype=torch.float32) for n in region]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    fields = torch.cat([grid, torch.ones(1, *region)])[None]
    n = len(level_strides(net))
    out = []
    for ua, ub, fa, fb in pairs:
        c = torch.tensor([(r - 1) / 2 for r in region])
        pr = [ViewPrior.from_crop(cc - torch.tensor(patch) * u / 2, torch.tensor(patch) * u, patch, flips=fl)
              for u, fl, cc in ((ua, fa, c), (ub, fb, c + 0.04 * torch.tensor(patch)))]
        views = []
        for p in pr:
            v = sample_view(fields, p)[0].unsqueeze(1).clone()
            v[:, :, [0, -1]] = v[:, :, :, [0, -1]] = v[..., [0, -1]] = float("nan")
            views.append(v)
        with torch.no_grad():
            x = torch.cat(views)
            feats = list(net.encoder(x)) if part == "encoder" else extract_features(net, x, list(range(n)))
        pos = [(f[:, 0] / f[:, 0][[3, 3, 3, 3, 7, 7, 7, 7]]) for f in feats]
        out.append((ua, pr, [q[0:3][None] for q in pos], [q[4:7][None] for q in pos]))
    return out


def errors(pos, geometry, level: int):
    """Per pair: (max |a − truth|, max |a − b|, points) in feature voxels of view a, at finite valid points."""
    res = []
    for ua, (pa, pb), fa, fb in pos:
        g = geometry[level]
        a, b, valid = align_features(fa[level], pa, fb[level], pb, geometry=g)
        shape = fa[level].shape[2:]
        pts, _ = overlap_points(pa, shape, pb, fb[level].shape[2:], shape, geometry=g)
        m = valid[0, 0] & torch.isfinite(a[0]).all(0) & torch.isfinite(b[0]).all(0)
        unit = torch.tensor(g.stride).view(3, 1) * ua
        ea = ((a[0][:, m] - pts[0].movedim(-1, 0)[:, m]).abs() / unit)
        eab = ((a[0][:, m] - b[0][:, m]).abs() / unit)
        res.append((float(ea.max()) if ea.numel() else math.nan, float(eab.max()) if eab.numel() else math.nan,
                    int(m.sum())))
    return res


@pytest.fixture(scope="module")
def plans_networks():
    torch.manual_seed(0)
    return build_plans_network("plain"), build_plans_network("resenc_m")


def decoder_origins(encoder_origins, strides):
    """Expected decoder origins: the equal-weight mean of the skip (its encoder level) and the upsampled level
    below, whose nearest-neighbour copy by ``t`` lags by ``(t − 1)/2`` fine voxels on average."""
    out = [None] * len(strides)
    out[-1] = tuple(encoder_origins[-1])
    for lv in range(len(strides) - 2, -1, -1):
        out[lv] = tuple((o + ob) / 2 - s * (hi / s - 1) / 4
                        for o, ob, s, hi in zip(encoder_origins[lv], out[lv + 1], strides[lv], strides[lv + 1]))
    return out


# ------------------------------------------------------------------------------------------ level_geometry
def test_level_geometry_of_the_plans_networks(plans_networks):
    plain, resenc = plans_networks
    geos = {}
    for name, net in (("plain", plain), ("resenc", resenc)):
        before = {k: v.clone() for k, v in net.state_dict().items()}
        net.train()
        geos[name] = (level_geometry(net, encoder=True), level_geometry(net))
        assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        strides = [tuple(float(x) for x in s) for s in level_strides(net)]
        assert [g.stride for g in geos[name][0]] == [g.stride for g in geos[name][1]] == strides
    # PlainConvUNet: kernel-3 stride-2 padding-1 convolutions, output i centred at input 2i
    enc, feat = geos["plain"]
    assert [g.origin for g in enc] == [(0.0, 0.0, 0.0)] * 5
    assert [g.origin for g in feat] == decoder_origins([g.origin for g in enc], [g.stride for g in enc])
    assert feat[3].origin == (-1.0, -2.0, -2.0) and feat[4].origin == (0.0, 0.0, 0.0)
    # ResidualEncoderUNet (1-3-4-6-6 blocks): strided path and average-pool shortcut weighed equally
    enc, feat = geos["resenc"]
    assert [g.origin for g in enc] == [tuple((s - 1) / 4 for s in g.stride) for g in enc]
    assert enc[-1].origin == (1.75, 3.75, 3.75)
    assert [g.origin for g in feat] == decoder_origins([g.origin for g in enc], [g.stride for g in enc])
    # only the first block of a stage has the shortcut: one block per stage gives the same geometry
    one_block = plans_linear_unet("resenc_m", 5)
    assert level_geometry(one_block, encoder=True) == enc and level_geometry(one_block) == feat


def test_level_geometry_of_pooling_and_patchify_encoders():
    from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

    class UNet(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.decoder = UNetDecoder(encoder, 1, 1, False)

    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    for pool in ("avg", "max"):
        net = UNet(PlainConvEncoder(1, 3, [2, 4, 8], nn.Conv3d, 3, strides, 2, return_skips=True, pool=pool,
                                    nonlin=nn.ReLU, norm_op=nn.InstanceNorm3d))
        # pooling by t centres at t·i + (t − 1)/2, stride-1 convolutions keep it: the average-pooling convention,
        # which nearest-neighbour upsampling (a copy over the pooled cell) keeps in the decoder as well
        expected = [avg_pool_geometry(s) for s in level_strides(net)]
        assert level_geometry(net, encoder=True) == expected and level_geometry(net) == expected

    class Patchify(nn.Module):                      # kernel = stride, no padding (e.g. a ViT-style stem)
        def __init__(self):
            super().__init__()
            self.strides, self.output_channels, self.return_skips = [[1, 1, 1], [2, 4, 4]], [2, 4], True
            self.conv_op, self.kernel_sizes, self.conv_bias = nn.Conv3d, [[3, 3, 3], [3, 3, 3]], False
            self.norm_op = self.norm_op_kwargs = self.dropout_op = self.dropout_op_kwargs = None
            self.nonlin = self.nonlin_kwargs = None
            self.a = nn.Conv3d(1, 2, 3, padding="same")
            self.b = nn.Sequential(nn.Conv3d(2, 4, (2, 4, 4), (2, 4, 4)), nn.GELU(), nn.Conv3d(4, 4, 3, padding=1))

        def forward(self, x):
            y = self.a(x)
            return [y, self.b(y)]

    assert level_geometry(UNet(Patchify()), encoder=True) == [LevelGeometry((1, 1, 1), (0, 0, 0)),
                                                              LevelGeometry((2, 4, 4), (0.5, 1.5, 1.5))]


def test_level_geometry_refuses_what_it_cannot_read():
    from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

    class UNet(nn.Module):
        def __init__(self, extra):
            super().__init__()
            self.encoder = PlainConvEncoder(1, 2, [2, 4], nn.Conv3d, 3, [1, 2], 1, return_skips=True)
            self.encoder.stages[1].append(extra)
            self.decoder = UNetDecoder(self.encoder, 1, 1, False)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(4, 4)

        def forward(self, x):
            return x

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(ValueError, match=r"cannot linearise encoder.stages.1.1.gate \(Linear\).*Pass the geometry"):
        level_geometry(UNet(Attention()))
    for encoder in (False, True):
        with pytest.raises(ValueError, match=r"level \d does not respond as origin \+ i·stride.*pass the geometry"):
            level_geometry(UNet(Square()), encoder=encoder)
    with pytest.raises(ValueError, match="is not a U-Net"):
        level_geometry(nn.Conv3d(1, 1, 3))


def test_pgl_branch_aligns_with_the_network_geometry(plans_networks, monkeypatch):
    net = plans_networks[1]
    seen = []
    import nnunet_pgl.model as model

    def spy(*args, **kwargs):
        seen.append(kwargs.get("geometry"))
        return align_features(*args, **kwargs)

    monkeypatch.setattr(model, "align_features", spy)
    online = PGLBranch(net, [2, 4], proj_dim=8, hidden_dim=8)
    assert online.geometry == level_geometry(net)
    p = ViewPrior.from_crop([[0.0, 1.0, 2.0]], [[20.0, 40.0, 40.0]], (16, 32, 32))
    q = ViewPrior.from_crop([[1.0, 0.0, 3.0]], [[19.0, 42.0, 38.0]], (16, 32, 32), flips=[[True, False, True]])
    with torch.no_grad():
        online(torch.randn(2, 1, 16, 32, 32), p, q)
    assert seen == [online.geometry[2], online.geometry[4]]
    old = [avg_pool_geometry(s) for s in level_strides(net)]
    assert PGLBranch(net, [2], geometry=old).geometry == old
    with pytest.raises(ValueError, match="one LevelGeometry per level"):
        PGLBranch(net, [2], geometry=old[:-1])


# ------------------------------------------------------------------- alignment through linearised networks
@pytest.mark.parametrize("name", ["isotropic", "plans"])
def test_plain_encoder_levels_and_bottleneck_align_exactly(name):
    net = (linear_unet("plain", **ISO) if name == "isotropic" else plans_linear_unet("plain", 4))
    patch = (48, 48, 48) if name == "isotropic" else (40, 80, 80)
    geo = level_geometry(net, encoder=True)
    assert all(g.origin == (0.0, 0.0, 0.0) for g in geo)
    assert level_geometry(net)[-1] == geo[-1]                            # the bottleneck
    old = [avg_pool_geometry(g.stride) for g in geo]
    for flips, pairs in (("same", SAME_FLIPS), ("opposite", OPPOSITE_FLIPS)):
        pos = positions(net, patch, pairs, "encoder")
        for lvl, g in enumerate(geo):
            for e_true, e_ab, pts in errors(pos, geo, lvl):
                assert pts > 0, (name, flips, lvl)
                assert e_true <= EXACT and e_ab <= EXACT, (name, flips, lvl, e_true, e_ab)
            if flips == "opposite" and min(g.stride) > 1:
                # the average-pooling convention misaligns opposite flips by (s − 1)·u region voxels
                worst = max(e[1] for e in errors(pos, old, lvl))
                s = max(g.stride)
                assert worst >= 0.9 * (s - 1) / s, (name, lvl, worst)


def ripple_bound(strides, level: int) -> float:
    """Per-view error bound (feature voxels) of a decoder level with equal weights, at its calibrated origin.

    The nearest-neighbour copy by ``t`` puts phase ``r`` of a coarse voxel ``r − (t − 1)/2`` fine voxels from the
    upsampled path's mean, the level below adds its own ripple times ``t``, the equal-weight mean with the exact
    skip halves both, and the stage's box convolutions only average: ``R_L = ((t − 1)/2 + t·R_{L+1}) / 2``.
    """
    r = 0.0
    for lv in range(len(strides) - 2, level - 1, -1):
        t = max(hi / lo for hi, lo in zip(strides[lv + 1], strides[lv]))
        r = ((t - 1) / 2 + t * r) / 2
    return r


def test_plain_decoder_levels_with_equal_weights_are_bounded_and_beat_the_skip_geometry():
    net = plans_linear_unet("plain", 4)
    geo, skip = level_geometry(net), level_geometry(net, encoder=True)
    pos = positions(net, (40, 96, 96), OPPOSITE_FLIPS[:1], "decoder")
    ratio = 1.4 / 1.1
    for lvl in range(len(geo) - 1):
        (e_true, e_ab, pts), = errors(pos, geo, lvl)
        bound = ripple_bound([g.stride for g in geo], lvl)
        assert pts > 0
        assert e_true <= bound + EXACT and e_ab <= bound * (1 + ratio) + EXACT, (lvl, e_true, e_ab, bound)
        (_, e_skip, _), = errors(pos, skip, lvl)
        (_, e_old, _), = errors(pos, [avg_pool_geometry(g.stride) for g in geo], lvl)
        assert e_ab < e_skip and e_ab < e_old, (lvl, e_ab, e_skip, e_old)


def test_resenc_geometry_minimises_the_worst_misalignment():
    # the true centre of a ResEnc level depends on how training weighs its two paths: conv path only (origin 0),
    # equal weights ((s − 1)/4), average-pool shortcut only ((s − 1)/2). level_geometry takes the midpoint.
    nets = {w: plans_linear_unet("resenc_m", 4, shortcut=w) for w in (0.0, 0.5, 1.0)}
    geo = level_geometry(nets[0.5], encoder=True)
    assert all(level_geometry(n, encoder=True) == geo for n in nets.values())   # calibration ignores the weights
    conventions = {"level_geometry": geo, "avg-pool": [avg_pool_geometry(g.stride) for g in geo],
                   "conv": [LevelGeometry(g.stride, (0, 0, 0)) for g in geo]}
    worst = {c: [0.0] * len(geo) for c in conventions}
    for w, net in nets.items():
        pos = positions(net, (40, 80, 80), OPPOSITE_FLIPS[:1], "encoder")
        for lvl, g in enumerate(geo):
            for c, gc in conventions.items():
                (e_true, e_ab, pts), = errors(pos, gc, lvl)
                assert pts > 0
                worst[c][lvl] = max(worst[c][lvl], e_ab)
                if c == "level_geometry":
                    s = max(g.stride)
                    # the truth is at most (s − 1)/4 view voxels from the midpoint: per view (s − 1)/(4s) feature
                    # voxels; exact for equal weights
                    limit = EXACT if w == 0.5 else (s - 1) / (4 * s) * (1 + 1.4 / 1.1) + EXACT
                    assert e_true <= limit and e_ab <= limit, (w, lvl, e_true, e_ab)
    for lvl, g in enumerate(geo):
        if max(g.stride) > 1:
            assert worst["level_geometry"][lvl] < min(worst["avg-pool"][lvl], worst["conv"][lvl]), (lvl, worst)
