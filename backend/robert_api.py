"""JSON routes of the ROBERT role, with the paths and field names of the deployed API v6
(TousAntiCovid/robert-server). Bodies are read as JSON objects with the limits of
:mod:`backend.jsonbody` and checked field by field by :class:`~backend.robert.RobertServer`.
The role's work (SKINNY, HMACs, ECDH, a report's verification) runs on the application's
CPU lane (:class:`~backend.httputil.CpuLane`), never on the event loop."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from .httputil import client_host, off_loop
from .jsonbody import object_body
from .robert import RobertServer

REPORT_PATH = "/api/v6/report"
#: a proximity list holds every HELLO heard in 14 days
MAX_REPORT_BODY = 32 * 1024 * 1024


def robert_router(rs: RobertServer) -> APIRouter:
    router = APIRouter()

    @router.post("/api/v6/register")
    async def register(doc: object_body, request: Request, x_api_key: str | None = Header(default=None)):
        # RegisterRequest: captcha, captchaId, clientPublicECDHKey, pushInfo; 201 as
        # RegisterController.kt answers (the captcha is not checked: see backend.robert)
        answer = await off_loop(request, rs.register, str(doc.get("clientPublicECDHKey", "")),
                                client_host(request), x_api_key)
        return JSONResponse(answer, status_code=201)

    @router.post("/api/v6/status")
    async def status(doc: object_body, request: Request):
        return await off_loop(request, rs.status, doc)

    @router.post(REPORT_PATH)
    async def report(doc: object_body, request: Request):
        return await off_loop(request, rs.report, doc, client_host(request))

    @router.post("/api/v6/unregister")
    async def unregister(doc: object_body, request: Request):
        return await off_loop(request, rs.unregister, doc)

    @router.post("/api/v6/deleteExposureHistory")
    async def delete_history(doc: object_body, request: Request):
        return await off_loop(request, rs.delete_history, doc)

    @router.get("/api/v6/clock")
    def clock():
        return rs.clock_answer()

    return router
