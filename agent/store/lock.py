"""One writer per store: an exclusive ``flock`` on ``<db>.lock`` beside the database,
held for as long as the store is open for writing (the daemon, a write command, purge).
The lock file carries the holder's pid, for the refusal's message; the kernel releases
the lock when the holder exits, however it exits (a SIGKILL or a power cut leave no
stale lock)."""

from __future__ import annotations

import fcntl
import os
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
        """Take the lock at once, or raise :class:`StoreBusy` naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreBusy(f"the store {self.db_path} is in use by another ctagent process (pid {holder}); "
                            "stop it first (SIGTERM, or `systemctl stop ctagent`)") from None
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
