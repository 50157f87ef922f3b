"""The pretraining's per-iteration learning rate and EMA τ, and how a ``--c`` that changes the run's length joins
the old schedules to the new ones."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

from nnunet_pgl import rewarm, rewarm_steps, tau_schedule, warmup_cosine_lr
from nnunet_pgl.pretraining.config import PretrainConfig


def scheduled_lr_tau(cfg: PretrainConfig, step: int) -> Tuple[float, float]:
    """Learning rate and EMA τ of global step ``step`` (0-based, ``epoch · iters_per_epoch + iteration``).

    The run's schedules: linear warm-up over ``warmup_epochs`` then cosine to 0 at ``epochs · iters_per_epoch``
    (:func:`~nnunet_pgl.warmup_cosine_lr`), τ cosine from ``base_tau`` to 1 (:func:`~nnunet_pgl.tau_schedule`).
    From ``cfg.schedule_extension['start_step']`` on (a resumed run whose ``--epochs`` differs from the epochs its
    checkpoint was scheduled for, e.g. a finished run extended), both are joined to the values of the step before
    by :func:`~nnunet_pgl.rewarm`: a linear ramp over ``ramp_steps`` from the recorded ``lr`` / ``tau`` to the new
    schedules, which they follow from then on.
    """
    it = cfg.iters_per_epoch
    total = cfg.epochs * it

    def lr_at(s: int) -> float:
        return warmup_cosine_lr(s, total, cfg.initial_lr, cfg.warmup_epochs * it)

    def tau_at(s: int) -> float:
        return tau_schedule(s, total, cfg.base_tau)

    ext = cfg.schedule_extension
    if ext is None or step < ext["start_step"]:
        return lr_at(step), tau_at(step)
    s0, w = int(ext["start_step"]), int(ext["ramp_steps"])
    return rewarm(step, s0, float(ext["lr"]), w, lr_at), rewarm(step, s0, float(ext["tau"]), w, tau_at)


def resume_schedule(cfg: PretrainConfig, saved: Optional[Dict[str, Any]], current_epoch: int) -> Optional[str]:
    """Take over a checkpoint's schedule state into ``cfg``; if this run's length differs from the one the
    checkpoint was scheduled for (``--c --epochs N``), record where the schedule changes and from which learning
    rate and τ (``cfg.schedule_extension``, saved with every later checkpoint; see :func:`scheduled_lr_tau`).

    Args:
        cfg: this run's configuration (updated in place).
        saved: the checkpoint's ``pgl_config`` (None: an old checkpoint without one; nothing changes).
        current_epoch: the epoch the run resumes at (the checkpoint's ``current_epoch``).

    Returns:
        The line for the training log when the schedule changed, else None.
    """
    if saved is None:
        return None
    keys = ("epochs", "iters_per_epoch", "initial_lr", "warmup_epochs", "base_tau", "schedule_extension")
    old = replace(cfg, **{k: saved[k] for k in keys if k in saved})
    cfg.schedule_extension = old.schedule_extension
    it = cfg.iters_per_epoch
    start, remaining = current_epoch * it, (cfg.epochs - current_epoch) * it
    if (old.epochs, old.iters_per_epoch) == (cfg.epochs, it) or current_epoch == 0 or remaining <= 0:
        return None
    lr0, tau0 = scheduled_lr_tau(old, current_epoch * old.iters_per_epoch - 1)  # the last step trained
    ramp = rewarm_steps(cfg.epochs * it - old.epochs * old.iters_per_epoch, it, remaining)
    cfg.schedule_extension = {"start_step": start, "start_epoch": current_epoch, "from_epochs": old.epochs,
                              "from_iters_per_epoch": old.iters_per_epoch, "lr": lr0, "tau": tau0,
                              "ramp_steps": ramp}
    lr1, tau1 = scheduled_lr_tau(cfg, start + ramp - 1)
    return (f"Schedule changed from {old.epochs} to {cfg.epochs} epochs at epoch {current_epoch}: the learning "
            f"rate moves linearly from {lr0:.4g} to {lr1:.4g} and the EMA tau from {tau0:.6f} to {tau1:.6f} over "
            f"{ramp} iterations ({ramp / it:g} epochs), then both follow the {cfg.epochs}-epoch schedules")
