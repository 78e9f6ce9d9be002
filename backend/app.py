"""The backend's HTTP application (FastAPI): a body-size limit, one error shape
(``{"code": ..., "error": ...}``), and the routers of the roles: the JSON API, the
ROBERT API when that role runs, the physicians' page and the export files."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.middleware.base import BaseHTTPMiddleware

from .api import MAX_BODY, api_router
from .errors import ApiError, Code
from .httputil import SecurityHeaders, error_response
from .robert import RobertServer
from .robert_api import MAX_REPORT_BODY, REPORT_PATH, robert_router
from .service import Backend
from .web import web_router


class _BodyLimit(BaseHTTPMiddleware):
    """Refuse large bodies before any parsing: by the declared length, then by the
    bytes actually received."""

    async def dispatch(self, request: Request, call_next):
        if request.method in ("POST", "PUT"):
            limit = MAX_REPORT_BODY if request.url.path == REPORT_PATH else MAX_BODY
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return error_response(Code.BODY_TOO_LARGE, f"request body over {limit} bytes")
            body = await request.body()  # cached by Starlette for the handler
            if len(body) > limit:
                return error_response(Code.BODY_TOO_LARGE, f"request body over {limit} bytes")
        return await call_next(request)


async def _api_error(_request: Request, exc: Exception):
    assert isinstance(exc, ApiError)
    return error_response(exc.code, exc.message)


async def _validation_error(_request: Request, exc: Exception):
    assert isinstance(exc, RequestValidationError)
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return error_response(Code.UNPARSABLE_REQUEST, "the body is not valid JSON")
    first = errs[0] if errs else {}
    where = ".".join(str(x) for x in first.get("loc", ())[1:])
    return error_response(Code.INVALID_REQUEST, f"{where or 'body'}: {first.get('msg', 'invalid')}")


def create_app(backend: Backend, robert_server: RobertServer | None = None) -> FastAPI:
    app = FastAPI(title="ctagent reference backend", docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit)
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, refusals included
    app.state.backend = backend
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(api_router(backend))
    app.mount("/exports", StaticFiles(directory=backend.config.exports_dir), name="exports")
    if robert_server is not None:
        app.include_router(robert_router(robert_server))
    app.include_router(web_router(backend))
    return app
