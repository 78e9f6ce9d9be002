"""The agent in ROBERT mode (``protocol = "robert"``): register with the server, broadcast
a HELLO per epoch (rotated with the address by the radio), keep the HELLOs heard in the
encrypted store, poll ``/status``, report the heard HELLOs with a health authority code,
unregister, delete the exposure history. No radio or clock of its own: callers pass the
time and the received service data."""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from .exposure.encounter import SECONDS_PER_DAY
from .protocol import robert
from .store import Store
from .sync.client import SyncError, post_json

SECRET = "robert.registration"


class RobertClientError(SyncError):
    """The ROBERT server refused a request (one sentence)."""


class RobertDevice:
    def __init__(self, store: Store, base_url: str, *, http: httpx.Client | None = None, tx_power: int = 4,
                 rng: random.Random | None = None, api_key: str | None = None, retries: int = 3,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.http = http or httpx.Client(timeout=20)
        self.tx_power = tx_power
        self.rng = rng or random.Random()
        self.api_key = api_key
        self.retries, self.sleep = retries, sleep
        self._reg: dict | None = None
        raw = store.get_secret(SECRET)
        if raw:
            self._reg = json.loads(raw)  # None after unregister
        self._pending: list[tuple[float, bytes, int]] = []

    # -- transport ------------------------------------------------------------------------
    def _post(self, path: str, body: dict, headers: dict | None = None) -> dict:
        return post_json(self.http, self.base_url, path, body, error_cls=RobertClientError, what="the ROBERT server",
                         retries=self.retries, backoff_s=0.5, sleep=self.sleep, rng=self.rng, headers=headers)

    # -- registration ---------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        return self._reg is not None

    def _save(self) -> None:
        self.store.put_secret(SECRET, json.dumps(self._reg).encode())

    def _take_tuples(self, blob: str) -> None:
        keys = bytes.fromhex(self._reg["k_tuples"])
        tuples = robert.decrypt_tuples(keys, blob)
        self._reg["tuples"] = {str(t.epoch): [t.ebid.hex(), t.ecc.hex()] for t in tuples}

    def register(self) -> None:
        priv = ec.generate_private_key(ec.SECP256R1())
        headers = {"X-API-Key": self.api_key} if self.api_key else None
        doc = self._post("/api/v6/register", {"clientPublicECDHKey": robert.public_key_b64(priv)}, headers)
        keys = robert.ecdh_keys(priv, doc["serverPublicKey"])
        self._reg = {"k_mac": keys.k_mac.hex(), "k_tuples": keys.k_tuples.hex(), "time_start": doc["timeStart"]}
        self._take_tuples(doc["tuples"])
        self._save()

    def _epoch_tuple(self, now: float) -> tuple[int, int, bytes, bytes]:
        if self._reg is None:
            raise RobertClientError("not registered: register first")
        ntp = robert.ntp_seconds(now)
        epoch = robert.epoch_id(ntp, self._reg["time_start"])
        t = self._reg["tuples"].get(str(epoch))
        if t is None:
            raise RobertClientError("no identifier for this epoch: ask /status for new tuples")
        return ntp, epoch, bytes.fromhex(t[0]), bytes.fromhex(t[1])

    # -- broadcasting and hearing -----------------------------------------------------------
    def service_data(self, now: float) -> bytes:
        """0xFD64 service data to broadcast now (HELLO ‖ version ‖ TX power)."""
        ntp, _, ebid, ecc = self._epoch_tuple(now)
        return robert.service_data(robert.build_hello(bytes.fromhex(self._reg["k_mac"]), ecc, ebid, ntp),
                                   self.tx_power)

    def on_hello(self, t: float, service_data: bytes, rssi: int) -> bool:
        try:
            h = robert.parse_hello(service_data)
        except robert.RobertError:
            return False
        self._pending.append((t, h.to_bytes(), rssi))
        return True

    def flush(self) -> int:
        n = self.store.add_hellos(self._pending)
        self._pending = []
        return n

    # -- server requests ---------------------------------------------------------------------
    def _auth_body(self, prefix: int, now: float) -> dict:
        ntp, epoch, ebid, _ = self._epoch_tuple(now)
        mac = robert.request_mac(bytes.fromhex(self._reg["k_mac"]), prefix, ebid, epoch, ntp)
        return {"ebid": base64.b64encode(ebid).decode(), "epochId": epoch,
                "time": base64.b64encode((ntp & 0xFFFFFFFF).to_bytes(4, "big")).decode(),
                "mac": base64.b64encode(mac).decode()}

    def status(self, now: float) -> dict:
        doc = self._post("/api/v6/status", self._auth_body(robert.PREFIX_STATUS, now))
        if doc.get("tuples"):
            self._take_tuples(doc["tuples"])
            self._save()
        self.store.set_state("robert.status", {"at": now, "atRisk": doc["atRisk"], "riskLevel": doc["riskLevel"]})
        if doc["atRisk"]:
            day = int(now // SECONDS_PER_DAY)
            if not any(e["day"] == day and e.get("rule") == "robert" for e in self.store.exposures()):
                self.store.add_exposure(day, {"rule": "robert", "minutes": None, "risk": doc.get("risk"),
                                              "found_at": now})
        return doc

    def report(self, code: str, now: float, days: int = 14) -> dict:
        """Upload the HELLOs heard in the last ``days`` days (ROBERT /report)."""
        self.flush()
        since = int(now // SECONDS_PER_DAY) - days + 1
        contacts: dict[tuple[bytes, bytes], list[dict]] = {}
        for t, hello, rssi in self.store.hellos(since_day=since):
            h = robert.parse_hello(hello)
            contacts.setdefault((h.ebid, h.ecc), []).append({
                "timeCollectedOnDevice": robert.ntp_seconds(t), "timeFromHelloMessage": h.time16,
                "mac": base64.b64encode(h.mac).decode(), "rssiCalibrated": int(rssi)})
        body = {"token": code, "contacts": [{"ebid": base64.b64encode(e).decode(), "ecc": base64.b64encode(c).decode(),
                                              "ids": ids} for (e, c), ids in contacts.items()]}
        doc = self._post("/api/v6/report", body)
        self.store.clear_hellos()
        return doc

    def unregister(self, now: float) -> dict:
        doc = self._post("/api/v6/unregister", self._auth_body(robert.PREFIX_UNREGISTER, now))
        self._reg = None
        self.store.put_secret(SECRET, b"null")
        return doc

    def delete_history(self, now: float) -> dict:
        return self._post("/api/v6/deleteExposureHistory", self._auth_body(robert.PREFIX_DELETE_HISTORY, now))
