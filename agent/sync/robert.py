"""The ROBERT server client (API v6 as deployed by TousAntiCovid): register, status,
report, unregister, deleteExposureHistory; and the typed state it leaves in the store.

The client builds request bodies and reads answers into typed records; the protocol
session (keys, identifiers, HELLOs) is the ROBERT mode's (``agent.modes.robert``).
Requests and answers have the shapes of TousAntiCovid/robert-server (robert-server-ws-rest
``openapi-robert-server-v1.yml`` and its controllers, which win where they disagree):
register sends ``captcha``/``captchaId`` and is answered 201 without the server's public
key (the official app has it in its configuration: so does this client, [sync]
robert_server_public_key, else the ``config`` entry ctagent's server adds); status is
answered ``riskLevel`` (0: none, 4: high), ``lastContactDate`` as an NTP timestamp in a
string, tokens and ``config``, no ``atRisk``; report is answered ``success``.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from ..clock import Clock
from ..errors import BackendRejected, UserError
from ..protocol import robert
from ..store import HeardHello
from .http import JsonHttp


@dataclass(frozen=True)
class RobertRegistration:
    """What registration gave this device: its session keys, the server's epoch origin
    and the identifiers (EBID, ECC) per epoch. Sensitive: kept encrypted."""

    STATE_NAME: ClassVar[str] = "robert.registration"
    SENSITIVE: ClassVar[bool] = True
    k_mac: bytes
    k_tuples: bytes
    time_start: int
    #: epoch -> (EBID, ECC)
    tuples: Mapping[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"RobertRegistration(time_start={self.time_start}, epochs={len(self.tuples)})"

    def with_tuples(self, blob_b64: str) -> RobertRegistration:
        """A copy holding the identifiers of an encrypted tuple bundle (register or status)."""
        tuples = robert.decrypt_tuples(self.k_tuples, blob_b64)
        return RobertRegistration(self.k_mac, self.k_tuples, self.time_start,
                                  {t.epoch: (t.ebid, t.ecc) for t in tuples})

    def identity(self, now: float) -> tuple[int, int, bytes, bytes]:
        """(NTP time, epoch, EBID, ECC) for ``now``."""
        ntp = robert.ntp_seconds(now)
        epoch = robert.epoch_id(ntp, self.time_start)
        t = self.tuples.get(epoch)
        if t is None:
            raise UserError("no ROBERT identifier for this epoch: the next status call fetches new ones")
        return ntp, epoch, t[0], t[1]

    def to_json(self) -> dict[str, Any]:  # the format stored since ROBERT mode exists
        return {"k_mac": self.k_mac.hex(), "k_tuples": self.k_tuples.hex(), "time_start": self.time_start,
                "tuples": {str(e): [ebid.hex(), ecc.hex()] for e, (ebid, ecc) in self.tuples.items()}}

    @classmethod
    def from_json(cls, doc: Any) -> RobertRegistration:
        return cls(bytes.fromhex(doc["k_mac"]), bytes.fromhex(doc["k_tuples"]), int(doc["time_start"]),
                   {int(e): (bytes.fromhex(v[0]), bytes.fromhex(v[1])) for e, v in doc.get("tuples", {}).items()})


@dataclass(frozen=True)
class RobertStatus:
    """The server's last answer to /status. Sensitive (it says whether this person is at risk)."""

    STATE_NAME: ClassVar[str] = "robert.status"
    SENSITIVE: ClassVar[bool] = True
    at: float
    at_risk: bool
    risk_level: int
    risk: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "atRisk": self.at_risk, "riskLevel": self.risk_level, "risk": self.risk}

    @classmethod
    def from_json(cls, doc: Any) -> RobertStatus:
        return cls(float(doc["at"]), bool(doc["atRisk"]), int(doc["riskLevel"]), doc.get("risk"))


#: robert-server's registration ``config`` entry that ctagent's server adds (backend.robert)
SERVER_KEY_CONFIG = "ctagent.serverPublicKey"


@dataclass(frozen=True)
class RegisterAnswer:
    tuples_b64: str
    time_start: int
    #: the server's ECDH public key when the answer carried it ("" from robert-server)
    server_public_key_b64: str = ""


@dataclass(frozen=True)
class StatusAnswer:
    risk_level: int
    tuples_b64: str | None
    #: NTP seconds of the last contact, given only at risk
    last_contact_ntp: int | None = None
    #: ctagent's server adds the score behind the level; robert-server does not
    risk: float | None = None

    @property
    def at_risk(self) -> bool:
        return self.risk_level > 0


