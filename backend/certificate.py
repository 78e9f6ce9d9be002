"""The verification certificate: what the verification role signs and the publish role
checks. A JWT signed ES256 with the claims of the public Exposure Notifications
verification server's certificate (google/exposure-notifications-server,
``docs/design/verification_protocol.md``: ``reportType``, ``symptomOnsetInterval``,
``trisk``, ``tekmac``). Pure: keys and times are arguments."""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.export import ReportType

from .errors import ApiError, Code

AUDIENCE = "ctagent-keyserver"
ISSUER = "ctagent-verification"
ALGORITHM = "ES256"
#: test types a code can carry (the verification server's names) -> report type of the keys
TEST_TYPES = {"confirmed": ReportType.CONFIRMED_TEST, "likely": ReportType.CONFIRMED_CLINICAL_DIAGNOSIS}


@dataclass(frozen=True, slots=True)
class CertificateClaims:
    """What the publish role needs from a verified certificate."""

    jti: str
    tekmac: str
    test_type: str | None = None
    symptom_onset_interval: int | None = None
    health_authority: str | None = None

    @property
    def report_type(self) -> ReportType:
        return TEST_TYPES.get(self.test_type or "", ReportType.CONFIRMED_TEST)


def sign(key: ec.EllipticCurvePrivateKey, *, key_version: str, jti: str, tekmac: str, test_type: str,
         symptom_onset_interval: int | None, health_authority: str, now: float, ttl_s: int) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": int(now), "exp": int(now + ttl_s), "jti": jti,
              "reportType": test_type, "symptomOnsetInterval": symptom_onset_interval or 0,
              "trisk": [], "tekmac": tekmac, "healthAuthority": health_authority}
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": key_version})


def read(token: str, key: ec.EllipticCurvePublicKey, now: float) -> CertificateClaims:
    """Verify the signature, audience, issuer and expiry (against ``now``, not the wall
    clock: the demo runs the backend on simulated time)."""
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER,
                            options={"require": ["exp", "iat", "jti", "tekmac"], "verify_exp": False,
                                     "verify_iat": False})
        if claims["exp"] < now:
            raise jwt.ExpiredSignatureError
    except jwt.ExpiredSignatureError:
        raise ApiError(Code.CERTIFICATE_EXPIRED, "the verification certificate has expired") from None
    except jwt.PyJWTError as e:
        raise ApiError(Code.CERTIFICATE_INVALID, f"the verification certificate is invalid: {e}") from None
    test_type, onset, ha = claims.get("reportType"), claims.get("symptomOnsetInterval"), claims.get("healthAuthority")
    return CertificateClaims(jti=str(claims["jti"]), tekmac=str(claims["tekmac"]),
                             test_type=None if test_type is None else str(test_type),
                             symptom_onset_interval=int(onset) if onset else None,
                             health_authority=None if ha is None else str(ha))
