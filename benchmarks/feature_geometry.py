"""Misalignment of the PGL alignment through linearised nnU-Net networks, per level, for several geometries.

    python benchmarks/feature_geometry.py [--arch plain resenc] [--patch Z Y X] [--stages N] [--json PATH]

Builds the U-Nets of the test plans (``tests/data/plans_plain.json``, ``plans_resenc_m.json``: kernel sizes,
strides and convolutions per stage, first downsampling ``(1, 2, 2)``; the first ``--stages`` stages) with 1, 2, 3, …
feature channels, no normalisation and no nonlinearity, and box kernels (``nnunet_pgl.selfcheck.linearise_``:
every gain 1; ``ResidualEncoderUNet`` with one residual block per stage, since only a stage's first block has the
average-pool shortcut and the identity blocks move no centre). Where two paths meet, the network is linearised three
times with different weights: for ``PlainConvUNet`` the decoder's skip vs upsampled path (skip only / equal / upsampled
only), for ``ResidualEncoderUNet`` the strided block's convolution path vs average-pool shortcut (conv only / equal /
shortcut only; decoder equal).

For four view pairs (scales 1.1-1.4; two with the same flips, two with opposite flips on every axis) it aligns a
coordinate field's features at every level and prints the largest misalignment ``|a − b|`` over the points whose
receptive field lies inside both views, in feature voxels (``stride · u`` region voxels), for each geometry:
``avg-pool`` (the convention before ``level_geometry``), ``skip`` (every level at its encoder level's geometry, i.e.
``level_geometry(net, encoder=True)``), ``conv 0`` (origin 0 everywhere; ResEnc), and ``level_geometry`` (the
default). Levels 0 … n − 2 are measured at the encoder outputs and at the decoder outputs (what PGL uses); level
n − 1 is the bottleneck.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from nnunet_pgl import LevelGeometry, avg_pool_geometry, level_geometry
from nnunet_pgl.selfcheck import DEFAULT_PAIRS, alignment_errors, coordinate_positions, linearise_, small_unet

PLANS = Path(__file__).resolve().parent.parent / "tests" / "data"
SAME = [i for i, p in enumerate(DEFAULT_PAIRS) if p[2] == p[3]]
OPPOSITE = [i for i, p in enumerate(DEFAULT_PAIRS) if all(x != y for x, y in zip(p[2], p[3]))]


def arch_of(name: str, stages: int) -> Dict[str, Any]:
    conf = json.loads((PLANS / f"plans_{name}.json").read_text())["configurations"]["3d_fullres"]
    kw = conf["architecture"]["arch_kwargs"]
    per = kw.get("n_conv_per_stage", kw.get("n_blocks_per_stage"))
    return dict(strides=kw["strides"][:stages], kernels=kw["kernel_sizes"][:stages], per_stage=per[:stages],
                decoder=kw["n_conv_per_stage_decoder"][:stages - 1])


def measure(net: torch.nn.Module, geoms: Dict[str, Dict[str, List[LevelGeometry]]], patch: Sequence[int]
            ) -> Dict[str, Any]:
    """``geoms[name][part]``: per level; returns ``[name][part][level] = {same, opposite, points}``."""
    out: Dict[str, Any] = {name: {} for name in geoms}
    for part in ("encoder", "decoder"):
        pos = coordinate_positions(net, patch, encoder=part == "encoder")
        for name, g in geoms.items():
            errs = alignment_errors(pos, g[part])
            out[name][part] = [dict(same=max(errs[i][lvl][1] for i in SAME),
                                    opposite=max(errs[i][lvl][1] for i in OPPOSITE),
                                    points=min(errs[i][lvl][2] for i in range(len(errs))))
                               for lvl in range(len(g[part]))]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["plain", "resenc"], choices=["plain", "resenc"])
    p.add_argument("--patch", nargs=3, type=int, default=[48, 96, 96])
    p.add_argument("--stages", type=int, default=4, help="first N stages of the plans (default 4: bottleneck "
                   "stride (4, 8, 8), whose receptive field fits the default patch)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    result: Dict[str, Any] = dict(patch=args.patch, stages=args.stages, torch=torch.__version__,
                                  pairs=[list(map(str, x)) for x in DEFAULT_PAIRS])
    for arch in args.arch:
        a = arch_of("plain" if arch == "plain" else "resenc_m", args.stages)
        per = a["per_stage"] if arch == "plain" else [1] * args.stages
        if arch == "plain":
            variants = {"decoder: skip only": dict(skip_weight=1.0), "decoder: equal": {},
                        "decoder: upsampled only": dict(skip_weight=0.0)}
        else:
            variants = {"conv path only": dict(shortcut_weight=0.0), "equal": {},
                        "shortcut only": dict(shortcut_weight=1.0)}
        for vname, kw in variants.items():
            net = linearise_(small_unet(arch, a["strides"], a["kernels"], per, a["decoder"], channels=1), **kw)
            new, enc = level_geometry(net), level_geometry(net, encoder=True)
            old = [avg_pool_geometry(g.stride) for g in new]
            geoms = {"avg-pool": dict(encoder=old, decoder=old), "skip": dict(encoder=enc, decoder=enc)}
            if arch == "resenc":
                zero = [LevelGeometry(g.stride, (0.0, 0.0, 0.0)) for g in new]
                geoms["conv 0"] = dict(encoder=zero, decoder=zero)
            geoms["level_geometry"] = dict(encoder=enc, decoder=new)
            rows = measure(net, geoms, args.patch)
            result[f"{arch}/{vname}"] = dict(origins=[g.origin for g in new], encoder_origins=[g.origin for g in enc],
                                             rows=rows)
            print(f"\n{arch}, {vname}, patch {tuple(args.patch)}: max |a - b| in feature voxels, same flips / "
                  "opposite flips")
            print("| level | stride | part | " + " | ".join(geoms) + " | points |")
            print("|---" * (4 + len(geoms)) + "|")
            n = len(new)
            for lvl, g in enumerate(new):
                for part in ("encoder", "decoder"):
                    if part == "decoder" and lvl == n - 1:
                        continue
                    name = "bottleneck" if lvl == n - 1 else part
                    cells = [f"{rows[c][part][lvl]['same']:.2f} / {rows[c][part][lvl]['opposite']:.2f}"
                             for c in geoms]
                    print(f"| {lvl} | {tuple(int(s) for s in g.stride)} | {name} | " + " | ".join(cells)
                          + f" | {rows['level_geometry'][part][lvl]['points']} |")
            sys.stdout.flush()
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
