"""``pgl_selfcheck``: a short check of the PGL core on synthetic data, printing what it did.

1. Alignment exactness: a region filled with its own voxel coordinates, two random views, average-pooled at
   several (anisotropic) strides, aligned; the aligned maps must agree with each other and with the true region
   coordinates on every valid point.
2. A few PGL steps (views → intensity augmentation → U-Net features → alignment → heads → loss → SGD → EMA) on
   a small nnU-Net-style U-Net (dynamic-network-architectures, imported here only) and a blobby synthetic
   volume.
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from .ema import ema_update_, tau_schedule
from .alignment import align_features, overlap_points
from .intensity import IntensityAugmentation
from .model import PGLBranch, make_target, pgl_loss
from .features import default_levels, level_strides
from .views import make_view_pair, voxel_grid


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


def blob_volume(shape: List[int], batch: int, gen: torch.Generator) -> torch.Tensor:
    """Random smooth blobs with CT-like contrast, z-scored: ``(B, 1, *shape)``."""
    x = torch.randn(batch, 1, *[max(2, s // 8) for s in shape], generator=gen)
    x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    x = (x > 0.3).float() * 2 + (x > 1.0).float() * 1.5 + 0.2 * torch.randn(batch, 1, *shape, generator=gen)
    return (x - x.mean()) / x.std()


def pgl_steps(steps: int = 5, seed: int = 0) -> List[float]:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet  # type: ignore[import-untyped]

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
    losses = pgl_steps(args.steps)
    ok = worst < 1e-3 and all(l == l and 0.0 <= l <= 4.0 for l in losses)
    print(f"pgl_selfcheck: {'OK' if ok else 'FAILED'} (worst alignment error {worst:.1e} voxels, "
          f"losses finite and in [0, 4]: {all(0.0 <= l <= 4.0 for l in losses)})")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
