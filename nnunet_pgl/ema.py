"""The EMA target and the schedules, as small pure functions.

*Note* (paper vs ours): BYOL's τ schedule (0.996 → 1, cosine) is used as stated for PGL; buffers (e.g. norm
running statistics, if the plans use BatchNorm) are averaged the same way, integer buffers are copied. When a
resumed run changes its length (a finished run extended with more epochs), :func:`rewarm` joins the learning rate and
τ to the longer schedules by a short linear ramp instead of a jump (ours; the paper trains one fixed schedule).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """In place: ``θ_target ← τ·θ_target + (1 − τ)·θ_online`` for every parameter and floating buffer.

    Integer buffers (e.g. ``num_batches_tracked``) are copied from the online module. Both modules must have
    the same structure (same ``state_dict`` keys in the same order). τ = 1 leaves the target unchanged, τ = 0
    copies the online module, τ = 0.5 averages.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1]; got {tau}")
    tn, on = dict(target.named_parameters()), dict(online.named_parameters())
    tbn, obn = dict(target.named_buffers()), dict(online.named_buffers())
    shapes_t = [(k, tuple(v.shape)) for k, v in list(tn.items()) + list(tbn.items())]
    shapes_o = [(k, tuple(v.shape)) for k, v in list(on.items()) + list(obn.items())]
    if shapes_t != shapes_o:
        diff = sorted(set(shapes_t) ^ set(shapes_o))[:5]
        raise ValueError(f"target and online modules differ in structure (names/shapes), e.g. {diff}; make the "
                         "target with make_target(online)")
    tp, op, tb, ob = list(tn.values()), list(on.values()), list(tbn.values()), list(obn.values())
    float_t = [t for t in tp + tb if t.is_floating_point()]
    float_o = [o.detach().to(t.dtype) for t, o in zip(tp + tb, op + ob) if t.is_floating_point()]
    if float_t:
        if tau == 1.0:
            pass
        elif tau == 0.0:
            torch._foreach_copy_(float_t, float_o)
        else:
            torch._foreach_mul_(float_t, tau)
            torch._foreach_add_(float_t, float_o, alpha=1.0 - tau)
    for t, o in zip(tb, ob):
        if not t.is_floating_point():
            t.copy_(o)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ≥ total_steps)."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return end - (end - start) * (math.cos(math.pi * t) + 1.0) / 2.0


def tau_schedule(step: int, total_steps: int, base_tau: float = 0.996, end_tau: float = 1.0) -> float:
    """BYOL's EMA momentum: ``τ = 1 − (1 − τ_base)·(cos(π·k/K) + 1)/2``; τ_base at step 0, ``end_tau`` at K."""
    return cosine_schedule(step, total_steps, base_tau, end_tau)


def warmup_cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
                     final_lr: float = 0.0) -> float:
    """Linear warm-up from ``base_lr/warmup_steps`` to ``base_lr`` over ``warmup_steps``, then cosine to ``final_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, max(total_steps - warmup_steps, 0), base_lr, final_lr)


def rewarm_steps(changed_steps: int, steps_per_epoch: int, remaining_steps: int, fraction: float = 0.05) -> int:
    """Length in steps of the re-warm-up after a resumed run's schedule changed length (see :func:`rewarm`).

    ``max(steps_per_epoch, ceil(fraction · |changed_steps|))``, at most ``remaining_steps`` (the steps still to
    train), at least 0. ``changed_steps``: new total steps minus the total the checkpoint was scheduled for.

    *Note* (ours; the paper trains one fixed schedule): one epoch, or 5 % of the added epochs if that is longer,
    e.g. 25 epochs when a finished 500-epoch run is extended to 1000.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1; got {steps_per_epoch}")
    n = max(steps_per_epoch, math.ceil(fraction * abs(changed_steps)))
    return max(0, min(n, remaining_steps))


def rewarm(step: int, start_step: int, start_value: float, ramp_steps: int, schedule: Callable[[int], float]) -> float:
    """A schedule joined without a jump to what a resumed run did before its schedule changed.

    From ``start_step`` (the first step under the new ``schedule``) the value moves linearly, over ``ramp_steps``
    steps, from ``start_value`` (the value of the last step before, ``start_step − 1``) to the new schedule's value
    at the ramp's last step, and from then on is ``schedule(step)``::

        value(start_step + k) = v0 + (schedule(start_step + W − 1) − v0) · (k + 1) / W    for 0 ≤ k < W
        value(step)           = schedule(step)                                         for step ≥ start_step + W

    with ``v0 = start_value``, ``W = ramp_steps``. So the first step moves ``1/W`` of the way, the ramp ends on the
    new schedule, and each ramp step changes the value by the same amount. Used for the learning rate (a finished
    run's ~0 rising to the longer cosine schedule) and for the EMA τ (a finished run's ~1 falling to the longer τ
    schedule, so that the target follows the online network again while it moves).

    Args:
        step: global step (``>= start_step``).
        start_step: first step of the changed schedule.
        start_value: the value the previous schedule gave step ``start_step − 1``.
        ramp_steps: ``W`` (0: the new schedule at once), e.g. from :func:`rewarm_steps`.
        schedule: the new schedule, step → value.
    """
    k = step - start_step
    if k < 0:
        raise ValueError(f"step {step} is before the schedule change at step {start_step}")
    if k >= ramp_steps:
        return schedule(step)
    end = schedule(start_step + ramp_steps - 1)
    return start_value + (end - start_value) * (k + 1) / ramp_steps
