"""Request bodies read as JSON, with limits, for every JSON route.

A body must be UTF-8 JSON (RFC 8259) with no ``NaN`` or ``Infinity``, nested at most
:data:`MAX_DEPTH` levels, whose integers fit a signed 64-bit column, whose numbers are
finite and whose strings are Unicode text (no lone surrogate from a ``\\ud800``
escape). Anything else is an :class:`~backend.errors.ApiError`: ``unparsable_request``
when it is not such JSON, ``invalid_request`` when it is JSON the backend cannot hold.
Large bodies are parsed off the event loop, on the application's CPU lane.

Routes take their body through a dependency: :func:`model_body` (a strict pydantic
model) or :func:`object_body` (a JSON object, checked field by field by the role).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from .errors import ApiError, Code
from .httputil import off_loop

#: the deepest valid body is a ROBERT report: object > contacts > contact > ids > id (5)
MAX_DEPTH = 16
#: integers beyond a signed 64-bit column are refused (SQLite's INTEGER, PostgreSQL's BIGINT)
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_INT_DIGITS = len(str(INT_MAX))
#: bodies up to this size are parsed on the event loop (well under a millisecond)
INLINE_PARSE_MAX = 64 * 1024
#: a \\uD800-\\uDFFF escape: the only way JSON text can carry a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

M = TypeVar("M", bound=BaseModel)


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _INT_DIGITS or not INT_MIN <= (value := int(text)) <= INT_MAX:
        raise ApiError(Code.INVALID_REQUEST, "integers must fit in 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(Code.INVALID_REQUEST, "numbers must be finite")
    return value


def _constant(name: str) -> Any:
    raise ApiError(Code.UNPARSABLE_REQUEST, f"{name} is not JSON")


def _too_deep() -> ApiError:
    return ApiError(Code.UNPARSABLE_REQUEST, f"the body is nested deeper than {MAX_DEPTH} levels")


def _check(doc: Any, strings: bool) -> None:
    """Depth, and (when an escape could have made one) lone surrogates, without recursion."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            items = list(value.values())
            if strings:
                items += value.keys()
        elif isinstance(value, list):
            items = value
        else:
            if strings and isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(Code.INVALID_REQUEST, "strings must be Unicode text (a lone surrogate)") from None
            continue
        if depth > MAX_DEPTH:
            raise _too_deep()
        stack.extend((item, depth + 1) for item in items if strings or isinstance(item, (dict, list)))


def parse(raw: bytes) -> Any:
    """The JSON document of a request body, within the limits above; ApiError otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(Code.UNPARSABLE_REQUEST, "the body is not UTF-8 text") from None
    try:
        doc = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        raise ApiError(Code.UNPARSABLE_REQUEST, "the body is not valid JSON") from None
    _check(doc, strings=_SURROGATE_ESCAPE.search(text) is not None)
    return doc


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if len(raw) <= INLINE_PARSE_MAX:
        return parse(raw)
    return await off_loop(request, parse, raw)


async def _json_object(request: Request) -> dict[str, Any]:
    doc = await read_json(request)
    if not isinstance(doc, dict):
        raise ApiError(Code.INVALID_REQUEST, "the body must be a JSON object")
    return doc


#: a route parameter: the body as a JSON object
object_body = Annotated[dict[str, Any], Depends(_json_object)]


def model_body(model: type[M]) -> Any:
    """A route parameter's dependency: the body read by :func:`parse`, then checked by
    ``model`` (its errors answered like FastAPI's own: ``invalid_request``)."""

    async def read(request: Request) -> M:
        doc = await read_json(request)
        try:
            return model.model_validate(doc)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None

    return Depends(read)
