"""The daemon on a virtual clock, several simulated days, both protocol families."""

import asyncio
import base64
import json
import random
import socket
import sys

import pytest

from agent.ble.base import Radio
from agent.ble.sim import SimAdvertiser, SimScanner
from agent.clock import VirtualClock
from agent.daemon import Daemon, sd_notify
from agent.exposure.calibration import DeviceCalibration
from agent.modes.base import DeviceContext
from agent.modes.gaen import GaenMode
from agent.modes.robert import RobertMode
from agent.records import Exposure
from agent.store import Store

from .helpers import DAY, MIDNIGHT, fast_passphrase

PI = DeviceCalibration("Raspberry Pi 3 Model B", 0.0, 4.0, 2)


def make(tmp_path, clock, retention=3, mode_cls=GaenMode, tick_s=30, peers=3, backend_url="", **kw):
    store = Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock, retention_days=retention)
    rng = random.Random(1)
    mode = mode_cls(DeviceContext(store=store, clock=clock, calibration=PI, rng=rng, random_bytes=rng.randbytes,
                                  backend_url=backend_url, match_workers=1))
    adv = SimAdvertiser(clock)
    scan = SimScanner(clock, peer_factory=mode_cls.simulated_peer, peers=peers, seed=2, tick_s=tick_s)
    daemon = Daemon(mode, Radio(adv, scan), clock=clock, status_path=tmp_path / "status.json", rng=random.Random(3),
                    **{"flush_interval_s": 300, **kw})
    return daemon, adv


