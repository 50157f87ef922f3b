"""``pgl_pretrain`` with faults injected, for the fault tests only: ``python fault_runner.py <pgl_pretrain args>``.

Environment variables (all optional; unset means no fault):

- ``PGL_FAULT_NAN_STEPS`` / ``PGL_FAULT_INF_STEPS``: comma-separated 0-based indices of the training steps *of this
  process* whose loss is replaced by NaN / +Inf (the loss function's output is multiplied, so the graph is real).
- ``PGL_FAULT_SLOW_SAVE``: seconds that every ``torch.save`` takes; the bytes are written in 8 flushed chunks with
  pauses between them, so that a kill can land in the middle of a checkpoint write. The bytes are unchanged.
- ``PGL_FAULT_PAUSE_SAVE``: a path; the first ``torch.save`` writes half of its bytes, flushes them, creates that
  file (the signal for a test to kill now) and waits there for 10 minutes.

The patches act on this process only (not on spawned ingest workers), which is all the tests need.
"""
from __future__ import annotations

import io
import os
import sys
import time


def _steps(name: str) -> set:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


def install() -> None:
    import torch

    nan_steps, inf_steps = _steps("PGL_FAULT_NAN_STEPS"), _steps("PGL_FAULT_INF_STEPS")
    if nan_steps or inf_steps:
        from nnunet_pgl.pretraining import pretrainer
        real_loss = pretrainer.pgl_loss
        calls = [0]

        def faulty_loss(*args, **kwargs):
            loss, per_level, glob = real_loss(*args, **kwargs)
            k, calls[0] = calls[0], calls[0] + 1
            if k in nan_steps:
                loss = loss * float("nan")
            elif k in inf_steps:
                loss = loss * float("inf")
            return loss, per_level, glob

        pretrainer.pgl_loss = faulty_loss

    delay = float(os.environ.get("PGL_FAULT_SLOW_SAVE", "0") or 0)
    marker = os.environ.get("PGL_FAULT_PAUSE_SAVE")
    if delay > 0 or marker:
        real_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            own = isinstance(f, (str, os.PathLike))
            fh = open(f, "wb") if own else f
            try:
                for i in range(8):
                    fh.write(data[i * len(data) // 8:(i + 1) * len(data) // 8])
                    fh.flush()
                    if marker and i == 3:
                        open(marker, "w").close()
                        time.sleep(600)
                    time.sleep(delay / 8)
            finally:
                if own:
                    fh.close()

        torch.save = slow_save


if __name__ == "__main__":
    install()
    from nnunet_pgl.pretraining.cli import main
    main(sys.argv[1:])
