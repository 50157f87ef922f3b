"""Where and how ``pgl_demo``'s stages run: the ``--out`` folder, the subprocesses' environment, the stock command of
each stage, and running one with its output in ``<out>/logs/<stage>.log``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .config import CONFIGURATION, DATASET_ID, FOLD, MARKER, NNUNET_DIRS, OWN_ENTRIES, DemoConfig, DemoError


def prepare_out(out: str) -> List[str]:
    """Make ``out`` ready (new, empty, or a previous demo folder); return the previous outputs removed.

    Raises:
        DemoError: ``out`` is a file, or a non-empty folder that no demo made (nothing is touched then).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise DemoError(f"--out {out} is a file. Give a new or empty folder, or leave --out out for a new "
                        "pgl_demo_<date_time> folder")
    removed: List[str] = []
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MARKER)):
            raise DemoError(f"--out {out} is not empty and is not a pgl_demo folder (it has no {MARKER} file), so "
                            "the demo will not write into it. Give a new or empty folder, or leave --out out for a "
                            "new pgl_demo_<date_time> folder in the current directory")
        for entry in OWN_ENTRIES:
            path = os.path.join(out, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
                removed.append(entry)
            elif os.path.exists(path):
                os.remove(path)
                removed.append(entry)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("made by pgl_demo (nnunet_pgl); pgl_demo may replace this folder's outputs\n")
    return removed


def demo_env(cfg: DemoConfig, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of the subprocesses: nnU-Net's folders inside ``--out``, our trainers findable, CPU-sized pools."""
    from nnunet_pgl.trainers.discovery import EXT_ENV, ext_trainer_value

    env = dict(os.environ if base is None else base)
    for d in NNUNET_DIRS:
        env[d] = os.path.join(cfg.out, d)
    env[EXT_ENV] = ext_trainer_value(env.get(EXT_ENV, ""))
    env.pop("nnUNet_pgl_weights", None)   # the PGL arm must start from this demo's checkpoint
    env.pop("nnUNet_pgl_config", None)
    env["nnUNet_pgl_seed"] = str(cfg.seed)  # the fine-tuning trainers seed their generators with it (trainers/pgl.py)
    if cfg.device == "cpu":
        env["nnUNet_def_n_proc"] = "1"    # final validation would spawn 8 workers, ~35 s each to import torch
        env["nnUNet_n_proc_DA"] = "0"     # augmentation in the training process: 2 cores are busy with the model
    return env


def stage_commands(cfg: DemoConfig, bin_dir: Optional[str] = None) -> Dict[str, List[str]]:
    """The stock command line of every subprocess stage (what a user would type, minus the environment)."""
    b = bin_dir or os.path.dirname(sys.executable)
    d = str(DATASET_ID)
    n_proc = "2" if cfg.device == "cpu" else str(max(1, min(8, os.cpu_count() or 1)))
    pretrain = [os.path.join(b, "pgl_pretrain"), "-d", d, "-c", CONFIGURATION, "-device", cfg.device,
                "--epochs", str(cfg.pretrain_epochs), "--iters-per-epoch", str(cfg.pretrain_iters),
                "--seed", str(cfg.seed), "--exclude-fold", str(FOLD), "-np", n_proc]
    if cfg.unlabeled:
        pretrain += ["--unlabeled", os.path.join(cfg.out, "unlabeled")]
    train = [os.path.join(b, "nnUNetv2_train"), d, CONFIGURATION, str(FOLD)]
    return {
        "plan_and_preprocess": [os.path.join(b, "nnUNetv2_plan_and_preprocess"), "-d", d, "-c", CONFIGURATION,
                                "-npfp", n_proc, "-np", n_proc],
        "pretrain": pretrain,
        "finetune_pgl": train + ["-tr", cfg.pgl_trainer, "-device", cfg.device],
        "finetune_scratch": train + ["-tr", cfg.scratch_trainer, "-device", cfg.device],
    }


def stage_descriptions(cfg: DemoConfig) -> Dict[str, str]:
    """What each subprocess stage runs, in the few words of its progress line."""
    return {"plan_and_preprocess": f"nnUNetv2_plan_and_preprocess -d {DATASET_ID} -c {CONFIGURATION}",
            "pretrain": f"pgl_pretrain, {cfg.pretrain_epochs} x {cfg.pretrain_iters} iterations",
            "finetune_pgl": f"nnUNetv2_train -tr {cfg.pgl_trainer}",
            "finetune_scratch": f"nnUNetv2_train -tr {cfg.scratch_trainer}"}


def stage_env(stage: str, env: Dict[str, str]) -> Dict[str, str]:
    if stage == "plan_and_preprocess":  # planning calls torch.set_num_threads(nnUNet_n_proc_DA): 0 would fail
        return {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    return env


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, log: str):
        super().__init__(f"stage {stage} failed with exit status {returncode}; log: {log}")
        self.stage, self.returncode, self.log = stage, returncode, log


def _children_cpu_s() -> float:
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_stage(stage: str, cmd: Sequence[str], env: Dict[str, str], log: str) -> Tuple[float, float]:
    """Run ``cmd`` with stdout and stderr streamed into ``log``; return (wall s, CPU s) or raise StageFailed.

    The CPU seconds (all cores, the command and the processes it waited for) tell a busy machine apart from a slow
    stage: on an idle 2-core machine wall ≈ CPU / 2 for the training stages.
    """
    t0, c0 = time.perf_counter(), _children_cpu_s()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(list(cmd), env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise StageFailed(stage, rc, log)
    return time.perf_counter() - t0, _children_cpu_s() - c0


def tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
