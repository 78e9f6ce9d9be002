"""Benchmarks: one command each (``python -m benchmarks.bench_...``), a table, a naive
reference in the same run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def throwaway_postgres(console: Any) -> Iterator[str | None]:
    """A throw-away PostgreSQL server for one run (the tests' ``tests/postgres_fixture.py``):
    its URL, or None after saying on ``console`` why it could not start."""
    sys.path.insert(0, str(ROOT))
    from tests.postgres_fixture import PostgresServer

    pg = PostgresServer()
    if pg.start() is None:
        console.print(f"[yellow]PostgreSQL skipped: {pg.skip_reason}[/]")
        yield None
        return
    try:
        yield pg.url
    finally:
        pg.stop()
