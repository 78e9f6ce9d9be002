"""The publish role: a v1 publish request (the shape of the public Exposure
Notifications key server's, google/exposure-notifications-server
``pkg/api/v1/exposure_types.go``) with its verification certificate -> stored keys.

:func:`validate_publish` is pure (request, certificate claims and time in; typed keys or
an :class:`ApiError` out). Its checks mirror the key server's
``internal/publish/model/exposure_model.go`` (``AdjustAndValidate``,
``TransformPublish``): 16-byte keys, a rolling period of 1..144, a transmission risk of
0..8, no key that expired more than 15 days ago or starts in the future, and keys still
valid when uploaded are embargoed until they expire. The symptom onset is taken only
when plausible (:func:`symptom_onset`), and a key whose days since onset would be
beyond +-14 is not saved (a warning in the answer), as there.
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

from agent.clock import Clock
from agent.protocol import gaen
from agent.protocol.export import DiagnosisKey, ReportType
from agent.protocol.verification import accepted_tek_hmacs

from . import certificate, db
from .certificate import CertificateClaims
from .errors import ApiError, Code

log = logging.getLogger("ctagent.backend")

MAX_KEYS_PER_PUBLISH = 30
MAX_KEY_AGE_DAYS = 15
#: transmission risk levels of a v1 publish request (``MinTransmissionRisk`` ..
#: ``MaxTransmissionRisk``, google/exposure-notifications-server ``pkg/api/v1``)
MAX_TRANSMISSION_RISK = 8
#: a key is saved with its days since symptom onset only within +-14 days of the onset
#: (the key server's ``MAX_SYMPTOM_ONSET_DAYS`` default; Exposure Notifications v1.5
#: devices weigh days since onset in -14..14 only); beyond it, the key is not saved
MAX_ONSET_DAYS = 14
#: a symptom onset is plausible when it is not in the future and not before UTC
#: midnight this many days ago (the key server's ``MAX_VALID_SYMPTOM_ONSET_REPORT_DAYS``
#: default); an implausible one is ignored, as there
MAX_ONSET_REPORT_DAYS = 28


@dataclass(frozen=True)
class ValidatedPublish:
    """A publish request that passed every check: what will be stored."""

    jti: str
    #: with the certificate's report type and the days since symptom onset
    keys: tuple[DiagnosisKey, ...]
    report_type: ReportType
    symptom_onset_interval: int | None
    health_authority: str
    #: one sentence per key of the request that is not saved (its onset is too far off)
    warnings: tuple[str, ...] = ()


def embargo_end(key: DiagnosisKey, now: float, rehearsal_embargo_s: float | None = None) -> float:
    """When the key may be exported: not before it stopped being broadcast; in a
    rehearsal (an explicit setting, never the default) ``rehearsal_embargo_s`` after now."""
    if rehearsal_embargo_s is not None:
        return now + rehearsal_embargo_s
    end = (key.rolling_start_interval_number + key.rolling_period) * gaen.INTERVAL_SECONDS
    return max(now, end)


def _b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return None


def onset_plausible(onset: int, now: float) -> bool:
    """A symptom onset interval not in the future and not before UTC midnight
    :data:`MAX_ONSET_REPORT_DAYS` days ago."""
    earliest = gaen.rolling_start_for_day(now) - MAX_ONSET_REPORT_DAYS * gaen.TEK_ROLLING_PERIOD
    return isinstance(onset, int) and earliest <= onset <= gaen.en_interval_number(now)


def symptom_onset(certified: int | None, requested: object, now: float) -> int | None:
    """The onset the keys are labelled with: the certificate's (signed for the health
    authority) when it is plausible, else the request's (outside the certificate and its
    HMAC) when plausible, else none. 0 means none, as in the key server's API."""
    for onset in (certified, requested):
        if isinstance(onset, int) and not isinstance(onset, bool) and onset and onset_plausible(onset, now):
            return onset
    return None


