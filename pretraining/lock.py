"""One run per output folder: a lock file holding the owner's host and pid, recovered when the owner is dead."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, List, Optional

LOCK_NAME = "pgl_pretrain.lock"


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class RunLock:
    """``with RunLock(folder): ...`` — refuse if a live process (on this host) holds ``folder``.

    A lock whose pid is dead on this host is stale and taken over (logged by the caller through ``stale``). A lock
    from another host cannot be checked: it is honoured, and the message says how to remove it if that run is gone.
    """

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self.stale: Optional[Dict[str, Any]] = None
        self._held = False

    def acquire(self) -> "RunLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            if self._create(me):
                self._held = True
                return self
            owner = _read(self.path)
            pid = int(owner.get("pid", -1)) if owner is not None else -1
            here = owner is not None and owner.get("host") == me["host"]
            if owner is None:  # unreadable: damaged, or written by a version that created it empty first
                self.stale = {"host": "?", "pid": "?"}
            elif here and pid == me["pid"]:  # ours already: pgl_pretrain took it, its trainer takes it again
                self.stale, self._held = None, True
                return self
            elif here and pid == os.getppid():  # a DDP rank spawned by the pgl_pretrain holding it: it releases
                self.stale, self._held = None, False
                return self
            elif here and not _alive(pid):
                self.stale = owner
            else:
                raise RunLockedError(
                    f"another pgl_pretrain run (host {owner.get('host')}, pid {owner.get('pid')}, started "
                    f"{owner.get('started')}) is using {os.path.dirname(self.path)}. Wait for it to finish, or "
                    f"stop it; if it is gone (e.g. its node died), delete {self.path} and rerun with --c") from None
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise RunLockedError(f"could not take the lock {self.path} (it keeps reappearing); is another run starting?")

    def _create(self, me: Dict[str, Any]) -> bool:
        """Create the lock file with its content in one step (written aside, then hard-linked into place, which
        fails if it exists): nobody ever sees an empty lock."""
        aside = f"{self.path}.{me['pid']}.new"
        with open(aside, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(aside, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(aside)

    def release(self) -> None:
        if self._held:
            owner = _read(self.path)
            if owner is not None and owner.get("pid") == os.getpid():
                os.remove(self.path)
            self._held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class OutputFolder:
    """``with OutputFolder(out) as folder: ...; folder.keep()`` — create ``out`` (and its missing parents), take
    its :class:`RunLock`, and on exit release the lock; if the run stopped before :meth:`keep` (e.g. bad unlabeled
    input), remove the folders it created, so that a refused run leaves nothing behind.

    Raises :class:`RunLockedError` (nothing created stays) when another live run holds the folder.
    """

    def __init__(self, path: str):
        self.path = path
        self._made = _missing_parents(path) + ([] if os.path.isdir(path) else [path])
        self._kept = False
        self._lock: Optional[RunLock] = None

    def keep(self) -> None:
        """The run began: keep the folders whatever happens next."""
        self._kept = True

    def __enter__(self) -> "OutputFolder":
        os.makedirs(self.path, exist_ok=True)
        try:
            self._lock = RunLock(self.path).acquire()  # the trainer takes it again in this process (or DDP children)
        except RunLockedError:
            self._remove_made()
            raise
        if self._lock.stale:
            print(f"Recovered a stale lock of a dead run (host {self._lock.stale.get('host')}, pid "
                  f"{self._lock.stale.get('pid')})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
        if not self._kept:
            self._remove_made()

    def _remove_made(self) -> None:
        for d in self._made[::-1]:
            try:
                os.rmdir(d)
            except OSError:
                break


def _missing_parents(path: str) -> List[str]:
    """The folders that ``os.makedirs(path)`` would create above ``path``, outermost first."""
    out: List[str] = []
    p = os.path.dirname(os.path.abspath(path))
    while p and not os.path.isdir(p):
        out.append(p)
        p = os.path.dirname(p)
    return out[::-1]
