"""ROBERT end to end over real HTTP on 127.0.0.1: register -> HELLOs -> report -> status."""

import base64
import random

import httpx
import pytest
import sqlalchemy as sa

from agent.protocol import robert
from agent.robert_agent import RobertClientError, RobertDevice
from agent.store import Store
from backend import Backend, BackendConfig
from backend.robert import RobertConfig, RobertServer, contacts
from backend.server import BackgroundServer

from .conftest import database_url
from .helpers import FakeClock, fast_passphrase

DAY = 86_400
T0 = 20_000 * DAY + 9 * 3600


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path):
    clock = FakeClock(T0)
    backend = Backend(BackendConfig(tmp_path / "backend", database_url=database_url(request)), clock=clock)
    rs = RobertServer(backend, RobertConfig(min_status_interval_s=1500))
    with BackgroundServer(backend, robert_server=rs) as srv:
        def device(name, seed):
            store = Store.create(tmp_path / f"{name}.db", fast_passphrase(), clock=clock)
            d = RobertDevice(store, srv.url, rng=random.Random(seed), sleep=lambda s: None, retries=0)
            d.register()
            return d
        yield clock, backend, rs, srv, device


def stored_contacts(rs):
    with rs.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(contacts)).scalar()


def broadcast(clock, sender, receivers_rssi, minutes):
    for _ in range(minutes * 15):  # every 4 s
        sd = sender.service_data(clock.t)
        assert len(sd) == 18
        for receiver, rssi in receivers_rssi:
            receiver.on_hello(clock.t, sd, rssi)
        clock.advance(4)


def test_register_hello_report_status(world):
    clock, backend, rs, srv, device = world
    alice, bob, carol = device("alice", 1), device("bob", 2), device("carol", 3)
    broadcast(clock, bob, [(alice, -45)], 20)    # bob next to alice for 20 minutes
    broadcast(clock, carol, [(alice, -82)], 20)  # carol far away
    code = backend.verification.issue_code("lab")["code"]
    resp = alice.report(code, clock.t)
    assert resp["accepted"] == 2 * 20 * 15 and resp["dropped"] == 0
    clock.advance(1800)
    assert bob.status(clock.t)["atRisk"] is True
    assert carol.status(clock.t)["atRisk"] is False
    assert bob.store.exposures()[0]["rule"] == "robert"
    # the code is single use: a second report is refused and stores nothing
    before = stored_contacts(rs)
    with pytest.raises(RobertClientError, match="already used"):
        alice.report(code, clock.t)
    assert stored_contacts(rs) == before
    # delete history, then unregister
    clock.advance(1800)
    bob.delete_history(clock.t)
    clock.advance(1800)
    assert bob.status(clock.t)["atRisk"] is False
    bob.unregister(clock.t)
    assert not bob.registered


def test_forged_and_replayed_status_and_bad_hellos(world):
    clock, backend, rs, srv, device = world
    alice, bob = device("alice", 1), device("bob", 2)
    body = bob._auth_body(robert.PREFIX_STATUS, clock.t)
    forged = dict(body, mac=base64.b64encode(bytes(32)).decode())
    r = httpx.post(srv.url + "/api/v6/status", json=forged)
    assert r.status_code == 401 and r.json()["code"] == "bad_mac"
    assert httpx.post(srv.url + "/api/v6/status", json=body).status_code == 200
    r = httpx.post(srv.url + "/api/v6/status", json=body)  # the same request again
    assert r.status_code == 400 and r.json()["code"] == "replayed"
    r = httpx.post(srv.url + "/api/v6/status", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "unparsable_request"

    # HELLOs: one outside its epoch (collected 3 hours later), one with a forged MAC
    sd = bob.service_data(clock.t)
    alice.on_hello(clock.t, sd, -45)
    alice.on_hello(clock.t + 3 * 3600, sd, -45)
    forged_hello = bytearray(sd)
    forged_hello[15] ^= 0xFF
    alice.on_hello(clock.t, bytes(forged_hello), -45)
    resp = alice.report(backend.verification.issue_code("lab")["code"], clock.t + 3 * 3600)
    assert resp["accepted"] == 1 and resp["dropped"] == 2
    assert rs.stats["hellos_dropped"] == 2

    # malformed report: nothing stored, code not consumed
    code = backend.verification.issue_code("lab")["code"]
    before = stored_contacts(rs)
    r = httpx.post(srv.url + "/api/v6/report", json={"token": code, "contacts": [{"ebid": "!!"}]})
    assert r.status_code == 400 and stored_contacts(rs) == before
    r = httpx.post(srv.url + "/api/v6/report", json={"token": code, "contacts": []})
    assert r.status_code == 200  # the code was still valid


def test_registration_guard(tmp_path):
    clock = FakeClock(T0)
    backend = Backend(BackendConfig(tmp_path / "b"), clock=clock)
    rs = RobertServer(backend, RobertConfig(register_api_key="s3cret", register_per_min=2))
    with BackgroundServer(backend, robert_server=rs) as srv:
        store = Store.create(tmp_path / "d.db", fast_passphrase(), clock=clock)
        d = RobertDevice(store, srv.url, sleep=lambda s: None, retries=0)
        with pytest.raises(RobertClientError, match="X-API-Key"):
            d.register()
        d.api_key = "s3cret"
        d.register()
        assert d.registered and len(d.service_data(clock.t)) == 18
        r = httpx.post(srv.url + "/api/v6/register", json={"clientPublicECDHKey": "bm9wZQ=="},
                       headers={"X-API-Key": "s3cret"})
        assert r.status_code == 400 and r.json()["code"] == "key_invalid"
        r = httpx.post(srv.url + "/api/v6/register", json={"clientPublicECDHKey": "x"}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 429
    # the server keys are kept encrypted and survive a restart
    rs2 = RobertServer(Backend(BackendConfig(tmp_path / "b"), clock=clock))
    assert rs2.k_s == rs.k_s and rs2.server_public_key == rs.server_public_key
    assert b"k_s" not in (tmp_path / "b" / "robert-keys.enc").read_bytes()
