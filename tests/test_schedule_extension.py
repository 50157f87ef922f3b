"""Extending a run (``pgl_pretrain --c --epochs N`` with another N): the learning rate and the EMA τ are joined to
the new schedules by a linear re-warm-up from the values of the last trained step, never by a jump; the change is
recorded so that a further ``--c`` continues on the same schedule (issue 11, item 7)."""
from __future__ import annotations

import json
import math
from typing import Dict, List, Tuple

import pytest

from tiny_pretrain import load_checkpoint, log_lines, output_folder, pgl_pretrain, tiny  # noqa: F401 (fixture)

from nnunet_pgl import rewarm, rewarm_steps, tau_schedule, warmup_cosine_lr
from nnunet_pgl.pretraining.config import PretrainConfig
from nnunet_pgl.pretraining.schedule import scheduled_lr_tau


# ------------------------------------------------------------------------------------------- pure functions
def test_rewarm_steps():
    it = 250
    assert rewarm_steps(500 * it, it, 500 * it) == 25 * it          # 500 → 1000 epochs: 5 % of the added 500
    assert rewarm_steps(10 * it, it, 10 * it) == it                 # short extensions: one epoch
    assert rewarm_steps(-300 * it, it, 100 * it) == 15 * it         # a shortened schedule ramps the same way
    assert rewarm_steps(500 * it, it, 7) == 7                       # never more than the steps left
    assert rewarm_steps(500 * it, it, 0) == 0 and rewarm_steps(500 * it, it, -3) == 0
    assert rewarm_steps(41, 1, 100) == 3                            # ceil(0.05 · 41)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        rewarm_steps(10, 0, 10)


def test_rewarm_joins_a_finished_run_to_a_longer_schedule():
    base, it, old_epochs, new_epochs = 0.01, 10, 50, 100
    old_total, new_total, warm = old_epochs * it, new_epochs * it, 2 * it

    def new_lr(s: int) -> float:
        return warmup_cosine_lr(s, new_total, base, warm)

    def new_tau(s: int) -> float:
        return tau_schedule(s, new_total)

    s0 = old_total
    lr0, tau0 = warmup_cosine_lr(s0 - 1, old_total, base, warm), tau_schedule(s0 - 1, old_total)
    w = rewarm_steps(new_total - old_total, it, new_total - s0)
    assert w == 25
    lrs = [rewarm(s, s0, lr0, w, new_lr) for s in range(s0, new_total + 1)]
    taus = [rewarm(s, s0, tau0, w, new_tau) for s in range(s0, new_total + 1)]
    # end points: one equal step from the last value, the new schedule at the ramp's end and after it
    assert lrs[0] == pytest.approx(lr0 + (new_lr(s0 + w - 1) - lr0) / w, abs=1e-15)
    assert lrs[w - 1] == pytest.approx(new_lr(s0 + w - 1), abs=1e-15)
    assert lrs[w:] == pytest.approx([new_lr(s) for s in range(s0 + w, new_total + 1)], abs=1e-15)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-15)
    assert taus[0] == pytest.approx(tau0 + (new_tau(s0 + w - 1) - tau0) / w, abs=1e-15)
    assert taus[w:] == pytest.approx([new_tau(s) for s in range(s0 + w, new_total + 1)], abs=1e-15)
    assert taus[-1] == pytest.approx(1.0, abs=1e-15)
    # continuity: the ramp's steps are equal; no step changes more than one ramp step (the old code jumped from
    # ~0 to about half the peak learning rate: new_lr(s0) ≈ base / 2)
    d = [b - a for a, b in zip([lr0] + lrs[:w - 1], lrs[:w])]
    assert d == pytest.approx([d[0]] * w, rel=1e-9) and d[0] > 0
    assert max(abs(b - a) for a, b in zip([lr0] + lrs, lrs)) <= d[0] * (1 + 1e-9)
    assert abs(lrs[0] - lr0) < new_lr(s0) / 20 and new_lr(s0) == pytest.approx(base / 2, rel=0.05)
    # τ moves from the finished run's ~1 to the longer schedule's, in equal steps, and then rises to 1
    dt = [b - a for a, b in zip([tau0] + taus[:w - 1], taus[:w])]
    assert dt == pytest.approx([dt[0]] * w, rel=1e-9) and dt[0] < 0
    assert all(b >= a for a, b in zip(taus[w - 1:], taus[w:]))
    assert abs(taus[0] - tau0) <= abs(tau0 - new_tau(s0 + w - 1)) / w * (1 + 1e-9)


def test_rewarm_edges():
    def sched(s: int) -> float:
        return 10.0 - s

    assert rewarm(7, 5, 0.0, 0, sched) == 3.0                   # no ramp: the schedule at once
    assert rewarm(5, 5, 0.0, 1, sched) == 5.0                   # one step: lands on the schedule
    assert [rewarm(s, 5, 0.0, 4, sched) for s in range(5, 10)] == [0.5, 1.0, 1.5, 2.0, 1.0]
    with pytest.raises(ValueError, match="before the schedule change"):
        rewarm(4, 5, 0.0, 4, sched)


