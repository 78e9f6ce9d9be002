"""Every error the backend sends to a client: one exception, :class:`ApiError`, and
every code it may carry, each bound to its HTTP status.

The wire body of an error has two styles, one per family of routes:

- the verification server's routes (``/api/issue``, ``/api/verify``, ``/api/certificate``)
  answer ``{"errorCode": <code>, "error": <one sentence>}``, the ``ErrorReturn`` of
  google/exposure-notifications-verification-server ``pkg/api/api.go``: the official
  Android app reads ``errorCode`` (``ApiConstants.VerifyV1.ERR_CODE``);
- every other route (the key server's ``/v1/publish``, whose ``PublishResponse`` carries
  ``code`` and ``error``; the ROBERT role; the page) answers ``{"code": ..., "error": ...}``.

Codes shared with the public verification server keep its spelling (``unparsable_request``,
``code_invalid``, ``code_expired``, ``token_invalid``, ``hmac_invalid``,
``unsupported_test_type``, ``invalid_test_type``). No other backend module spells a code
as a string.
"""

from __future__ import annotations

import enum
from http import HTTPStatus

from agent.errors import UserError


class Code(enum.StrEnum):
    # -- any request
    UNPARSABLE_REQUEST = "unparsable_request"
    INVALID_REQUEST = "invalid_request"
    BODY_TOO_LARGE = "body_too_large"
    #: the client stopped sending its body (BODY_TIMEOUT_S without a byte)
    BODY_TIMEOUT = "body_timeout"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    # -- verification: accounts, codes, tokens, certificates
    WEAK_PASSWORD = "weak_password"
    BAD_LOGIN = "bad_login"
    BAD_TEST_TYPE = "bad_test_type"
    #: the code's test type is not among those the client accepts (``accept``)
    UNSUPPORTED_TEST_TYPE = "unsupported_test_type"
    #: the client's ``accept`` names a test type this server does not know
    INVALID_TEST_TYPE = "invalid_test_type"
    #: a symptom onset in the future or too long ago (issuing a code)
    ONSET_INVALID = "onset_invalid"
    CODE_SPACE_EXHAUSTED = "code_space_exhausted"
    CODE_INVALID = "code_invalid"
    CODE_USED = "code_used"
    CODE_EXPIRED = "code_expired"
    HMAC_INVALID = "hmac_invalid"
    TOKEN_INVALID = "token_invalid"
    # -- publish
    TOO_MANY_KEYS = "too_many_keys"
    CERTIFICATE_INVALID = "certificate_invalid"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_USED = "certificate_used"
    HMAC_KEY_INVALID = "hmac_key_invalid"
    #: a key in the request is malformed: a TEK (publish) or a client's ECDH key (ROBERT)
    KEY_INVALID = "key_invalid"
    KEY_TOO_OLD = "key_too_old"
    KEY_IN_FUTURE = "key_in_future"
    KEY_DUPLICATE = "key_duplicate"
    HMAC_MISMATCH = "hmac_mismatch"
    # -- ROBERT
    ID_SPACE_EXHAUSTED = "id_space_exhausted"
    BAD_EPOCH = "bad_epoch"
    BAD_TIME = "bad_time"
    BAD_MAC = "bad_mac"
    REPLAYED = "replayed"
    TOO_FREQUENT = "too_frequent"
    TOO_MANY_CONTACTS = "too_many_contacts"
    TOO_MANY_HELLOS = "too_many_hellos"

    @property
    def status(self) -> HTTPStatus:
        return _STATUS.get(self, HTTPStatus.BAD_REQUEST)


# Codes answered with another status than 400.
_STATUS: dict[Code, HTTPStatus] = {
    Code.BODY_TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    Code.BODY_TIMEOUT: HTTPStatus.REQUEST_TIMEOUT,
    Code.RATE_LIMITED: HTTPStatus.TOO_MANY_REQUESTS,
    Code.TOO_FREQUENT: HTTPStatus.TOO_MANY_REQUESTS,
    Code.UNAUTHORIZED: HTTPStatus.UNAUTHORIZED,
    Code.UNSUPPORTED_TEST_TYPE: HTTPStatus.PRECONDITION_FAILED,  # as the verification server (docs/api.md)
    Code.BAD_LOGIN: HTTPStatus.UNAUTHORIZED,
    Code.BAD_MAC: HTTPStatus.UNAUTHORIZED,
    Code.CODE_SPACE_EXHAUSTED: HTTPStatus.SERVICE_UNAVAILABLE,
    Code.ID_SPACE_EXHAUSTED: HTTPStatus.SERVICE_UNAVAILABLE,
}


class ApiError(UserError):
    """A refusal for the client: a stable ``code``, its HTTP ``status`` and one sentence
    (a :class:`~agent.errors.UserError`: the backend's own CLI prints it as it is)."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.status = int(code.status)

    def body(self, path: str = "") -> dict[str, str]:
        """The wire body for a request to ``path`` (the style of its family of routes)."""
        key = "errorCode" if path in VERIFICATION_API_PATHS else "code"
        return {key: self.code.value, "error": self.message}


#: the routes of the verification server's API: their errors are ``{errorCode, error}``
VERIFICATION_API_PATHS = frozenset({"/api/issue", "/api/verify", "/api/certificate"})
