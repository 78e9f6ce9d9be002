"""Chaff (cover traffic): a request with an ``X-Chaff`` header gets a success-shaped answer
that an observer of the connection cannot tell from a real one, and changes nothing.

As Google's servers do it (google/exposure-notifications-server ``internal/publish``
``chaffPublishResponse`` and the verification server's ``middleware.ProcessChaff``, both on
mikehelmick/go-chaff's tracker): the real answers of each route are tracked (how long they
took, how large they were) in a rolling window of the last :data:`TRACKED` per route; a
chaff request is read whole like a real one, then answered with that route's canned
success body padded to the size of a real answer drawn from the window, once the time of
a real answer drawn from the window has passed. Drawing one real answer (rather than the
window's average, as go-chaff does) gives chaff the distribution of real answers, not
only their mean. The official Android app sends ``X-Chaff: 1`` on /api/verify,
/api/certificate and /v1/publish (``ApiConstants.CHAFF_HEADER``) and never reads the
answer.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: the header, as the Android app and the verification server spell it
HEADER = b"x-chaff"
#: real answers remembered per route (go-chaff's DefaultCapacity)
TRACKED = 100


def _token(n: int) -> str:
    return secrets.token_urlsafe(n)


def _jwt_like() -> str:
    """Three base64url parts of a certificate's usual sizes (ES256: a 64-byte signature)."""
    return ".".join(base64.urlsafe_b64encode(secrets.token_bytes(n)).decode().rstrip("=") for n in (36, 230, 64))


#: the success body of each route that takes chaff (before its padding): the shapes of
#: the real answers, with random values of the real lengths
CANNED: dict[str, Callable[[], dict]] = {
    "/api/verify": lambda: {"testtype": "confirmed", "token": _token(32)},
    "/api/certificate": lambda: {"certificate": _jwt_like()},
    "/v1/publish": lambda: {"revisionToken": "", "insertedExposures": 0, "error": "", "code": ""},
}


@dataclass(frozen=True, slots=True)
class Served:
    seconds: float
    body_bytes: int


class ChaffTracker:
    """The last real answers of each route, and chaff answers that look like them.
    ``timer`` (monotonic seconds) and ``sleep`` are injected for tests."""

    def __init__(self, *, timer: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        self.timer, self.sleep = timer, sleep
        self.rng = rng or random.SystemRandom()
        self.served: dict[str, collections.deque[Served]] = collections.defaultdict(
            lambda: collections.deque(maxlen=TRACKED))
        #: how late chaff answers end after their target, on average (waking up and
        #: answering take time of their own): taken off the next waits
        self.overshoot_s = 0.0

    def record(self, path: str, seconds: float, body_bytes: int) -> None:
        self.served[path].append(Served(seconds, body_bytes))

    def model(self, path: str) -> Served | None:
        """One real answer of ``path``, drawn at random (None before the first)."""
        seen = self.served.get(path)
        return self.rng.choice(seen) if seen else None

    def body(self, path: str, size: int | None) -> bytes:
        """The canned answer of ``path``, its padding sized so that the whole body has
        ``size`` bytes (1-2 KiB of padding when no real answer was seen yet)."""
        doc = CANNED[path]()
        doc["padding"] = ""
        bare = len(json.dumps(doc, separators=(",", ":")))
        chars = (size - bare) if size is not None else 4 * (1024 + self.rng.randrange(1024)) // 3
        n = max(0, chars) * 3 // 4
        doc["padding"] = base64.b64encode(secrets.token_bytes(n)).decode()
        return json.dumps(doc, separators=(",", ":")).encode()


class ChaffMiddleware:
    """ASGI middleware: chaff on the routes of :data:`CANNED` is answered by the tracker;
    real requests there are timed and measured for it."""

    def __init__(self, app: ASGIApp, tracker: ChaffTracker) -> None:
        self.app, self.tracker = app, tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in CANNED:
            await self.app(scope, receive, send)
            return
        start = self.tracker.timer()
        if any(k.lower() == HEADER and v.strip() for k, v in scope.get("headers", [])):
            await self._chaff(path, start, receive, send)
            return
        status, size = 0, 0

        async def measure(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, measure)
        if status == 200:
            self.tracker.record(path, self.tracker.timer() - start, size)

    async def _chaff(self, path: str, start: float, receive: Receive, send: Send) -> None:
        while True:  # the body is read like a real one (the body limit still cuts it)
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        model = self.tracker.model(path)
        body = self.tracker.body(path, None if model is None else model.body_bytes)
        if model is not None:
            wait = model.seconds - (self.tracker.timer() - start) - self.tracker.overshoot_s
            if wait > 0:
                await self.tracker.sleep(wait)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        if model is not None:
            late = (self.tracker.timer() - start) - model.seconds
            self.tracker.overshoot_s = max(0.0, 0.8 * self.tracker.overshoot_s + 0.2 * late)
