"""``pgl_selfcheck``: a short check of the PGL core on synthetic data, printing what it did.

1. Alignment exactness: a region filled with its own voxel coordinates, two random views, average-pooled at
   several (anisotropic) strides, aligned; the aligned maps must agree with each other and with the true region
   coordinates on every valid point.
1b. The same through a linearised nnU-Net ``PlainConvUNet`` (box kernels, no normalisation or nonlinearity):
   its encoder levels and bottleneck, aligned with :func:`~nnunet_pgl.geometry.level_geometry`, must agree to
   0.05 feature voxels for views with the same and with opposite flips, at points whose receptive field lies
   inside both views; the average-pooling convention's misalignment is printed beside it.
2. A few PGL steps (views → intensity augmentation → U-Net features → alignment → heads → loss → SGD → EMA) on
   a small nnU-Net-style U-Net (dynamic-network-architectures, imported here only) and a blobby synthetic
   volume.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .ema import ema_update_, tau_schedule
from .alignment import align_features, overlap_points
from .geometry import LevelGeometry, avg_pool_geometry, level_geometry
from .intensity import IntensityAugmentation
from .model import PGLBranch, make_target, pgl_loss
from .features import default_levels, extract_features, level_strides
from .prior import ViewPrior
from .views import make_view_pair, sample_view, voxel_grid

#: a view pair of :func:`coordinate_alignment_errors`: scales ``u_a``, ``u_b`` and flips (z, y, x) of each view
PairSpec = Tuple[float, float, Tuple[bool, bool, bool], Tuple[bool, bool, bool]]
SAME, ALL = (False, False, False), (True, True, True)
#: same flips and opposite flips on every axis, scales 1.1-1.4
DEFAULT_PAIRS: Tuple[PairSpec, ...] = ((1.1, 1.4, SAME, SAME), (1.4, 1.2, ALL, ALL), (1.1, 1.4, SAME, ALL),
                                       (1.3, 1.1, (True, False, True), (False, True, False)))


def check_alignment(patch: tuple[int, int, int] = (32, 64, 64), batch: int = 4, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    region_size = [int(1.4 * p) + 1 for p in patch]
    coords = voxel_grid(region_size, torch.device("cpu")).permute(3, 0, 1, 2)[None].repeat(batch, 1, 1, 1, 1)
    va, vb, pa, pb = make_view_pair(coords, patch, generator=g)
    worst = 0.0
    print(f"[1] alignment of a coordinate field: region {tuple(region_size)}, patch {patch}, {batch} view pairs")
    print("    stride       points  valid   max |a-b|   max |a-coords|")
    for s in [(1, 1, 1), (2, 2, 2), (1, 2, 2), (2, 4, 4), (4, 8, 8)]:
        fa, fb = F.avg_pool3d(va, s, s), F.avg_pool3d(vb, s, s)
        a, b, valid = align_features(fa, pa, fb, pb)
        pts, _ = overlap_points(pa, fa.shape[2:], pb, fb.shape[2:], fa.shape[2:])
        truth = pts.movedim(-1, 1)
        m = valid.expand_as(a)
        e_ab = float((a - b)[m].abs().max())
        e_true = float((a - truth)[m].abs().max())
        worst = max(worst, e_ab, e_true)
        print(f"    {str(s):12s} {valid.numel():6d}  {float(valid.float().mean()):5.1%}   {e_ab:.2e}    {e_true:.2e}")
    return worst


def linearise_(network: nn.Module, shortcut_weight: float = 0.5, skip_weight: float = 0.5) -> nn.Module:
    """Make a U-Net built without normalisation and nonlinearity linear, in place, with every gain 1.

    Every convolution gets the box weight ``1 / (C_in/groups · k_z k_y k_x)`` and no bias (a constant input keeps
    its value); transposed convolutions with kernel = stride get ``1 / C_in`` (nearest-neighbour upsampling).
    Where paths meet, their weights sum to 1:

    * residual blocks whose shortcut average-pools (``ResidualEncoderUNet``, first block of a stage): the
      convolution path gets ``1 − shortcut_weight``, the shortcut ``shortcut_weight``; the other residual blocks
      are reduced to their shortcut (the identity, or a projection), which moves no centre;
    * the first convolution of each decoder stage (input: upsampled path, then skip): the skip gets
      ``skip_weight``, the upsampled path ``1 − skip_weight``.
    """
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                if tuple(m.kernel_size) != tuple(m.stride):
                    raise ValueError(f"linearise_: transposed convolution with kernel {m.kernel_size} != stride "
                                     f"{m.stride}")
                m.weight.fill_(1.0 / m.in_channels)
            elif isinstance(m, nn.modules.conv._ConvNd):
                m.weight.fill_(1.0 / (m.in_channels // m.groups * math.prod(m.kernel_size)))
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                raise ValueError("linearise_: build the network with norm_op=None")
            if isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None:
                m.bias.zero_()
        for m in network.modules():
            if not hasattr(m, "skip") or not hasattr(m, "conv2"):
                continue
            skip = getattr(m, "skip")
            pools = isinstance(skip, nn.Sequential) and any(isinstance(x, nn.modules.pooling._AvgPoolNd)
                                                            for x in skip)
            convs = [c for c in skip.modules() if isinstance(c, nn.modules.conv._ConvNd)] if pools else []
            if pools and not convs:
                raise ValueError("linearise_: a pooling shortcut without projection cannot be weighted; give the "
                                 "stages different channel counts (as nnU-Net's plans do)")
            for c in convs:
                c.weight.mul_(shortcut_weight)
            for c in getattr(m, "conv2").modules():
                if isinstance(c, nn.modules.conv._ConvNd):
                    c.weight.mul_(1 - shortcut_weight if pools else 0.0)
        decoder = getattr(network, "decoder", None)
        for stage in getattr(decoder, "stages", []):
            first = next(c for c in stage.modules() if isinstance(c, nn.modules.conv._ConvNd))
            half = first.in_channels // 2
            first.weight[:, :half].mul_(2 * (1 - skip_weight))
            first.weight[:, half:].mul_(2 * skip_weight)
    return network.eval()


def small_unet(kind: str, strides: Sequence[Sequence[int]], kernels: Sequence[Sequence[int]],
               n_per_stage: Sequence[int], n_decoder: Sequence[int], channels: int = 2) -> nn.Module:
    """A dynamic-network-architectures U-Net (``'plain'`` or ``'resenc'``) with ``channels``, ``channels + 1``, …
    features per stage (changing at every stage, as in nnU-Net's plans, so that every strided residual block has
    its projection), no normalisation and no nonlinearity, linearised by :func:`linearise_`."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    n = len(strides)
    common: Dict[str, Any] = dict(conv_bias=False, norm_op=None, nonlin=None, deep_supervision=False)
    args = (1, n, list(range(channels, channels + n)), nn.Conv3d, [list(k) for k in kernels],
            [list(s) for s in strides], list(n_per_stage), 1, list(n_decoder))
    if kind == "plain":
        net = PlainConvUNet(*args, **common)
    elif kind == "resenc":
        net = ResidualEncoderUNet(*args, **common)
    else:
        raise ValueError(f"kind must be 'plain' or 'resenc'; got {kind!r}")
    return linearise_(net)


