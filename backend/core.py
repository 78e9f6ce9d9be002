"""Backend logic, independent of HTTP: codes, verification, certificates, publish,
exports. Every method takes the time from the injected clock (the demo runs the
backend on a virtual clock)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import export, gaen
from agent.protocol.verification import PublishKey, tek_hmac
from agent.store.keys import write_private_file

from . import db

log = logging.getLogger("ctagent.backend")

SHORT_CODE_TTL = 15 * 60
LONG_CODE_TTL = 24 * 3600
TOKEN_TTL = 10 * 60
CERT_TTL = 15 * 60
MAX_KEYS_PER_PUBLISH = 30
MAX_KEY_AGE_DAYS = 15
JWT_AUDIENCE = "ctagent-keyserver"
JWT_ISSUER = "ctagent-verification"
_LONG_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
TEST_TYPES = {"confirmed": export.ReportType.CONFIRMED_TEST, "likely": export.ReportType.CONFIRMED_CLINICAL_DIAGNOSIS}


class ApiError(Exception):
    """An error for the client: HTTP status, a stable code and one sentence."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class BackendConfig:
    data_dir: Path
    database_url: str | None = None
    region: str = "XX"
    export_period_s: int = 3600
    export_max_keys: int = 500_000
    export_min_keys: int = 100  # padded with random keys up to this
    export_retention_days: int = 14
    rate_issue_per_min: int = 60
    rate_verify_per_min: int = 20
    key_id: str = "ctagent"
    key_version: str = "v1"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"


