"""What-if: does the normalisation inside the local heads decide whether PGL's projections collapse?

    python benchmarks/head_norm.py --evidence-dir DIR --out DIR [--norm layer batch] [--epochs 4] [--iters 50]
        [--save-every 2]

The heads (:class:`nnunet_pgl.model.MLPHead`) are Linear → LayerNorm → ReLU → Linear; BYOL's have BatchNorm, whose
batch centring is what several analyses of BYOL credit with keeping the projections from collapsing. The local heads
see every feature voxel of the batch as one sample (thousands per step even at batch 2), so a BatchNorm over points
has enough samples. This script pretrains PGL on ``benchmarks/evidence.py``'s dataset (its ``--workdir``:
``pre/``, ``raw/``, ``unlabeled/``) once per ``--norm``, same seed and budget, each into ``<out>/<norm>/``, with the
heads' LayerNorm replaced by a BatchNorm over points for ``batch`` (patched in this process only; the project's
heads are unchanged), and prints per epoch the collapse statistics (spread, effective rank) and the dense probe
(every ``--save-every`` epochs and at the end). ``--norm batch --epochs 12 --iters 100 --save-every 5`` is the
evidence run's PGL pretraining (``pgl_pretrain``'s defaults otherwise; its batches do not depend on the number of
loader workers) with only the heads changed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import List, Optional


def _point_batchnorm_heads() -> None:
    """Replace ``nn.LayerNorm`` in every :class:`MLPHead` built from now on by a BatchNorm over all points."""
    import torch
    from torch import nn

    from nnunet_pgl import model

    class PointBatchNorm(nn.BatchNorm1d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C): every leading index is a sample
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)

    original = model.MLPHead.__init__

    def init(self: nn.Module, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        original(self, in_dim, hidden_dim, out_dim)
        self.net[1] = PointBatchNorm(hidden_dim)

    model.MLPHead.__init__ = init  # type: ignore[method-assign]


def run_one(norm: str, evidence: str, out: str, epochs: int, iters: int, seed: int, save_every: int) -> None:
    """One pretraining in this process (``--norm`` already patched), nnU-Net's folders set before its import."""
    os.environ.update(nnUNet_raw=os.path.join(evidence, "raw"), nnUNet_preprocessed=os.path.join(evidence, "pre"),
                      nnUNet_results=os.path.join(out, norm), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0")
    if norm == "batch":
        _point_batchnorm_heads()
    from nnunet_pgl.pretraining.run import pretrain
    pretrain(996, "3d_fullres", "nnUNetPlans_evidence", unlabeled=[os.path.join(evidence, "unlabeled")],
             exclude_fold=0, device="cpu", epochs=epochs, iters_per_epoch=iters, seed=seed, save_every=save_every,
             num_workers=0)


def report(out: str, norms: List[str]) -> None:
    for norm in norms:
        path = os.path.join(out, norm, "Dataset996_PGLEvidence",
                            "nnUNetPretrainerPGL__nnUNetPlans_evidence__3d_fullres", "fold_0", "pgl_log.json")
        with open(path) as f:
            log = json.load(f)
        init = next((r["probe_random_init"] for r in log if r.get("probe_random_init")), None)
        print(f"\n{norm} norm heads (random init probe, all levels: {init['all'] if init else 'n/a'})")
        print("| epoch | loss | spread / effective rank per level | probe all |")
        print("|---|---|---|---|")
        for r in log:
            col = "; ".join(f"level {c['level']}: {c['spread']:.3f} / {c['effective_rank']:.1f}"
                            for c in r.get("collapse") or [])
            probe = f"{r['probe']['all']:.4f}" if r.get("probe") else ""
            print(f"| {r['epoch']} | {r['loss']:.4f} | {col} | {probe} |")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evidence-dir", required=True, help="benchmarks/evidence.py's --workdir (planned, ingested)")
    p.add_argument("--out", required=True)
    p.add_argument("--norm", nargs="+", default=["layer", "batch"], choices=["layer", "batch"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=2, help="epochs between probes (and checkpoints)")
    p.add_argument("--one", choices=["layer", "batch"], help=argparse.SUPPRESS)  # the child process of one run
    args = p.parse_args(argv)
    if args.one:
        run_one(args.one, os.path.abspath(args.evidence_dir), os.path.abspath(args.out), args.epochs, args.iters,
                args.seed, args.save_every)
        return
    for norm in args.norm:
        subprocess.run([sys.executable, __file__, "--evidence-dir", args.evidence_dir, "--out", args.out,
                        "--epochs", str(args.epochs), "--iters", str(args.iters), "--seed", str(args.seed),
                        "--save-every", str(args.save_every), "--one", norm], check=True)
    report(os.path.abspath(args.out), args.norm)


if __name__ == "__main__":
    main()