#: per view pair: the two priors and, per level, each view's map of region positions ``(1, 3, *S)``
Positions = List[Tuple[ViewPrior, ViewPrior, List[torch.Tensor], List[torch.Tensor]]]


def coordinate_positions(network: nn.Module, patch: Sequence[int], pairs: Sequence[PairSpec] = DEFAULT_PAIRS,
                         encoder: bool = True) -> Positions:
    """The region positions that the feature voxels of a linearised U-Net stand for, per view pair and level.

    A region filled with its voxel coordinates (z, y, x, one field each) and with ones is viewed twice per pair:
    crops of ``u·patch`` around the region centre (view b's shifted by 4 % of the patch), resized and flipped. The
    views' outermost voxels are set to NaN, so a feature voxel is finite exactly when its receptive field lies
    inside the view. Per level, the features of the ramps divided by those of the ones are the region positions
    the feature voxels stand for (any gain of the network cancels).

    Args:
        network: a linearised U-Net (:func:`linearise_`) with one input channel.
        patch: the view size; divisible by the bottleneck stride.
        pairs: the view pairs.
        encoder: the encoder's outputs (levels 0 … n − 1, the last the bottleneck); False: the decoder levels and
            the bottleneck as :func:`~nnunet_pgl.features.extract_features` returns them.
    """
    p = [int(x) for x in patch]
    region = [math.ceil(1.45 * x) + 2 for x in p]
    fields = torch.cat([voxel_grid(region, torch.device("cpu")).permute(3, 0, 1, 2),
                        torch.ones(1, *region)])[None]                          # (1, 4, *region)
    n = len(level_strides(network))
    out: Positions = []
    for ua, ub, fa, fb in pairs:
        centre = torch.tensor([(r - 1) / 2 for r in region])
        shift = torch.tensor([0.04 * x for x in p])
        priors = []
        for u, fl, c in ((ua, fa, centre), (ub, fb, centre + shift)):
            size = torch.tensor([u * x for x in p])
            priors.append(ViewPrior.from_crop(c - size / 2, size, p, flips=fl))
        views = []
        for pr in priors:
            v = sample_view(fields, pr)[0].unsqueeze(1)                        # (4, 1, *patch)
            for d in range(3):
                v.select(2 + d, 0).fill_(float("nan"))
                v.select(2 + d, p[d] - 1).fill_(float("nan"))
            views.append(v)
        with torch.no_grad():
            x = torch.cat(views)
            enc: Any = getattr(network, "encoder")
            feats = list(enc(x)) if encoder else extract_features(network, x, list(range(n)))
        pos = [f[:, 0] / f[:, 0][[3, 3, 3, 3, 7, 7, 7, 7]] for f in feats]    # ramp / ones, (8, *S)
        out.append((priors[0], priors[1], [q[0:3][None] for q in pos], [q[4:7][None] for q in pos]))
    return out


