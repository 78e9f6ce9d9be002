"""Devices and the backend over real HTTP on 127.0.0.1: declare -> export -> sync -> match."""

import io
import random
import re
import zipfile

import httpx
import pytest

from agent.errors import BackendUnreachable
from agent.exposure.calibration import DeviceCalibration
from agent.modes.base import DeviceContext
from agent.modes.gaen import GaenMode
from agent.protocol import export
from agent.protocol.payload import EN_SERVICE_UUID

from .helpers import DAY

pytestmark = pytest.mark.integration
PI = DeviceCalibration("Raspberry Pi 3 Model B", 0.0, 4.0, 2)




@pytest.fixture
def device(new_store, clock, backend, live):
    """``device(name, seed, url=live server, trusted=its key)``: a GAEN device."""
    def make(name, seed, *, url=None, trusted=None):
        rng = random.Random(seed)
        ctx = DeviceContext(store=new_store(name), clock=clock, calibration=PI, rng=rng, random_bytes=rng.randbytes,
                            backend_url=live.url if url is None else url,
                            trusted_keys=(backend.public_key_b64,) if trusted is None else tuple(trusted),
                            match_workers=1, http_retries=1)
        return GaenMode(ctx)
    return make


def meet(a: GaenMode, b: GaenMode, clock, minutes: int, rssi: int) -> None:
    """a advertises, b hears it every 4 s for ``minutes``."""
    end = clock.t + minutes * 60
    on_air = a.broadcast(clock.t)
    while clock.t < end:
        if clock.t >= on_air.next_at:
            on_air = a.broadcast(clock.t)
        b.record(clock.t, b.decode({EN_SERVICE_UUID: on_air.service_data}), rssi)
        clock.advance(4)
    b.flush(clock.t, final=True)


def physician_issues_code(url: str) -> str:
    with httpx.Client(base_url=url, follow_redirects=True) as web:
        r = web.get("/")
        assert "Sign in" in r.text  # redirected to the login page
        form = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text).group(1)
        r = web.post("/login", data={"username": "dr.who", "password": "tardis-1963", "csrf": form})
        assert r.status_code == 200 and "Issue a verification code" in r.text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text).group(1)
        r = web.post("/issue", data={"csrf": csrf, "test_type": "confirmed", "onset": ""})
        assert r.status_code == 200 and "<svg" in r.text  # the QR code
        return re.search(r'id="code">(\d{8})<', r.text).group(1)


def test_end_to_end_declare_export_sync_match(clock, backend, live, device):
    alice, bob, carol = device("alice", 1), device("bob", 2), device("carol", 3)
    meet(alice, bob, clock, 25, rssi=-44)     # ~1 m for 25 minutes: exposure
    meet(alice, carol, clock, 25, rssi=-70)   # ~5 m: no exposure

    code = physician_issues_code(live.url)
    assert alice.declare(code, clock.t).accepted == 1

    assert backend.exports.run() == []  # today's key is embargoed until it expires
    clock.advance(DAY)
    files = backend.exports.run()
    assert len(files) == 1

    # the public key the agent trusts is published by the backend
    pub = httpx.get(live.url + "/v1/public-key").json()["publicKey"]
    assert pub == backend.public_key_b64
    ticks = []
    res, decisions = bob.sync(clock.t, progress=lambda done, total: ticks.append((done, total)))
    assert res.files_new == 1 and res.key_count >= 50  # padded
    assert ticks == [(0, 1), (1, 1)]
    assert [d.exposed for d in decisions] == [True]
    assert bob.store.exposures.days() == [20000]
    (exposure,) = bob.store.exposures.all()
    assert exposure.minutes >= 15 and exposure.windows and exposure.decided_by == "distance"
    _, decisions = carol.sync(clock.t)
    assert not any(d.exposed for d in decisions) and carol.store.exposures.all() == []

    # second sync: index unchanged (ETag) -> nothing downloaded
    res, _ = bob.sync(clock.t)
    assert res.not_modified and res.files_new == 0


def test_wrong_signing_key_and_tampered_export(clock, backend, live, device):
    from cryptography.hazmat.primitives.asymmetric import ec

    alice, bob = device("a", 1), device("b", 2)
    meet(alice, bob, clock, 20, rssi=-44)
    alice.declare(backend.verification.issue_code("lab")["code"], clock.t)
    clock.advance(DAY)
    (name,) = backend.exports.run()
    stranger = export.public_key_b64(ec.generate_private_key(ec.SECP256R1()))
    bob.client.trusted_keys = [stranger]  # a device configured with the wrong key
    res, dec = bob.sync(clock.t)
    assert res.files_failed == (name,) and dec == [] and bob.store.exposures.all() == []
    bob.client.trusted_keys = [backend.public_key_b64]
    # tamper with the file on the server: verification fails, nothing matched or stored
    path = backend.config.exports_dir / name
    b, s = export.unzip_export(path.read_bytes())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("export.bin", b[:-1] + bytes([b[-1] ^ 1]))
        z.writestr("export.sig", s)
    original = path.read_bytes()
    path.write_bytes(buf.getvalue())
    res, _ = bob.sync(clock.t)
    assert res.files_failed == (name,) and bob.store.exposures.all() == []
    path.write_bytes(original)  # the next sync retries the failed file
    res, _ = bob.sync(clock.t)
    assert res.files_new == 1 and bob.store.exposures.days() == [20000]


def test_offline_device(backend, clock, device):
    c = backend.verification.issue_code("lab")
    clock.advance(3600)  # the short code expired, the long one still works
    assert backend.verification.verify_code(c["longCode"], "x")["token"]
    offline = device("offline", 9, url="http://127.0.0.1:9")
    res, dec = offline.sync(clock.t)
    assert res.offline and dec == []
    assert offline.check(clock.t).offline
    offline.broadcast(clock.t)  # today's key exists
    with pytest.raises(BackendUnreachable, match="unreachable"):
        offline.declare("12345678", clock.t)
