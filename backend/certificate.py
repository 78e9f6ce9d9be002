"""The verification certificate: what a verification server signs and the publish role
checks. A JWT signed ES256 with the claims of the public Exposure Notifications
verification server's certificate (google/exposure-notifications-server ``pkg/api/v1``
VerificationClaims: ``reportType``, ``symptomOnsetInterval``, ``testDateInterval``,
``trisk``, ``tekmac`` and the standard ``iss``, ``aud``, ``exp``, ``iat``, ``nbf``).

Two kinds of issuer are trusted: the built-in verification role (it also writes ``jti``
and ``healthAuthority``, and records every certificate it signs), and outside
verification servers configured by issuer, audience and public key
(google/exposure-notifications-verification-server ``pkg/controller/certapi``: no
``jti``). As the key server does (``internal/verification/phaverify.go``), the issuer
named in the token picks the key and the audience it must carry. Pure: keys and times
are arguments."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ConfigError
from agent.protocol.export import ReportType

from .errors import ApiError, Code

AUDIENCE = "ctagent-keyserver"
ISSUER = "ctagent-verification"
ALGORITHM = "ES256"
#: report types a certificate can carry (the verification server's test types,
#: ``pkg/api/v1`` ValidReportTypes) -> report type of the keys. "negative" publishes no
#: keys ("These keys are not saved in the system") and is refused.
TEST_TYPES = {"confirmed": ReportType.CONFIRMED_TEST, "likely": ReportType.CONFIRMED_CLINICAL_DIAGNOSIS,
              "user-report": ReportType.SELF_REPORT}
#: the test types a physician or lab of this backend may give a code
ISSUABLE_TEST_TYPES = ("confirmed", "likely")
#: the longest issuer name kept as a key's health authority (the column's width)
HEALTH_AUTHORITY_MAX = 64


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """A verification server whose certificates publish keys."""

    issuer: str
    audience: str
    public_key: ec.EllipticCurvePublicKey
    #: the built-in role: it records each certificate (``jti``) when it signs it
    builtin: bool = False


def outside_issuer(issuer: str, audience: str, public_key_pem: str | Path) -> TrustedIssuer:
    """An outside verification server from its settings: the PEM text or a file holding it."""
    text = public_key_pem if isinstance(public_key_pem, str) and "-----BEGIN" in public_key_pem \
        else Path(public_key_pem).expanduser().read_text()
    try:
        key = serialization.load_pem_public_key(text.encode())
    except ValueError as e:
        raise ConfigError(f"the public key of verification server {issuer!r} is not a PEM public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"the public key of verification server {issuer!r} must be ECDSA P-256 (ES256)")
    if not issuer or not audience:
        raise ConfigError("an outside verification server needs its issuer and audience")
    return TrustedIssuer(issuer, audience, key)


@dataclass(frozen=True, slots=True)
class CertificateClaims:
    """What the publish role needs from a verified certificate."""

    #: the certificate's identity for single use and retries: its ``jti``, or (a
    #: certificate without one) a hash of its issuer and HMAC, the keys it can publish
    jti: str
    tekmac: str
    test_type: str | None = None
    symptom_onset_interval: int | None = None
    health_authority: str | None = None
    #: signed by the built-in role, which recorded it; else recorded at its first publish
    issued_here: bool = True

    @property
    def report_type(self) -> ReportType:
        return TEST_TYPES.get(self.test_type or "", ReportType.CONFIRMED_TEST)


def sign(key: ec.EllipticCurvePrivateKey, *, key_version: str, jti: str, tekmac: str, test_type: str,
         symptom_onset_interval: int | None, health_authority: str, now: float, ttl_s: int) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": int(now), "nbf": int(now) - 1, "exp": int(now + ttl_s),
              "jti": jti, "reportType": test_type, "symptomOnsetInterval": symptom_onset_interval or 0,
              "trisk": [], "tekmac": tekmac, "healthAuthority": health_authority}
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": key_version})


def _invalid(why: str) -> ApiError:
    return ApiError(Code.CERTIFICATE_INVALID, f"the verification certificate is invalid: {why}")


def _unverified_issuer(token: str) -> object:
    """The ``iss`` the token names, read without checking anything: only to pick the key
    the one verified decoding below uses, which checks the issuer again (a second full
    decoding by PyJWT, which checks the base64 character by character in Python, was a
    tenth of a publish's CPU)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise _invalid("not a JWT (three dot-separated parts)")
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise _invalid("its payload is not base64url JSON") from None
    return payload.get("iss") if isinstance(payload, dict) else None


def read(token: str, issuers: Sequence[TrustedIssuer] | ec.EllipticCurvePublicKey, now: float) -> CertificateClaims:
    """Verify the signature with the key of the issuer the token names, its audience, and
    its times (``exp``, ``nbf``) against ``now``, not the wall clock: the demo runs the
    backend on simulated time. ``issuers`` may be the built-in role's key alone."""
    if isinstance(issuers, ec.EllipticCurvePublicKey):
        issuers = [TrustedIssuer(ISSUER, AUDIENCE, issuers, builtin=True)]
    iss = _unverified_issuer(token)
    trusted = next((i for i in issuers if i.issuer == iss), None)
    if trusted is None:
        raise _invalid(f"issuer {str(iss)[:64]!r} is not a trusted verification server")
    required = ["exp", "iat", "tekmac"] + (["jti"] if trusted.builtin else [])
    try:
        claims = jwt.decode(token, trusted.public_key, algorithms=[ALGORITHM], audience=trusted.audience,
                            issuer=trusted.issuer, options={"require": required, "verify_exp": False,
                                                            "verify_iat": False, "verify_nbf": False})
        if claims["exp"] < now:
            raise jwt.ExpiredSignatureError
    except jwt.ExpiredSignatureError:
        raise ApiError(Code.CERTIFICATE_EXPIRED, "the verification certificate has expired") from None
    except jwt.PyJWTError as e:
        raise _invalid(str(e)) from None
    nbf = claims.get("nbf")
    if isinstance(nbf, (int, float)) and nbf > now + 60:  # a minute of clock skew between the servers
        raise _invalid("it is not valid yet (nbf)")
    test_type, onset, ha = claims.get("reportType"), claims.get("symptomOnsetInterval"), claims.get("healthAuthority")
    if test_type is not None and str(test_type) not in TEST_TYPES:
        raise _invalid(f"report type {str(test_type)[:32]!r} publishes no keys")
    if not isinstance(onset, int) or isinstance(onset, bool) or onset < 0:
        onset = None
    tekmac = str(claims["tekmac"])
    if trusted.builtin:
        jti, ha = str(claims["jti"]), None if ha is None else str(ha)
    else:
        # the key server keeps no record of certificates: a certificate publishes exactly
        # the keys its HMAC binds, which are skipped when sent again. Here it is used once
        # too, identified by what it binds; an identical retry gets the first answer.
        jti = hashlib.sha256(f"{trusted.issuer}\0{tekmac}".encode()).hexdigest()
        ha = trusted.issuer[:HEALTH_AUTHORITY_MAX]
    return CertificateClaims(jti=jti, tekmac=tekmac, test_type=None if test_type is None else str(test_type),
                             symptom_onset_interval=onset or None, health_authority=ha,
                             issued_here=trusted.builtin)
