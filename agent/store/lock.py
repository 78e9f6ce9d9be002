"""One writer per store: an exclusive ``flock`` on ``<db>.lock`` beside the database,
held for as long as the store is open for writing (the daemon, a write command, purge).
The lock file carries the holder's pid, for the refusal's message; the kernel releases
the lock when the holder exits, however it exits (a SIGKILL or a power cut leave no
stale lock)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from ..errors import StoreError


class StoreBusy(StoreError):
    """Another process has the store open for writing."""


def lock_path(db_path: Path) -> Path:
    return Path(str(db_path) + ".lock")


class StoreLock:
    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.path = lock_path(self.db_path)
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        """Take the lock, or raise :class:`StoreBusy` naming the holder. A fraction of a
        second of patience lets a probe (:func:`holder`) pass."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + PROBE_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                pid = _pid_in(fd)
                os.close(fd)
                raise StoreBusy(f"the store {self.db_path} is in use by another ctagent process "
                                f"(pid {pid or 'unknown'}); stop it first (`ctagent stop`, or "
                                "`systemctl stop ctagent`)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


#: how long a writer waits for a probe to let go of the lock
PROBE_PATIENCE_S = 0.5


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def holder(db_path: Path) -> int | None:
    """The pid of the process writing to the store, or None when none is: a probe that
    takes the lock shared for an instant (a writer opening then waits for it)."""
    path = lock_path(db_path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