class RateLimiter:
    """Sliding one-minute window per (bucket, client), in memory."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._hits: dict[tuple[str, str], deque] = defaultdict(deque)

    def check(self, bucket: str, client: str, per_min: int) -> None:
        now = self.clock()
        q = self._hits[(bucket, client)]
        while q and q[0] <= now - 60:
            q.popleft()
        if len(q) >= per_min:
            raise ApiError(429, "rate_limited", f"too many {bucket} requests; try again in a minute")
        q.append(now)


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_file(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return key


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


class Backend:
    def __init__(self, config: BackendConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.exports_dir.mkdir(parents=True, exist_ok=True)
        url = config.database_url or f"sqlite:///{config.data_dir / 'backend.db'}"
        self.engine = db.make_engine(url)
        self.signing_key = _load_or_create_key(config.data_dir / "export-signing-key.pem")
        self.cert_key = _load_or_create_key(config.data_dir / "certificate-signing-key.pem")
        pepper_path = config.data_dir / "code-pepper"
        if not pepper_path.exists():
            write_private_file(pepper_path, secrets.token_bytes(32))
        self._pepper = pepper_path.read_bytes()
        self.limiter = RateLimiter(clock)
        if not (config.exports_dir / "index.txt").exists():
            self._write_index(self.clock())

    # -- helpers ------------------------------------------------------------------
    def _h(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    @property
    def public_key_b64(self) -> str:
        return export.public_key_b64(self.signing_key)

    # -- accounts -----------------------------------------------------------------
    def add_user(self, username: str, password: str, health_authority: str = "default") -> None:
        if len(password) < 8:
            raise ApiError(400, "weak_password", "passwords need at least 8 characters")
        with self.engine.begin() as c:
            c.execute(sa.insert(db.users).values(username=username, password_hash=hash_password(password),
                                                 health_authority=health_authority))

    def add_api_key(self, name: str, health_authority: str = "default") -> str:
        key = secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            c.execute(sa.insert(db.api_keys).values(key_hash=self._h(key), name=name, health_authority=health_authority))
        return key

    def api_key_owner(self, key: str | None) -> str:
        if key:
            with self.engine.connect() as c:
                row = c.execute(sa.select(db.api_keys.c.name).where(db.api_keys.c.key_hash == self._h(key))).first()
            if row:
                return row.name
        raise ApiError(401, "unauthorized", "a valid X-API-Key header is required")

    def login(self, username: str, password: str) -> str:
        with self.engine.connect() as c:
            row = c.execute(sa.select(db.users).where(db.users.c.username == username)).first()
        if row is None or not check_password(password, row.password_hash):
            raise ApiError(401, "bad_login", "wrong user name or password")
        token = secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            c.execute(sa.insert(db.sessions).values(token_hash=self._h(token), user_id=row.id,
                                                    expires_at=self.clock() + 8 * 3600))
        return token

    def session_user(self, token: str | None) -> str | None:
        if not token:
            return None
        with self.engine.connect() as c:
            row = c.execute(sa.select(db.users.c.username).select_from(db.sessions.join(db.users))
                            .where(db.sessions.c.token_hash == self._h(token),
                                   db.sessions.c.expires_at > self.clock())).first()
        return row.username if row else None

    # -- codes --------------------------------------------------------------------
    def issue_code(self, issued_by: str, *, test_type: str = "confirmed", symptom_onset_interval: int | None = None) -> dict:
        if test_type not in TEST_TYPES:
            raise ApiError(400, "bad_test_type", f"test type must be one of {', '.join(TEST_TYPES)}")
        self.limiter.check("issue", issued_by, self.config.rate_issue_per_min)
        now = self.clock()
        for _ in range(5):
            short = f"{secrets.randbelow(10**8):08d}"
            long = "".join(secrets.choice(_LONG_ALPHABET) for _ in range(16))
            try:
                with self.engine.begin() as c:
                    c.execute(sa.insert(db.codes).values(
                        short_hash=self._h(short), long_hash=self._h(long), short_expires_at=now + SHORT_CODE_TTL,
                        long_expires_at=now + LONG_CODE_TTL, test_type=test_type,
                        symptom_onset_interval=symptom_onset_interval, issued_by=issued_by, issued_at=now))
                break
            except sa.exc.IntegrityError:  # a collision with a live code: draw again
                continue
        else:
            raise ApiError(503, "code_space_exhausted", "could not draw a unique code")
        log.info("code issued by=%s type=%s", issued_by, test_type)
        return {"code": short, "expiresAt": int(now + SHORT_CODE_TTL), "longCode": long,
                "longExpiresAt": int(now + LONG_CODE_TTL), "testType": test_type}

    def verify_code(self, code: str, client: str) -> dict:
        self.limiter.check("verify", client, self.config.rate_verify_per_min)
        if not isinstance(code, str) or not (len(code) == 8 and code.isdigit() or len(code) == 16):
            raise ApiError(400, "code_invalid", "the code is not a valid verification code")
        now, h = self.clock(), self._h(code.lower() if len(code) == 16 else code)
        c_ = db.codes.c
        with self.engine.begin() as c:
            # atomic claim: only one request can move claimed_at from NULL
            res = c.execute(sa.update(db.codes).where(
                sa.or_(sa.and_(c_.short_hash == h, c_.short_expires_at > now),
                       sa.and_(c_.long_hash == h, c_.long_expires_at > now)),
                c_.claimed_at.is_(None)).values(claimed_at=now))
            if res.rowcount != 1:
                row = c.execute(sa.select(db.codes).where(sa.or_(c_.short_hash == h, c_.long_hash == h))).first()
                if row is None:
                    raise ApiError(400, "code_invalid", "the code is not a valid verification code")
                if row.claimed_at is not None:
                    raise ApiError(400, "code_used", "the code was already used")
                raise ApiError(400, "code_expired", "the code has expired")
            row = c.execute(sa.select(db.codes).where(sa.or_(c_.short_hash == h, c_.long_hash == h))).first()
            token = secrets.token_urlsafe(32)
            c.execute(sa.insert(db.tokens).values(token_hash=self._h(token), code_id=row.id, expires_at=now + TOKEN_TTL))
        return {"token": token, "testtype": row.test_type, "symptomOnsetInterval": row.symptom_onset_interval}

    def certificate(self, token: str, ekeyhmac: str) -> dict:
        try:
            if len(base64.b64decode(ekeyhmac, validate=True)) != 32:
                raise ValueError
        except (ValueError, TypeError, binascii.Error):
            raise ApiError(400, "hmac_invalid", "ekeyhmac must be a base64 HMAC-SHA256") from None
        now, t_ = self.clock(), db.tokens.c
        with self.engine.begin() as c:
            res = c.execute(sa.update(db.tokens).where(t_.token_hash == self._h(str(token)), t_.expires_at > now,
                                                       t_.used_at.is_(None)).values(used_at=now))
            if res.rowcount != 1:
                raise ApiError(400, "token_invalid", "the verification token is invalid, expired or used")
            row = c.execute(sa.select(db.codes).select_from(db.tokens.join(db.codes))
                            .where(t_.token_hash == self._h(str(token)))).first()
            jti = uuid.uuid4().hex
            c.execute(sa.insert(db.certificates).values(jti=jti))
        claims = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "iat": int(now), "exp": int(now + CERT_TTL), "jti": jti,
                  "reportType": row.test_type, "symptomOnsetInterval": row.symptom_onset_interval or 0,
                  "trisk": [], "tekmac": ekeyhmac, "healthAuthority": row.issued_by}
        cert = jwt.encode(claims, self.cert_key, algorithm="ES256", headers={"kid": self.config.key_version})
        return {"certificate": cert, "error": ""}

    # -- publish ------------------------------------------------------------------
    def publish(self, req: dict) -> dict:
        """``req`` is the validated v1 publish body (see app.PublishRequest)."""
        now = self.clock()
        try:
            claims = jwt.decode(req["verificationPayload"], self.cert_key.public_key(), algorithms=["ES256"],
                                audience=JWT_AUDIENCE, issuer=JWT_ISSUER,
                                # time is checked against our clock (virtual in the demo), not time.time()
                                options={"require": ["exp", "iat", "jti", "tekmac"], "verify_exp": False,
                                         "verify_iat": False})
            if claims["exp"] < now:
                raise jwt.ExpiredSignatureError
        except jwt.ExpiredSignatureError:
            raise ApiError(400, "certificate_expired", "the verification certificate has expired") from None
        except jwt.PyJWTError as e:
            raise ApiError(400, "certificate_invalid", f"the verification certificate is invalid: {e}") from None
        try:
            hmac_key = base64.b64decode(req["hmacKey"], validate=True)
        except (ValueError, binascii.Error):
            raise ApiError(400, "hmac_key_invalid", "hmacKey is not base64") from None
        keys = []
        now_enin = gaen.en_interval_number(now)
        oldest = now_enin - MAX_KEY_AGE_DAYS * gaen.TEK_ROLLING_PERIOD
        for i, k in enumerate(req["temporaryExposureKeys"]):
            try:
                data = base64.b64decode(k["key"], validate=True)
            except (ValueError, binascii.Error):
                data = b""
            if len(data) != 16:
                raise ApiError(400, "key_invalid", f"key {i} is not 16 bytes of base64")
            rs, rp = k["rollingStartNumber"], k.get("rollingPeriod", 144)
            if not 1 <= rp <= 144:
                raise ApiError(400, "key_invalid", f"key {i}: rollingPeriod must be 1..144")
            if rs + rp < oldest:
                raise ApiError(400, "key_too_old", f"key {i} is older than {MAX_KEY_AGE_DAYS} days")
            if rs > now_enin:
                raise ApiError(400, "key_in_future", f"key {i} starts in the future")
            keys.append(PublishKey(data, rs, rp, k.get("transmissionRisk", 0)))
        if len({k.key for k in keys}) != len(keys):
            raise ApiError(400, "key_duplicate", "the same key appears twice")
        if not hmac.compare_digest(tek_hmac(hmac_key, keys), claims["tekmac"]):
            raise ApiError(400, "hmac_mismatch", "the keys do not match the certificate's HMAC")
        report_type = int(TEST_TYPES.get(claims.get("reportType"), export.ReportType.CONFIRMED_TEST))
        onset = req.get("symptomOnsetInterval") or claims.get("symptomOnsetInterval") or None
        with self.engine.begin() as c:
            cert = c.execute(sa.select(db.certificates).where(db.certificates.c.jti == claims["jti"])).first()
            if cert is None:
                raise ApiError(400, "certificate_invalid", "unknown certificate")
            if cert.used_at is not None:
                if cert.response:  # same certificate, same keys (HMAC checked): an idempotent retry
                    return json.loads(cert.response)
                raise ApiError(400, "certificate_used", "the certificate was already used")
            rows = []
            for k in keys:
                dso = None if not onset else int((k.rolling_start - onset) // gaen.TEK_ROLLING_PERIOD)
                end = (k.rolling_start + k.rolling_period) * gaen.INTERVAL_SECONDS
                rows.append(dict(key_data=k.key, rolling_start=k.rolling_start, rolling_period=k.rolling_period,
                                 transmission_risk=k.transmission_risk, report_type=report_type, days_since_onset=dso,
                                 health_authority=str(claims.get("healthAuthority", req.get("healthAuthorityID", ""))),
                                 received_at=now, export_after=max(now, end)))  # embargo until the key expired
            existing = set(r.key_data for r in c.execute(sa.select(db.exposures.c.key_data).where(
                db.exposures.c.key_data.in_([k.key for k in keys]))))
            new_rows = [r for r in rows if r["key_data"] not in existing]
            if new_rows:
                c.execute(sa.insert(db.exposures), new_rows)
            resp = {"revisionToken": "", "insertedExposures": len(new_rows), "error": "", "code": ""}
            c.execute(sa.update(db.certificates).where(db.certificates.c.jti == claims["jti"])
                      .values(used_at=now, response=json.dumps(resp)))
        log.info("publish: %d key(s) inserted", len(new_rows))
        return resp

    # -- exports ------------------------------------------------------------------
    def run_export(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Write the export files of keys whose embargo ended; refresh index.txt."""
        now = self.clock()
        cfg = self.config
        end = int(now // cfg.export_period_s * cfg.export_period_s)
        e_ = db.exposures.c
        with self.engine.connect() as c:
            last = c.execute(sa.select(sa.func.max(db.batches.c.end))).scalar()
            rows = c.execute(sa.select(db.exposures).where(e_.batch_id.is_(None), e_.export_after <= end)
                             .order_by(e_.id)).fetchall()
        start = int(last) if last else end - cfg.export_period_s
        if end <= start or not rows:
            self._write_index(now)
            return []
        keys = [export.DiagnosisKey(r.key_data, r.rolling_start, r.rolling_period, r.transmission_risk,
                                    export.ReportType(r.report_type), r.days_since_onset) for r in rows]
        if len(keys) < cfg.export_min_keys:
            keys += self._padding_keys(cfg.export_min_keys - len(keys), now)
        secrets.SystemRandom().shuffle(keys)  # padding must not be told apart by position
        chunks = [keys[i : i + cfg.export_max_keys] for i in range(0, len(keys), cfg.export_max_keys)]
        names = []
        for i, chunk in enumerate(chunks, 1):
            blob = export.build_export(chunk, signing_key=self.signing_key, start_timestamp=start, end_timestamp=end,
                                       region=cfg.region, key_id=cfg.key_id, key_version=cfg.key_version,
                                       batch_num=i, batch_size=len(chunks))
            name = f"{start}-{end}-{i:05d}.zip"
            tmp = cfg.exports_dir / (name + ".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, cfg.exports_dir / name)
            names.append(name)
            if progress:
                progress(i, len(chunks))
        with self.engine.begin() as c:
            bid = c.execute(sa.insert(db.batches).values(start=start, end=end, files=json.dumps(names),
                                                         created_at=now)).inserted_primary_key[0]
            c.execute(sa.update(db.exposures).where(e_.id.in_([r.id for r in rows])).values(batch_id=bid))
        self._write_index(now)
        log.info("export: %d real key(s) in %d file(s)", len(rows), len(names))
        return names

    def _padding_keys(self, n: int, now: float) -> list[export.DiagnosisKey]:
        rnd = secrets.SystemRandom()
        today = gaen.rolling_start_for_day(now)
        return [export.DiagnosisKey(secrets.token_bytes(16), today - rnd.randint(1, 13) * 144, 144, rnd.randint(1, 8),
                                    export.ReportType.CONFIRMED_TEST) for _ in range(n)]

    def _write_index(self, now: float) -> None:
        cutoff = now - self.config.export_retention_days * 86400
        with self.engine.connect() as c:
            rows = c.execute(sa.select(db.batches.c.files).where(db.batches.c.end >= cutoff)
                             .order_by(db.batches.c.id)).fetchall()
        lines = [n for r in rows for n in json.loads(r.files)]
        tmp = self.config.exports_dir / "index.txt.tmp"
        tmp.write_text("".join(f"{n}\n" for n in lines))
        os.replace(tmp, self.config.exports_dir / "index.txt")
