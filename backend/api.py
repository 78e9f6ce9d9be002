"""JSON routes of the verification and key-server roles. Request bodies are read with the
limits of :mod:`backend.jsonbody`, then checked by strict models (unknown fields refused);
field names are those of the public verification server (``/api/issue``, ``/api/verify``,
``/api/certificate``: google/exposure-notifications-verification-server
``pkg/api/api.go``) and key server (``/v1/publish``: google/exposure-notifications-server
``pkg/api/v1/exposure_types.go``)."""

from __future__ import annotations

import base64
import secrets
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from agent.protocol.export import INT32_MAX
from agent.protocol.gaen import TEK_ROLLING_PERIOD

from .errors import ApiError, Code
from .httputil import blocking, client_host
from .jsonbody import model_body
from .publish import MAX_TRANSMISSION_RISK
from .service import Backend
from .verification import date_interval

#: the largest body of these routes (the publish request's padding included)
MAX_BODY = 64 * 1024
#: ``padding`` of a request: ignored, as the official servers do, within the body limit
#: (the Android reference app pads each request to 5,000 bytes, ``Padding.addPadding``)
_PADDING = Field("", max_length=MAX_BODY)
#: responses carry 1-2 KiB of random padding, as the official servers' (``api.Padding``,
#: ``generatePadding``): an observer cannot tell an answer by its size
RESPONSE_PADDING_MIN, RESPONSE_PADDING_RANGE = 1024, 1024


def response_padding() -> str:
    return base64.b64encode(secrets.token_bytes(RESPONSE_PADDING_MIN + secrets.randbelow(RESPONSE_PADDING_RANGE))
                            ).decode()


def padded(answer: dict) -> JSONResponse:
    """The answer with its padding, as a response: these answers hold only JSON types, so
    FastAPI's walk through them (``jsonable_encoder``) is skipped."""
    return JSONResponse({**answer, "padding": response_padding()})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The verification server's request shapes (``pkg/api/api.go``): VerifyCodeRequest,
# VerificationCertificateRequest, IssueCodeRequest.
class VerifyRequest(_Strict):
    code: str = Field(max_length=64)
    accept: list[Annotated[str, Field(max_length=32)]] | None = Field(None, max_length=8)
    padding: str = _PADDING
    #: only for user-report codes, which this server does not issue: read and ignored
    nonce: str = Field("", max_length=1024)


class CertificateRequest(_Strict):
    token: str = Field(max_length=256)
    ekeyhmac: str = Field(max_length=128)
    padding: str = _PADDING


# Every number of these requests is a 32-bit field on the wire (export.proto; the key
# server's int32): a larger one is refused by the model, before it can reach the
# database or an export file; the roles then check what it means (age, period, onset).
class IssueRequest(_Strict):
    testType: str = "confirmed"
    symptomOnsetInterval: int | None = Field(None, ge=0, le=INT32_MAX)
    #: ``YYYY-MM-DD``; the verification server encodes one date in the certificate, the
    #: symptom date when there is one, else the test date: so does this server
    symptomDate: str = Field("", max_length=10)
    testDate: str = Field("", max_length=10)
    #: the user's time zone in minutes: the dates are UTC days here, as in the certificate
    tzOffset: float = Field(0, ge=-24 * 60, le=24 * 60)
    padding: str = _PADDING


class ExposureKey(_Strict):
    key: str = Field(max_length=64)
    rollingStartNumber: int = Field(ge=0, le=INT32_MAX)
    rollingPeriod: int = Field(TEK_ROLLING_PERIOD, ge=0, le=INT32_MAX)
    transmissionRisk: int = Field(0, ge=0, le=MAX_TRANSMISSION_RISK)


class PublishRequest(_Strict):
    temporaryExposureKeys: list[ExposureKey] = Field(min_length=1)
    healthAuthorityID: str = Field("", max_length=128)
    verificationPayload: str = Field(max_length=8192)
    hmacKey: str = Field(max_length=128)
    symptomOnsetInterval: int | None = Field(None, ge=0, le=INT32_MAX)
    traveler: bool = False
    revisionToken: str = Field("", max_length=4096)
    padding: str = Field("", max_length=MAX_BODY)


def api_router(backend: Backend) -> APIRouter:
    router = APIRouter()
    verification = backend.verification

    @router.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @router.get("/v1/public-key")
    def public_key():
        c = backend.config
        return {"publicKey": backend.public_key_b64, "keyId": c.key_id, "keyVersion": c.key_version,
                "region": c.region, "algorithm": "ECDSA P-256 SHA-256"}

    # The declaration's four routes: the body read and checked on the event loop, then
    # the role's work (a database transaction) on a thread: one hand-off a request.
    @router.post("/api/issue")
    async def api_issue(body: Annotated[IssueRequest, model_body(IssueRequest)],
                        x_api_key: str | None = Header(default=None)):
        def issue() -> dict:
            who = verification.api_key_owner(x_api_key)
            onset = body.symptomOnsetInterval
            for date in (body.symptomDate, body.testDate):
                if onset is None and date:
                    try:
                        onset = date_interval(date)
                    except ValueError:
                        raise ApiError(Code.INVALID_REQUEST, "symptomDate and testDate are YYYY-MM-DD") from None
            return verification.issue_code(f"api:{who}", test_type=body.testType, symptom_onset_interval=onset)

        return JSONResponse(await blocking(issue))

    @router.post("/api/verify")
    async def api_verify(body: Annotated[VerifyRequest, model_body(VerifyRequest)], request: Request):
        return padded(await blocking(verification.verify_code, body.code, client_host(request), body.accept))

    @router.post("/api/certificate")
    async def api_certificate(body: Annotated[CertificateRequest, model_body(CertificateRequest)]):
        return padded(await blocking(verification.certificate, body.token, body.ekeyhmac))

    @router.post("/v1/publish")
    async def publish(body: Annotated[PublishRequest, model_body(PublishRequest)]):
        return padded(await blocking(backend.publisher.publish, body.model_dump()))

    return router
