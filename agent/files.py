"""Private files: written atomically, mode 0600, durable (file and folder fsynced)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: str | os.PathLike[str], data: bytes, *, tmp: Path | None = None) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600, fsynced (file and folder).
    ``tmp``: the temporary file to write first (default: ``<path>.tmp<pid>``); a single
    writer under a lock passes one fixed name, so a crash leaves at most that one."""
    path = Path(path)
    tmp = tmp or path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_private_file(path: str | os.PathLike[str], data: bytes) -> Path:
    """Create a new file (never overwriting one) with mode 0600, fsynced."""
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return p


def erase_file(path: Path) -> bool:
    """Overwrite with zeros (best effort on flash), then unlink. False if it did not exist."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    with open(path, "r+b") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    return True
