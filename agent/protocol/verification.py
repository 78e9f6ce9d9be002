"""The HMAC binding a verification certificate to the keys a user will publish
(Exposure Notifications verification server, "Design: tekmac"): HMAC-SHA256 keyed by
the client's random hmacKey over the keys sorted by their base64 form, each written
``key.rollingStartNumber.rollingPeriod.transmissionRisk``, joined with commas. When every
transmission risk is 0 the key server also accepts each key written without it,
``key.rollingStartNumber.rollingPeriod`` (google/exposure-notifications-server
``pkg/verification/utils.go`` CalculateAllAllowedExposureKeyHMAC).
Pure; shared by the agent (client) and the backend (server)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence

from .gaen import TemporaryExposureKey


def tek_cleartext(keys: Iterable[TemporaryExposureKey], *, with_risk: bool = True) -> bytes:
    parts = sorted(
        (base64.b64encode(k.key_data).decode(), k.rolling_start_interval_number, k.rolling_period,
         k.transmission_risk_level)
        for k in keys
    )
    if with_risk:
        return ",".join(f"{b}.{rs}.{rp}.{tr}" for b, rs, rp, tr in parts).encode()
    return ",".join(f"{b}.{rs}.{rp}" for b, rs, rp, _ in parts).encode()


def tek_hmac(hmac_key: bytes, keys: Iterable[TemporaryExposureKey], *, with_risk: bool = True) -> str:
    """base64 HMAC-SHA256 (the ``ekeyhmac`` / ``tekmac`` value); ``with_risk=False``: the
    3-field form."""
    cleartext = tek_cleartext(keys, with_risk=with_risk)
    return base64.b64encode(hmac.new(hmac_key, cleartext, hashlib.sha256).digest()).decode()


def accepted_tek_hmacs(hmac_key: bytes, keys: Sequence[TemporaryExposureKey]) -> tuple[str, ...]:
    """Every HMAC a certificate for ``keys`` may carry: the 4-field form, and the 3-field
    form when all transmission risks are 0."""
    forms = [tek_hmac(hmac_key, keys)]
    if all(k.transmission_risk_level == 0 for k in keys):
        forms.append(tek_hmac(hmac_key, keys, with_risk=False))
    return tuple(forms)
