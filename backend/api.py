"""JSON routes of the verification and key-server roles. Request bodies are read with the
limits of :mod:`backend.jsonbody`, then checked by strict models (unknown fields refused);
field names are those of the public verification server (``/api/issue``, ``/api/verify``,
``/api/certificate``: google/exposure-notifications-verification-server
``pkg/api/api.go``) and key server (``/v1/publish``: google/exposure-notifications-server
``pkg/api/v1/exposure_types.go``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from agent.protocol.export import INT32_MAX
from agent.protocol.gaen import TEK_ROLLING_PERIOD

from .httputil import client_host
from .jsonbody import model_body
from .publish import MAX_TRANSMISSION_RISK
from .service import Backend

#: the largest body of these routes (the publish request's padding included)
MAX_BODY = 64 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VerifyRequest(_Strict):
    code: str = Field(max_length=64)
    accept: list[str] | None = None


class CertificateRequest(_Strict):
    token: str = Field(max_length=256)
    ekeyhmac: str = Field(max_length=128)


# Every number of these requests is a 32-bit field on the wire (export.proto; the key
# server's int32): a larger one is refused by the model, before it can reach the
# database or an export file; the roles then check what it means (age, period, onset).
class IssueRequest(_Strict):
    testType: str = "confirmed"
    symptomOnsetInterval: int | None = Field(None, ge=0, le=INT32_MAX)


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

    @router.post("/api/issue")
    def api_issue(body: Annotated[IssueRequest, model_body(IssueRequest)],
                  x_api_key: str | None = Header(default=None)):
        who = verification.api_key_owner(x_api_key)
        return verification.issue_code(f"api:{who}", test_type=body.testType,
                                       symptom_onset_interval=body.symptomOnsetInterval)

    @router.post("/api/verify")
    def api_verify(body: Annotated[VerifyRequest, model_body(VerifyRequest)], request: Request):
        return verification.verify_code(body.code, client_host(request))

    @router.post("/api/certificate")
    def api_certificate(body: Annotated[CertificateRequest, model_body(CertificateRequest)]):
        return verification.certificate(body.token, body.ekeyhmac)

    @router.post("/v1/publish")
    def publish(body: Annotated[PublishRequest, model_body(PublishRequest)]):
        return backend.publisher.publish(body.model_dump())

    return router