def test_scheduled_lr_tau_follows_the_recorded_extension():
    cfg = PretrainConfig(epochs=48, iters_per_epoch=1, warmup_epochs=2, initial_lr=0.01)
    plain = [scheduled_lr_tau(cfg, s) for s in range(48)]
    assert plain == [(warmup_cosine_lr(s, 48, 0.01, 2), tau_schedule(s, 48)) for s in range(48)]
    cfg.schedule_extension = {"start_step": 6, "lr": 0.001, "tau": 0.9999, "ramp_steps": 3}
    got = [scheduled_lr_tau(cfg, s) for s in range(48)]
    assert got[:6] == plain[:6] and got[9:] == plain[9:]
    assert got[6][0] == pytest.approx(0.001 + (plain[8][0] - 0.001) / 3)
    assert got[7][1] == pytest.approx(0.9999 + (plain[8][1] - 0.9999) * 2 / 3)
    assert got[8] == plain[8]


# ------------------------------------------------------------------------------------------- pgl_pretrain --c
class Stop(Exception):
    """Ends a run at a chosen step, as a kill would (the checkpoint of the epoch before stays)."""


@pytest.mark.slow  # three in-process pgl_pretrain runs
def test_extending_a_finished_run_rewarms_and_a_further_resume_keeps_the_schedule(tiny, monkeypatch):
    from nnunet_pgl.pretraining import pretrainer
    seen: Dict[int, Tuple[float, float]] = {}
    stop_at: List[int] = [-1]
    real = pretrainer.nnUNetPretrainerPGL.train_step

    def spy(self, batch):  # the learning rate the optimizer used and the τ of each global step
        step = self.current_epoch * self.num_iterations_per_epoch + self._iter
        if step == stop_at[0]:
            raise Stop(step)
        out = real(self, batch)
        seen[step] = (self.optimizer.param_groups[0]["lr"], self._epoch_stats["tau"])
        return out

    monkeypatch.setattr(pretrainer.nnUNetPretrainerPGL, "train_step", spy)
    base, warm = 1e-2, 2
    # a finished 6-epoch run of 1 iteration per epoch; its last learning rate is 15 % of the peak
    pgl_pretrain("--epochs", "6", "--iters-per-epoch", "1", "--save-every", "100", "--no-probe")
    assert sorted(seen) == list(range(6))
    for s in range(6):
        assert seen[s] == pytest.approx((warmup_cosine_lr(s, 6, base, warm), tau_schedule(s, 6)), abs=1e-15)
    lr0, tau0 = seen[5]
    # extended to 48 epochs: ramp of ceil(5 % of 42) = 3 steps (epochs 6-8) to the 48-epoch schedule; stopped in
    # epoch 7, after the checkpoint of epoch 6
    stop_at[0] = 7
    with pytest.raises(Stop):
        pgl_pretrain("--c", "--epochs", "48", "--save-every", "1", "--no-probe")
    end_lr, end_tau = warmup_cosine_lr(8, 48, base, warm), tau_schedule(8, 48)
    assert seen[6][0] == pytest.approx(lr0 + (end_lr - lr0) / 3, rel=1e-12)
    assert seen[6][1] == pytest.approx(tau0 + (end_tau - tau0) / 3, rel=1e-12)
    assert seen[6][0] < warmup_cosine_lr(6, 48, base, warm) / 2  # the old code jumped to the 48-epoch value
    out = output_folder(tiny)
    record = {"start_step": 6, "start_epoch": 6, "from_epochs": 6, "from_iters_per_epoch": 1,
              "lr": pytest.approx(lr0, rel=1e-12), "tau": pytest.approx(tau0, rel=1e-12), "ramp_steps": 3}
    assert json.loads((out / "pgl_config.json").read_text())["schedule_extension"] == record
    assert load_checkpoint(out / "checkpoint_latest.pth")["pgl_config"]["schedule_extension"] == record
    assert load_checkpoint(out / "checkpoint_final.pth")["current_epoch"] == 6  # the finished run stays
    assert any("Schedule changed from 6 to 48 epochs at epoch 6" in line for line in log_lines(out))
    # a further --c (no --epochs): resumes the extension from checkpoint_latest.pth, inside the ramp
    stop_at[0] = 8
    with pytest.raises(Stop):
        pgl_pretrain("--c", "--no-probe")
    assert seen[7][0] == pytest.approx(lr0 + (end_lr - lr0) * 2 / 3, rel=1e-12)
    assert seen[7][1] == pytest.approx(tau0 + (end_tau - tau0) * 2 / 3, rel=1e-12)
    assert any("Resuming from checkpoint_latest.pth (epoch 7)" in line for line in log_lines(out))
    log = json.loads((out / "pgl_log.json").read_text())
    assert [r["epoch"] for r in log] == list(range(8))
    assert math.isclose(log[6]["lr"], seen[6][0], rel_tol=1e-12) and math.isclose(log[7]["lr"], seen[7][0],
                                                                                 rel_tol=1e-12)
