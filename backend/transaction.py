"""The roles' database transactions, written once as generators and run either on a
thread (the SQLAlchemy engine: the CLI, the tests, ROBERT, SQLite) or on the event loop
(an asyncio engine: the hot API routes on PostgreSQL).

A transaction is a generator that yields :class:`Sql` steps and is sent each step's
result (a buffered :class:`sqlalchemy.CursorResult`, read before the next step), then
returns its answer. The work before its first step (checks, rate limits, certificate
signatures) runs before a connection is taken; a step that is never reached takes none.
An exception from the generator rolls the transaction back. ::

    def _owner(key_hash):
        row = (yield Sql(_SELECT_OWNER, {"key_hash": key_hash})).first()
        return row.name

Why: on PostgreSQL an API route that waits for the database on a thread-pool thread
pays a thread hand-off each way (a futex wake across cores: a tenth of the event loop's
samples under load); the same route awaiting an asyncio connection used the same CPU
and cut p99 latency by a quarter (16 clients, 2 workers; docs in hardware/backend.md).
SQLite has no asyncio driver that is not a thread itself: its transactions stay on the
thread pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Sql:
    """One statement of a transaction: a SQLAlchemy statement, or the driver's own SQL text
    (``exec_driver_sql``: PostgreSQL's fixed-text array inserts), with its parameters."""

    statement: sa.Executable | str
    params: Any = None


#: a transaction: yields statements, is sent their results, returns its answer
Transaction = Generator[Sql, Any, T]


def _execute(conn: sa.Connection, step: Sql) -> Any:
    if isinstance(step.statement, str):
        return conn.exec_driver_sql(step.statement, step.params)
    return conn.execute(step.statement, step.params)


def run_on(conn: sa.Connection, steps: Transaction[T]) -> T:
    """Run ``steps`` in the caller's open transaction ``conn``."""
    try:
        step = next(steps)
        while True:
            step = steps.send(_execute(conn, step))
    except StopIteration as done:
        return done.value
    finally:
        steps.close()


def run(engine: sa.Engine, steps: Transaction[T]) -> T:
    """Run ``steps`` as one transaction on ``engine``, in the calling thread."""
    try:
        step = next(steps)
    except StopIteration as done:  # answered without the database
        return done.value
    try:
        with engine.begin() as conn:
            while True:
                try:
                    step = steps.send(_execute(conn, step))
                except StopIteration as done:
                    return done.value
    finally:
        steps.close()


class Transactions:
    """Runs a role's transactions on its database: :meth:`run` in the calling thread,
    :meth:`run_async` from the event loop (on PostgreSQL through an asyncio engine of that
    loop, elsewhere on the thread pool)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._async: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._async_lock = threading.Lock()

    def run(self, steps: Transaction[T]) -> T:
        return run(self.engine, steps)

    async def run_async(self, steps: Transaction[T]) -> T:
        if self.engine.dialect.name != "postgresql":
            return await run_in_threadpool(run, self.engine, steps)
        try:
            step = next(steps)
        except StopIteration as done:
            return done.value
        try:
            async with self._async_engine().begin() as conn:
                while True:
                    if isinstance(step.statement, str):
                        result = await conn.exec_driver_sql(step.statement, step.params)
                    else:
                        result = await conn.execute(step.statement, step.params)
                    try:
                        step = steps.send(result)
                    except StopIteration as done:
                        return done.value
        finally:
            steps.close()

    async def aclose(self) -> None:
        """Close the asyncio engine's connections (at the server's shutdown, on its loop)."""
        current, self._async = self._async, None
        if current is not None and current[0] is asyncio.get_running_loop():
            await current[1].dispose()

    def _async_engine(self) -> Any:
        """The asyncio engine of the running loop: its connections belong to that loop
        (a server's; a process that serves again on a new loop gets a new engine)."""
        loop = asyncio.get_running_loop()
        current = self._async
        if current is not None and current[0] is loop:
            return current[1]
        with self._async_lock:
            current = self._async
            if current is None or current[0] is not loop:
                from .db import make_async_engine

                current = (loop, make_async_engine(self.engine))
                self._async = current
            return current[1]
