"""The EMA target and the schedules, as small pure functions.

*Note* (paper vs ours): BYOL's τ schedule (0.996 → 1, cosine) is used as stated for PGL; buffers (e.g. norm
running statistics, if the plans use BatchNorm) are averaged the same way, integer buffers are copied.
"""
from __future__ import annotations

import math

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
