"""The verification role: physicians' accounts and sessions, lab API keys, verification
codes (issue, verify), tokens and certificates.

The flow is the public Exposure Notifications verification server's
(google/exposure-notifications-verification-server, ``docs/api.md``): a health
authority issues a short code (and a long one) -> ``/api/verify`` trades the code for a
token, once -> ``/api/certificate`` trades the token and the HMAC of the keys to upload
for a signed certificate, once. Secrets (codes, tokens, session cookies, API keys) are
stored only as HMACs under a pepper kept in the data folder.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock import Clock
from agent.errors import UserError
from agent.protocol import gaen

from . import certificate, db
from .config import BackendConfig
from .errors import ApiError, Code
from .keyfiles import load_or_create_ec_key, load_or_create_secret
from .publish import MAX_ONSET_REPORT_DAYS, onset_plausible
from .ratelimit import LoginBackoff, RateLimiter

log = logging.getLogger("ctagent.backend")

SHORT_CODE_TTL = 15 * 60
LONG_CODE_TTL = 24 * 3600
TOKEN_TTL = 10 * 60
CERT_TTL = 15 * 60
SESSION_TTL = 8 * 3600
MIN_PASSWORD_LEN = 8
SHORT_CODE_DIGITS = 8
LONG_CODE_LEN = 16
#: no 0/o, 1/i/l: the long code is read aloud and typed
_LONG_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
_DRAWS = 5  # attempts at a code that collides with no live one
#: how long a server process trusts an API key it found (a removal elsewhere takes this long)
API_KEY_CACHE_S = 5.0
_API_KEY_CACHE_MAX = 1024


#: The ``accept`` values of the verification server's ``/api/verify``, in its hierarchy: a
#: client accepting one accepts those before it (``pkg/api/api.go``, VerifyCodeRequest);
#: ``user-report`` stands apart and may be added to any of them.
ACCEPT_HIERARCHY = ("confirmed", "likely", "negative")
USER_REPORT = "user-report"


def accepted_test_types(accept: list[str] | None) -> frozenset[str] | None:
    """The test types a client accepts, from its ``accept`` list; None (all, including
    types added later) when it is omitted or empty, as the verification server reads it."""
    if not accept:
        return None
    out: set[str] = set()
    for name in accept:
        if name in ACCEPT_HIERARCHY:
            out.update(ACCEPT_HIERARCHY[: ACCEPT_HIERARCHY.index(name) + 1])
        elif name == USER_REPORT:
            out.add(name)
        else:
            raise ApiError(Code.INVALID_TEST_TYPE, f"unknown test type in accept: {name[:32]!r}")
    return frozenset(out)


def date_interval(date_text: str) -> int:
    """The ENIntervalNumber of the start (UTC) of a ``YYYY-MM-DD`` day; ValueError if it is not one."""
    if len(date_text) != 10:
        raise ValueError("not YYYY-MM-DD")
    d = dt.date.fromisoformat(date_text)
    return gaen.en_interval_number(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp())


def interval_date(interval: int) -> str:
    """The ``YYYY-MM-DD`` UTC day an ENIntervalNumber falls in (``symptomDate`` of /api/verify)."""
    return dt.datetime.fromtimestamp(interval * gaen.INTERVAL_SECONDS, dt.UTC).date().isoformat()


def http_date(unix: float) -> str:
    """RFC 1123 in UTC, as the verification server's ``expiresAt`` (Go's ``time.RFC1123``)."""
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%a, %d %b %Y %H:%M:%S UTC")


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt${salt.hex()}${dk.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, salt, _ = stored.split("$")
    except ValueError:
        return False
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt)), stored)


@functools.cache
def _no_account_hash() -> str:
    """A password hash of no account: checked against when the user name is unknown, so
    that a wrong name costs the same time as a wrong password."""
    return hash_password(secrets.token_urlsafe(16))


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LEN:
        raise ApiError(Code.WEAK_PASSWORD, f"passwords need at least {MIN_PASSWORD_LEN} characters")


def _check_name(name: str, what: str) -> None:
    if not (1 <= len(name) <= 64) or not name.isprintable() or name.strip() != name:
        raise UserError(f"a {what} has 1 to 64 printable characters without spaces around them")


#: The code formats of the TousAntiCovid app (what it lets a user type or scan, and what
#: the StopCovid submission code server generates: ``/generate/short`` a 6-character
#: alphanumeric code, ``/generate/long`` a UUID), issued with ``code_format="robert"``.
ROBERT_SHORT_CODE_LEN = 6
_ROBERT_SHORT_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud and typed
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
CODE_FORMATS = ("digits", "robert")


def _normal_code(code: object) -> str | None:
    """The code as stored (its case folded where case does not count); None when it has
    none of the accepted shapes: 8 digits or 16 characters (ours), 6 alphanumeric
    characters or a UUID (TousAntiCovid's)."""
    if not isinstance(code, str):
        return None
    if len(code) == SHORT_CODE_DIGITS and code.isdigit():
        return code
    if len(code) == LONG_CODE_LEN or _UUID.fullmatch(code):
        return code.lower()
    if len(code) == ROBERT_SHORT_CODE_LEN and code.isascii() and code.isalnum():
        return code.upper()
    return None


# The statements of the API's hot routes, built once: building one per request (SQLAlchemy
# coerces every operand and derives a cache key for it) was a third of a request's CPU.
# Each route is one statement where it can be (no BEGIN and COMMIT round trips on
# PostgreSQL: on a server shared with its database, a round trip costs the database
# about as much CPU as the statement).
_c, _t = db.codes.c, db.tokens.c
_API_KEY_OWNER = sa.select(db.api_keys.c.name).where(db.api_keys.c.key_hash == sa.bindparam("key_hash"))
#: a code whose short or long hash collides with a stored one is not inserted (no row
#: back): the caller draws again
_INSERT_CODE = {name: dialect.insert(db.codes).on_conflict_do_nothing().returning(_c.id)
                for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))}
