"""ROBERT end to end over real HTTP on 127.0.0.1: register -> HELLOs -> report -> status."""

import base64
import dataclasses
import random

import httpx
import pytest
import sqlalchemy as sa

from agent.errors import BackendRejected
from agent.modes.base import DeviceContext
from agent.modes.robert import RobertMode
from agent.protocol import robert
from agent.sync.robert import RobertClient
from backend import Backend, BackendConfig
from backend.robert import RobertConfig, RobertServer, contacts
from backend.server import BackgroundServer

from .conftest import database_url

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request, tmp_path, clock, new_store):
    backend = Backend(BackendConfig(tmp_path / "backend", database_url=database_url(request)), clock=clock)
    rs = RobertServer(backend, RobertConfig(min_status_interval_s=1500))
    with BackgroundServer(backend, robert_server=rs) as srv:
        def device(name, seed, api_key=""):
            mode = RobertMode(DeviceContext(store=new_store(name), clock=clock, backend_url=srv.url,
                                            rng=random.Random(seed), api_key=api_key, http_retries=0))
            mode.prepare(clock.t)  # registers
            return mode
        yield clock, backend, rs, srv, device


def stored_contacts(rs):
    with rs.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(contacts)).scalar()


def hear(receiver: RobertMode, t: float, service_data: bytes, rssi: int) -> None:
    receiver.record(t, receiver.decode({robert.ROBERT_SERVICE_UUID: service_data}), rssi)


def broadcast(clock, sender, receivers_rssi, minutes):
    for _ in range(minutes * 15):  # a fresh HELLO every 4 s
        sd = sender.broadcast(clock.t).service_data
        assert len(sd) == 18
        for receiver, rssi in receivers_rssi:
            hear(receiver, clock.t, sd, rssi)
        clock.advance(4)


def test_register_hello_report_status(world):
    clock, backend, rs, srv, device = world
    alice, bob, carol = device("alice", 1), device("bob", 2), device("carol", 3)
    broadcast(clock, bob, [(alice, -45)], 20)    # bob next to alice for 20 minutes
    broadcast(clock, carol, [(alice, -82)], 20)  # carol far away
    code = backend.verification.issue_code("lab")["code"]
    assert f"{2 * 20 * 15} HELLO(s)" in alice.declare_prompt(clock.t)
    resp = alice.declare(code, clock.t)
    assert resp.accepted == 2 * 20 * 15 and resp.dropped == 0
    clock.advance(1800)
    assert bob.status(clock.t).at_risk is True
    assert carol.status(clock.t).at_risk is False
    (exposure,) = bob.store.exposures.all()
    assert (exposure.protocol, exposure.decided_by, exposure.minutes) == ("robert", "server", None)
    assert exposure.risk > 0.1
    # the code is single use: a second report is refused and stores nothing
    before = stored_contacts(rs)
    with pytest.raises(BackendRejected, match="already used") as e:
        alice.declare(code, clock.t)
    assert e.value.code == "code_used"
    assert stored_contacts(rs) == before
    # delete history, then unregister
    clock.advance(1800)
    bob.account.delete_history(clock.t)
    clock.advance(1800)
    assert bob.status(clock.t).at_risk is False
    bob.account.unregister(clock.t)
    assert not bob.registered and bob.broadcast(clock.t) is None


def test_forged_and_replayed_status_and_bad_hellos(world):
    clock, backend, rs, srv, device = world
    alice, bob = device("alice", 1), device("bob", 2)
    body = RobertClient._auth(bob.registration, robert.PREFIX_STATUS, clock.t)
    forged = dict(body, mac=base64.b64encode(bytes(32)).decode())
    r = httpx.post(srv.url + "/api/v6/status", json=forged)
    assert r.status_code == 401 and r.json()["code"] == "bad_mac"
    assert httpx.post(srv.url + "/api/v6/status", json=body).status_code == 200
    r = httpx.post(srv.url + "/api/v6/status", json=body)  # the same request again
    assert r.status_code == 400 and r.json()["code"] == "replayed"

    # HELLOs: one outside its epoch (collected 3 hours later), one with a forged MAC
    sd = bob.broadcast(clock.t).service_data
    hear(alice, clock.t, sd, -45)
    hear(alice, clock.t + 3 * 3600, sd, -45)
    forged_hello = bytearray(sd)
    forged_hello[15] ^= 0xFF
    hear(alice, clock.t, bytes(forged_hello), -45)
    resp = alice.declare(backend.verification.issue_code("lab")["code"], clock.t + 3 * 3600)
    assert resp.accepted == 1 and resp.dropped == 2
    assert rs.stats["hellos_dropped"] == 2


def test_registration_needs_the_configured_api_key(tmp_path, clock, new_store):
    backend = Backend(BackendConfig(tmp_path / "b"), clock=clock)
    rs = RobertServer(backend, RobertConfig(register_api_key="s3cret", register_per_min=2))
    with BackgroundServer(backend, robert_server=rs) as srv:
        ctx = DeviceContext(store=new_store("d"), clock=clock, backend_url=srv.url, http_retries=0)
        with pytest.raises(BackendRejected, match="X-API-Key"):
            RobertMode(ctx).prepare(clock.t)
        mode = RobertMode(dataclasses.replace(ctx, api_key="s3cret"))
        mode.prepare(clock.t)
        assert mode.registered and len(mode.broadcast(clock.t).service_data) == 18
