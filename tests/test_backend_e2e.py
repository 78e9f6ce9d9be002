"""Backend and agent sync over real HTTP on 127.0.0.1."""

import base64
import json
import random
import re

import httpx
import pytest

from agent.agent import Agent
from agent.exposure.calibration import DeviceCalibration
from agent.exposure.encounter import Sighting
from agent.protocol import export, gaen
from agent.protocol.verification import PublishKey, tek_hmac
from agent.store import Store
from agent.sync import DeclareError, SyncClient
from agent.sync.client import teks_to_upload
from backend import Backend, BackendConfig

from .backend_helpers import LiveServer
from .conftest import database_url
from .helpers import FakeClock, fast_passphrase

DAY = 86_400
T0 = 20_000 * DAY + 9 * 3600
PI = DeviceCalibration("Raspberry Pi 3 Model B", 0.0, 4.0, 2)


@pytest.fixture
def clock():
    return FakeClock(T0)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path, clock):
    b = Backend(BackendConfig(tmp_path / "backend", database_url=database_url(request), export_min_keys=50),
                clock=clock)
    b.verification.add_user("dr.who", "tardis-1963")
    yield b
    b.engine.dispose()


@pytest.fixture
def live(backend):
    with LiveServer(backend) as srv:
        yield srv


def make_agent(tmp_path, name, clock, seed):
    rng = random.Random(seed)
    store = Store.create(tmp_path / f"{name}.db", fast_passphrase(), clock=clock)
    return Agent(store, calibration=PI, rng=rng, tek_factory=lambda: rng.randbytes(16), match_workers=1)


def physician_issues_code(url: str) -> str:
    with httpx.Client(base_url=url, follow_redirects=True) as web:
        r = web.get("/")
        assert "Sign in" in r.text  # redirected to the login page
        r = web.post("/login", data={"username": "dr.who", "password": "tardis-1963"})
        assert r.status_code == 200 and "Issue a verification code" in r.text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text).group(1)
        r = web.post("/issue", data={"csrf": csrf, "test_type": "confirmed", "onset": ""})
        assert r.status_code == 200 and "<svg" in r.text  # the QR code
        return re.search(r'id="code">(\d{8})<', r.text).group(1)


def meet(a: Agent, b: Agent, clock, minutes: int, rssi: int):
    """a advertises, b hears it every 4 s for ``minutes``."""
    end = clock.t + minutes * 60
    rot = a.rotate(clock.t)
    while clock.t < end:
        if clock.t >= rot.next_at:
            rot = a.rotate(clock.t)
        b.on_sighting(Sighting(clock.t, rot.payload.rpi, rot.payload.aem, rssi))
        clock.advance(4)
    b.flush(clock.t, final=True)


def test_end_to_end_declare_export_sync_match(tmp_path, clock, backend, live):
    alice, bob, carol = (make_agent(tmp_path, n, clock, s) for n, s in (("alice", 1), ("bob", 2), ("carol", 3)))
    meet(alice, bob, clock, 25, rssi=-44)     # ~1 m for 25 minutes: exposure
    meet(alice, carol, clock, 25, rssi=-70)   # ~5 m: no exposure

    code = physician_issues_code(live.url)
    client = SyncClient(live.url, trusted_keys=[backend.public_key_b64], sleep=lambda s: None)
    resp = alice.store and client.declare(code, teks_to_upload(alice.store, clock.t), alice.store, now=clock.t)
    assert resp["insertedExposures"] == 1

    assert backend.exports.run() == []  # today's key is embargoed until it expires
    clock.advance(DAY)
    files = backend.exports.run()
    assert len(files) == 1

    # the public key the agent trusts is published by the backend
    pub = httpx.get(live.url + "/v1/public-key").json()["publicKey"]
    assert pub == backend.public_key_b64
    ticks = []
    res, decisions = bob.sync(client, clock.t, progress=lambda done, total: ticks.append((done, total)))
    assert res.files_new == 1 and len(res.keys) >= 50  # padded
    assert ticks == [(0, 1), (1, 1)]
    assert [d.exposed for d in decisions] == [True]
    assert bob.exposed_days() == [20000]
    exp = bob.store.exposures()[0]
    assert exp["minutes"] >= 15 and exp["explain"]["windows"]
    _, decisions = carol.sync(client, clock.t)
    assert not any(d.exposed for d in decisions) and carol.exposed_days() == []

    # second sync: index unchanged (ETag) -> nothing downloaded
    res, _ = bob.sync(client, clock.t)
    assert res.not_modified and res.files_new == 0


