"""What PGL pretraining learns with the old (average-pooling) and the new (``level_geometry``) alignment geometry.

    python benchmarks/geometry_effect.py [--steps N] [--arch plain|resenc] [--seed S] [--json PATH]

Two runs that differ only in the geometry the alignment uses: the same network initialisation, heads, phantoms
(``demo/synthetic.py``, z-scored), view pairs, intensity augmentation and optimiser (SGD, Nesterov 0.99,
lr 1e-2, τ from 0.996 on ``tau_schedule``), at the plans' architecture of ``tests/data`` with fewer
channels. It prints the per-level loss over training (means of windows of steps), then evaluates both trained
branches, and the untrained one, on held-out view pairs with the *network's* geometry (where the features truly
correspond): the per-level local loss for pairs with the same flips and pairs with opposite flips on every axis.
A convention that misplaces opposite-flipped views by about one feature voxel trains the network to match
neighbouring points; held-out opposite-flip pairs show it.
"""
from __future__ import annotations

import argparse
import copy
import json
import pydoc
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from nnunet_pgl import (IntensityAugmentation, PGLBranch, ViewPrior, avg_pool_geometry, default_levels, ema_update_,
                        level_geometry, level_strides, make_target, make_view_pair, pgl_loss, tau_schedule)
from nnunet_pgl.demo.synthetic import make_case
from nnunet_pgl.views import sample_view

PLANS = Path(__file__).resolve().parent.parent / "tests" / "data"


