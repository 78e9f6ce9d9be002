"""Requests to the backend that tests build again and again: keys, the code -> token ->
certificate steps done in-process, the v1 publish body. Shared by the backend tests."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from agent.protocol import gaen
from agent.protocol.gaen import TemporaryExposureKey
from agent.protocol.verification import tek_hmac

HMAC_KEY = b"k" * 32


def random_keys(now: float, n: int = 14) -> list[TemporaryExposureKey]:
    """``n`` random keys of the days before ``now`` (one a day, no embargo)."""
    today = gaen.rolling_start_for_day(now)
    return [TemporaryExposureKey(secrets.token_bytes(16), today - gaen.TEK_ROLLING_PERIOD * (i + 1))
            for i in range(n)]


def publish_body(keys: list[TemporaryExposureKey], cert: str, hmac_key: bytes = HMAC_KEY, **extra: Any) -> dict:
    return {"temporaryExposureKeys": [{"key": base64.b64encode(k.key_data).decode(),
                                       "rollingStartNumber": k.rolling_start_interval_number,
                                       "rollingPeriod": k.rolling_period, "transmissionRisk": k.transmission_risk_level}
                                      for k in keys],
            "healthAuthorityID": "x", "verificationPayload": cert, "hmacKey": base64.b64encode(hmac_key).decode(),
            **extra}


def certified(backend: Any, keys: list[TemporaryExposureKey], *, onset: int | None = None,
              hmac_key: bytes = HMAC_KEY) -> str:
    """code -> token -> certificate for ``keys``, in-process."""
    v = backend.verification
    code = v.issue_code("lab", symptom_onset_interval=onset)["code"]
    token = v.verify_code(code, secrets.token_hex(4))["token"]  # a client of its own: no rate limit
    return str(v.certificate(token, tek_hmac(hmac_key, keys))["certificate"])


def prepared_publish(backend: Any, now: float, n_keys: int = 14, **extra: Any) -> tuple[dict, list[bytes]]:
    """A valid publish body of ``n_keys`` random keys, and the keys' bytes."""
    keys = random_keys(now, n_keys)
    return publish_body(keys, certified(backend, keys), **extra), [k.key_data for k in keys]