def alignment_errors(positions: Positions, geometry: Sequence[LevelGeometry]) -> List[List[Tuple[float, float, int]]]:
    """Align the position maps of :func:`coordinate_positions` with ``geometry`` and compare them.

    Returns:
        Per pair, per level ``(max |a − truth|, max |a − b|, points)``: errors in feature voxels of view a
        (``stride · u_a`` region voxels), the maximum over the axes and over the valid points where both aligned
        maps are finite (receptive fields inside both views); NaN where there is no such point.
    """
    out: List[List[Tuple[float, float, int]]] = []
    for pa, pb, pos_a, pos_b in positions:
        ua = float(pa.to_region[0, :3, :3].abs().sum(dim=0).max())            # region voxels per view voxel
        row = []
        for lvl, (fa, fb) in enumerate(zip(pos_a, pos_b)):
            g = geometry[lvl]
            a, b, valid = align_features(fa, pa, fb, pb, geometry=g)
            pts, _ = overlap_points(pa, fa.shape[2:], pb, fb.shape[2:], fa.shape[2:], geometry=g)
            m = valid[0, 0] & torch.isfinite(a[0]).all(0) & torch.isfinite(b[0]).all(0)
            if not bool(m.any()):
                row.append((float("nan"), float("nan"), 0))
                continue
            unit = torch.tensor([s * ua for s in g.stride]).view(3, 1)
            truth = pts[0].movedim(-1, 0)[:, m]
            e_true = float(((a[0][:, m] - truth).abs() / unit).max())
            e_ab = float(((a[0][:, m] - b[0][:, m]).abs() / unit).max())
            row.append((e_true, e_ab, int(m.sum())))
        out.append(row)
    return out


def coordinate_alignment_errors(network: nn.Module, geometry: Sequence[LevelGeometry], patch: Sequence[int],
                                pairs: Sequence[PairSpec] = DEFAULT_PAIRS, encoder: bool = True,
                                ) -> List[List[Tuple[float, float, int]]]:
    """Misalignment of two views of a coordinate field through a linearised U-Net aligned with ``geometry``:
    :func:`alignment_errors` of :func:`coordinate_positions` (per pair, per level)."""
    return alignment_errors(coordinate_positions(network, patch, pairs, encoder), geometry)