def test_wrong_signing_key_and_tampered_export(tmp_path, clock, backend, live):
    alice, bob = make_agent(tmp_path, "a", clock, 1), make_agent(tmp_path, "b", clock, 2)
    meet(alice, bob, clock, 20, rssi=-44)
    code = backend.verification.issue_code("lab")["code"]
    good = SyncClient(live.url, trusted_keys=[backend.public_key_b64], sleep=lambda s: None)
    good.declare(code, teks_to_upload(alice.store, clock.t), alice.store, now=clock.t)
    clock.advance(DAY)
    (name,) = backend.exports.run()
    from cryptography.hazmat.primitives.asymmetric import ec
    stranger = export.public_key_b64(ec.generate_private_key(ec.SECP256R1()))
    bad = SyncClient(live.url, trusted_keys=[stranger], sleep=lambda s: None)
    res, dec = bob.sync(bad, clock.t)
    assert res.files_failed == [name] and dec == [] and bob.exposed_days() == []
    # tamper with the file on the server: verification fails, nothing matched or stored
    path = backend.config.exports_dir / name
    b, s = export.unzip_export(path.read_bytes())
    import io, zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("export.bin", b[:-1] + bytes([b[-1] ^ 1]))
        z.writestr("export.sig", s)
    original = path.read_bytes()
    path.write_bytes(buf.getvalue())
    res, dec = bob.sync(good, clock.t)
    assert res.files_failed == [name] and bob.exposed_days() == []
    path.write_bytes(original)  # the next sync retries the failed file
    res, dec = bob.sync(good, clock.t)
    assert res.files_new == 1 and bob.exposed_days() == [20000]


def api(url, path, body=None, raw=None, headers=None):
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={"content-type": "application/json", **(headers or {})})
    return httpx.post(url + path, json=body, headers=headers)


def valid_publish(backend, now, n_keys=2, hmac_key=b"k" * 32, tamper_hmac=False):
    code = backend.verification.issue_code("lab")["code"]
    token = backend.verification.verify_code(code, "t")["token"]
    rs = gaen.rolling_start_for_day(now) - 144
    keys = [PublishKey(bytes([i]) * 16, rs - 144 * i, 144, 0) for i in range(n_keys)]
    mac = tek_hmac(hmac_key, keys if not tamper_hmac else keys[:1])
    cert = backend.verification.certificate(token, mac)["certificate"]
    return {"temporaryExposureKeys": [{"key": base64.b64encode(k.key).decode(), "rollingStartNumber": k.rolling_start,
                                       "rollingPeriod": 144, "transmissionRisk": 0} for k in keys],
            "healthAuthorityID": "x", "verificationPayload": cert, "hmacKey": base64.b64encode(hmac_key).decode(),
            "padding": ""}


def count_exposures(backend):
    import sqlalchemy as sa
    from backend import db
    with backend.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(db.exposures)).scalar()


