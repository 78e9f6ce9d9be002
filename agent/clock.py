"""Time for the daemon: the real clock, or a virtual one that runs days in seconds."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time


class RealClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class VirtualClock:
    """Deterministic virtual time for asyncio tasks: ``sleep`` parks the task until
    :meth:`run_until` advances time to its wake-up. Tasks must only wait on this clock
    (or on each other) for the run to be deterministic."""

    def __init__(self, start: float) -> None:
        self.t = float(start)
        self._heap: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def __call__(self) -> float:  # usable where a plain clock function is expected
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.t + max(0.0, seconds), next(self._seq), fut))
        await fut

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
