"""The backend against hostile requests, over real HTTP on 127.0.0.1, on SQLite and
PostgreSQL where the database matters. Every refusal is a 4xx with the ``{code, error}``
body; the sections name the issue's points they guard."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol import robert
from backend import Backend, BackendConfig
from backend.errors import Code
from backend.robert import RobertConfig, RobertServer, contacts
from backend.server import BackgroundServer

from .conftest import database_url

pytestmark = pytest.mark.integration

#: what a request may take while the server is busy with another one
QUICK_S = 0.5
CODES = {c.value for c in Code}


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path, clock):
    """The backend with the ROBERT role on the test clock (generous rate limits)."""
    backend = Backend(BackendConfig(tmp_path / "b", database_url=database_url(request), rate_verify_per_min=10_000),
                      clock=clock)
    rs = RobertServer(backend, RobertConfig(register_per_min=10_000, min_status_interval_s=1500))
    with BackgroundServer(backend, robert_server=rs) as srv:
        yield backend, rs, srv
    backend.engine.dispose()


sqlite_only = pytest.mark.parametrize("world", ["sqlite"], indirect=True)


def refused(r: httpx.Response, code: str | None = None, status: int | None = None) -> None:
    """A 4xx with the ``{code, error}`` body (that code and status when given)."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    doc = r.json()
    assert set(doc) == {"code", "error"} and doc["code"] in CODES and isinstance(doc["error"], str), doc
    if code is not None:
        assert doc["code"] == code, doc
    if status is not None:
        assert r.status_code == status, r.status_code


class Phone:
    """A registered ROBERT device, driven with the pure protocol code."""

    def __init__(self, url: str) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        r = httpx.post(url + "/api/v6/register", json={"clientPublicECDHKey": robert.public_key_b64(self.private)})
        assert r.status_code == 200, r.text
        self.reg = r.json()
        self.keys = robert.ecdh_keys(self.private, self.reg["serverPublicKey"])
        self.tuples = {t.epoch: t for t in robert.decrypt_tuples(self.keys.k_tuples, self.reg["tuples"])}

    def epoch(self, ntp: int) -> int:
        return robert.epoch_id(ntp, self.reg["timeStart"])

    def epoch_start(self, epoch: int) -> int:
        return robert.epoch_start_ntp(epoch, self.reg["timeStart"])

    def hello(self, sent_ntp: int, collected_ntp: int | None = None, rssi: int = -50) -> dict:
        """What a receiver reports of this phone's HELLO sent at ``sent_ntp``."""
        t = self.tuples[self.epoch(sent_ntp)]
        h = robert.parse_hello(robert.build_hello(self.keys.k_mac, t.ecc, t.ebid, sent_ntp))
        return {"timeCollectedOnDevice": sent_ntp if collected_ntp is None else collected_ntp,
                "timeFromHelloMessage": h.time16, "mac": base64.b64encode(h.mac).decode(), "rssiCalibrated": rssi}

    def contact(self, epoch: int, ids: list[dict]) -> dict:
        t = self.tuples[epoch]
        return {"ebid": base64.b64encode(t.ebid).decode(), "ecc": base64.b64encode(t.ecc).decode(), "ids": ids}

    def auth(self, prefix: int, now: float) -> dict:
        ntp = robert.ntp_seconds(now)
        epoch = self.epoch(ntp)
        t = self.tuples[epoch]
        return {"ebid": base64.b64encode(t.ebid).decode(), "epochId": epoch,
                "time": base64.b64encode((ntp & 0xFFFFFFFF).to_bytes(4, "big")).decode(),
                "mac": base64.b64encode(robert.request_mac(self.keys.k_mac, prefix, t.ebid, epoch, ntp)).decode()}


def stored(rs: RobertServer) -> list:
    with rs.engine.connect() as c:
        return c.execute(sa.select(contacts.c.ntp, contacts.c.rssi)).fetchall()


def code_claimed(backend: Backend, code: str) -> bool:
    from backend import db
    with backend.engine.connect() as c:
        rows = c.execute(sa.select(db.codes.c.claimed_at)).fetchall()
    return any(r.claimed_at is not None for r in rows)


# -- point 6: the body limit holds whatever the transfer encoding ---------------------------

def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _chunks(total: int, size: int = 1 << 20):
    chunk = b" " * size  # one buffer, sent again and again: the client holds 1 MiB
    for _ in range(total // size):
        yield chunk


def _post_streamed(url: str, total: int) -> tuple[httpx.Response, int]:
    """POST ``total`` bytes with chunked transfer encoding; the response and the largest
    growth of this process's memory (the server runs in it) meanwhile."""
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() - base)
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = httpx.post(url, content=_chunks(total), headers={"content-type": "application/json"}, timeout=120)
    finally:
        done.set()
        sampler.join()
    return r, peak[0]


@sqlite_only
@pytest.mark.parametrize("path, total", [("/api/verify", 256 << 20), ("/api/v6/report", 256 << 20)])
def test_a_streamed_body_is_cut_at_the_limit(world, path, total):
    backend, rs, srv = world
    r, grew = _post_streamed(srv.url + path, total)
    refused(r, "body_too_large", 413)
    assert grew < 64 << 20, f"the server grew by {grew / 2**20:.0f} MiB for a {total >> 20} MiB chunked body"


@sqlite_only
def test_a_small_streamed_body_is_read_as_usual(world):
    backend, rs, srv = world
    code = backend.verification.issue_code("lab")["code"]
    body = json.dumps({"code": code}).encode()
    r = httpx.post(srv.url + "/api/verify", content=iter([body[:5], body[5:]]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["token"]