def build(arch: str, channels: Sequence[int]) -> torch.nn.Module:
    name = "plain" if arch == "plain" else "resenc_m"
    conf = json.loads((PLANS / f"plans_{name}.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    kw = dict(conf["arch_kwargs"])
    for k in conf["_kw_requires_import"]:
        if kw[k] is not None:
            kw[k] = pydoc.locate(kw[k])
    kw["features_per_stage"] = list(channels)
    return pydoc.locate(conf["network_class_name"])(input_channels=1, num_classes=4, deep_supervision=False, **kw)


def phantoms(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    vols = []
    for _ in range(n):
        img, _ = make_case(shape, rng=rng)
        img = np.clip(img, -1024, 325)
        vols.append((img - img.mean()) / img.std())
    return torch.from_numpy(np.stack(vols))[:, None].float()


def crops(vols: torch.Tensor, size: Sequence[int], batch: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, vols.shape[0], (batch,), generator=g)
    out = []
    for i in idx.tolist():
        st = [int(torch.randint(0, vols.shape[2 + d] - size[d] + 1, (1,), generator=g)) for d in range(3)]
        out.append(vols[i, :, st[0]:st[0] + size[0], st[1]:st[1] + size[1], st[2]:st[2] + size[2]])
    return torch.stack(out)


def train(net: torch.nn.Module, geometry: Any, vols: torch.Tensor, patch: Sequence[int], steps: int, batch: int,
          seed: int) -> Dict[str, Any]:
    torch.manual_seed(seed)
    online = PGLBranch(net, default_levels(level_strides(net)), proj_dim=32, hidden_dim=64, geometry=geometry)
    for m in online.features.unused_modules():
        m.requires_grad_(False)
    target = make_target(online)
    opt = torch.optim.SGD([p for p in online.parameters() if p.requires_grad], 1e-2, momentum=0.99, nesterov=True)
    aug, g = IntensityAugmentation(), torch.Generator().manual_seed(seed)
    region = [int(np.ceil(1.4 * p)) + 1 for p in patch]
    log: List[List[float]] = []
    t0 = time.time()
    for k in range(steps):
        va, vb, pa, pb = make_view_pair(crops(vols, region, batch, g), patch, generator=g)
        x = aug(torch.cat([va, vb]), generator=g)
        out = online(x, pa, pb)
        with torch.no_grad():
            tgt = target(x, pa, pb, use_predictor=False)
        loss, per_level, _ = pgl_loss(out, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update_(target, online, tau_schedule(k, steps))
        log.append([float(v.detach()) for v in per_level])
    return dict(online=online, target=target, log=log, seconds=time.time() - t0)


def held_out_pairs(vols: torch.Tensor, patch: Sequence[int], n: int, seed: int) -> List[Dict[str, Any]]:
    """``n`` pairs per kind: both views unflipped, or view b flipped on every axis; scales U(1.1, 1.4)."""
    g = torch.Generator().manual_seed(seed)
    region = [int(np.ceil(1.5 * p)) for p in patch]
    out = []
    for kind, flip_b in (("same", False), ("opposite", True)):
        for _ in range(n):
            r = crops(vols, region, 1, g)
            pri = []
            for flip in (False, flip_b):
                u = 1.1 + 0.3 * float(torch.rand(1, generator=g))
                size = torch.tensor([u * p for p in patch])
                lo = torch.tensor([(rr - 1) / 2 for rr in region]) - size / 2 + (torch.rand(3, generator=g) - 0.5) * 2
                pri.append(ViewPrior.from_crop(lo, size, patch, flips=(flip,) * 3))
            out.append(dict(kind=kind, x=torch.cat([sample_view(r, p) for p in pri]), pa=pri[0], pb=pri[1]))
    return out


def evaluate(online: PGLBranch, target: PGLBranch, geometry: Any, pairs: List[Dict[str, Any]]) -> Dict[str, List[float]]:
    on, tg = copy.copy(online), copy.copy(target)
    on.geometry, tg.geometry = list(geometry), list(geometry)           # compare at truly corresponding points
    res: Dict[str, List[List[float]]] = {"same": [], "opposite": []}
    with torch.no_grad():
        for p in pairs:
            _, per_level, _ = pgl_loss(on(p["x"], p["pa"], p["pb"]), tg(p["x"], p["pa"], p["pb"], use_predictor=False))
            res[p["kind"]].append([float(v) for v in per_level])
    return {k: np.mean(np.array(v), axis=0).tolist() for k, v in res.items()}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="plain", choices=["plain", "resenc"])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--patch", nargs=3, type=int, default=[32, 64, 64])
    ap.add_argument("--channels", nargs=5, type=int, default=[4, 8, 16, 32, 32])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--held-out", type=int, default=8, help="held-out view pairs per kind (same / opposite flips)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    patch = tuple(args.patch)
    vols = phantoms(6, (48, 96, 96), args.seed)
    held = phantoms(2, (48, 96, 96), args.seed + 1)
    torch.manual_seed(args.seed)
    net0 = build(args.arch, args.channels)
    true_geo = level_geometry(net0)
    geos = {"avg-pool (old)": [avg_pool_geometry(g.stride) for g in true_geo], "level_geometry (new)": true_geo}
    pairs = held_out_pairs(held, patch, args.held_out, args.seed + 2)
    levels = default_levels(level_strides(net0))
    result: Dict[str, Any] = dict(args=vars(args), levels=levels, origins=[g.origin for g in true_geo], runs={})
    untrained = PGLBranch(copy.deepcopy(net0), levels, proj_dim=32, hidden_dim=64, geometry=true_geo)
    result["untrained"] = evaluate(untrained, make_target(untrained), true_geo, pairs)
    for name, geo in geos.items():
        run = train(copy.deepcopy(net0), geo, vols, patch, args.steps, args.batch, args.seed)
        ev = evaluate(run["online"], run["target"], true_geo, pairs)
        w = max(1, args.steps // 6)
        curve = [np.mean(run["log"][i:i + w], axis=0).round(4).tolist() for i in range(0, args.steps, w)]
        result["runs"][name] = dict(curve=curve, window=w, held_out=ev, seconds=run["seconds"])
        print(f"{name}: {run['seconds']:.0f} s; per-level loss (levels {levels}), means of {w} steps:")
        for i, c in enumerate(curve):
            print(f"    steps {i * w:4d}-{min(args.steps, (i + 1) * w) - 1:4d}: {c}")
        print(f"    held-out, network geometry: same flips {np.round(ev['same'], 4).tolist()}, "
              f"opposite flips {np.round(ev['opposite'], 4).tolist()}")
    ev = result["untrained"]
    print(f"untrained: held-out same flips {np.round(ev['same'], 4).tolist()}, "
          f"opposite flips {np.round(ev['opposite'], 4).tolist()}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
