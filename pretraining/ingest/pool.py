"""The worker pool of ingestion: spawned processes that die with the ingesting process, and tasks run in them.

Hashing and preprocessing run in worker processes (spawn) when there is more than one task and more than one
process is asked for; otherwise in this process (the tests' way, and the cheapest for a single case).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills the worker when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    SIGKILLed ingest leaves no orphaned worker behind. Elsewhere the pool's own shutdown is all there is.

    Assumes a spawn (or fork) context, whose workers are children of the ingesting process, started from the thread
    that calls ``submit`` (the death signal follows the creating *thread*); a pool with ``max_tasks_per_child``
    would restart workers from its manager thread instead."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def run_tasks(fn: Callable, tasks: Sequence[tuple], executor: Optional[ProcessPoolExecutor], desc: str,
              verbose: bool) -> Iterator[Tuple[int, Any]]:
    """Yield ``(task index, result)`` as tasks finish: in-process without an executor, else in the pool.
    Worker exceptions propagate; on any exit the not-yet-started tasks are cancelled."""
    from tqdm import tqdm
    with tqdm(total=len(tasks), desc=desc, disable=not verbose or not tasks) as bar:
        if executor is None:
            for i, t in enumerate(tasks):
                res = fn(*t)
                bar.update()
                yield i, res
            return
        futures: Dict[Future, int] = {executor.submit(fn, *t): i for i, t in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    res = fut.result()
                    bar.update()
                    yield futures[fut], res
        finally:
            for fut in pending:
                fut.cancel()


class WorkerPool:
    """``with WorkerPool(n) as pool: pool.run(fn, tasks, ...)``: the processes start at the first batch of more
    than one task (if ``n > 1``), serve every later batch, and are shut down on exit (waiting for running tasks,
    cancelling the others)."""

    def __init__(self, num_processes: int) -> None:
        self.num_processes = num_processes
        self.executor: Optional[ProcessPoolExecutor] = None

    def run(self, fn: Callable, tasks: Sequence[tuple], desc: str, verbose: bool) -> Iterator[Tuple[int, Any]]:
        """:func:`run_tasks` in the pool (started now if needed) or, for one task or one process, in-process."""
        if self.executor is None and self.num_processes > 1 and len(tasks) > 1:
            self.executor = ProcessPoolExecutor(max_workers=self.num_processes,
                                                mp_context=multiprocessing.get_context("spawn"),
                                                initializer=die_with_parent, initargs=(os.getpid(),))
        return run_tasks(fn, tasks, self.executor, desc, verbose)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
