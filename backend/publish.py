"""The publish role: a v1 publish request (the shape of the public Exposure
Notifications key server's, google/exposure-notifications-server
``pkg/api/v1/exposure_types.go``) with its verification certificate -> stored keys.

:func:`validate_publish` is pure (request, certificate claims and time in; typed keys or
an :class:`ApiError` out). Its checks mirror the key server's
``internal/publish/model/exposure_model.go`` (``AdjustAndValidate``): 16-byte keys, a
rolling period of 1..144, no key that expired more than 15 days ago or starts in the
future, and keys still valid when uploaded are embargoed until they expire.
:class:`Publisher` adds the certificate check and the one database transaction.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock import Clock
from agent.protocol import gaen
from agent.protocol.export import DiagnosisKey, ReportType
from agent.protocol.verification import tek_hmac

from . import certificate, db
from .certificate import CertificateClaims
from .errors import ApiError, Code

log = logging.getLogger("ctagent.backend")

MAX_KEYS_PER_PUBLISH = 30
MAX_KEY_AGE_DAYS = 15


@dataclass(frozen=True)
class ValidatedPublish:
    """A publish request that passed every check: what will be stored."""

    jti: str
    #: with the certificate's report type and the days since symptom onset
    keys: tuple[DiagnosisKey, ...]
    report_type: ReportType
    symptom_onset_interval: int | None
    health_authority: str


def embargo_end(key: DiagnosisKey, now: float) -> float:
    """When the key may be exported: not before it stopped being broadcast."""
    end = (key.rolling_start_interval_number + key.rolling_period) * gaen.INTERVAL_SECONDS
    return max(now, end)


def _b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return None


def validate_publish(request: Mapping[str, Any], claims: CertificateClaims, now: float) -> ValidatedPublish:
    """Check the keys of ``request`` (the JSON body of a v1 publish request, shape-checked
    by the route's model) against ``claims`` (a verified certificate) at ``now``."""
    hmac_key = _b64(request["hmacKey"])
    if hmac_key is None:
        raise ApiError(Code.HMAC_KEY_INVALID, "hmacKey is not base64")
    now_enin = gaen.en_interval_number(now)
    oldest = now_enin - MAX_KEY_AGE_DAYS * gaen.TEK_ROLLING_PERIOD
    onset = request.get("symptomOnsetInterval") or claims.symptom_onset_interval or None
    report_type = claims.report_type
    keys = []
    for i, k in enumerate(request["temporaryExposureKeys"]):
        data = _b64(k["key"])
        if data is None or len(data) != gaen.KEY_LEN:
            raise ApiError(Code.KEY_INVALID, f"key {i} is not {gaen.KEY_LEN} bytes of base64")
        rs, rp = k["rollingStartNumber"], k.get("rollingPeriod", gaen.TEK_ROLLING_PERIOD)
        if not 1 <= rp <= gaen.TEK_ROLLING_PERIOD:
            raise ApiError(Code.KEY_INVALID, f"key {i}: rollingPeriod must be 1..{gaen.TEK_ROLLING_PERIOD}")
        if rs + rp < oldest:
            raise ApiError(Code.KEY_TOO_OLD, f"key {i} is older than {MAX_KEY_AGE_DAYS} days")
        if rs > now_enin:
            raise ApiError(Code.KEY_IN_FUTURE, f"key {i} starts in the future")
        dso = None if not onset else int((rs - onset) // gaen.TEK_ROLLING_PERIOD)
        keys.append(DiagnosisKey(data, rs, rp, k.get("transmissionRisk", 0), report_type, dso))
    if len({k.key_data for k in keys}) != len(keys):
        raise ApiError(Code.KEY_DUPLICATE, "the same key appears twice")
    if not hmac.compare_digest(tek_hmac(hmac_key, keys), claims.tekmac):
        raise ApiError(Code.HMAC_MISMATCH, "the keys do not match the certificate's HMAC")
    ha = claims.health_authority
    return ValidatedPublish(claims.jti, tuple(keys), report_type, onset,
                            ha if ha is not None else str(request.get("healthAuthorityID", "")))


def check_key_count(keys: Sequence[object]) -> None:
    if len(keys) > MAX_KEYS_PER_PUBLISH:
        raise ApiError(Code.TOO_MANY_KEYS, f"at most {MAX_KEYS_PER_PUBLISH} keys per request")


class Publisher:
    def __init__(self, engine: sa.Engine, clock: Clock, certificate_key: ec.EllipticCurvePublicKey) -> None:
        self.engine, self.clock, self.certificate_key = engine, clock, certificate_key

    def publish(self, request: Mapping[str, Any]) -> dict:
        """Store the keys of a v1 publish request; the response body. A certificate is
        used once; an identical retry (same certificate, hence same keys) gets the first
        answer again."""
        now = self.clock.now()
        check_key_count(request["temporaryExposureKeys"])  # before any work on the certificate
        claims = certificate.read(request["verificationPayload"], self.certificate_key, now)
        valid = validate_publish(request, claims, now)
        certs = db.certificates
        with self.engine.begin() as c:
            cert = c.execute(sa.select(certs).where(certs.c.jti == valid.jti)).first()
            if cert is None:
                raise ApiError(Code.CERTIFICATE_INVALID, "unknown certificate")
            if cert.used_at is not None:
                if cert.response:
                    return json.loads(cert.response)
                raise ApiError(Code.CERTIFICATE_USED, "the certificate was already used")
            existing = {r.key_data for r in c.execute(sa.select(db.exposures.c.key_data).where(
                db.exposures.c.key_data.in_([k.key_data for k in valid.keys])))}
            new_rows = [_row(k, valid.health_authority, now) for k in valid.keys if k.key_data not in existing]
            if new_rows:
                c.execute(sa.insert(db.exposures), new_rows)
            resp = {"revisionToken": "", "insertedExposures": len(new_rows), "error": "", "code": ""}
            c.execute(sa.update(certs).where(certs.c.jti == valid.jti).values(used_at=now, response=json.dumps(resp)))
        log.info("publish: %d key(s) inserted", len(new_rows))
        return resp


def _row(k: DiagnosisKey, health_authority: str, now: float) -> dict[str, Any]:
    return {"key_data": k.key_data, "rolling_start": k.rolling_start_interval_number,
            "rolling_period": k.rolling_period, "transmission_risk": k.transmission_risk_level,
            "report_type": int(k.report_type), "days_since_onset": k.days_since_onset_of_symptoms,
            "health_authority": health_authority, "received_at": now, "export_after": embargo_end(k, now)}
