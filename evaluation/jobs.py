"""The trainers ``pgl_compare`` compares and the training jobs of its ``--run``.

:func:`resolve_trainers` finds each arm's trainer class per labeled fraction (``<trainer>_fracNN`` variants, see
:mod:`nnunet_pgl.trainers.fractions`); :func:`training_jobs` lists the folds still to train or validate, and
:func:`run_jobs` runs ``nnUNetv2_train`` for them one at a time (resumable).
"""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nnunet_pgl.evaluation.records import Record
from nnunet_pgl.evaluation.results import CompareError, fold_dir


# ================================================================================================ trainers
def fraction_suffix(fraction: float) -> str:
    """``0.1 → '_frac10'``, ``0.25 → '_frac25'``, ``1.0 → ''`` (the base trainer)."""
    if not 0 < fraction <= 1:
        raise CompareError(f"--fractions {fraction:g}: a labeled fraction must be in (0, 1] (1.0 = all cases)")
    pct = fraction * 100
    if abs(pct - round(pct)) > 1e-6:
        raise CompareError(f"--fractions {fraction:g}: use whole percentages (0.1, 0.25, 0.5, ...); the trainer "
                           "variants are named <trainer>_fracNN")
    return "" if round(pct) == 100 else f"_frac{int(round(pct))}"


def find_trainer_class(name: str) -> Optional[type]:
    """The trainer class nnU-Net would use for ``-tr name`` (built-ins, then ``nnUNet_extTrainer``), or None."""
    from nnunet_pgl.trainers.discovery import ensure_ext_trainer_env
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    ensure_ext_trainer_env()
    with contextlib.redirect_stdout(io.StringIO()):  # the search prints every folder it scans
        try:
            return recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            return None


def _available_fraction_variants(base: str) -> List[str]:
    from nnunet_pgl.trainers import fractions
    return sorted((n[len(base):] for n in dir(fractions) if n.startswith(base + "_frac")
                   and n[len(base) + 5:].isdigit()), key=lambda s: int(s[5:]))


def resolve_trainers(pair: Sequence[str], fractions: Sequence[float]) -> Dict[float, Tuple[Any, Any]]:
    """``{fraction: (class_a, class_b)}``; CompareError naming the missing class and the variants that exist."""
    out = {}
    for f in fractions:
        classes = []
        for base in pair:
            name = base + fraction_suffix(f)
            cls = find_trainer_class(name)
            if cls is None:
                if f < 1:
                    have = _available_fraction_variants(base)
                    raise CompareError(
                        f"--fractions {f:g} needs the trainer class {name}, which does not exist. Label-fraction "
                        f"variants of {base}: {', '.join(have) if have else 'none'} (defined in "
                        "nnunet_pgl/trainers/fractions.py: add a subclass with LabelFractionMixin and "
                        "label_fraction, and re-export it in trainers/ext/nnunet_pgl_trainers.py)")
                raise CompareError(f"trainer {name} not found by nnU-Net (built-ins or nnUNet_extTrainer="
                                   f"{os.environ.get('nnUNet_extTrainer', '')}): check the name")
            classes.append(cls)
        out[f] = (classes[0], classes[1])
    return out


def is_pgl_trainer(cls: Any) -> bool:
    """A trainer initialised from a PGL checkpoint (declares ``pgl_method``)."""
    return isinstance(getattr(cls, "pgl_method", None), str)


# ================================================================================================ training
@dataclass
class TrainingJob(Record):
    """One ``nnUNetv2_train`` run of ``--run``: ``state`` is what :func:`fold_state` says the fold needs."""

    trainer: str
    fold: int
    state: str
    fraction: float


def fold_state(folder: str) -> str:
    """'done' (summary.json), 'val' (final checkpoint, no summary), 'continue' (latest only) or 'train'."""
    if os.path.isfile(os.path.join(folder, "validation", "summary.json")):
        return "done"
    if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
        return "val"
    if os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")):
        return "continue"
    return "train"


def training_jobs(results_dataset: str, trainers_by_fraction: Dict[float, Tuple[str, str]], plans: str,
                  configuration: str, folds: Sequence[int]) -> List[TrainingJob]:
    """What ``--run`` does, in order (fraction, fold, arm: so that finished pairs accumulate early)."""
    jobs = []
    for f, pair in trainers_by_fraction.items():
        for k in folds:
            for t in pair:
                state = fold_state(fold_dir(results_dataset, t, plans, configuration, k))
                if state != "done":
                    jobs.append(TrainingJob(trainer=t, fold=k, state=state, fraction=f))
    return jobs


def train_command(dataset: str, configuration: str, fold: int, trainer: str, plans: str, device: str,
                  state: str) -> List[str]:
    """The ``nnUNetv2_train`` command line of a job (``--val`` or ``--c`` by ``state``)."""
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    if not os.path.isfile(exe):
        exe = shutil.which("nnUNetv2_train") or "nnUNetv2_train"
    cmd = [exe, dataset, configuration, str(fold), "-tr", trainer, "-p", plans, "-device", device]
    return cmd + {"val": ["--val"], "continue": ["--c"]}.get(state, [])


def run_jobs(jobs: List[TrainingJob], dataset: str, configuration: str, plans: str, device: str) -> None:
    """Run ``nnUNetv2_train`` for each job, sequentially, output passed through; CompareError on a failure."""
    from nnunet_pgl.trainers.discovery import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    for i, j in enumerate(jobs):
        cmd = train_command(dataset, configuration, j.fold, j.trainer, plans, device, j.state)
        print(f"[pgl_compare] {i + 1}/{len(jobs)}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env=dict(os.environ))
        if rc != 0:
            raise CompareError(f"{shlex.join(cmd)} failed (exit {rc}); its output is above. Fix it and re-run "
                               "pgl_compare --run: finished folds are kept, a run with a checkpoint_latest resumes")
