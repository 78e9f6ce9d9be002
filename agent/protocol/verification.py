"""The HMAC binding a verification certificate to the keys a user will publish
(Exposure Notifications verification server, "Design: tekmac"): HMAC-SHA256 keyed by
the client's random hmacKey over the keys sorted by their base64 form, each written
``key.rollingStartNumber.rollingPeriod.transmissionRisk``, joined with commas.
Pure; shared by the agent (client) and the backend (server)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

from .gaen import TemporaryExposureKey


def tek_cleartext(keys: Iterable[TemporaryExposureKey]) -> bytes:
    parts = sorted(
        (base64.b64encode(k.key_data).decode(), k.rolling_start_interval_number, k.rolling_period,
         k.transmission_risk_level)
        for k in keys
    )
    return ",".join(f"{b}.{rs}.{rp}.{tr}" for b, rs, rp, tr in parts).encode()


def tek_hmac(hmac_key: bytes, keys: Iterable[TemporaryExposureKey]) -> str:
    """base64 HMAC-SHA256 (the ``ekeyhmac`` / ``tekmac`` value)."""
    return base64.b64encode(hmac.new(hmac_key, tek_cleartext(keys), hashlib.sha256).digest()).decode()
