"""The backend's HTTP application (FastAPI): a body-size limit, chaff answered like real
answers (:mod:`backend.chaff`), the error shapes (:mod:`backend.errors`), and the routers
of the roles: the JSON API, the ROBERT API when that role runs, the physicians' page and
the export files."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import MAX_BODY, api_router
from .chaff import ChaffMiddleware, ChaffTracker
from .errors import ApiError, Code
from .httputil import CpuLane, SecurityHeaders, error_response
from .robert import RobertServer
from .robert_api import MAX_REPORT_BODY, REPORT_PATH, robert_router
from .service import Backend
from .web import web_router


#: the longest a client may go silent in the middle of its request body (nginx's
#: ``client_body_timeout`` is 60 s): then it is answered 408 and its request dropped, so
#: that clients that stall cannot hold the server's connections and tasks for ever
BODY_TIMEOUT_S = 30.0


class _BodyLimit:
    """Refuse a body over its route's limit, whatever the transfer encoding (pure ASGI):
    at once when the declared length is over it, else as soon as the bytes received pass
    it. The 413 goes out then; the application sees the client gone and what it still
    sends is dropped, so nothing more of the body is read or kept. A body whose next
    bytes take more than ``body_timeout_s`` is answered 408 the same way."""

    def __init__(self, app: ASGIApp, body_timeout_s: float | None = None) -> None:
        self.app = app
        self.body_timeout_s = BODY_TIMEOUT_S if body_timeout_s is None else body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_REPORT_BODY if scope["path"] == REPORT_PATH else MAX_BODY

        def too_large() -> ASGIApp:  # made only when needed: every request passes here
            return error_response(Code.BODY_TOO_LARGE, f"request body over {limit} bytes", scope["path"])

        def too_slow() -> ASGIApp:
            return error_response(Code.BODY_TIMEOUT, f"no byte of the request body for {self.body_timeout_s:g} s",
                                  scope["path"])

        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await too_large()(scope, receive, send)
            return
        received, cut, answered, started, body_done = 0, False, False, False, False

        async def receive_within_limit() -> Message:
            nonlocal received, cut, answered, body_done
            if cut:
                return {"type": "http.disconnect"}
            if body_done:  # after the body: only a disconnect can come, whenever it comes
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout_s):  # a timer, no task of its own
                    message = await receive()
            except TimeoutError:
                cut, answered = True, not started
                if answered:
                    await too_slow()(scope, receive, send)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    cut, answered = True, not started
                    if answered:
                        await too_large()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_answered(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_within_limit, send_unless_answered)
        except Exception:
            if not answered:  # else: the application failed on the body it was refused
                raise


async def _api_error(request: Request, exc: Exception):
    assert isinstance(exc, ApiError)
    return error_response(exc.code, exc.message, request.url.path)


async def _validation_error(request: Request, exc: Exception):
    assert isinstance(exc, RequestValidationError)
    errs, path = exc.errors(), request.url.path
    if any(e.get("type") == "json_invalid" for e in errs):
        return error_response(Code.UNPARSABLE_REQUEST, "the body is not valid JSON", path)
    first = errs[0] if errs else {}
    where = ".".join(str(x) for x in first.get("loc", ())[1:])
    return error_response(Code.INVALID_REQUEST, f"{where or 'body'}: {first.get('msg', 'invalid')}", path)


def create_app(backend: Backend, robert_server: RobertServer | None = None) -> FastAPI:
    app = FastAPI(title="ctagent reference backend", docs_url=None, redoc_url=None)
    app.state.chaff = ChaffTracker()
    app.add_middleware(ChaffMiddleware, tracker=app.state.chaff)  # inside the body limit
    app.add_middleware(_BodyLimit)
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, refusals included
    app.state.backend = backend
    app.state.cpu = CpuLane()
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(api_router(backend))
    app.mount("/exports", StaticFiles(directory=backend.config.exports_dir), name="exports")
    if robert_server is not None:
        app.include_router(robert_router(robert_server))
    app.include_router(web_router(backend))
    return app