_CLAIMABLE = sa.and_(
    sa.or_(sa.and_(_c.short_hash == sa.bindparam("h"), _c.short_expires_at > sa.bindparam("now")),
           sa.and_(_c.long_hash == sa.bindparam("h"), _c.long_expires_at > sa.bindparam("now"))),
    _c.claimed_at.is_(None))
_CODE_BY_HASH = sa.select(db.codes).where(sa.or_(_c.short_hash == sa.bindparam("h"), _c.long_hash == sa.bindparam("h")))
_INSERT_TOKEN = sa.insert(db.tokens)
_USE_TOKEN = (sa.update(db.tokens)
              .where(_t.token_hash == sa.bindparam("h"), _t.expires_at > sa.bindparam("now"), _t.used_at.is_(None))
              .values(used_at=sa.bindparam("now"))
              .returning(_t.code_id))
_CODE_BY_ID = sa.select(db.codes).where(_c.id == sa.bindparam("code_id"))
_INSERT_CERTIFICATE = sa.insert(db.certificates)


@functools.cache
def _claim_code(*, of_types: bool, with_token: bool) -> sa.Executable:
    """Claim a live, unused code (``of_types``: of one of the ``types``), returning its
    row; ``with_token`` (PostgreSQL): and insert the token for it in the same statement
    (data-modifying CTEs), whose rows are those of the code claimed."""
    claim = (sa.update(db.codes)
             .where(_CLAIMABLE, *([_c.test_type.in_(sa.bindparam("types", expanding=True))] if of_types else []))
             .values(claimed_at=sa.bindparam("now"))
             .returning(*db.codes.c))
    if not with_token:
        return claim
    claimed = claim.cte("claimed")
    token = sa.insert(db.tokens).from_select(
        ["token_hash", "code_id", "expires_at"],
        sa.select(sa.bindparam("token_hash", type_=_t.token_hash.type), claimed.c.id,
                  sa.bindparam("token_expires_at", type_=_t.expires_at.type))).cte("token")
    return sa.select(claimed).add_cte(token)