def test_negative_cases_each_clear_and_nothing_stored(backend, live, clock):
    url = live.url
    code = backend.verification.issue_code("lab")["code"]
    assert api(url, "/api/verify", {"code": code}).status_code == 200
    r = api(url, "/api/verify", {"code": code})
    assert r.status_code == 400 and r.json()["code"] == "code_used"
    old = backend.verification.issue_code("lab")["code"]
    clock.advance(16 * 60)
    r = api(url, "/api/verify", {"code": old})
    assert r.json()["code"] == "code_expired"
    r = api(url, "/api/verify", {"code": "12345678"})
    assert r.json()["code"] == "code_invalid"
    r = api(url, "/api/verify", raw=b'{"code": "1234')
    assert r.status_code == 400 and r.json()["code"] == "unparsable_request"
    r = api(url, "/api/verify", {"code": "12345678", "extra": 1})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"

    body = valid_publish(backend, clock.t, tamper_hmac=True)
    r = api(url, "/v1/publish", body)
    assert r.status_code == 400 and r.json()["code"] == "hmac_mismatch"
    body = valid_publish(backend, clock.t)
    body["unknownField"] = True
    assert api(url, "/v1/publish", body).json()["code"] == "invalid_request"
    body = valid_publish(backend, clock.t)
    body["padding"] = "A" * 70_000
    r = api(url, "/v1/publish", body)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    body = valid_publish(backend, clock.t)
    body["temporaryExposureKeys"] = body["temporaryExposureKeys"] * 16  # 32 keys
    assert api(url, "/v1/publish", body).json()["code"] == "too_many_keys"
    body = valid_publish(backend, clock.t)
    body["temporaryExposureKeys"][0]["rollingPeriod"] = 145
    assert api(url, "/v1/publish", body).json()["code"] == "key_invalid"
    body = valid_publish(backend, clock.t)
    body["verificationPayload"] = body["verificationPayload"][:-4] + "AAAA"
    assert api(url, "/v1/publish", body).json()["code"] == "certificate_invalid"
    assert count_exposures(backend) == 0  # nothing partial from any rejected request

    body = valid_publish(backend, clock.t)
    r = api(url, "/v1/publish", body)
    assert r.status_code == 200 and r.json()["insertedExposures"] == 2
    r = api(url, "/v1/publish", body)  # an identical retry is idempotent
    assert r.status_code == 200 and count_exposures(backend) == 2


def test_keys_too_old_or_in_future(backend, live, clock):
    for rs, code in ((gaen.rolling_start_for_day(clock.t) - 17 * 144, "key_too_old"),
                     (gaen.en_interval_number(clock.t) + 10, "key_in_future")):
        token = backend.verification.verify_code(backend.verification.issue_code("lab")["code"], "t")["token"]
        keys = [PublishKey(b"q" * 16, rs, 144, 0)]
        cert = backend.verification.certificate(token, tek_hmac(b"h" * 32, keys))["certificate"]
        body = {"temporaryExposureKeys": [{"key": base64.b64encode(b"q" * 16).decode(), "rollingStartNumber": rs,
                                           "rollingPeriod": 144}], "verificationPayload": cert,
                "hmacKey": base64.b64encode(b"h" * 32).decode()}
        assert api(live.url, "/v1/publish", body).json()["code"] == code


def test_lab_api_needs_key_and_rate_limits(backend, live):
    assert api(live.url, "/api/issue", {}).status_code == 401
    key = backend.verification.add_api_key("lab-1")
    r = api(live.url, "/api/issue", {"testType": "confirmed"}, headers={"X-API-Key": key})
    assert r.status_code == 200 and len(r.json()["code"]) == 8 and len(r.json()["longCode"]) == 16
    backend.config.rate_verify_per_min = 3
    codes = [api(live.url, "/api/verify", {"code": "00000000"}).status_code for _ in range(4)]
    assert codes[-1] == 429


def test_long_code_and_offline_agent(tmp_path, backend, live, clock):
    c = backend.verification.issue_code("lab")
    clock.advance(3600)  # the short code expired, the long one still works
    assert backend.verification.verify_code(c["longCode"], "x")["token"]
    agent = make_agent(tmp_path, "offline", clock, 9)
    dead = SyncClient("http://127.0.0.1:9", trusted_keys=[backend.public_key_b64], sleep=lambda s: None, retries=1)
    res, dec = agent.sync(dead, clock.t)
    assert res.offline and dec == []
    agent.rotate(clock.t)
    with pytest.raises(DeclareError, match="unreachable"):
        dead.declare("12345678", teks_to_upload(agent.store, clock.t), agent.store, now=clock.t)