def days_between_intervals(onset: int, key_start: int) -> int:
    """Days from the symptom onset to a key's first interval, both rounded down to their UTC
    day first: a key of the onset's day is day 0 whatever the hour of either. The key
    server rounds the onset down to the start of its UTC day (google/exposure-notifications-
    server ``pkg/api/v1`` VerificationClaims.SymptomOnsetInterval, Publish.SymptomOnsetInterval:
    "Will be rounded down to the start of the UTC day provided"); the whole-day difference
    is its ``DaysBetweenIntervals`` (``internal/publish/model/exposure_model.go``) as issue 12
    describes it: no stored version of that file has it, the stored ones round the distance
    to the nearest day (``DaysFromSymptomOnset``), which agrees for keys starting at UTC
    midnight (every key the agent and the official apps upload)."""
    return key_start // gaen.TEK_ROLLING_PERIOD - onset // gaen.TEK_ROLLING_PERIOD


def _int_field(k: Mapping[str, Any], name: str, default: int | None, i: int) -> int:
    value = k.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(Code.KEY_INVALID, f"key {i}: {name} must be an integer")
    return value


def validate_publish(request: Mapping[str, Any], claims: CertificateClaims, now: float) -> ValidatedPublish:
    """Check the keys of ``request`` (the JSON body of a v1 publish request, shape-checked
    by the route's model) against ``claims`` (a verified certificate) at ``now``."""
    hmac_key = _b64(request["hmacKey"])
    if hmac_key is None:
        raise ApiError(Code.HMAC_KEY_INVALID, "hmacKey is not base64")
    now_enin = gaen.en_interval_number(now)
    oldest = now_enin - MAX_KEY_AGE_DAYS * gaen.TEK_ROLLING_PERIOD
    onset = symptom_onset(claims.symptom_onset_interval, request.get("symptomOnsetInterval"), now)
    report_type = claims.report_type
    keys, saved, warnings = [], [], []
    for i, k in enumerate(request["temporaryExposureKeys"]):
        data = _b64(k["key"])
        if data is None or len(data) != gaen.KEY_LEN:
            raise ApiError(Code.KEY_INVALID, f"key {i} is not {gaen.KEY_LEN} bytes of base64")
        rs = _int_field(k, "rollingStartNumber", None, i)
        rp = _int_field(k, "rollingPeriod", gaen.TEK_ROLLING_PERIOD, i)
        tr = _int_field(k, "transmissionRisk", 0, i)
        if not 1 <= rp <= gaen.TEK_ROLLING_PERIOD:
            raise ApiError(Code.KEY_INVALID, f"key {i}: rollingPeriod must be 1..{gaen.TEK_ROLLING_PERIOD}")
        if not 0 <= tr <= MAX_TRANSMISSION_RISK:
            raise ApiError(Code.KEY_INVALID, f"key {i}: transmissionRisk must be 0..{MAX_TRANSMISSION_RISK}")
        if rs + rp < oldest:
            raise ApiError(Code.KEY_TOO_OLD, f"key {i} is older than {MAX_KEY_AGE_DAYS} days")
        if rs > now_enin:
            raise ApiError(Code.KEY_IN_FUTURE, f"key {i} starts in the future")
        dso = None if onset is None else days_between_intervals(onset, rs)
        key = DiagnosisKey(data, rs, rp, tr, report_type, dso)
        keys.append(key)
        if dso is not None and abs(dso) > MAX_ONSET_DAYS:
            warnings.append(f"key {i} is {abs(dso)} days from the symptom onset (over {MAX_ONSET_DAYS}): not saved")
        else:
            saved.append(key)
    if len({k.key_data for k in keys}) != len(keys):
        raise ApiError(Code.KEY_DUPLICATE, "the same key appears twice")
    # every form is compared, so the time taken does not say which one matched
    if sum(hmac.compare_digest(m, claims.tekmac) for m in accepted_tek_hmacs(hmac_key, keys)) != 1:
        raise ApiError(Code.HMAC_MISMATCH, "the keys do not match the certificate's HMAC")
    ha = claims.health_authority
    return ValidatedPublish(claims.jti, tuple(saved), report_type, onset,
                            ha if ha is not None else str(request.get("healthAuthorityID", "")), tuple(warnings))