#: PostgreSQL: use the token and record the certificate in one statement; the code's row
_USED_TOKEN = _USE_TOKEN.cte("used")
_USE_TOKEN_FOR_CERTIFICATE = (
    sa.select(db.codes).join(_USED_TOKEN, _c.id == _USED_TOKEN.c.code_id)
    .add_cte(sa.insert(db.certificates).from_select(
        ["jti"], sa.select(sa.bindparam("jti", type_=db.certificates.c.jti.type)).select_from(_USED_TOKEN))
        .cte("certificate")))


def _live(row: sa.Row[Any], h: str, now: float) -> bool:
    """Whether the code of ``row``, typed in as the form hashed ``h``, is still live."""
    return (row.short_hash == h and row.short_expires_at > now) or (row.long_hash == h and row.long_expires_at > now)


class VerificationService:
    def __init__(self, config: BackendConfig, engine: sa.Engine, clock: Clock, limiter: RateLimiter) -> None:
        self.config, self.engine, self.clock, self.limiter = config, engine, clock, limiter
        #: connections whose every statement is its own transaction (the one-statement routes)
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._postgresql = engine.dialect.name == "postgresql"
        self._cert_key = load_or_create_ec_key(config.data_dir / "certificate-signing-key.pem")
        self._pepper = load_or_create_secret(config.data_dir / "code-pepper")
        self.login_backoff = LoginBackoff(clock)
        #: API key HMAC -> (its name, when it was read)
        self._api_key_cache: dict[str, tuple[str, float]] = {}

    @property
    def certificate_public_key(self) -> ec.EllipticCurvePublicKey:
        """What the publish role checks certificates with."""
        return self._cert_key.public_key()

    def _h(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    # -- accounts -------------------------------------------------------------------
    def add_user(self, username: str, password: str, health_authority: str = "default") -> None:
        _check_name(username, "user name")
        _check_password(password)
        try:
            with self.engine.begin() as c:
                c.execute(sa.insert(db.users).values(username=username, password_hash=hash_password(password),
                                                     health_authority=health_authority))
        except sa.exc.IntegrityError:
            raise UserError(f"a user named {username!r} exists already (`ctagent backend user passwd {username}` "
                            "changes the password)") from None

    def users(self) -> list[tuple[str, str]]:
        """(user name, health authority) of every physician account, by name."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(db.users.c.username, db.users.c.health_authority)
                             .order_by(db.users.c.username)).fetchall()
        return [(r.username, r.health_authority) for r in rows]

    def set_password(self, username: str, password: str) -> None:
        """A new password; the account's open sessions end."""
        _check_password(password)
        with self.engine.begin() as c:
            uid = self._user_id(c, username)
            c.execute(sa.update(db.users).where(db.users.c.id == uid).values(password_hash=hash_password(password)))
            c.execute(sa.delete(db.sessions).where(db.sessions.c.user_id == uid))

    def remove_user(self, username: str) -> None:
        """The account and its sessions; codes it issued stay valid until they expire."""
        with self.engine.begin() as c:
            uid = self._user_id(c, username)
            c.execute(sa.delete(db.sessions).where(db.sessions.c.user_id == uid))
            c.execute(sa.delete(db.users).where(db.users.c.id == uid))

    @staticmethod
    def _user_id(c: sa.Connection, username: str) -> int:
        uid = c.execute(sa.select(db.users.c.id).where(db.users.c.username == username)).scalar()
        if uid is None:
            raise UserError(f"there is no user named {username!r} (`ctagent backend user list` shows them)")
        return int(uid)

    def add_api_key(self, name: str, health_authority: str = "default") -> str:
        """A new lab API key (shown once; only its HMAC is stored). Names are unique, so
        that a key can be revoked by its name."""
        _check_name(name, "API key name")
        key = secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            if c.execute(sa.select(db.api_keys.c.name).where(db.api_keys.c.name == name)).first():
                raise UserError(f"an API key named {name!r} exists already (remove it first to replace it)")
            c.execute(sa.insert(db.api_keys).values(key_hash=self._h(key), name=name,
                                                    health_authority=health_authority))
        return key

    def api_keys(self) -> list[tuple[str, str]]:
        """(name, health authority) of every API key, by name (the keys are not kept)."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(db.api_keys.c.name, db.api_keys.c.health_authority)
                             .order_by(db.api_keys.c.name)).fetchall()
        return [(r.name, r.health_authority) for r in rows]

    def remove_api_key(self, name: str) -> None:
        with self.engine.begin() as c:
            if c.execute(sa.delete(db.api_keys).where(db.api_keys.c.name == name)).rowcount == 0:
                raise UserError(f"there is no API key named {name!r} (`ctagent backend api-key list` shows them)")
        self._api_key_cache.clear()

    def api_key_owner(self, key: str | None) -> str:
        """The name of a lab's API key. A key found is remembered for
        :data:`API_KEY_CACHE_S` seconds (one database round trip less per code issued; the
        verification server caches them too, ``pkg/controller/middleware/apikey.go``): a
        key removed by another process (``backend api-key remove``) stops working within
        that time. A key not found is looked up every time."""
        if key:
            h, now = self._h(key), self.clock.now()
            cached = self._api_key_cache.get(h)
            if cached is not None and 0 <= now - cached[1] < API_KEY_CACHE_S:
                return cached[0]
            with self._autocommit.connect() as c:
                row = c.execute(_API_KEY_OWNER, {"key_hash": h}).first()
            if row:
                if len(self._api_key_cache) >= _API_KEY_CACHE_MAX:
                    self._api_key_cache.clear()
                self._api_key_cache[h] = (row.name, now)
                return row.name
        raise ApiError(Code.UNAUTHORIZED, "a valid X-API-Key header is required")

    def login(self, username: str, password: str) -> str:
        """A new session token for the physicians' page. Each account name (known or
        not) backs off after failures; an unknown name costs one password hash too."""
        self.login_backoff.check(username)
        with self.engine.connect() as c:
            row = c.execute(sa.select(db.users).where(db.users.c.username == username)).first()
        password_ok = check_password(password, row.password_hash if row is not None else _no_account_hash())
        if row is None or not password_ok:
            self.login_backoff.failed(username)
            raise ApiError(Code.BAD_LOGIN, "wrong user name or password")
        self.login_backoff.succeeded(username)
        token = secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            c.execute(sa.insert(db.sessions).values(token_hash=self._h(token), user_id=row.id,
                                                    expires_at=self.clock.now() + SESSION_TTL))
        return token

    def session_user(self, token: str | None) -> str | None:
        if not token:
            return None
        with self.engine.connect() as c:
            row = c.execute(sa.select(db.users.c.username).select_from(db.sessions.join(db.users))
                            .where(db.sessions.c.token_hash == self._h(token),
                                   db.sessions.c.expires_at > self.clock.now())).first()
        return row.username if row else None

    def logout(self, token: str) -> None:
        """End a session: its row is deleted, the cookie is worth nothing from now on."""
        with self.engine.begin() as c:
            c.execute(sa.delete(db.sessions).where(db.sessions.c.token_hash == self._h(token)))

    def csrf_token(self, session: str) -> str:
        """The page's form token, bound to the session cookie."""
        return hmac.new(self._pepper, b"csrf|" + session.encode(), hashlib.sha256).hexdigest()

    def login_form_token(self, nonce: str) -> str:
        """The sign-in form's token, bound to its pre-session cookie (login CSRF)."""
        return hmac.new(self._pepper, b"login-csrf|" + nonce.encode(), hashlib.sha256).hexdigest()

    # -- codes ----------------------------------------------------------------------
    def issue_code(self, issued_by: str, *, test_type: str = "confirmed",
                   symptom_onset_interval: int | None = None, code_format: str = "digits") -> dict:
        """A new code: ``digits`` (8 digits, and a 16-character long code) or ``robert``
        (6 characters, and a UUID: the formats the TousAntiCovid app accepts)."""
        if code_format not in CODE_FORMATS:
            raise UserError(f"code format must be one of {', '.join(CODE_FORMATS)}")
        if test_type not in certificate.ISSUABLE_TEST_TYPES:
            raise ApiError(Code.BAD_TEST_TYPE,
                           f"test type must be one of {', '.join(certificate.ISSUABLE_TEST_TYPES)}")
        now = self.clock.now()
        symptom_onset_interval = symptom_onset_interval or None  # 0: none, as in the API
        if symptom_onset_interval is not None and not onset_plausible(symptom_onset_interval, now):
            raise ApiError(Code.ONSET_INVALID, f"the symptom onset must be within the last {MAX_ONSET_REPORT_DAYS} "
                                               "days and not in the future")
        self.limiter.check("issue", issued_by, self.config.rate_issue_per_min)
        insert = _INSERT_CODE[self.engine.dialect.name]
        with self._autocommit.connect() as c:
            for _ in range(_DRAWS):
                if code_format == "robert":
                    short = "".join(secrets.choice(_ROBERT_SHORT_ALPHABET) for _ in range(ROBERT_SHORT_CODE_LEN))
                    long = str(uuid.uuid4())
                else:
                    short = f"{secrets.randbelow(10**SHORT_CODE_DIGITS):0{SHORT_CODE_DIGITS}d}"
                    long = "".join(secrets.choice(_LONG_ALPHABET) for _ in range(LONG_CODE_LEN))
                if c.execute(insert, {
                        "short_hash": self._h(short), "long_hash": self._h(long),
                        "short_expires_at": now + SHORT_CODE_TTL, "long_expires_at": now + LONG_CODE_TTL,
                        "test_type": test_type, "symptom_onset_interval": symptom_onset_interval,
                        "issued_by": issued_by, "issued_at": now}).all():
                    break  # else it collides with a stored code: draw again
            else:
                raise ApiError(Code.CODE_SPACE_EXHAUSTED, "could not draw a unique code")
        log.info("code issued by=%s type=%s", issued_by, test_type)
        # the verification server's IssueCodeResponse (expiresAt as RFC 1123, the
        # timestamps in Unix seconds), and the long code and test type beside it
        return {"code": short, "expiresAt": http_date(now + SHORT_CODE_TTL),
                "expiresAtTimestamp": int(now + SHORT_CODE_TTL), "longCode": long,
                "longExpiresAt": http_date(now + LONG_CODE_TTL), "longExpiresAtTimestamp": int(now + LONG_CODE_TTL),
                "testType": test_type}

    def _code_hash(self, code: object) -> str:
        normal = _normal_code(code)
        if normal is None:
            raise ApiError(Code.CODE_INVALID, "the code is not a valid verification code")
        return self._h(normal)

    @staticmethod
    def _refusal(row: sa.Row[Any] | None) -> ApiError:
        """Why a code that could not be claimed (its row, or None) cannot be used."""
        if row is None:
            return ApiError(Code.CODE_INVALID, "the code is not a valid verification code")
        if row.claimed_at is not None:
            return ApiError(Code.CODE_USED, "the code was already used")
        return ApiError(Code.CODE_EXPIRED, "the code has expired")

    def check_code(self, code: object, client: str) -> None:
        """Refuse, as :meth:`claim_code` would, a code that is unknown, used or expired,
        without using it: the cheap check before work the code pays for. Counts toward the
        client's verification rate limit."""
        self.limiter.check("verify", client, self.config.rate_verify_per_min)
        now, h = self.clock.now(), self._code_hash(code)
        with self.engine.connect() as c:
            row = c.execute(_CODE_BY_HASH, {"h": h}).first()
        if row is None or row.claimed_at is not None or not _live(row, h, now):
            raise self._refusal(row)

    def claim_code(self, conn: sa.Connection, code: object) -> sa.Row[Any]:
        """Use ``code`` once, in the caller's transaction ``conn``: what the code pays for
        is stored in that transaction, and a rollback leaves the code unused. Race-free:
        only one transaction moves ``claimed_at`` from NULL. The code's row."""
        now, h = self.clock.now(), self._code_hash(code)
        claimed = conn.execute(_claim_code(of_types=False, with_token=False), {"h": h, "now": now}).all()
        if len(claimed) == 1:
            return claimed[0]
        raise self._refusal(conn.execute(_CODE_BY_HASH, {"h": h}).first())

    def verify_code(self, code: str, client: str, accept: list[str] | None = None) -> dict:
        """Trade a live, unused code for a token; the code can never be used again. The
        answer is the verification server's VerifyCodeResponse: ``testtype``, ``token`` and,
        when the code carries an onset, ``symptomDate``. A code of a test type the client
        does not ``accept`` is refused (``unsupported_test_type``, 412) and stays unused."""
        accepted = accepted_test_types(accept)
        self.limiter.check("verify", client, self.config.rate_verify_per_min)
        now, h = self.clock.now(), self._code_hash(code)
        token = secrets.token_urlsafe(32)
        params: dict[str, Any] = {"h": h, "now": now, "token_hash": self._h(token), "token_expires_at": now + TOKEN_TTL}
        if accepted is not None:
            params["types"] = sorted(accepted)
        if self._postgresql:
            with self._autocommit.connect() as c:
                claimed = c.execute(_claim_code(of_types=accepted is not None, with_token=True), params).all()
                found = None if claimed else c.execute(_CODE_BY_HASH, {"h": h}).first()
        else:
            with self.engine.begin() as c:
                claimed = c.execute(_claim_code(of_types=accepted is not None, with_token=False), params).all()
                if claimed:
                    c.execute(_INSERT_TOKEN, {"token_hash": params["token_hash"], "code_id": claimed[0].id,
                                              "expires_at": params["token_expires_at"]})
                found = None if claimed else c.execute(_CODE_BY_HASH, {"h": h}).first()
        if not claimed:
            if found is not None and found.claimed_at is None and _live(found, h, now):
                # live and unused, so of a type the client does not accept: it stays unused
                raise ApiError(Code.UNSUPPORTED_TEST_TYPE, f"the code is for a {found.test_type!r} test, which "
                                                           "this app does not accept")
            e = self._refusal(found)
            if e.code is Code.CODE_USED:  # the verification server: "code invalid or used"
                raise ApiError(Code.CODE_INVALID, e.message)
            raise e
        row = claimed[0]
        answer = {"testtype": row.test_type, "token": token}
        if row.symptom_onset_interval:
            answer["symptomDate"] = interval_date(row.symptom_onset_interval)
        return answer

    def certificate(self, token: str, ekeyhmac: str) -> dict:
        """Trade a token, once, for a certificate binding the HMAC of the keys to upload."""
        try:
            if len(base64.b64decode(ekeyhmac, validate=True)) != hashlib.sha256().digest_size:
                raise ValueError
        except (ValueError, TypeError, binascii.Error):
            raise ApiError(Code.HMAC_INVALID, "ekeyhmac must be a base64 HMAC-SHA256") from None
        now, jti = self.clock.now(), uuid.uuid4().hex
        params = {"h": self._h(str(token)), "now": now, "jti": jti}
        if self._postgresql:
            with self._autocommit.connect() as c:
                row = c.execute(_USE_TOKEN_FOR_CERTIFICATE, params).first()
        else:
            with self.engine.begin() as c:
                used = c.execute(_USE_TOKEN, params).all()
                row = c.execute(_CODE_BY_ID, {"code_id": used[0].code_id}).first() if len(used) == 1 else None
                if row is not None:
                    c.execute(_INSERT_CERTIFICATE, {"jti": jti})
        if row is None:
            raise ApiError(Code.TOKEN_INVALID, "the verification token is invalid, expired or used")
        cert = certificate.sign(self._cert_key, key_version=self.config.key_version, jti=jti, tekmac=ekeyhmac,
                                test_type=row.test_type, symptom_onset_interval=row.symptom_onset_interval,
                                health_authority=row.issued_by, now=now, ttl_s=CERT_TTL)
        return {"certificate": cert}