@dataclass(frozen=True)
class ReportAnswer:
    #: HELLOs the server kept and dropped, when it says (ctagent's server; robert-server
    #: answers only ``success``)
    accepted: int | None = None
    dropped: int | None = None


def _answer_error(path: str, e: Exception) -> BackendRejected:
    return BackendRejected(f"{path}: the ROBERT server's answer cannot be used ({type(e).__name__}: {e})")


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


class RobertClient:
    def __init__(self, base_url: str, *, clock: Clock, http: httpx.Client | None = None,
                 rng: random.Random | None = None, retries: int = 3, api_key: str | None = None,
                 captcha: tuple[str, str] = ("", ""), timeout_s: float = 10.0) -> None:
        """``captcha``: (solution, id) sent on register, as robert-server requires them."""
        self.api_key = api_key
        self.captcha = captcha
        self.transport = JsonHttp(base_url, what="the ROBERT server", clock=clock, http=http, retries=retries,
                                  backoff_s=0.5, rng=rng, timeout_s=timeout_s)

    def close(self) -> None:
        self.transport.close()

    @staticmethod
    def _auth(reg: RobertRegistration, prefix: int, now: float) -> dict[str, Any]:
        ntp, epoch, ebid, _ = reg.identity(now)
        mac = robert.request_mac(reg.k_mac, prefix, ebid, epoch, ntp)
        return {"ebid": base64.b64encode(ebid).decode(), "epochId": epoch,
                "time": base64.b64encode((ntp & 0xFFFFFFFF).to_bytes(4, "big")).decode(),
                "mac": base64.b64encode(mac).decode()}

    def register(self, client_public_key_b64: str) -> RegisterAnswer:
        """RegisterRequest (captcha, captchaId, clientPublicECDHKey); any 2xx answer (201)."""
        headers = {"X-API-Key": self.api_key} if self.api_key else None
        body = {"captcha": self.captcha[0], "captchaId": self.captcha[1], "clientPublicECDHKey": client_public_key_b64}
        doc = self.transport.post_json("/api/v6/register", body, headers)
        try:
            config = doc.get("config") or []
            key = next((str(p["value"]) for p in config if isinstance(p, dict) and p.get("name") == SERVER_KEY_CONFIG),
                       "")
            return RegisterAnswer(str(doc["tuples"]), int(doc["timeStart"]), key)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _answer_error("/api/v6/register", e) from None

    def status(self, reg: RobertRegistration, now: float) -> StatusAnswer:
        doc = self.transport.post_json("/api/v6/status", self._auth(reg, robert.PREFIX_STATUS, now))
        try:
            risk = doc.get("risk")
            return StatusAnswer(int(doc["riskLevel"]), doc.get("tuples") or None,
                                _optional_int(doc.get("lastContactDate")), None if risk is None else float(risk))
        except (KeyError, TypeError, ValueError) as e:
            raise _answer_error("/api/v6/status", e) from None

    def report(self, code: str, hellos: Iterable[HeardHello]) -> ReportAnswer:
        """Upload the HELLOs heard, grouped per (EBID, ECC) as the deployed API wants."""
        contacts: dict[tuple[bytes, bytes], list[dict[str, Any]]] = {}
        for t, hello, rssi in hellos:
            h = robert.parse_hello(hello)
            contacts.setdefault((h.ebid, h.ecc), []).append({
                "timeCollectedOnDevice": robert.ntp_seconds(t), "timeFromHelloMessage": h.time16,
                "mac": base64.b64encode(h.mac).decode(), "rssiCalibrated": int(rssi)})
        body = {"token": code, "contacts": [{"ebid": base64.b64encode(e).decode(), "ecc": base64.b64encode(c).decode(),
                                              "ids": ids} for (e, c), ids in contacts.items()]}
        doc = self.transport.post_json("/api/v6/report", body)
        try:
            if doc.get("success") is False:
                raise ValueError(str(doc.get("message") or "success is false"))
            return ReportAnswer(_optional_int(doc.get("accepted")), _optional_int(doc.get("dropped")))
        except (TypeError, ValueError) as e:
            raise _answer_error("/api/v6/report", e) from None

    def unregister(self, reg: RobertRegistration, now: float) -> None:
        self.transport.post_json("/api/v6/unregister", self._auth(reg, robert.PREFIX_UNREGISTER, now))

    def delete_history(self, reg: RobertRegistration, now: float) -> None:
        self.transport.post_json("/api/v6/deleteExposureHistory", self._auth(reg, robert.PREFIX_DELETE_HISTORY, now))
