"""DDP overhead of ``pgl_pretrain`` with 2 CPU ranks (gloo), for machines without 2 GPUs.

    python benchmarks/ddp_overhead.py [--iters N] [--json PATH]

Makes the tiny synthetic dataset of ``pretrain_speed.py --tiny``, then runs two real ``pgl_pretrain`` jobs of 2
epochs on the same plan, one core per rank, no loader workers (data is read inside the step in both):

- 1 rank pinned to one core, ``--batch-size B``;
- ``torchrun --nproc_per_node 2``, ``--batch-size 2B`` (B per rank; each rank gets half the cores, i.e. one).

and compares the views/s of epoch 1 (epoch 0 includes start-up). Ideal scaling is 2.0x; the shortfall is the cost
of DDP (gradient all-reduce, the per-step non-finite check, the epoch-end statistics) plus contention for memory
bandwidth between the two cores. Needs >= 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_speed import _make_synthetic  # noqa: E402


def _run(cmd, env, pin_one_core: bool) -> dict:
    pre = (lambda: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})) if pin_one_core else None
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=pre)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    for root, _, files in os.walk(env["nnUNet_results"]):
        if "pgl_log.json" in files:
            with open(os.path.join(root, "pgl_log.json")) as f:
                return json.load(f)[-1]
    raise SystemExit("no pgl_log.json written")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=4, help="iterations per epoch (default 4)")
    ap.add_argument("--batch", type=int, default=2, help="pairs per rank (default 2)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs at least 2 cores")
    tmp = tempfile.mkdtemp(prefix="pgl_ddp_")
    dataset = _make_synthetic(tmp)
    bindir = os.path.dirname(sys.executable)
    common = ["-d", dataset, "-device", "cpu", "--epochs", "2", "--iters-per-epoch", str(args.iters),
              "--num-workers", "0", "--seed", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")
    one = _run([os.path.join(bindir, "pgl_pretrain"), *common, "--batch-size", str(args.batch)],
               dict(env, nnUNet_results=os.path.join(tmp, "one")), pin_one_core=True)
    two = _run([os.path.join(bindir, "torchrun"), "--standalone", "--nproc_per_node", "2",
                os.path.join(bindir, "pgl_pretrain"), *common, "--batch-size", str(2 * args.batch)],
               dict(env, nnUNet_results=os.path.join(tmp, "two"), OMP_NUM_THREADS="1"), pin_one_core=False)
    ratio = two["views_per_s"] / one["views_per_s"]
    res = {"ranks_1_views_per_s": one["views_per_s"], "ranks_2_views_per_s": two["views_per_s"],
           "throughput_ratio": ratio, "scaling_efficiency": ratio / 2, "ranks_in_sync": two.get("ranks_in_sync"),
           "iters_per_epoch": args.iters, "pairs_per_rank": args.batch}
    print("| run | views/s (epoch 1) |")
    print("|---|---|")
    print(f"| 1 rank, 1 core, {args.batch} pairs/step | {one['views_per_s']:.2f} |")
    print(f"| 2 ranks (gloo), 1 core each, {args.batch} pairs/rank | {two['views_per_s']:.2f} |")
    print(f"| throughput ratio (ideal 2.0) | {ratio:.2f}x (efficiency {100 * ratio / 2:.0f} %) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
