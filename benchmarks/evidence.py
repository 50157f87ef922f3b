"""Evidence where pretraining should pay off: few labeled cases, many unlabeled volumes, a fixed pretraining budget.

    python benchmarks/evidence.py --workdir DIR [--cases 10] [--unlabeled 40] [--shape 40 96 96] [--patch 24 48 48]
        [--methods pgl byol pgl+byol] [--pretrain-epochs E] [--pretrain-iters I] [--seeds 0 1 2]
        [--finetune-trainers PGL_TRAINER SCRATCH_TRAINER] [-device cpu|cuda] [--json PATH] [--md PATH]

Steps (each skipped when its output exists, so a killed run resumes with the same command):

1. synthetic CT phantoms (:mod:`nnunet_pgl.demo.synthetic`): ``--cases`` labeled cases and ``--unlabeled``
   unlabeled volumes of ``--shape`` voxels, planned by stock nnU-Net; then plans ``nnUNetPlans_evidence`` with the
   CPU-sized ``--patch`` (the topology nnU-Net's planner derives for it; the preprocessed data is shared), so that
   cases are larger than the patch and the pretraining views are real crops;
2. one ``pgl_pretrain --exclude-fold 0`` per ``--methods`` entry, each with the same budget of ``--pretrain-epochs``
   × ``--pretrain-iters`` iterations and the same seed (wall time recorded);
3. ``pgl_probe --exclude-fold 0 --seed S random <each checkpoint>``: the dense linear probe of every method against
   random init (the network every pretraining started from: same ``--seed``) on the same cases and voxels;
4. fine-tuning fold 0 (``--cases``/5 validation cases, never seen in pretraining) once per seed and arm: each
   method's checkpoint with ``PGL_TRAINER`` (``nnUNet_pgl_weights``) and random init with ``SCRATCH_TRAINER`` (the
   twin with the identical schedule), seeded by ``nnUNet_pgl_seed``; the per-case foreground Dice of each arm is
   paired with scratch's by (seed, case) and compared with ``pgl_compare``'s paired statistics.

Writes the JSON (every number, the commands, the wall times) and a Markdown report (the tables), and prints the
report. The budget is the arguments: pick ``--pretrain-epochs``/``--pretrain-iters`` for the wall time you want
(``BENCHMARKS.md`` gives seconds per iteration) and record the command with the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

DATASET_ID, DATASET_NAME = 996, "PGLEvidence"
DATASET = f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
PLANS, CONFIGURATION, FOLD = "nnUNetPlans_evidence", "3d_fullres", 0
METHODS = ("pgl", "byol", "pgl+byol")  # pgl_pretrain --method; the pretrainers: nnunet_pgl.pretraining.contract
BIN = os.path.dirname(sys.executable)
RANDOM_ROW = "random init"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="folder for the dataset, nnU-Net's folders and the logs (reused)")
    p.add_argument("--cases", type=int, default=10, help="labeled training cases (fold 0 validates on a fifth)")
    p.add_argument("--unlabeled", type=int, default=40, help="unlabeled volumes for pretraining")
    p.add_argument("--shape", type=int, nargs=3, default=[40, 96, 96], metavar=("Z", "Y", "X"),
                   help="case size in voxels (larger than --patch, so that views are crops)")
    p.add_argument("--spacing", type=float, nargs=3, default=[2.5, 1.0, 1.0], metavar=("Z", "Y", "X"))
    p.add_argument("--patch", type=int, nargs=3, default=[24, 48, 48], metavar=("Z", "Y", "X"),
                   help="network patch (must be divisible by the pooling nnU-Net's planner chooses for it)")
    p.add_argument("--methods", nargs="+", default=["pgl", "byol", "pgl+byol"], choices=METHODS)
    p.add_argument("--pretrain-epochs", type=int, default=8, help="the pretraining budget: epochs ...")
    p.add_argument("--pretrain-iters", type=int, default=100, help="... x iterations per epoch, for every method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (nnUNet_pgl_seed)")
    p.add_argument("--finetune-trainers", nargs=2, default=["nnUNetTrainerPGL_demo", "nnUNetTrainerScratch_demo"],
                   metavar=("PGL_TRAINER", "SCRATCH_TRAINER"), help="twins with the same schedule")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the pretraining")
    p.add_argument("-device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", default=None, help="default: <workdir>/evidence.json")
    p.add_argument("--md", default=None, help="default: <workdir>/evidence.md")
    return p


def _env(work: str, device: str, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env.update(nnUNet_raw=os.path.join(work, "raw"), nnUNet_preprocessed=os.path.join(work, "pre"),
               nnUNet_results=os.path.join(work, "res"))
    if device == "cpu":
        env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0")
    env.update(extra)
    return env


def _run(cmd: List[str], env: Dict[str, str], log: str, record: Dict[str, Any], key: str) -> float:
    """Run ``cmd`` with its output in ``log``; record command and wall time under ``key``; raise on failure."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    record.setdefault("commands", {})[key] = " ".join(os.path.basename(cmd[0]) if i == 0 else c
                                                      for i, c in enumerate(cmd))
    record.setdefault("wall_s", {})[key] = dt
    if rc != 0:
        raise SystemExit(f"evidence: step {key} failed (exit {rc}); log: {log}")
    print(f"  {key}: {dt:.0f} s", flush=True)
    return dt


