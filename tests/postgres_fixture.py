"""A throw-away PostgreSQL server on 127.0.0.1 for the backend tests.

Uses Debian's postgresql package (``.ci/run`` installs it where it can). When the
binaries or a non-root user to run them are missing, the tests that need it are
skipped with the reason."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bindir() -> Path | None:
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(cand, "initdb").exists():
            return Path(cand)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir: Path | None = None
        self.url: str | None = None
        self.skip_reason: str | None = None
        if self.bindir is None:
            self.skip_reason = "PostgreSQL is not installed (apt-get install postgresql)"
        try:
            import psycopg  # noqa: F401
        except ImportError:
            self.skip_reason = "the psycopg driver is not installed"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> str | None:
        if self.skip_reason:
            return None
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="ctagent-pg-"))
            if os.geteuid() == 0:
                shutil.chown(self.dir, "postgres", "postgres")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            data = self.dir / "data"
            self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "ctagent", "--auth=trust", "-E", "UTF8")
            self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-o",
                      f"-p {port} -h 127.0.0.1 -k {self.dir}", "start")
            self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "ctagent", "ctagent")
            self.url = f"postgresql+psycopg://ctagent@127.0.0.1:{port}/ctagent"
            self._data = data
            return self.url
        except (subprocess.SubprocessError, OSError, KeyError) as e:
            self.skip_reason = f"could not start PostgreSQL: {type(e).__name__}: {e}"
            return None

    def stop(self) -> None:
        if self.url:
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self._data), "-m", "immediate", "stop")
            except subprocess.SubprocessError:
                pass
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
