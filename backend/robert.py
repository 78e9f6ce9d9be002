"""The backend's ROBERT role (centralized mode): registration, status, report,
unregister, deleteExposureHistory. Server keys (K_S for SKINNY, K_G for ECC, the ECDH
key) are created on first start and kept sealed (:class:`~agent.store.envelope.Envelope`)
under a 0600 master key file; each registration's K_mac and K_tuples are sealed too,
bound to its identifier.

The captcha of the deployed system is replaced by a registration guard: a per-client
rate limit and, when configured, an API key (``X-API-Key``); the ``captcha`` and
``captchaId`` that the official app sends are read and not checked.

Answers have robert-server's shapes (robert-server-ws-rest, ``RegisterController.kt``,
``StatusController.kt``, ``ReportController.kt``, ``ClockController.kt``; where its
``openapi-robert-server-v1.yml`` disagrees, the server wins, as noted at each). Fields
this server adds, which the official app ignores, are :data:`EXTENSIONS`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock import DAY_SECONDS
from agent.exposure.robert_rule import (
    RobertRiskConfig,
    at_risk,
    epoch_weighted_minutes,
    total_risk,
)
from agent.files import write_private_file
from agent.protocol import robert
from agent.store.envelope import Envelope

from . import db
from .db import metadata
from .errors import ApiError, Code
from .keyfiles import ec_key_from_pem, load_or_create_secret

if TYPE_CHECKING:
    from .service import Backend

#: associated data binding each sealed blob to its role (and a registration to its id)
_AAD_SERVER_KEYS = b"robert-server-keys"
_AAD_REGISTRATION = b"robert-reg|"
#: the ``riskLevel`` answered to a person at risk (0: not at risk): robert-server's
#: ``RiskStatus.High`` (StatusController.kt)
RISK_LEVEL_AT_RISK = 4
#: the registration's ``config`` entry carrying the server's ECDH public key. robert-server
#: answers ``config: []`` and the official app has the key in its own configuration; a
#: ctagent agent takes it from its [sync] robert_server_public_key, else from here.
SERVER_KEY_CONFIG = "ctagent.serverPublicKey"
#: fields of our answers that robert-server does not send: the risk score behind the
#: level (status) and how many HELLOs were kept and dropped (report)
EXTENSIONS = {"status": {"risk"}, "report": {"accepted", "dropped"}}
#: how long the JWTs of status and report stay valid (robert-server's defaults are days)
TOKEN_TTL_S = 7 * DAY_SECONDS
#: A reported RSSI is clamped to what the API carries: "Calibrated RSSI (as 8-bit)"
#: (TousAntiCovid/robert-server, robert-api-spec/openapi.yaml, HelloMessageDetail); the
#: risk scoring then drops readings above -5 dBm (robert_rule.drop_above_dbm, as
#: robert-server's ScoringStrategyV2ServiceImpl does).
RSSI_MIN_DBM, RSSI_MAX_DBM = -128, 127
#: How far a HELLO's time may be from its reception (and a request's from the server's
#: clock): robert-server's ``robert.protocol.hello-message-timestamp-tolerance`` default
#: (ServerConfigurationServiceImpl).
TIME_TOLERANCE_S = 180
#: At most this many contacts (one per EBID heard) in a report: 14 days of 96 epochs with
#: about 15 devices heard in every epoch. A larger list is refused before any work on it.
MAX_CONTACTS_PER_REPORT = 20_000
#: At most this many HELLOs in one contact: one reception a second over the EBID's epoch
#: and the time tolerance on both sides of it (1,260).
MAX_HELLOS_PER_CONTACT = robert.EPOCH_SECONDS + 2 * TIME_TOLERANCE_S
#: One HELLO (EBID, time) counts once per second of reception, and a HELLO whose
#: receptions span more than a device broadcasts it (robert.HELLO_REFRESH_S) is dropped
#: whole: no receiver heard it so. The risk is scored per 2-minute window of reception, so
#: repeating a HELLO raised it: copies spread over the 6 minutes the time tolerance allows
#: counted as 6 minutes of contact (robert-server's scoring, too, counts every reception).
MAX_HELLO_SPAN_S = robert.HELLO_REFRESH_S
#: registrations read per statement (far below SQLite's and PostgreSQL's parameter limits)
_IDS_PER_STATEMENT = 500


def clamp_rssi(rssi: int) -> int:
    return min(max(rssi, RSSI_MIN_DBM), RSSI_MAX_DBM)

registrations = sa.Table(
    "robert_registrations", metadata,
    sa.Column("id_a", sa.LargeBinary(5), primary_key=True),
    sa.Column("keys_enc", sa.LargeBinary, nullable=False),
    sa.Column("created_ntp", sa.BigInteger, nullable=False),
    sa.Column("last_status_ntp", sa.BigInteger, nullable=True),
    sa.Column("notified", sa.Boolean, nullable=False, default=False),
)

contacts = sa.Table(
    "robert_contacts", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("id_a", sa.LargeBinary(5), sa.ForeignKey("robert_registrations.id_a", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("ntp", sa.BigInteger, nullable=False),
    sa.Column("rssi", sa.Integer, nullable=False),
)

#: The time of the last accepted authenticated request of a kind (its MAC prefix) per
#: registration: a request no later than it is a replay. A table of its own, so that
#: databases made before it only gain a table.
last_requests = sa.Table(
    "robert_last_requests", metadata,
    sa.Column("id_a", sa.LargeBinary(5), sa.ForeignKey("robert_registrations.id_a", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("prefix", sa.Integer, primary_key=True),
    sa.Column("ntp", sa.BigInteger, nullable=False),
)


@dataclass
class RobertConfig:
    country_code: int = 0x21
    tuples_epochs: int = 4 * 24 * 2  # two days of identifiers per bundle
    time_tolerance_s: int = TIME_TOLERANCE_S
    min_status_interval_s: int = 2 * robert.EPOCH_SECONDS - 300  # at most once per ~2 epochs
    register_per_min: int = 30
    register_api_key: str | None = None


class RobertServer:
    def __init__(self, backend: Backend, config: RobertConfig | None = None) -> None:
        self.backend = backend  # the database, the clock, the limiter and the health authority's codes
        self.engine = backend.engine
        self.cfg = config or RobertConfig()
        self.clock = backend.clock
        self.limiter = backend.limiter
        self.risk_cfg = RobertRiskConfig()
        with db.schema_change(self.engine) as c:
            metadata.create_all(c, tables=[registrations, contacts, last_requests])
        d = backend.config.data_dir
        self._master = Envelope(load_or_create_secret(d / "robert-master.key"))
        keys_path = d / "robert-keys.enc"
        if keys_path.exists():
            doc = json.loads(self._master.open(keys_path.read_bytes(), _AAD_SERVER_KEYS))
        else:
            priv = ec.generate_private_key(ec.SECP256R1())
            doc = {"k_s": secrets.token_hex(24), "k_g": secrets.token_hex(32),
                   "ecdh": priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode(),
                   "start_ntp": robert.ntp_seconds(self.clock.now()) // 3600 * 3600}
            write_private_file(keys_path, self._master.seal(json.dumps(doc).encode(), _AAD_SERVER_KEYS))
        self.k_s, self.k_g = bytes.fromhex(doc["k_s"]), bytes.fromhex(doc["k_g"])
        self.skinny = robert.Skinny64_192(self.k_s)
        self.ecdh = ec_key_from_pem(doc["ecdh"].encode(), "the ROBERT ECDH key")
        self.start_ntp = int(doc["start_ntp"])
        #: signs the status and report JWTs (analyticsToken, declarationToken, reportValidationToken)
        self._token_key = load_or_create_secret(d / "robert-token.key")
        self.stats = {"hellos_valid": 0, "hellos_dropped": 0}

    # -- helpers ------------------------------------------------------------------------
    @property
    def server_public_key(self) -> str:
        return robert.public_key_b64(self.ecdh)

    def now_ntp(self) -> int:
        return robert.ntp_seconds(self.clock.now())

    def current_epoch(self) -> int:
        return robert.epoch_id(self.now_ntp(), self.start_ntp)

    def _token(self, kind: str, **claims: object) -> str:
        """A JWT as robert-server's JwtService issues them (HS256 here: no one outside
        this server verifies them)."""
        now = int(self.clock.now())
        return jwt.encode({"iss": "robert-server", "iat": now, "exp": now + TOKEN_TTL_S, "kind": kind,
                           "jti": secrets.token_hex(16), **claims}, self._token_key, algorithm="HS256")

    def clock_answer(self) -> dict:
        """``/clock`` as ClockController.kt: the service's first day (a date), the time
        (ISO 8601, UTC) and the epoch. (The openapi file requires ``serviceStartTime``, a
        name the server never sends; the server wins.)"""
        now = self.clock.now()
        start = self.start_ntp - robert.NTP_UNIX_OFFSET
        return {"serviceStartDate": dt.datetime.fromtimestamp(start, dt.UTC).date().isoformat(),
                "time": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00",
                                                                                                           "Z"),
                "epoch": self.current_epoch()}

    def _seal_keys(self, id_a: bytes, keys: robert.SessionKeys) -> bytes:
        return self._master.seal(keys.k_mac + keys.k_tuples, _AAD_REGISTRATION + id_a)

    def _keys(self, row) -> robert.SessionKeys:
        plain = self._master.open(row.keys_enc, _AAD_REGISTRATION + row.id_a)
        return robert.SessionKeys(plain[:32], plain[32:])

    def _tuples(self, id_a: bytes, keys: robert.SessionKeys, first_epoch: int) -> str:
        out = []
        for e in range(first_epoch, first_epoch + self.cfg.tuples_epochs):
            ebid = self.skinny.encrypt(e.to_bytes(3, "big") + id_a)
            out.append(robert.Tuple(e, ebid, robert.make_ecc(self.k_g, ebid, self.cfg.country_code)))
        return robert.encrypt_tuples(keys.k_tuples, out)

    @staticmethod
    def _b64(value, name: str, length: int | None = None) -> bytes:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ApiError(Code.INVALID_REQUEST, f"{name} is not base64") from None
        if length is not None and len(raw) != length:
            raise ApiError(Code.INVALID_REQUEST, f"{name} must be {length} bytes")
        return raw

    # -- register -------------------------------------------------------------------------
    def register(self, client_public_key_b64: str, client: str, api_key: str | None = None) -> dict:
        """RegisterSuccessResponse (answered 201): the tuples, ``timeStart`` (NTP) and
        ``config``, where this server adds its public key (:data:`SERVER_KEY_CONFIG`)."""
        if self.cfg.register_api_key and api_key != self.cfg.register_api_key:
            raise ApiError(Code.UNAUTHORIZED, "registration needs the configured X-API-Key")
        self.limiter.check("register", client, self.cfg.register_per_min)
        try:
            keys = robert.ecdh_keys(self.ecdh, client_public_key_b64)
        except robert.RobertError as e:
            raise ApiError(Code.KEY_INVALID, str(e)) from None
        for _ in range(10):
            id_a = secrets.token_bytes(5)
            try:
                with self.engine.begin() as c:
                    c.execute(sa.insert(registrations).values(id_a=id_a, keys_enc=self._seal_keys(id_a, keys),
                                                              created_ntp=self.now_ntp(), notified=False))
                break
            except sa.exc.IntegrityError:
                continue
        else:
            raise ApiError(Code.ID_SPACE_EXHAUSTED, "could not allocate an identifier")
        return {"tuples": self._tuples(id_a, keys, self.current_epoch()), "timeStart": self.start_ntp,
                "config": [{"name": SERVER_KEY_CONFIG, "value": self.server_public_key}]}

    # -- authenticated requests -----------------------------------------------------------------
    def _authenticate(self, prefix: int, body: dict):
        ebid = self._b64(body.get("ebid"), "ebid", 8)
        mac = self._b64(body.get("mac"), "mac", 32)
        t = self._b64(body.get("time"), "time", 4)
        epoch = body.get("epochId")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ApiError(Code.INVALID_REQUEST, "epochId must be an integer")
        req_epoch, id_a = robert.open_ebid(self.skinny, ebid)
        ntp32 = int.from_bytes(t, "big")
        now = self.now_ntp()
        if req_epoch != epoch or abs(epoch - self.current_epoch()) > 1:
            raise ApiError(Code.BAD_EPOCH, "the EBID does not belong to the current epoch")
        if abs((now & 0xFFFFFFFF) - ntp32) > self.cfg.time_tolerance_s:
            raise ApiError(Code.BAD_TIME, "the request time is too far from the server's clock")
        with self.engine.connect() as c:
            row = c.execute(sa.select(registrations).where(registrations.c.id_a == id_a)).first()
        if row is None or not robert.verify_request_mac(self._keys(row).k_mac, prefix, ebid, epoch, ntp32, mac):
            raise ApiError(Code.BAD_MAC, "the request is not authenticated")
        return row, ntp32

    def status(self, body: dict) -> dict:
        row, ntp32 = self._authenticate(robert.PREFIX_STATUS, body)
        if row.last_status_ntp is not None:
            if ntp32 <= row.last_status_ntp:
                raise ApiError(Code.REPLAYED, "this status request was already seen")
            if ntp32 - row.last_status_ntp < self.cfg.min_status_interval_s:
                raise ApiError(Code.TOO_FREQUENT, "status can be asked at most once per two epochs")
        risk, last = self.risk(row.id_a)
        exposed = last is not None and at_risk(risk, (self.now_ntp() - last) / DAY_SECONDS, self.risk_cfg)
        with self.engine.begin() as c:
            c.execute(sa.update(registrations).where(registrations.c.id_a == row.id_a)
                      .values(last_status_ntp=ntp32, notified=row.notified or exposed))
        # ExposureStatusResponse as StatusController.kt builds it: the dates are NTP seconds
        # as strings, present only at risk (the openapi file's required "atRisk" and
        # "idsForEpochs" are never sent: the server wins)
        answer: dict = {"riskLevel": RISK_LEVEL_AT_RISK if exposed else 0,
                        "tuples": self._tuples(row.id_a, self._keys(row), self.current_epoch()), "config": [],
                        "analyticsToken": self._token("analytics")}
        if exposed:
            assert last is not None
            answer.update(lastContactDate=str(last), lastRiskScoringDate=str(self.now_ntp()),
                          declarationToken=self._token("declaration", lastContactDateTimestamp=last,
                                                       notificationDateTimestamp=self.now_ntp()))
        answer["risk"] = round(total_risk(risk), 4)  # an extension: the score behind the level
        return answer

    def risk(self, id_a: bytes) -> tuple[float, int | None]:
        """Risk-weighted minutes over the last days, and the last contact time (NTP)."""
        cutoff = self.now_ntp() - self.risk_cfg.max_contact_age_days * DAY_SECONDS
        with self.engine.connect() as c:
            rows = c.execute(sa.select(contacts.c.epoch, contacts.c.ntp, contacts.c.rssi)
                             .where(contacts.c.id_a == id_a, contacts.c.ntp >= cutoff)).fetchall()
        by_epoch: dict[int, list[tuple[float, float]]] = {}
        for r in rows:  # clamped again: rows stored before the intake clamp
            by_epoch.setdefault(r.epoch, []).append((r.ntp, clamp_rssi(r.rssi)))
        minutes = sum(epoch_weighted_minutes(s, robert.epoch_start_ntp(e, self.start_ntp), self.risk_cfg)
                      for e, s in by_epoch.items())
        return minutes, max((r.ntp for r in rows), default=None)

    def unregister(self, body: dict) -> dict:
        row, _ = self._authenticate(robert.PREFIX_UNREGISTER, body)
        with self.engine.begin() as c:
            c.execute(sa.delete(contacts).where(contacts.c.id_a == row.id_a))
            c.execute(sa.delete(registrations).where(registrations.c.id_a == row.id_a))
        return {"success": True}

    def delete_history(self, body: dict) -> dict:
        row, ntp32 = self._authenticate(robert.PREFIX_DELETE_HISTORY, body)
        with self.engine.begin() as c:
            self._once(c, row.id_a, robert.PREFIX_DELETE_HISTORY, ntp32)
            c.execute(sa.delete(contacts).where(contacts.c.id_a == row.id_a))
        return {"success": True}

    @staticmethod
    def _once(c: sa.Connection, id_a: bytes, prefix: int, ntp32: int) -> None:
        """Record, in the transaction ``c``, an authenticated request of time ``ntp32``;
        :class:`ApiError` (replayed) if one of that kind was accepted at that time or later."""
        lr = last_requests.c
        moved = c.execute(sa.update(last_requests).where(lr.id_a == id_a, lr.prefix == prefix, lr.ntp < ntp32)
                          .values(ntp=ntp32)).rowcount
        if moved == 1:
            return
        if c.execute(sa.select(lr.ntp).where(lr.id_a == id_a, lr.prefix == prefix)).first() is None:
            try:
                c.execute(sa.insert(last_requests).values(id_a=id_a, prefix=prefix, ntp=ntp32))
                return
            except sa.exc.IntegrityError:  # a concurrent first request of that kind won
                pass  # the caller's transaction is rolled back with the refusal
        raise ApiError(Code.REPLAYED, "this request was already seen")

    # -- report ---------------------------------------------------------------------------
    def report(self, body: dict, client: str) -> dict:
        """Check the token (a health authority code) first, without using it; verify every
        HELLO of the proximity list, keep the valid ones and count the others; claim the
        code in the transaction that stores them, so that a failure leaves it unused."""
        token = str(body.get("token", ""))
        verification = self.backend.verification
        verification.check_code(token, client)
        contacts_in = body.get("contacts")
        if not isinstance(contacts_in, list):
            raise ApiError(Code.INVALID_REQUEST, "contacts must be a list")
        if len(contacts_in) > MAX_CONTACTS_PER_REPORT:
            raise ApiError(Code.TOO_MANY_CONTACTS, f"a report holds at most {MAX_CONTACTS_PER_REPORT} contacts")
        valid, dropped = self._verify_contacts(contacts_in)
        with self.engine.begin() as c:
            verification.claim_code(c, token)  # single use; undone with the insert if that fails
            if valid:  # the driver's executemany: SQLAlchemy's per-row parameter work was most of a report's time
                mark = "?" if c.dialect.paramstyle == "qmark" else "%s"
                c.exec_driver_sql(f"INSERT INTO {contacts.name} (id_a, epoch, ntp, rssi) VALUES ({mark}, {mark}, "
                                  f"{mark}, {mark})", valid)
        self.stats["hellos_valid"] += len(valid)
        self.stats["hellos_dropped"] += dropped
        # ReportBatchResponse as ReportController.kt, and how many HELLOs were kept (an extension)
        return {"success": True, "message": "Successful operation",
                "reportValidationToken": self._token("report-validation"), "accepted": len(valid), "dropped": dropped}

    def _senders(self, pairs: set[tuple[bytes, bytes]]) -> dict[tuple[bytes, bytes], tuple[int, bytes, bytes] | None]:
        """For each (EBID, ECC): (epoch, ID_A, K_mac) of the registration it belongs to;
        None if none. The registrations are read in a few statements, not one per sender."""
        opened: dict[tuple[bytes, bytes], tuple[int, bytes] | None] = {}
        for ebid, ecc in pairs:
            country = robert.open_ecc(self.k_g, ebid, ecc)
            opened[(ebid, ecc)] = robert.open_ebid(self.skinny, ebid) if country == self.cfg.country_code else None
        wanted = sorted({v[1] for v in opened.values() if v is not None})
        rows: dict[bytes, Any] = {}
        with self.engine.connect() as c:
            for k in range(0, len(wanted), _IDS_PER_STATEMENT):
                part = wanted[k : k + _IDS_PER_STATEMENT]
                rows.update((r.id_a, r) for r in c.execute(sa.select(registrations)
                                                           .where(registrations.c.id_a.in_(part))))
        out: dict[tuple[bytes, bytes], tuple[int, bytes, bytes] | None] = {}
        for pair, v in opened.items():
            row = None if v is None else rows.get(v[1])
            out[pair] = None if v is None or row is None else (v[0], v[1], self._keys(row).k_mac)
        return out

    def _verify_contacts(self, contacts_in: list) -> tuple[list[tuple[bytes, int, int, int]], int]:
        """The rows (ID_A, epoch, NTP time, RSSI) of the valid HELLOs, and how many were
        dropped: a HELLO is dropped when its MAC, time or epoch is wrong, when it was received
        in the future, when it repeats a reception (same EBID, time and second), or when its receptions span longer than
        a HELLO is broadcast (:data:`MAX_HELLO_SPAN_S`). Each (EBID, ECC) is opened once
        per report, each HELLO's MAC checked once."""
        macs_ok: dict[bytes, bool] = {}
        #: (EBID, HELLO time) -> second of reception -> row
        heard: dict[tuple[bytes, int], dict[int, tuple[bytes, int, int, int]]] = {}
        latest = self.now_ntp() + self.cfg.time_tolerance_s
        dropped = 0
        parsed = []
        for ct in contacts_in:
            try:
                ebid = self._b64(ct["ebid"], "ebid", 8)
                ecc = self._b64(ct["ecc"], "ecc", 1)
                ids = ct["ids"]
                if not isinstance(ids, list):
                    raise ApiError(Code.INVALID_REQUEST, "ids must be a list")
            except (KeyError, TypeError):
                raise ApiError(Code.INVALID_REQUEST, "each contact needs ebid, ecc and ids") from None
            if len(ids) > MAX_HELLOS_PER_CONTACT:
                raise ApiError(Code.TOO_MANY_HELLOS, f"a contact holds at most {MAX_HELLOS_PER_CONTACT} HELLOs")
            parsed.append((ebid, ecc, ids))
        senders = self._senders({(ebid, ecc) for ebid, ecc, _ in parsed})
        for ebid, ecc, ids in parsed:
            sender = senders[(ebid, ecc)]
            if sender is None:
                dropped += len(ids)
                continue
            epoch, id_a, k_mac = sender
            for h in ids:
                try:
                    collected = int(h["timeCollectedOnDevice"])
                    t16 = int(h["timeFromHelloMessage"])
                    mac = self._b64(h["mac"], "mac", 5)
                    rssi = clamp_rssi(int(h["rssiCalibrated"]))
                except (KeyError, TypeError, ValueError):
                    raise ApiError(Code.INVALID_REQUEST, "each id needs timeCollectedOnDevice, "
                                   "timeFromHelloMessage, mac and rssiCalibrated") from None
                if not 0 <= t16 <= 0xFFFF:
                    dropped += 1
                    continue
                sent = robert.reconstruct_ntp(t16, collected)
                in_time = (abs(sent - collected) <= self.cfg.time_tolerance_s and max(sent, collected) <= latest
                           and abs(robert.epoch_id(sent, self.start_ntp) - epoch) <= 1)
                receptions = heard.setdefault((ebid, t16), {})
                if not in_time or collected in receptions:
                    dropped += 1
                    continue
                hello = robert.Hello(ecc, ebid, t16, mac)
                key = hello.to_bytes()
                if key not in macs_ok:
                    macs_ok[key] = robert.verify_hello_mac(k_mac, hello)
                if not macs_ok[key]:
                    dropped += 1
                    continue
                receptions[collected] = (id_a, epoch, collected, rssi)
        valid: list[tuple[bytes, int, int, int]] = []
        for receptions in heard.values():
            if receptions and max(receptions) - min(receptions) > MAX_HELLO_SPAN_S:
                dropped += len(receptions)
            else:
                valid += receptions.values()
        return valid, dropped
