"""The backend against hostile requests, over real HTTP on 127.0.0.1, on SQLite and
PostgreSQL where the database matters. Every refusal is a 4xx with the ``{code, error}``
body; the sections name the issue's points they guard."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol import robert
from backend import Backend, BackendConfig, db
from backend.errors import VERIFICATION_API_PATHS, Code
from backend.robert import MAX_CONTACTS_PER_REPORT, MAX_HELLOS_PER_CONTACT, RobertConfig, RobertServer, contacts
from backend.server import BackgroundServer

from .conftest import database_url
from .test_backend_api import server_key, valid_publish

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
    """A 4xx with the error body of its route (``{errorCode, error}`` on the verification
    server's routes, ``{code, error}`` elsewhere), that code and status when given."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    doc = r.json()
    key = "errorCode" if r.request.url.path in VERIFICATION_API_PATHS else "code"
    assert set(doc) == {key, "error"} and doc[key] in CODES and isinstance(doc["error"], str), doc
    if code is not None:
        assert doc[key] == code, doc
    if status is not None:
        assert r.status_code == status, r.status_code


class Phone:
    """A registered ROBERT device, driven with the pure protocol code."""

    def __init__(self, url: str) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        r = httpx.post(url + "/api/v6/register", json={"clientPublicECDHKey": robert.public_key_b64(self.private)})
        assert r.status_code == 201, r.text
        self.reg = r.json()
        self.keys = robert.ecdh_keys(self.private, server_key(self.reg))
        self.tuples = {t.epoch: t for t in robert.decrypt_tuples(self.keys.k_tuples, self.reg["tuples"])}

    def epoch(self, ntp: int) -> int:
        return robert.epoch_id(ntp, self.reg["timeStart"])

    def epoch_start(self, epoch: int) -> int:
        return robert.epoch_start_ntp(epoch, self.reg["timeStart"])

    def hello(self, sent_ntp: int, rssi: int = -50) -> dict:
        """What a receiver reports of this phone's HELLO sent (and heard) at ``sent_ntp``."""
        t = self.tuples[self.epoch(sent_ntp)]
        h = robert.parse_hello(robert.build_hello(self.keys.k_mac, t.ecc, t.ebid, sent_ntp))
        return {"timeCollectedOnDevice": sent_ntp,
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


def any_code_claimed(backend: Backend) -> bool:
    with backend.engine.connect() as c:
        rows = c.execute(sa.select(db.codes.c.claimed_at)).fetchall()
    return any(r.claimed_at is not None for r in rows)


def _report(url: str, token: str, contact_list: list[dict]) -> httpx.Response:
    return httpx.post(url + "/api/v6/report", json={"token": token, "contacts": contact_list}, timeout=60)


# -- point 5: a report must not freeze the server -------------------------------------------

def _probe_while(fut, url: str) -> tuple[list[float], float]:
    """/healthz latencies measured while ``fut`` runs; and the first latency at all."""
    during: list[float] = []
    first = None
    with httpx.Client(base_url=url, timeout=300) as c:
        while not fut.done():
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200
            dt = time.monotonic() - t0
            first = dt if first is None else first
            if not fut.done():
                during.append(dt)
    return during, first if first is not None else 0.0


@sqlite_only
def test_a_large_report_does_not_stall_other_requests(world, clock):
    """A report of 3,840 distinct identifiers (20 phones, 192 epochs each; each one opened
    and looked up), 5 HELLOs each, while /healthz is asked again and again."""
    backend, rs, srv = world
    phones = [Phone(srv.url) for _ in range(20)]
    ntp = robert.ntp_seconds(clock.t)
    ids = [phones[0].hello(ntp + 100 + i) for i in range(5)]
    clock.advance(600)
    body = json.dumps({"token": backend.verification.issue_code("lab")["code"],
                       "contacts": [p.contact(e, ids) for p in phones for e in p.tuples]}).encode()
    started = threading.Event()
    report = rs.report

    def watched(*a, **kw):
        started.set()
        return report(*a, **kw)

    rs.report = watched
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        fut = pool.submit(httpx.post, srv.url + "/api/v6/report", content=body,
                          headers={"content-type": "application/json"}, timeout=300)
        assert started.wait(60)
        during, first = _probe_while(fut, srv.url)
        r = fut.result()
        took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert len(during) >= 3 and max(during) < QUICK_S, (
        f"/healthz answered {len(during)} time(s) during a {took:.2f} s report ({len(body) / 1e6:.1f} MB); "
        f"the first /healthz took {first:.2f} s")


@sqlite_only
def test_register_and_status_do_not_stall_other_requests(world, clock):
    backend, rs, srv = world

    def phone_life(n: int) -> None:
        for _ in range(n):
            phone = Phone(srv.url)
            r = httpx.post(srv.url + "/api/v6/status", json=phone.auth(robert.PREFIX_STATUS, clock.t), timeout=300)
            assert r.status_code == 200, r.text

    started = threading.Event()
    register = rs.register

    def watched(*a, **kw):
        started.set()
        return register(*a, **kw)

    rs.register = watched
    with ThreadPoolExecutor(33) as pool:
        t0 = time.monotonic()
        futs = [pool.submit(phone_life, 1) for _ in range(32)]
        assert started.wait(60)
        all_done = pool.submit(lambda: [f.result() for f in futs])
        during, first = _probe_while(all_done, srv.url)
        all_done.result()
        took = time.monotonic() - t0
    # a stalled server answers once or twice, late; a busy one answers quickly nearly always
    # (one scheduling hiccup on a loaded 2-core CI machine is not a stall: judged at the 90th percentile)
    p90 = sorted(during)[int(0.9 * (len(during) - 1))] if during else first
    assert len(during) >= 3 and p90 < QUICK_S and max(during) < 4 * QUICK_S, (
        f"/healthz: {len(during)} answer(s) during {took:.2f} s of 32 registrations and 32 status requests by "
        f"32 clients, 90th percentile {p90:.2f} s, worst {max(during, default=first):.2f} s")


@sqlite_only
def test_contacts_per_report_are_bounded(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    ntp = robert.ntp_seconds(clock.t)
    contact = bob.contact(bob.epoch(ntp), [bob.hello(ntp + 10)])
    clock.advance(60)
    code = backend.verification.issue_code("lab")["code"]
    refused(_report(srv.url, code, [contact] * (MAX_CONTACTS_PER_REPORT + 1)), "too_many_contacts")
    too_long = bob.contact(bob.epoch(ntp), [bob.hello(ntp + 10)] * (MAX_HELLOS_PER_CONTACT + 1))
    refused(_report(srv.url, code, [too_long]), "too_many_hellos")
    assert not any_code_claimed(backend)
    assert _report(srv.url, code, [contact]).status_code == 200


# -- point 5: a report's token is checked before its contacts ------------------------------

@sqlite_only
def test_an_unauthenticated_report_is_refused_before_its_contacts_are_read(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    ntp = robert.ntp_seconds(clock.t)
    contact = bob.contact(bob.epoch(ntp), [bob.hello(ntp + 10)])
    clock.advance(60)
    body = json.dumps({"token": "12345678", "contacts": [contact] * 10_000}).encode()
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/api/v6/report", content=body, headers={"content-type": "application/json"},
                   timeout=300)
    took = time.monotonic() - t0
    refused(r, "code_invalid")
    assert took < 2.0, f"a report with a bad token took {took:.2f} s ({len(body) / 1e6:.1f} MB)"


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


# -- point 9: odd JSON is a 4xx with the {code, error} body ---------------------------------

#: a placeholder replaced, in the serialized body, by 1,000 levels of nesting
DEEP = "@deep@"
HOSTILE_VALUES = {
    "lone surrogate": "\udc00" + "a" * 15,
    "Infinity": float("inf"),
    "NaN": float("nan"),
    "1e400": "@1e400@",
    "2**63": 2**63,
    "-2**63 - 1": -(2**63) - 1,
    "2**40": 2**40,
    "1,000 levels": DEEP,
}


def _json(doc) -> bytes:
    text = json.dumps(doc)  # escapes lone surrogates; writes Infinity and NaN
    text = text.replace(json.dumps(DEEP), "[" * 1000 + "]" * 1000).replace('"@1e400@"', "1e400")
    return text.encode()


def _bodies(backend: Backend, bob: Phone, now: float) -> dict[str, tuple[dict, dict]]:
    """Per route: a well-formed body (fields to spoil) and the headers it needs."""
    lab = {"X-API-Key": backend.verification.add_api_key("lab")}
    ntp = robert.ntp_seconds(now)
    auth = bob.auth(robert.PREFIX_STATUS, now)
    return {
        "/api/verify": ({"code": "12345678"}, {}),
        "/api/certificate": ({"token": "t", "ekeyhmac": base64.b64encode(bytes(32)).decode()}, {}),
        "/api/issue": ({"testType": "confirmed", "symptomOnsetInterval": 2_900_000}, lab),
        "/v1/publish": ({"temporaryExposureKeys": [{"key": base64.b64encode(bytes(16)).decode(),
                                                    "rollingStartNumber": 2_900_000, "rollingPeriod": 144,
                                                    "transmissionRisk": 0}],
                         "verificationPayload": "x", "hmacKey": base64.b64encode(bytes(32)).decode(),
                         "symptomOnsetInterval": 2_900_000}, {}),
        "/api/v6/register": ({"clientPublicECDHKey": robert.public_key_b64(bob.private)}, {}),
        "/api/v6/status": (auth, {}),
        "/api/v6/unregister": (dict(auth), {}),
        "/api/v6/deleteExposureHistory": (dict(auth), {}),
        "/api/v6/report": ({"token": "12345678",
                            "contacts": [bob.contact(bob.epoch(ntp), [bob.hello(ntp)])]}, {}),
    }


def _spoiled(body, value):
    """Copies of ``body`` with one leaf (at any depth) replaced by ``value``."""
    if isinstance(body, dict):
        for k, v in body.items():
            yield {**body, k: value}
            for inner in _spoiled(v, value):
                yield {**body, k: inner}
    elif isinstance(body, list):
        for i, v in enumerate(body):
            for inner in _spoiled(v, value):
                yield body[:i] + [inner] + body[i + 1:]


def test_odd_json_is_refused_with_the_error_body(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    failures = []
    with httpx.Client(base_url=srv.url) as c:
        for path, (body, headers) in _bodies(backend, bob, clock.t).items():
            for what, value in HOSTILE_VALUES.items():
                for doc in [value, *_spoiled(body, value)]:
                    try:
                        r = c.post(path, content=_json(doc), headers={"content-type": "application/json", **headers})
                    except httpx.TransportError as e:
                        failures.append(f"{path} {what}: {type(e).__name__} {e}")
                        continue
                    try:
                        refused(r)
                    except (AssertionError, ValueError):
                        failures.append(f"{path} {what}: {r.status_code} {r.text[:80]!r}")
    assert not failures, f"{len(failures)} answer(s) without the error body:\n" + "\n".join(failures)



def test_a_publish_with_an_absurd_onset_is_refused(world, clock):
    backend, rs, srv = world
    for onset in (2**40, -1):
        body = valid_publish(backend, clock.t)
        body["symptomOnsetInterval"] = onset
        refused(httpx.post(srv.url + "/v1/publish", json=body), "invalid_request")

# -- point 9: a report's code is claimed with its contacts, in one transaction ---------------

def test_an_out_of_range_rssi_neither_fails_nor_burns_the_code(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    ntp = robert.ntp_seconds(clock.t)
    ids = [bob.hello(ntp + 10, rssi=2**40), bob.hello(ntp + 20, rssi=-(2**40)), bob.hello(ntp + 30, rssi=-50)]
    clock.advance(60)
    code = backend.verification.issue_code("lab")["code"]
    r = _report(srv.url, code, [bob.contact(bob.epoch(ntp), ids)])
    assert r.status_code == 200, f"{r.status_code} {r.text[:200]}; code claimed: {any_code_claimed(backend)}"
    assert r.json()["accepted"] == 3
    assert sorted(row.rssi for row in stored(rs)) == [-128, -50, 127]  # clamped to what 8 bits carry


def test_a_failed_store_leaves_the_code_unclaimed(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    ntp = robert.ntp_seconds(clock.t)
    contact = bob.contact(bob.epoch(ntp), [bob.hello(ntp + 10)])
    clock.advance(60)
    code = backend.verification.issue_code("lab")["code"]
    contacts.drop(rs.engine)  # the store fails under the report
    try:
        assert _report(srv.url, code, [contact]).status_code == 500
    finally:
        contacts.create(rs.engine)
    assert not any_code_claimed(backend)
    r = _report(srv.url, code, [contact])
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text


def test_two_reports_with_one_code_store_once(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    ntp = robert.ntp_seconds(clock.t)
    contact = bob.contact(bob.epoch(ntp), [bob.hello(ntp + i) for i in range(50)])
    clock.advance(120)
    code = backend.verification.issue_code("lab")["code"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _report(srv.url, code, [contact]), range(4)))
    assert sorted(r.status_code for r in answers) == [200, 400, 400, 400]
    for r in answers:
        if r.status_code == 400:
            refused(r, "code_used")
    assert len(stored(rs)) == 50

# -- point 11: a report cannot poison a status -----------------------------------------------

def test_an_absurd_rssi_does_not_poison_the_status(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    ntp = robert.ntp_seconds(clock.t)
    ids = [bob.hello(ntp + 10 * i, rssi=-10_000) for i in range(30)]
    clock.advance(600)
    assert _report(srv.url, backend.verification.issue_code("lab")["code"], [bob.contact(bob.epoch(ntp), ids)]
                   ).status_code == 200
    r = httpx.post(srv.url + "/api/v6/status", json=bob.auth(robert.PREFIX_STATUS, clock.t))
    assert r.status_code == 200, f"{r.status_code} {r.text[:200]}"
    assert r.json()["riskLevel"] == 0


# -- point 11: a report cannot inflate a risk ------------------------------------------------

def test_one_hello_repeated_does_not_inflate_the_risk(world, clock):
    """Two HELLOs heard close (-35 dBm), once each: not at risk. The same two reported 61
    times each (within 3 minutes of their time, or as identical copies) must not be more;
    heard every 8 s while they are broadcast, every reception counts."""
    backend, rs, srv = world
    victims = {name: Phone(srv.url) for name in ("once", "spread", "copies", "on air")}
    clock.advance(2 * robert.EPOCH_SECONDS)
    answers = {}
    for name, bob in victims.items():
        epoch = bob.epoch(robert.ntp_seconds(clock.t)) - 2
        start = bob.epoch_start(epoch)
        heard = [bob.hello(start + 200, rssi=-35), bob.hello(start + 700, rssi=-35)]
        ids = {"once": heard,
               "spread": [dict(h, timeCollectedOnDevice=h["timeCollectedOnDevice"] + d)
                          for h in heard for d in range(-180, 181, 6)],
               "copies": [h for h in heard for _ in range(61)],
               # what a receiver scanning every 8 s hears while each HELLO is broadcast
               "on air": [dict(h, timeCollectedOnDevice=h["timeCollectedOnDevice"] + d)
                          for h in heard for d in range(0, robert.HELLO_REFRESH_S, 8)]}[name]
        r = _report(srv.url, backend.verification.issue_code("lab")["code"], [bob.contact(epoch, ids)])
        assert r.status_code == 200, r.text
        status = httpx.post(srv.url + "/api/v6/status", json=bob.auth(robert.PREFIX_STATUS, clock.t)).json()
        answers[name] = (r.json()["accepted"], status["risk"], status["riskLevel"])
    assert [a[2] for a in answers.values()] == [0] * 4, answers
    assert answers["spread"][1] <= answers["once"][1] and answers["copies"][1] <= answers["once"][1], answers
    assert answers["on air"][0] == 2 * 8  # every reception of a HELLO on the air counts


# -- point 13 (ROBERT): no HELLO from the future -------------------------------------------

def test_hellos_from_the_future_are_dropped(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    ntp = robert.ntp_seconds(clock.t) + 300
    clock.advance(300)
    future = ntp + 400
    ids = [bob.hello(ntp - 10), bob.hello(future)]
    contact_list = [bob.contact(bob.epoch(ntp), ids[:1]), bob.contact(bob.epoch(future), ids[1:])]
    r = _report(srv.url, backend.verification.issue_code("lab")["code"], contact_list)
    assert r.status_code == 200 and (r.json()["accepted"], r.json()["dropped"]) == (1, 1), r.json()


# -- point 13 (ROBERT): no replayed deleteExposureHistory -------------------------------------

def test_delete_history_is_not_replayable(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    clock.advance(60)
    body = bob.auth(robert.PREFIX_DELETE_HISTORY, clock.t)
    assert httpx.post(srv.url + "/api/v6/deleteExposureHistory", json=body).status_code == 200
    refused(httpx.post(srv.url + "/api/v6/deleteExposureHistory", json=body), "replayed")
    older = bob.auth(robert.PREFIX_DELETE_HISTORY, clock.t - 30)
    refused(httpx.post(srv.url + "/api/v6/deleteExposureHistory", json=older), "replayed")
    clock.advance(30)
    body = bob.auth(robert.PREFIX_DELETE_HISTORY, clock.t)
    assert httpx.post(srv.url + "/api/v6/deleteExposureHistory", json=body).status_code == 200


def test_one_delete_history_request_sent_at_once_is_done_once(world, clock):
    backend, rs, srv = world
    bob = Phone(srv.url)
    clock.advance(60)
    body = bob.auth(robert.PREFIX_DELETE_HISTORY, clock.t)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: httpx.post(srv.url + "/api/v6/deleteExposureHistory", json=body),
                                range(4)))
    assert sorted(r.status_code for r in answers) == [200, 400, 400, 400], [r.text for r in answers]
    for r in answers:
        if r.status_code == 400:
            refused(r, "replayed")

# -- fuzz: random and hostile JSON on every JSON route ---------------------------------------

JSON_ROUTES = ("/api/verify", "/api/certificate", "/api/issue", "/v1/publish", "/api/v6/register", "/api/v6/status",
               "/api/v6/report", "/api/v6/unregister", "/api/v6/deleteExposureHistory")
_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
         | st.floats(allow_nan=True, allow_infinity=True)
         | st.text(st.characters(exclude_categories=()), max_size=24))  # lone surrogates included
_values = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def _hostile_bodies(draw) -> bytes:
    """Valid-looking bodies spoiled anywhere, random documents, random bytes."""
    kind = draw(st.sampled_from(["spoiled", "random", "bytes", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        n = draw(st.integers(1, 3000))
        return (draw(st.sampled_from(["[", '{"a":'])) * n).encode()
    if kind == "random":
        return _json(draw(_values))
    template = draw(st.sampled_from(_TEMPLATES))
    spoiled = list(_spoiled(template, draw(_values))) or [template]
    return _json(draw(st.sampled_from(spoiled)))


#: bodies of the right shape for each route (the fuzzer spoils one leaf)
_TEMPLATES = [
    {"code": "12345678", "accept": ["confirmed"]},
    {"token": "t", "ekeyhmac": "AAAA"},
    {"testType": "confirmed", "symptomOnsetInterval": 2_900_000},
    {"temporaryExposureKeys": [{"key": "AAAAAAAAAAAAAAAAAAAAAA==", "rollingStartNumber": 2_900_000,
                                "rollingPeriod": 144, "transmissionRisk": 0}],
     "verificationPayload": "x", "hmacKey": "AAAA", "symptomOnsetInterval": 1, "padding": ""},
    {"clientPublicECDHKey": "AAAA"},
    {"ebid": "AAAAAAAAAAA=", "epochId": 1, "time": "AAAAAA==", "mac": "A" * 44},
    {"token": "12345678", "contacts": [{"ebid": "AAAAAAAAAAA=", "ecc": "AA==",
                                        "ids": [{"timeCollectedOnDevice": 1, "timeFromHelloMessage": 1,
                                                 "mac": "AAAAAAA=", "rssiCalibrated": -50}]}]},
]


def test_fuzzed_json_gets_a_client_answer(world):
    backend, rs, srv = world
    lab = {"X-API-Key": backend.verification.add_api_key("lab")}
    with httpx.Client(base_url=srv.url) as c:

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(path=st.sampled_from(JSON_ROUTES), body=_hostile_bodies())
        def post(path: str, body: bytes) -> None:
            r = c.post(path, content=body, headers={"content-type": "application/json", **lab})
            if r.status_code >= 300:
                refused(r)

        post()


def _raw_post(port: int, path: str, head_body: bytes, declared: int):
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {declared}\r\n\r\n".encode() + head_body)
    return s


def _answer(s) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            [ln for ln in data.split(b"\r\n\r\n")[0].split(b"\r\n") if ln.lower().startswith(b"content-length")][0]
            .split(b":")[1]):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_client_that_stalls_in_its_body_is_answered_408_and_a_slow_steady_one_is_not(tmp_path, clock,
                                                                                        monkeypatch):
    """A client that goes quiet mid-body held a connection and a task of the server for
    ever (and kept it from stopping): after BODY_TIMEOUT_S of silence it gets 408
    ``body_timeout`` and the request is dropped. The limit is on silence, not on the whole
    body: a slow client that keeps sending is served."""
    from backend import app as backend_app

    monkeypatch.setattr(backend_app, "BODY_TIMEOUT_S", 0.5)
    backend = Backend(BackendConfig(tmp_path / "backend"), clock=clock)
    body = json.dumps({"code": "12345678"}).encode()
    with BackgroundServer(backend) as srv:
        port = srv.port
        s = _raw_post(port, "/api/verify", body[:5], len(body))
        started = time.monotonic()
        status, answer = _answer(s)
        s.close()
        assert status == 408 and answer["errorCode"] == "body_timeout", answer
        assert time.monotonic() - started < 5
        s = _raw_post(port, "/api/verify", b"", len(body))  # slow and steady: a byte every 0.2 s
        for i in range(len(body)):
            s.sendall(body[i : i + 1])
            time.sleep(0.2 if i < 8 else 0)
        status, answer = _answer(s)
        s.close()
        assert status == 400 and answer["errorCode"] == "code_invalid", answer  # read whole, then judged
        r = httpx.post(srv.url + "/api/verify", json={"code": "12345678"})
        assert r.status_code == 400 and r.json()["errorCode"] == "code_invalid"