async def test_days_of_virtual_time(tmp_path):
    clock = VirtualClock(MIDNIGHT)
    d, adv = make(tmp_path, clock)
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(MIDNIGHT + 5 * DAY - 3600)
    st = d.status()
    days = 5
    assert 144 * days - 8 <= adv.rotations <= 144 * days - 5  # one rotation per 10-minute interval
    assert st["mode"] == "normal" and st["sightings"] > 5_000 and not st["failures"]
    assert st["rotations"] == adv.rotations and st["protocol"] == "gaen"
    # retention (3 days) erased the first days: only the last 3 days of encounters remain
    assert sorted(d.store.encounters.count_by_day()) == [MIDNIGHT // DAY + 2, MIDNIGHT // DAY + 3, MIDNIGHT // DAY + 4]
    assert len(d.store.teks.all()) == 3 and st["protocol_status"]["own_keys"] == 3
    status_file = json.loads((tmp_path / "status.json").read_text())
    assert status_file["sightings"] > 5_000
    assert oct((tmp_path / "status.json").stat().st_mode & 0o777) == "0o600"
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0
    # clean shutdown: the store reopens and nothing is lost
    s = Store.open(tmp_path / "agent.db", fast_passphrase(), clock=clock, retention_days=3)
    assert s.integrity_check() == "ok" and sum(s.encounters.count_by_day().values()) > 0
    s.close()


async def test_failing_scanner_degrades_not_dies(tmp_path):
    clock = VirtualClock(MIDNIGHT)
    d, adv = make(tmp_path, clock)

    async def broken():
        raise OSError("adapter gone")
        yield  # pragma: no cover

    d.scanner.sightings = broken
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(MIDNIGHT + 3 * 3600)
    st = d.status()
    assert st["mode"] == "advertise only" and st["failures"]["scan"] >= 3
    assert adv.rotations >= 17  # advertising goes on
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0


async def test_duty_cycle_on_the_virtual_clock(tmp_path):
    clock = VirtualClock(MIDNIGHT)
    d, adv = make(tmp_path, clock, tick_s=4, duty_cycle=(20.0, 10.0))
    run = asyncio.create_task(d.run(install_signals=False))
    seen = []
    for k in range(1, 31):  # every 2 s for a minute: which phase is on
        await clock.run_until(MIDNIGHT + 2 * k)
        seen.append((d.advertiser.health().advertising, d.scanner.health().scanning))
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0
    assert (True, False) in seen and (False, True) in seen and (True, True) not in seen
    assert sum(a for a, _ in seen) / len(seen) > 0.5  # advertising 20 s of every 30


async def test_exposure_hook_gets_date_and_minutes_only(tmp_path):
    clock = VirtualClock(MIDNIGHT + 9 * 3600)
    out = tmp_path / "hook.txt"
    hook = (f"{sys.executable} -c \"import os,sys; open({str(out)!r},'w').write(repr(sorted(k for k in os.environ "
            "if k.startswith('CTAGENT_EXPOSURE'))) + ' ' + os.environ['CTAGENT_EXPOSURE_DATE'])\"")
    d, _ = make(tmp_path, clock, on_exposure=hook)
    d.store.exposures.add(Exposure(day=MIDNIGHT // DAY, protocol="gaen", decided_by="distance", found_at=clock.now(),
                                   minutes=22.0, key_rolling_start=1))
    await d._notify_new_exposures()
    assert out.read_text() == "['CTAGENT_EXPOSURE_DATE', 'CTAGENT_EXPOSURE_MINUTES'] 2024-10-04"
    assert d.hook_runs == 1
    await d._notify_new_exposures()
    assert d.hook_runs == 1  # once per exposure day
    d.store.close()


def test_sd_notify_datagram(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify("READY=1")
    assert srv.recv(100) == b"READY=1"
    srv.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


@pytest.mark.integration
async def test_robert_mode_on_a_virtual_clock(tmp_path):
    from backend import Backend, BackendConfig
    from backend.robert import RobertServer
    from backend.server import BackgroundServer

    clock = VirtualClock(MIDNIGHT + 8 * 3600)
    backend = Backend(BackendConfig(tmp_path / "backend"), clock=clock)
    with BackgroundServer(backend, robert_server=RobertServer(backend)) as srv:
        d, adv = make(tmp_path, clock, mode_cls=RobertMode, tick_s=20, peers=2, backend_url=srv.url,
                      flush_interval_s=120)
        statuses = []
        real_status = d.mode.status
        d.mode.status = lambda now: statuses.append(now) or real_status(now)
        run = asyncio.create_task(d.run(install_signals=False))
        await clock.run_until(MIDNIGHT + 11 * 3600)
        assert d.mode.registered
        assert 11 <= adv.rotations <= 14  # a new EBID + address each 15-minute epoch
        assert adv.updates >= 100  # fresh HELLOs within each epoch, same address
        assert len(adv.payload) == 18
        assert 3 <= len(statuses) <= 6 and all(b - a >= 1800 for a, b in zip(statuses, statuses[1:]))
        st = d.status()
        assert st["protocol"] == "robert" and st["protocol_status"]["at_risk"] is False
        assert st["last_check"]["atRisk"] is False and st["sightings"] > 100
        d.stop()
        assert await asyncio.wait_for(run, 5) == 0
        s = Store.open(tmp_path / "agent.db", fast_passphrase(), clock=clock)
        assert len(s.hellos.all()) > 100  # the HELLOs heard, encrypted at rest
        s.close()


@pytest.mark.parametrize(("chaff_interval_s", "days"), [(0, 8), (DAY, 16)])
async def test_cover_traffic_on_the_virtual_clock(tmp_path, chaff_interval_s, days):
    """[sync] chaff_interval_s: on average that often, at random times, a declaration's
    three requests marked X-Chaff: 1 and padded as real ones; none by default (0). The
    sync goes on as usual meanwhile."""
    import httpx

    requests, chaff_times = [], []

    def server(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.headers.get("x-chaff") and request.url.path == "/api/verify":
            chaff_times.append(clock.now())
        if request.url.path.endswith("index.txt"):
            return httpx.Response(404)
        return httpx.Response(200, json={})

    clock = VirtualClock(MIDNIGHT)
    store = Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock, retention_days=3)
    rng = random.Random(4)
    with httpx.Client(transport=httpx.MockTransport(server)) as http:
        mode = GaenMode(DeviceContext(store=store, clock=clock, calibration=PI, rng=rng, random_bytes=rng.randbytes,
                                      backend_url="https://keys.example", trusted_keys=("unused",), http=http,
                                      http_retries=0, chaff_interval_s=chaff_interval_s, match_workers=1))
        daemon = Daemon(mode, Radio(SimAdvertiser(clock), SimScanner(clock, peer_factory=GaenMode.simulated_peer,
                                                                     peers=0, seed=2, tick_s=3600)),
                        clock=clock, status_path=tmp_path / "status.json", rng=random.Random(5), flush_interval_s=3600)
        run = asyncio.create_task(daemon.run(install_signals=False))
        await clock.run_until(MIDNIGHT + days * DAY)
        daemon.stop()
        assert await asyncio.wait_for(run, 5) == 0
    chaff = [r for r in requests if r.headers.get("x-chaff") == "1"]
    assert [r for r in requests if r.url.path.endswith("index.txt")]  # the syncs went on
    if not chaff_interval_s:
        assert chaff == [] and daemon.chaff_sent == 0
        return
    # a 4-hour tick (plus up to 2 h), sending with probability 1/6: about 13 in 16 days (seeded)
    assert 5 <= daemon.chaff_sent <= 22 and len(chaff) == 3 * daemon.chaff_sent
    assert [r.url.path for r in chaff[:3]] == ["/api/verify", "/api/certificate", "/v1/publish"]
    assert all(5000 <= len(r.content) <= 5003 for r in chaff)  # as padded as a real declaration's
    gaps_h = {round((b - a) / 3600) for a, b in zip(chaff_times, chaff_times[1:])}
    assert len(gaps_h) > 3 and min(gaps_h) >= 4  # not periodic; never closer than a tick


def test_declaration_requests_are_padded_as_the_android_app_pads_them():
    from agent.sync.http import json_bytes
    from agent.sync.keyserver import PADDED_REQUEST_BYTES, padded

    for body in ({"code": "12345678"}, {"token": "t" * 43, "ekeyhmac": "h" * 44}, {"x": "y" * 4900}):
        size = len(json_bytes(padded(body)))
        assert PADDED_REQUEST_BYTES <= size <= PADDED_REQUEST_BYTES + 3, (body.keys(), size)
    near = padded({"x": "y" * 4990})  # 4,998 bytes: one byte of padding takes it over, as in the app
    assert len(base64.b64decode(near["padding"])) == 1
    large = {"x": "y" * 6000}
    assert padded(large) == large  # already over: no padding, as Padding.addPadding
