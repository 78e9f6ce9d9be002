"""The daemon on a virtual clock, several simulated days."""

import asyncio
import json
import os
import random
import socket
import sys

import pytest

from agent.agent import Agent
from agent.ble.simradio import SimAdvertiser, SimScanner
from agent.clock import VirtualClock
from agent.daemon import Daemon, sd_notify
from agent.exposure.calibration import DeviceCalibration
from agent.protocol import gaen
from agent.store import Store

from .helpers import fast_passphrase

DAY = 86_400
T0 = 20_000 * DAY
PI = DeviceCalibration("Raspberry Pi 3 Model B", 0.0, 4.0, 2)


def make(tmp_path, clock, retention=3, **kw):
    store = Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock, retention_days=retention)
    rng = random.Random(1)
    agent = Agent(store, calibration=PI, rng=rng, tek_factory=lambda: rng.randbytes(16), match_workers=1)
    adv = SimAdvertiser(clock)
    scan = SimScanner(clock, peers=3, seed=2, tick_s=30)
    return Daemon(agent, clock=clock, advertiser=adv, scanner=scan, status_path=tmp_path / "status.json",
                  rng=random.Random(3), flush_interval_s=300, **kw), adv


async def test_days_of_virtual_time(tmp_path):
    clock = VirtualClock(T0)
    d, adv = make(tmp_path, clock)
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(T0 + 5 * DAY - 3600)
    st = d.status()
    days = 5
    assert 144 * days - 8 <= adv.rotations <= 144 * days - 5  # one rotation per 10-minute interval
    assert st["mode"] == "normal" and st["sightings"] > 5_000 and not st["failures"]
    # retention (3 days) erased the first days: only the last 3 days of encounters remain
    assert sorted(d.agent.store.encounter_days()) == [T0 // DAY + 2, T0 // DAY + 3, T0 // DAY + 4]
    assert len(d.agent.store.teks()) == 3
    status_file = json.loads((tmp_path / "status.json").read_text())
    assert status_file["rotations"] == st["rotations"]
    assert oct((tmp_path / "status.json").stat().st_mode & 0o777) == "0o600"
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0
    # clean shutdown: the store reopens and nothing is lost
    s = Store.open(tmp_path / "agent.db", fast_passphrase(), clock=clock, retention_days=3)
    assert s.integrity_check() == "ok" and sum(s.encounter_days().values()) > 0
    s.close()


async def test_failing_scanner_degrades_not_dies(tmp_path):
    clock = VirtualClock(T0)
    d, adv = make(tmp_path, clock)

    async def broken():
        raise OSError("adapter gone")
        yield  # pragma: no cover

    d.scanner.sightings = broken
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(T0 + 3 * 3600)
    st = d.status()
    assert st["mode"] == "advertise only" and st["failures"]["scan"] >= 3
    assert adv.rotations >= 17  # advertising goes on
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0


async def test_exposure_hook_gets_date_and_minutes_only(tmp_path):
    clock = VirtualClock(T0 + 9 * 3600)
    out = tmp_path / "hook.txt"
    hook = f"{sys.executable} -c \"import os,sys; open({str(out)!r},'w').write(repr(sorted(k for k in os.environ if k.startswith('CTAGENT_EXPOSURE'))) + ' ' + os.environ['CTAGENT_EXPOSURE_DATE'])\""
    d, _ = make(tmp_path, clock, on_exposure=hook)
    d.agent.store.add_exposure(T0 // DAY, {"minutes": 22, "key_rolling_start": 1})
    await d._notify_new_exposures()
    assert out.read_text() == "['CTAGENT_EXPOSURE_DATE', 'CTAGENT_EXPOSURE_MINUTES'] 2024-10-04"
    assert d.hook_runs == 1
    await d._notify_new_exposures()
    assert d.hook_runs == 1  # once per exposure day
    d.agent.store.close()


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


async def test_robert_mode_on_a_virtual_clock(tmp_path):
    from agent.robert_agent import RobertDevice
    from backend import Backend, BackendConfig
    from backend.robert import RobertServer
    from backend.server import BackgroundServer

    clock = VirtualClock(T0 + 8 * 3600)
    backend = Backend(BackendConfig(tmp_path / "backend"), clock=clock)
    rs = RobertServer(backend)
    with BackgroundServer(backend, robert_server=rs) as srv:
        store = Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock)
        agent = Agent(store, calibration=PI, match_workers=1)
        dev = RobertDevice(store, srv.url, sleep=lambda s: None)
        adv = SimAdvertiser(clock)
        scan = SimScanner(clock, peers=2, seed=4, tick_s=20, protocol="robert")
        d = Daemon(agent, clock=clock, advertiser=adv, scanner=scan, robert=dev, flush_interval_s=120,
                   rng=random.Random(5))
        statuses = []
        real_status = dev.status
        dev.status = lambda now: statuses.append(now) or real_status(now)
        run = asyncio.create_task(d.run(install_signals=False))
        await clock.run_until(T0 + 11 * 3600)
        assert dev.registered
        assert 11 <= adv.rotations <= 14  # a new EBID + address each 15-minute epoch
        assert adv.updates >= 100  # fresh HELLOs within each epoch, same address
        assert len(adv.payload) == 18 and adv.payload[:1] != b""
        assert 3 <= len(statuses) <= 6 and all(b - a >= 1800 for a, b in zip(statuses, statuses[1:]))
        assert d.status()["robert_status"]["atRisk"] is False
        d.stop()
        assert await asyncio.wait_for(run, 5) == 0
        s = Store.open(tmp_path / "agent.db", fast_passphrase(), clock=clock)
        assert len(s.hellos()) > 100  # the HELLOs heard, encrypted at rest
        s.close()
