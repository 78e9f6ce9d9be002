"""JSON routes of the ROBERT role, with the paths and field names of the deployed API v6
(TousAntiCovid/robert-server). Bodies are read as JSON objects and checked
field by field by :class:`~backend.robert.RobertServer`."""

from __future__ import annotations

import json

from fastapi import APIRouter, Header, Request

from .errors import ApiError, Code
from .httputil import client_host
from .robert import RobertServer

REPORT_PATH = "/api/v6/report"
#: a proximity list holds every HELLO heard in 14 days
MAX_REPORT_BODY = 32 * 1024 * 1024


async def _json_object(request: Request) -> dict:
    try:
        doc = json.loads(await request.body())
    except ValueError:
        raise ApiError(Code.UNPARSABLE_REQUEST, "the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ApiError(Code.INVALID_REQUEST, "the body must be a JSON object")
    return doc


def robert_router(rs: RobertServer) -> APIRouter:
    router = APIRouter()

    @router.post("/api/v6/register")
    async def register(request: Request, x_api_key: str | None = Header(default=None)):
        doc = await _json_object(request)
        return rs.register(str(doc.get("clientPublicECDHKey", "")), client_host(request), x_api_key)

    @router.post("/api/v6/status")
    async def status(request: Request):
        return rs.status(await _json_object(request))

    @router.post(REPORT_PATH)
    async def report(request: Request):
        return rs.report(await _json_object(request), client_host(request))

    @router.post("/api/v6/unregister")
    async def unregister(request: Request):
        return rs.unregister(await _json_object(request))

    @router.post("/api/v6/deleteExposureHistory")
    async def delete_history(request: Request):
        return rs.delete_history(await _json_object(request))

    @router.get("/api/v6/clock")
    def clock():
        return {"serverTime": rs.now_ntp(), "epochId": rs.current_epoch(), "timeStart": rs.start_ntp}

    return router
