"""The official clients' requests, built as they build them: line-by-line Python ports of
the request builders of google/exposure-notifications-android (the Exposure Notifications
reference app), each with the file it comes from. The interop tests send exactly these
bodies to our backend, so that a change of ours that the real app would trip over fails
here first.

Sources (google/exposure-notifications-android, app/src/main/java/com/google/android/apps/
exposurenotification/):

- ``network/Padding.java`` ``addPadding``: TARGET_PAYLOAD_SIZE_BYTES = 5000; a
  ``padding`` field of ``StringUtils.randomBase64Data(n)`` grown one byte at a time until
  the serialised JSON reaches 5,000 bytes;
- ``keyupload/DiagnosisAttestor.java``: ``verificationCodeRequestBody`` (``code``,
  ``accept`` = SUPPORTED_TEST_TYPES, padded), ``certRequestBody`` (``token``,
  ``ekeyhmac``, padded), ``hashedKeys`` (``%s.%d.%d.%d`` per key, sorted, joined with
  commas, HMAC-SHA256, base64), the ``X-API-Key`` header and ``X-Chaff: 1`` for cover
  traffic;
- ``keyupload/DiagnosisKeyUploader.java`` ``createPayload``: ``temporaryExposureKeys``,
  ``healthAuthorityID``, ``hmacKey``, ``verificationPayload``, ``traveler``, the onset as
  the interval of the symptom date's UTC midnight, ``revisionToken`` when there is one,
  padded; ``X-Chaff: 1`` only for cover traffic;
- ``keyupload/ApiConstants.java``: the JSON names (``VerifyV1``, ``UploadV1``) and
  ``CHAFF_HEADER``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from typing import Any

from agent.protocol import gaen
from agent.protocol.gaen import TemporaryExposureKey

#: Padding.TARGET_PAYLOAD_SIZE_BYTES
TARGET_PAYLOAD_SIZE_BYTES = 5000
#: DiagnosisAttestor.SUPPORTED_TEST_TYPES (TestResult.CONFIRMED/LIKELY/NEGATIVE/USER_REPORT.toApiType())
SUPPORTED_TEST_TYPES = ["confirmed", "likely", "negative", "user-report"]
#: ApiConstants.CHAFF_HEADER
CHAFF_HEADER = "X-Chaff"


def _serialised(payload: dict[str, Any]) -> bytes:
    """``JSONObject.toString().getBytes()``: compact JSON, '/' escaped as org.json does."""
    return json.dumps(payload, separators=(",", ":")).replace("/", "\\/").encode()


def add_padding(payload: dict[str, Any]) -> dict[str, Any]:
    """Padding.addPadding: grow ``padding`` until the body reaches the target size."""
    payload = dict(payload)
    size, padding_size = len(_serialised(payload)), 1
    while size < TARGET_PAYLOAD_SIZE_BYTES:
        payload["padding"] = base64.b64encode(secrets.token_bytes(padding_size)).decode()
        size = len(_serialised(payload))
        padding_size += 1
    return payload


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The bytes Volley sends for a JSONObject request."""
    return _serialised(payload)


def verify_body(code: str) -> dict[str, Any]:
    """DiagnosisAttestor.verificationCodeRequestBody."""
    return add_padding({"code": code, "accept": SUPPORTED_TEST_TYPES})


def hashed_keys(keys: Sequence[TemporaryExposureKey], hmac_key_b64: str) -> str:
    """DiagnosisAttestor.hashedKeys (Locale.ENGLISH ``%s.%d.%d.%d``, Collections.sort, Joiner.on(','))."""
    segments = sorted(f"{base64.b64encode(k.key_data).decode()}.{k.rolling_start_interval_number}."
                      f"{k.rolling_period}.{k.transmission_risk_level}" for k in keys)
    mac = hmac.new(base64.b64decode(hmac_key_b64), ",".join(segments).encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def certificate_body(token: str, keys: Sequence[TemporaryExposureKey], hmac_key_b64: str) -> dict[str, Any]:
    """DiagnosisAttestor.certRequestBody."""
    return add_padding({"token": token, "ekeyhmac": hashed_keys(keys, hmac_key_b64)})


def onset_interval(symptom_date: dt.date) -> int:
    """DiagnosisKey.instantToInterval(symptomOnset.atStartOfDay(ZoneOffset.UTC).toInstant())."""
    midnight = dt.datetime(symptom_date.year, symptom_date.month, symptom_date.day, tzinfo=dt.UTC)
    return gaen.en_interval_number(midnight.timestamp())


def publish_body(keys: Sequence[TemporaryExposureKey], certificate: str, hmac_key_b64: str, *,
                 health_authority_id: str = "com.example.app", symptom_onset: dt.date | None = None,
                 traveler: bool = False, revision_token: str | None = None) -> dict[str, Any]:
    """DiagnosisKeyUploader.createPayload."""
    payload: dict[str, Any] = {
        "temporaryExposureKeys": [{"key": base64.b64encode(k.key_data).decode(),
                                   "rollingStartNumber": k.rolling_start_interval_number,
                                   "rollingPeriod": k.rolling_period,
                                   "transmissionRisk": k.transmission_risk_level} for k in keys],
        "healthAuthorityID": health_authority_id, "hmacKey": hmac_key_b64,
        "verificationPayload": certificate, "traveler": traveler}
    if symptom_onset is not None:
        payload["symptomOnsetInterval"] = onset_interval(symptom_onset)
    if revision_token is not None:
        payload["revisionToken"] = revision_token
    return add_padding(payload)


def headers(api_key: str = "", cover_traffic: bool = False) -> dict[str, str]:
    """VerificationRequest.getHeaders / SubmitKeysRequest.getHeaders (and Volley's content type)."""
    h = {"Content-Type": "application/json; charset=utf-8"}
    if api_key:
        h["X-API-Key"] = api_key
    if cover_traffic:
        h[CHAFF_HEADER] = "1"
    return h


def new_hmac_key() -> str:
    """Upload.hmacKeyBase64: 32 random bytes (StringUtils.randomBase64Data)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()
