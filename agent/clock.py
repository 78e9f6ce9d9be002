"""Time: one ``Clock`` protocol for every part that needs "now", and the project's day.

- :class:`RealClock`: wall time; blocking work runs in a thread.
- :class:`VirtualClock`: deterministic virtual time for asyncio code (the daemon in
  tests and ``run --radio sim`` dry runs): ``sleep`` parks a task until
  :meth:`VirtualClock.run_until` reaches its wake-up; blocking work runs inline, and
  virtual time does not pass while it runs.
- :class:`ManualClock`: time that moves only when told (synchronous tests, the demo,
  a backend on simulated time).

Nothing below the daemon's edge calls ``time.time()``: it is handed a clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")

#: A UTC day: the unit of TEKs (144 intervals of 10 minutes), of the store's retention
#: and of exposure decisions.
DAY_SECONDS = 86_400


def utc_day(unix_seconds: float) -> int:
    """Days since 1970-01-01 UTC."""
    return int(unix_seconds // DAY_SECONDS)


def iso_date(day: int) -> str:
    """``2026-11-25`` for a day number."""
    return dt.datetime.fromtimestamp(day * DAY_SECONDS, dt.UTC).date().isoformat()


def iso_time(unix_seconds: float) -> str:
    """``2026-11-25T07:46:24Z``: every time ctagent prints (UTC, whole seconds)."""
    return dt.datetime.fromtimestamp(int(unix_seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Clock(Protocol):
    def now(self) -> float:
        """Unix time in seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait (asyncio) for ``seconds`` of this clock's time."""
        ...

    def sleep_blocking(self, seconds: float) -> None:
        """Wait in synchronous code that runs off the event loop (retry back-off)."""
        ...

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking work (HTTP, matching) without stalling the event loop."""
        ...


class RealClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def sleep_blocking(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(fn, *args)


class ManualClock:
    """Time that moves only by :meth:`advance` (or by setting ``t``)."""

    def __init__(self, t: float) -> None:
        self.t = float(t)

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

    def sleep_blocking(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        return fn(*args)


class VirtualClock:
    """Deterministic virtual time for asyncio tasks. Tasks must only wait on this clock
    (or on each other) for a run to be deterministic."""

    def __init__(self, start: float) -> None:
        self.t = float(start)
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.t + max(0.0, seconds), next(self._seq), fut))
        await fut

    def sleep_blocking(self, seconds: float) -> None:
        """Returns at once: blocking work runs inline, outside virtual time."""

    async def run_blocking(self, fn: Callable[..., T], *args: object) -> T:
        return fn(*args)  # inline: deterministic

    async def _settle(self) -> None:
        """Let every ready task run up to its next sleep: yield until the set of parked
        tasks has stopped changing for a few rounds."""
        stable, last = 0, -1
        for _ in range(200):
            await asyncio.sleep(0)
            n = len(self._heap)
            stable = stable + 1 if n == last else 0
            last = n
            if stable >= 3:
                return

    async def run_until(self, t_end: float) -> None:
        while True:
            await self._settle()
            if not self._heap or self._heap[0][0] > t_end:
                self.t = max(self.t, t_end)
                return
            t, _, fut = heapq.heappop(self._heap)
            self.t = max(self.t, t)
            if not fut.done():
                fut.set_result(None)