def plans_for_patch(base: str, patch: Sequence[int]) -> None:
    """Write ``nnUNetPlans_evidence.json``: nnUNetPlans with ``patch`` and the topology nnU-Net's planner derives for
    it (data identifier unchanged: the preprocessed data is shared)."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    plans = load_json(join(base, "nnUNetPlans.json"))
    cfg = plans["configurations"][CONFIGURATION]
    planner = ExperimentPlanner(DATASET, gpu_memory_target_in_gb=1e6, plans_name=PLANS)
    new = planner.get_plans_for_configuration(cfg["spacing"], list(patch), cfg["data_identifier"], 1e12, {})
    if list(new["patch_size"]) != list(patch):
        raise SystemExit(f"nnU-Net's topology for spacing {cfg['spacing']} needs patch {list(new['patch_size'])}, "
                         f"not {list(patch)}: pass that --patch")
    cfg.update(patch_size=list(patch), batch_size=2, architecture=new["architecture"])
    plans["plans_name"] = PLANS
    save_json(plans, join(base, PLANS + ".json"), sort_keys=False)


def fg_dice_per_case(summary: str) -> Dict[str, float]:
    """Per case: the mean Dice over the foreground labels that are not NaN (NaN if all are)."""
    from nnunet_pgl.evaluation.results import read_summary
    out = {}
    for case, labels in read_summary(summary).items():
        vals = [m["Dice"] for k, m in labels.items() if k != "0" and not math.isnan(m["Dice"])]
        out[case] = sum(vals) / len(vals) if vals else math.nan
    return out


def _f(x: Optional[float], sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def render(result: Dict[str, Any]) -> str:
    """The Markdown report: setting, probe table, fine-tuning table, wall times."""
    a = result["args"]
    lines = [
        "# Evidence: PGL with few labels and many unlabeled volumes", "",
        f"{a['cases']} labeled cases + {a['unlabeled']} unlabeled volumes of {'×'.join(map(str, a['shape']))} voxels, "
        f"patch {'×'.join(map(str, a['patch']))}; pretraining budget {a['pretrain_epochs']} × {a['pretrain_iters']} "
        f"iterations per method (--exclude-fold {FOLD}); fine-tuning {a['finetune_trainers'][0]} / "
        f"{a['finetune_trainers'][1]}, seeds {a['seeds']}; device {a['device']}.", "",
        "## Dense linear probe (pgl_probe; mean foreground F1, same cases and voxels for every row)", "",
    ]
    probe = result.get("probe") or {}
    levels = sorted({lv for r in probe.values() for lv in r["levels"]}, key=int)
    lines += ["| network | " + " | ".join(f"level {lv}" for lv in levels) + " | all levels | all − random |",
              "|---" * (len(levels) + 3) + "|"]
    rnd = probe.get(RANDOM_ROW, {}).get("all")
    for name, r in probe.items():
        diff = None if rnd is None or r["all"] is None else r["all"] - rnd
        lines.append(f"| {name} | " + " | ".join(_f(r["levels"].get(lv)) for lv in levels)
                     + f" | {_f(r['all'])} | {_f(diff, True)} |")
    lines += ["", f"## Fine-tuning fold {FOLD} (foreground Dice per validation case, paired with scratch by seed and "
              "case)", "",
              "| init | n | Dice | Dice scratch | mean Δ | 95 % CI | Wilcoxon p | W/L/T |", "|---" * 8 + "|"]
    for arm, s in (result.get("finetune") or {}).get("paired", {}).items():
        p = "n/a" if s["p"] is None else f"{s['p']:.3f}"
        lines.append(f"| {arm} | {s['n']} | {_f(s['mean_a'])} | {_f(s['mean_b'])} | {_f(s['mean_diff'], True)} | "
                     f"[{_f(s['ci_low'], True)}, {_f(s['ci_high'], True)}] | {p} | "
                     f"{s['wins']}/{s['losses']}/{s['ties']} |")
    lines += ["", "## Wall time per step", "", "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in result.get("wall_s", {}).items()]
    lines += ["", "## Commands", "", "```"] + list(result.get("commands", {}).values()) + ["```", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    env = _env(work, args.device)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    json_path = args.json or os.path.join(work, "evidence.json")
    md_path = args.md or os.path.join(work, "evidence.md")
    logs = os.path.join(work, "logs")
    result: Dict[str, Any] = {"args": vars(args)}
    if os.path.isfile(json_path):  # keep the wall times and commands of steps done by an earlier run
        with open(json_path) as f:
            prev = json.load(f)
        result.update({k: prev[k] for k in ("wall_s", "commands") if k in prev})

    def save() -> None:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)

    # 1. data and plans
    base = os.path.join(env["nnUNet_preprocessed"], DATASET)
    if not os.path.isfile(os.path.join(base, PLANS + ".json")):
        print("[1] synthetic dataset, plan and preprocess", flush=True)
        from nnunet_pgl.demo.synthetic import make_dataset
        make_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID, name=DATASET_NAME, num_train=args.cases,
                     num_unlabeled=args.unlabeled, unlabeled_dir=os.path.join(work, "unlabeled"),
                     shape=tuple(args.shape), spacing=tuple(args.spacing), seed=args.seed)
        n = "2" if args.device == "cpu" else "8"
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
        _run([f"{BIN}/nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-npfp", n, "-np", n],
             plan_env, os.path.join(logs, "plan.log"), result, "plan_and_preprocess")
        plans_for_patch(base, args.patch)
        save()

    # 2. pretraining, one per method, same budget
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    from nnunet_pgl.pretraining.contract import PRETRAINER_BY_METHOD, pretraining_checkpoint
    checkpoints: Dict[str, str] = {}
    for m in args.methods:
        ck = pretraining_checkpoint(DATASET, PLANS, CONFIGURATION, PRETRAINER_BY_METHOD[m], FOLD)
        checkpoints[m] = ck
        if not os.path.isfile(ck):
            print(f"[2] pgl_pretrain --method {m}", flush=True)
            _run([f"{BIN}/pgl_pretrain", "-d", str(DATASET_ID), "-p", PLANS, "-c", CONFIGURATION, "--method", m,
                  "--unlabeled", os.path.join(work, "unlabeled"), "--exclude-fold", str(FOLD), "--epochs",
                  str(args.pretrain_epochs), "--iters-per-epoch", str(args.pretrain_iters), "--seed", str(args.seed),
                  "-device", args.device, "-np", "2"],
                 env, os.path.join(logs, f"pretrain_{m}.log"), result, f"pretrain_{m}")
            save()

    # 3. probe: random init and every method, same cases and voxels
    probe_json = os.path.join(work, "probe.json")
    print("[3] pgl_probe", flush=True)
    _run([f"{BIN}/pgl_probe", "-d", str(DATASET_ID), "-p", PLANS, "-c", CONFIGURATION, "--exclude-fold", str(FOLD),
          "-device", args.device, "--seed", str(args.seed), "random"] + [checkpoints[m] for m in args.methods]
         + ["--json", probe_json],
         env, os.path.join(logs, "probe.log"), result, "probe")
    with open(probe_json) as f:
        raw = json.load(f)
    names = {"random": RANDOM_ROW, **{checkpoints[m]: m for m in args.methods}}
    result["probe"] = {names[k]: {"levels": v["levels"], "all": v["all"]} for k, v in raw.items()}
    save()

    # 4. fine-tuning per seed and arm; the per-case foreground Dice paired with scratch by (seed, case)
    from dataclasses import asdict

    from nnunet_pgl.evaluation.stats import paired_stats
    pgl_tr, scratch_tr = args.finetune_trainers
    per_case: Dict[str, Dict[str, float]] = {}
    for seed in args.seeds:
        for arm in args.methods + ["scratch"]:
            res_dir = os.path.join(work, "finetune", f"{arm.replace('+', '_')}_seed{seed}")
            trainer = scratch_tr if arm == "scratch" else pgl_tr
            summary = os.path.join(res_dir, DATASET, convert_trainer_plans_config_to_identifier(
                trainer, PLANS, CONFIGURATION), f"fold_{FOLD}", "validation", "summary.json")
            if not os.path.isfile(summary):
                print(f"[4] fine-tune {arm}, seed {seed}", flush=True)
                extra = {"nnUNet_results": res_dir, "nnUNet_pgl_seed": str(seed)}
                if arm != "scratch":
                    extra["nnUNet_pgl_weights"] = checkpoints[arm]
                _run([f"{BIN}/nnUNetv2_train", str(DATASET_ID), CONFIGURATION, str(FOLD), "-p", PLANS, "-tr", trainer,
                      "-device", args.device], _env(work, args.device, **extra),
                     os.path.join(logs, f"finetune_{arm}_seed{seed}.log"), result, f"finetune_{arm}_seed{seed}")
                save()
            for case, d in fg_dice_per_case(summary).items():
                per_case.setdefault(arm, {})[f"seed{seed}/{case}"] = d
    keys = sorted(per_case["scratch"])
    result["finetune"] = {
        "per_case": per_case,
        "paired": {arm: asdict(paired_stats([per_case[arm].get(k, math.nan) for k in keys],
                                            [per_case["scratch"][k] for k in keys], n_boot=10000, seed=0))
                   for arm in args.methods}}
    save()
    md = render(result)
    with open(md_path, "w") as f:
        f.write(md)
    print(md)
    print(f"JSON: {json_path}\nMarkdown: {md_path}")


if __name__ == "__main__":
    main()
