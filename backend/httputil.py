"""Small helpers shared by the HTTP routers."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from .errors import ApiError, Code


def client_host(request: Request) -> str:
    """The peer's address: the key of the per-client rate limits."""
    return request.client.host if request.client else "unknown"


def error_response(code: Code, message: str) -> JSONResponse:
    return JSONResponse(ApiError(code, message).body(), status_code=int(code.status))
