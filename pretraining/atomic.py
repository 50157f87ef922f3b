"""Atomic file writes: write a temporary file beside the target, fsync it, rename it over the target, fsync the folder.

A reader (or a run resumed after a kill) therefore sees either the old file or the complete new one, never a part.
A write that fails removes its temporary file; one killed mid-write leaves it, under a name its writer knows and
removes on the next start (``pgl_pretrain``: ``*.tmp`` and ``*.tmp.png``; ingestion: ``.pgltmp-*``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Optional

#: the temporary name of :func:`atomic_write` unless given: ``<path>.tmp``
TMP_SUFFIX = ".tmp"
#: the temporary name of :func:`save_figure`: ``<path>.tmp.png`` (matplotlib takes the format from the ending)
FIGURE_TMP_SUFFIX = ".tmp.png"


def remove_quietly(paths: Iterable[str]) -> None:
    """Remove the files that exist (no error for the others)."""
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def fsync_file(path: str) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename into it) to the disk; nothing on Windows or where the OS refuses."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], Any], tmp: Optional[str] = None) -> None:
    """``write(tmp)`` writes the whole content to ``tmp`` (default ``path + '.tmp'``, in the same folder); then
    it is fsynced and renamed over ``path``, and the folder fsynced. On any error ``tmp`` is removed."""
    tmp = path + TMP_SUFFIX if tmp is None else tmp
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly([tmp])
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str, tmp: Optional[str] = None) -> None:
    """:func:`atomic_write` of a text file."""
    def write(p: str) -> None:
        with open(p, "w") as f:
            f.write(text)
    atomic_write(path, write, tmp)


def atomic_write_json(path: str, obj: Any, indent: int = 2, tmp: Optional[str] = None) -> None:
    """:func:`atomic_write` of ``json.dump(obj, indent=indent)``."""
    atomic_write_text(path, json.dumps(obj, indent=indent), tmp)


def save_figure(fig: Any, path: str, **savefig_kwargs: Any) -> None:
    """``fig.savefig(path, ...)`` atomically (through ``<path>.tmp.png``); the caller closes the figure."""
    atomic_write(path, lambda p: fig.savefig(p, **savefig_kwargs), tmp=path + FIGURE_TMP_SUFFIX)