def check_network_alignment(patch: Tuple[int, int, int] = (48, 48, 48)) -> float:
    """Part 1b: a linearised PlainConvUNet (strides 1, 2, 2, 2, one convolution per stage, so that the
    bottleneck's receptive field fits the patch); returns the worst misalignment (feature voxels)."""
    net = small_unet("plain", [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)], [(3, 3, 3)] * 4, [1, 1, 1, 1],
                     [1, 1, 1], channels=1)
    geo = level_geometry(net, encoder=True)
    old = [avg_pool_geometry(g.stride) for g in geo]
    print(f"[1b] a linearised PlainConvUNet (box kernels, no norm, no nonlinearity), patch {patch}; encoder levels "
          f"and bottleneck, {len(DEFAULT_PAIRS)} view pairs (scales 1.1-1.4, same and opposite flips); "
          "max |a-b| in feature voxels")
    print("    level  stride       origin            level_geometry  avg-pool convention  points")
    pos = coordinate_positions(net, patch)
    new_e, old_e = alignment_errors(pos, geo), alignment_errors(pos, old)
    worst = 0.0
    for lvl, g in enumerate(geo):
        e_new = max(max(r[lvl][0], r[lvl][1]) for r in new_e)
        e_old = max(r[lvl][1] for r in old_e)
        pts = min(r[lvl][2] for r in new_e)
        worst = max(worst, e_new) if pts > 0 else float("inf")
        print(f"    {lvl:5d}  {str(tuple(int(s) for s in g.stride)):11s}  {str(g.origin):16s}  {e_new:14.2e}  "
              f"{e_old:19.3f}  {pts:6d}")
    return worst


def blob_volume(shape: List[int], batch: int, gen: torch.Generator) -> torch.Tensor:
    """Random smooth blobs with CT-like contrast, z-scored: ``(B, 1, *shape)``."""
    x = torch.randn(batch, 1, *[max(2, s // 8) for s in shape], generator=gen)
    x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    x = (x > 0.3).float() * 2 + (x > 1.0).float() * 1.5 + 0.2 * torch.randn(batch, 1, *shape, generator=gen)
    return (x - x.mean()) / x.std()


def pgl_steps(steps: int = 5, seed: int = 0) -> List[float]:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    patch = (16, 32, 32)
    net = PlainConvUNet(1, 4, [8, 16, 32, 64], torch.nn.Conv3d, [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                        [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [2, 2, 2, 2], 4, [2, 2, 2], True,
                        torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                        {"inplace": True}, deep_supervision=True)
    levels = default_levels(level_strides(net))
    online = PGLBranch(net, levels, "pgl", proj_dim=32, hidden_dim=64)
    for m in online.features.unused_modules():
        m.requires_grad_(False)
    target = make_target(online)
    opt = torch.optim.SGD([p for p in online.parameters() if p.requires_grad], 1e-2, momentum=0.99, nesterov=True)
    aug = IntensityAugmentation()
    print(f"[2] {steps} PGL steps: PlainConvUNet {[8, 16, 32, 64]} features, patch {patch}, loss levels {levels} "
          f"(strides {[level_strides(net)[lv] for lv in levels]})")
    losses = []
    for k in range(steps):
        t0 = time.perf_counter()
        region = blob_volume([23, 45, 45], 2, gen)
        va, vb, pa, pb = make_view_pair(region, patch, generator=gen)
        x = aug(torch.cat([va, vb]), generator=gen)
        out, tgt = online(x, pa, pb), None
        with torch.no_grad():
            tgt = target(x, pa, pb, use_predictor=False)
        loss, per_level, _ = pgl_loss(out, tgt)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        ema_update_(target, online, tau_schedule(k, steps))
        losses.append(float(loss.detach()))
        valid = [f"{float(v.float().mean()):.0%}" for v in out.valid]
        print(f"    step {k}: loss {losses[-1]:.4f}  per level {[round(float(x.detach()), 4) for x in per_level]}  "
              f"valid overlap {valid}  {time.perf_counter() - t0:.2f} s")
    return losses


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="pgl_selfcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="PGL steps to run in part 2")
    args = p.parse_args(argv)
    worst = check_alignment()
    worst_net = check_network_alignment()
    losses = pgl_steps(args.steps)
    ok = worst < 1e-3 and worst_net <= 0.05 and all(l == l and 0.0 <= l <= 4.0 for l in losses)
    print(f"pgl_selfcheck: {'OK' if ok else 'FAILED'} (worst alignment error {worst:.1e} voxels, through a "
          f"linearised PlainConvUNet {worst_net:.1e} feature voxels, "
          f"losses finite and in [0, 4]: {all(0.0 <= l <= 4.0 for l in losses)})")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
