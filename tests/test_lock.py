"""The output-folder lock: a live owner refuses a second run with a clear message; a dead owner's lock is stale."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from nnunet_pgl.pretraining.lock import LOCK_NAME, RunLock, RunLockedError


def test_second_run_refused_while_owner_lives(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid,
                                                      "started": "then"}))
        with pytest.raises(RunLockedError, match=f"pid {owner.pid}.*Wait for it to finish"):
            RunLock(str(tmp_path)).acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == owner.pid  # untouched
    finally:
        owner.kill()
        owner.wait()
    lock = RunLock(str(tmp_path)).acquire()  # owner dead: stale, recovered
    assert lock.stale is not None and lock.stale["pid"] == owner.pid
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_other_host_lock_is_honoured(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "another-node", "pid": 1, "started": "then"}))
    with pytest.raises(RunLockedError, match="another-node.*delete .*pgl_pretrain.lock"):
        RunLock(str(tmp_path)).acquire()


def test_half_written_lock_is_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with RunLock(str(tmp_path)) as lock:
        assert lock.stale is not None
    assert not (tmp_path / LOCK_NAME).exists()


def test_retaking_our_own_lock_keeps_it_unchanged(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    before = (tmp_path / LOCK_NAME).read_text()
    again = RunLock(str(tmp_path)).acquire()  # the trainer in the process that pgl_pretrain locked for
    assert again.stale is None and (tmp_path / LOCK_NAME).read_text() == before
    again.release()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert os.listdir(tmp_path) == []  # nothing left beside it either
