"""Small helpers shared by the HTTP routers: who the client is, whether the request came
over HTTPS, the error response."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.errors import ConfigError

from .errors import ApiError, Code

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

#: Requests whose CPU work (SKINNY, HMACs, ECDH, parsing a large body) runs at the same
#: time. More would not go faster (one interpreter lock) and would starve the event loop
#: of it: with 32 registrations at once on 32 threads, /healthz took up to 1 s.
CPU_LANES = 2


def proxy_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """The trusted proxies of the configuration as networks; :class:`ConfigError` names
    an entry that is neither an address nor a network."""
    nets = []
    for e in entries:
        try:
            nets.append(ipaddress.ip_network(e.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"trusted proxy {e!r} is not an IP address or network (like 10.0.0.0/8)") from None
    return tuple(nets)


@functools.lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    return proxy_networks(entries)


def _trusted(host: str, nets: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(addr in n for n in nets)


def _proxies(request: Request) -> tuple[Network, ...]:
    backend = getattr(request.app.state, "backend", None)
    return _networks(tuple(backend.config.trusted_proxies)) if backend is not None else ()


def _peer(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _header_values(request: Request, name: str) -> list[str]:
    return [v.strip() for h in request.headers.getlist(name) for v in h.split(",") if v.strip()]


def client_host(request: Request) -> str:
    """The client's address: the key of the per-client rate limits. The peer of the
    connection, unless it is a configured trusted proxy: then the nearest address of
    ``X-Forwarded-For`` that is not one (each proxy appends the address it saw, so what
    a client wrote itself stands further left and is never reached)."""
    peer, nets = _peer(request), _proxies(request)
    if not nets or not _trusted(peer, nets):
        return peer
    hops = _header_values(request, "x-forwarded-for")
    for hop in reversed(hops):
        if not _trusted(hop, nets):
            return hop
    return hops[0] if hops else peer


def is_https(request: Request) -> bool:
    """Whether the client's connection is HTTPS: this one, or, from a trusted proxy,
    the nearest ``X-Forwarded-Proto``."""
    if request.url.scheme == "https":
        return True
    nets = _proxies(request)
    if not nets or not _trusted(_peer(request), nets):
        return False
    proto = _header_values(request, "x-forwarded-proto")
    return bool(proto) and proto[-1].lower() == "https"


#: headers of every response unless the route set its own (OWASP Secure Headers Project;
#: REST Security Cheat Sheet): no content sniffing, no framing, no referrer, and for
#: anything that is not one of the pages, a policy that allows nothing at all
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"),
)


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def error_response(code: Code, message: str, path: str = "") -> JSONResponse:
    """The error answer to a request for ``path``, in the style of its routes (errors.py)."""
    return JSONResponse(ApiError(code, message).body(path), status_code=int(code.status))


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


class DaemonThreads(Executor):
    """A pool of daemon threads, made as work waits and none is idle, up to ``max_workers``.
    ``ThreadPoolExecutor``'s threads are joined when the interpreter exits: one blocked on
    a database that stopped answering would keep a stopping server alive past its grace
    period (anyio's threads, which served these routes before, are daemons too)."""

    def __init__(self, max_workers: int, name: str) -> None:
        self.max_workers, self.name = max_workers, name
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._work.put((future, fn, args, kwargs))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if self._threads < self.max_workers:
                    self._threads += 1
                    threading.Thread(target=self._serve, name=f"{self.name}-{self._threads}", daemon=True).start()
        return future

    def _serve(self) -> None:
        while True:
            future, fn, args, kwargs = self._work.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # the caller's to raise
                    future.set_exception(e)
            del future, fn, args, kwargs  # no reference kept while idle
            self._idle.release()


#: the threads the JSON API's blocking work runs on (database transactions): as many as
#: Starlette's thread pool has (anyio's 40), handed work through the event loop's
#: executor, a third of the CPU of anyio's ``to_thread`` per call (30 against 80-100 us,
#: measured under uvloop with 16 callers): a request's one hand-off
_BLOCKING = DaemonThreads(max_workers=40, name="ctagent-blocking")


async def blocking(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on a thread of :data:`_BLOCKING`, awaited."""
    return await asyncio.get_running_loop().run_in_executor(_BLOCKING, fn, *args)


async def off_loop(request: Request, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on the application's :class:`CpuLane`."""
    lane: CpuLane = request.app.state.cpu
    return await lane.run(fn, *args)
