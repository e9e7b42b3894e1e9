"""Exclusive ownership of a run directory or a job's output, across processes.

``flock`` on a lock file beside what is owned: the kernel drops it when the owner dies (kill -9
included), so a lock is never stale, and the owner's pid in the file names who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class Locked(RuntimeError):
    """Another live process owns it."""


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold ``lock_path`` for the block, or raise Locked naming the holder's pid."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Locked(f"{what} is in use by another process (pid {holder}); wait for it to finish "
                         f"or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new owner)
