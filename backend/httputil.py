"""Small helpers shared by the HTTP routers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .errors import ApiError, Code

T = TypeVar("T")

#: Requests whose CPU work (SKINNY, HMACs, ECDH, parsing a large body) runs at the same
#: time. More would not go faster (one interpreter lock) and would starve the event loop
#: of it: with 32 registrations at once on 32 threads, /healthz took up to 1 s.
CPU_LANES = 2


def client_host(request: Request) -> str:
    """The peer's address: the key of the per-client rate limits."""
    return request.client.host if request.client else "unknown"


def error_response(code: Code, message: str) -> JSONResponse:
    return JSONResponse(ApiError(code, message).body(), status_code=int(code.status))


class CpuLane:
    """Run blocking, CPU-bound work in the thread pool, at most ``lanes`` at a time, so
    that the event loop keeps serving other requests meanwhile (one per application,
    reached as ``request.app.state.cpu``)."""

    def __init__(self, lanes: int = CPU_LANES) -> None:
        self.lanes = lanes
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.lanes)
        async with self._slots:
            return await run_in_threadpool(fn, *args)


async def off_loop(request: Request, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on the application's :class:`CpuLane`."""
    lane: CpuLane = request.app.state.cpu
    return await lane.run(fn, *args)
