"""Writes that survive a crash or a power cut: whole-file replacement, and deletion that never
leaves something half-removed looking whole.

After a crash a file replaced here holds its old bytes or its new ones, never a mix: the new
bytes go to a temporary file in the same directory, are fsynced, renamed over the old file, and
the directory is fsynced so the rename itself is on disk.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return
    view = memoryview(data)
    while n < len(view):
        n += os.pwrite(fd, view[n:], offset + n)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` whole: readers, and a crash, see the old bytes or the new ones, never a
    mix. ``fsync=False`` keeps that for readers but not across a power cut (throwaway files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            pwrite_all(fd, data, 0)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def discard(path: Path) -> None:
    """Rename, then delete: a crash halfway through never leaves something that looks installed or resumable."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{uuid.uuid4().hex}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def sweep(directory: Path) -> None:
    """Finish deletions and temp files a crash interrupted."""
    for entry in directory.glob(".trash-*"):
        shutil.rmtree(entry, ignore_errors=True)
    mine = f".tmp-{os.getpid()}-"
    for entry in directory.glob(".*.tmp-*"):
        if mine not in entry.name:  # this process's own may be being written right now
            entry.unlink(missing_ok=True)
