"""Knowing the state: `status` tells running from stopped (pid, lock, ages), the real
radio state and what is failing; `ctagent stop`; systemd hears the truth (READY only
when the radios work, STATUS= current, a distinct exit when the radio never comes up);
`sync` does not reassure falsely."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from agent.ble.base import Radio
from agent.ble.sim import SimAdvertiser, SimScanner
from agent.clock import VirtualClock
from agent.daemon import EXIT_RADIO_DOWN, Daemon
from agent.errors import StoreError
from agent.modes.base import DeviceContext
from agent.modes.gaen import GaenMode

from .helpers import MIDNIGHT, wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def device(tmp_path):
    cfg = tmp_path / "ctagent.toml"
    env = {"CTAGENT_CONFIG": str(cfg), "CTAGENT_AGENT_FLUSH_INTERVAL_S": "1",
         # the machine's own clock state is not what these tests are about (tests/test_timesync.py)
         "CTAGENT_AGENT_CLOCK_CHECK": "off"}
    r = CliRunner().invoke(cli.main, ["init", "--data-dir", str(tmp_path / "data"), "--radio", "sim"], env=env)
    assert r.exit_code == 0, r.output
    return env, tmp_path


def invoke(env, *args):
    return CliRunner().invoke(cli.main, list(args), env=env)


def status(env):
    r = invoke(env, "status", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def start(env, **extra):
    return subprocess.Popen([sys.executable, "-m", "cli", "run"], env={**os.environ, **env, **extra}, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
def test_status_tells_running_from_stopped_with_pid_and_ages(device):
    env, tmp = device
    assert status(env)["daemon"]["running"] is False
    proc = start(env)
    try:
        wait_until(lambda: (status(env)["daemon"].get("figures") or {}).get("rotations", 0) >= 1,
                   what="the daemon's first rotation")
        d = status(env)["daemon"]
        assert d["running"] is True and d["pid"] == proc.pid
        assert 0 <= d["figures_age_s"] < 30 and d["radio"]["advertising"] is True
        text = invoke(env, "status").output
        assert f"running (pid {proc.pid})" in text and "s ago" in text
    finally:
        proc.send_signal(signal.SIGKILL)  # a power cut, as far as the store knows
        proc.wait()
    d = status(env)["daemon"]
    assert d["running"] is False and d["pid"] is None
    text = invoke(env, "status").output
    assert "stopped" in text and "mode=normal" not in text  # old figures are shown as old, not as the present


@pytest.mark.integration
def test_ctagent_stop(device):
    env, tmp = device
    r = invoke(env, "stop")
    assert r.exit_code == 0 and "not running" in r.output
    proc = start(env)
    try:
        wait_until(lambda: status(env)["daemon"]["running"], what="the daemon running")
        r = invoke(env, "stop")
        assert r.exit_code == 0 and f"stopped (pid {proc.pid})" in r.output
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status(env)["daemon"]["running"] is False


def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setblocking(False)
    return s, path


def messages(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.integration
def test_no_radio_no_ready_a_clear_log_line_and_a_distinct_exit(device):
    env, tmp = device
    sock, path = notify_socket(tmp)
    proc = start(env, CTAGENT_RADIO_KIND="bluez", CTAGENT_RADIO_START_ATTEMPTS="2", NOTIFY_SOCKET=path,
                 DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp / 'no-bus-here'}")
    code = proc.wait(timeout=60)
    err = proc.stderr.read()
    sent = messages(sock)
    assert code == EXIT_RADIO_DOWN
    assert not any("READY=1" in m for m in sent)
    assert any("STATUS=" in m and "radio" in m for m in sent)
    line = next(ln for ln in err.splitlines() if "level=ERROR" in ln and "radio" in ln)
    assert "no-bus-here" in line and "doctor" in line  # what failed, where, and what to do
    assert "FileNotFoundError" not in err or "No such file" in err  # the message, not only the class


@pytest.mark.integration
def test_ready_and_status_are_sent_when_the_radio_works(device):
    env, tmp = device
    sock, path = notify_socket(tmp)
    proc = start(env, NOTIFY_SOCKET=path)
    sent_all: list[str] = []
    try:
        wait_until(lambda: sent_all.extend(messages(sock)) or any("READY=1" in m for m in sent_all),
                   what="READY=1")
        wait_until(lambda: sent_all.extend(messages(sock)) or any("STATUS=" in m and "rotations" in m
                                                                   for m in sent_all), what="a current STATUS=")
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


async def test_failing_flushes_show_in_the_status(new_store, tmp_path, monkeypatch):
    clock = VirtualClock(MIDNIGHT)
    store = new_store()
    rng = random.Random(1)
    mode = GaenMode(DeviceContext(store=store, clock=clock, rng=rng, random_bytes=rng.randbytes))
    d = Daemon(mode, Radio(SimAdvertiser(clock), SimScanner(clock, peer_factory=GaenMode.simulated_peer, peers=2,
                                                            seed=2, tick_s=20)),
               clock=clock, rng=random.Random(3), flush_interval_s=60)

    def disk_full(_batch, closed=()):
        raise StoreError("cannot write to the store: database or disk is full")

    monkeypatch.setattr(store.encounters, "write", disk_full)
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(MIDNIGHT + 600)
    st = d.status()
    assert st["mode"] != "normal" and "flush" in st["failing"]
    assert "disk is full" in st["failing"]["flush"]["error"]
    monkeypatch.undo()
    await clock.run_until(MIDNIGHT + 1200)
    assert "flush" not in d.status()["failing"]  # it recovered, and says so
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0


@pytest.mark.integration
def test_sync_does_not_reassure_falsely(device):
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.clock import ManualClock
    from agent.protocol.export import public_key_b64
    from backend import Backend, BackendConfig
    from backend.server import BackgroundServer

    env, tmp = device
    r = invoke({**env, "CTAGENT_SYNC_BACKEND_URL": "http://127.0.0.1:9",
                "CTAGENT_SYNC_TRUSTED_KEYS": public_key_b64(ec.generate_private_key(ec.SECP256R1()))}, "sync")
    assert r.exit_code == 1 and "unreachable" in r.output
    backend = Backend(BackendConfig(tmp / "backend", export_min_keys=10), clock=ManualClock(time.time() + 86400))
    import sqlalchemy as sa

    from backend import db
    with backend.engine.begin() as c:  # one published key past its embargo
        c.execute(sa.insert(db.exposures).values(
            key_data=b"k" * 16, rolling_start=int(time.time() // 600 // 144 * 144 - 144), rolling_period=144,
            transmission_risk=0, report_type=1, days_since_onset=None, health_authority="x", received_at=0,
            export_after=0))
    assert backend.exports.run()
    with BackgroundServer(backend) as srv:
        wrong = {**env, "CTAGENT_SYNC_BACKEND_URL": srv.url,
                 "CTAGENT_SYNC_TRUSTED_KEYS": public_key_b64(ec.generate_private_key(ec.SECP256R1()))}
        r = invoke(wrong, "sync")
        assert r.exit_code == 1 and "failed verification" in r.output and "trusted_keys" in r.output
        right = {**wrong, "CTAGENT_SYNC_TRUSTED_KEYS": backend.public_key_b64}
        r = invoke(right, "sync")
        assert r.exit_code == 0 and "1 new export file(s), 10 key(s) checked; no exposure found" in r.output