def check_key_count(keys: Sequence[object]) -> None:
    if len(keys) > MAX_KEYS_PER_PUBLISH:
        raise ApiError(Code.TOO_MANY_KEYS, f"at most {MAX_KEYS_PER_PUBLISH} keys per request")


# built once (building a statement per request costs more CPU than running it)
_certs = db.certificates
_CLAIM_CERTIFICATE = (sa.update(_certs).where(_certs.c.jti == sa.bindparam("cert_jti"), _certs.c.used_at.is_(None))
                      .values(used_at=sa.bindparam("now")))
_CERTIFICATE = sa.select(_certs).where(_certs.c.jti == sa.bindparam("cert_jti"))
_SAVE_RESPONSE = sa.update(_certs).where(_certs.c.jti == sa.bindparam("cert_jti")).values(
    response=sa.bindparam("answer"))


class Publisher:
    def __init__(self, engine: sa.Engine, clock: Clock, issuers: Sequence[certificate.TrustedIssuer], *,
                 rehearsal_embargo_s: float | None = None) -> None:
        """``issuers``: the verification servers whose certificates are trusted."""
        self.engine, self.clock, self.issuers = engine, clock, tuple(issuers)
        self.rehearsal_embargo_s = rehearsal_embargo_s

    def publish(self, request: Mapping[str, Any]) -> dict:
        """Store the keys of a v1 publish request; the response body. A certificate is
        used once; an identical retry (same certificate, hence same keys) gets the first
        answer again, also when it arrives while the first is being stored. A key that
        is stored already (another upload, even one at the same moment) is skipped."""
        now = self.clock.now()
        check_key_count(request["temporaryExposureKeys"])  # before any work on the certificate
        claims = certificate.read(request["verificationPayload"], self.issuers, now)
        valid = validate_publish(request, claims, now)
        with self.engine.begin() as c:
            if not claims.issued_here:  # an outside certificate: recorded at its first use
                db.insert_new(c, _certs, [{"jti": valid.jti}], "jti")
            # claim the certificate first: a second request with it waits here until the
            # first is stored (a row lock; SQLite's one writer), then answers as a retry
            claimed = c.execute(_CLAIM_CERTIFICATE, {"cert_jti": valid.jti, "now": now}).rowcount == 1
            if not claimed:
                cert = c.execute(_CERTIFICATE, {"cert_jti": valid.jti}).first()
                if cert is None:
                    raise ApiError(Code.CERTIFICATE_INVALID, "unknown certificate")
                if cert.response:
                    return json.loads(cert.response)
                raise ApiError(Code.CERTIFICATE_USED, "the certificate was already used")
            # in one order (by key): two uploads sharing keys cannot wait on each other
            rows = sorted((_row(k, valid.health_authority, now, self.rehearsal_embargo_s) for k in valid.keys),
                          key=lambda r: r["key_data"])
            inserted = db.insert_new(c, db.exposures, rows, "key_data")
            resp: dict[str, Any] = {"revisionToken": "", "insertedExposures": inserted, "error": "", "code": ""}
            if valid.warnings:  # as the key server's ``warnings`` (omitted when empty)
                resp["warnings"] = list(valid.warnings)
            c.execute(_SAVE_RESPONSE, {"cert_jti": valid.jti, "answer": json.dumps(resp)})
        log.info("publish: %d key(s) inserted", inserted)
        return resp


def _row(k: DiagnosisKey, health_authority: str, now: float, rehearsal_embargo_s: float | None) -> dict[str, Any]:
    return {"key_data": k.key_data, "rolling_start": k.rolling_start_interval_number,
            "rolling_period": k.rolling_period, "transmission_risk": k.transmission_risk_level,
            "report_type": int(k.report_type), "days_since_onset": k.days_since_onset_of_symptoms,
            "health_authority": health_authority, "received_at": now,
            "export_after": embargo_end(k, now, rehearsal_embargo_s)}
