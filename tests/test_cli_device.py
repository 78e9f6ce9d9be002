"""Every device command as a user types it (click runner and real subprocesses)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import cli
from agent.clock import ManualClock, iso_date, utc_day
from agent.exposure.rule import WindowDecision
from agent.records import Exposure
from agent.store import KeyFile, Store
from backend import Backend, BackendConfig
from backend.server import BackgroundServer

from .helpers import DAY, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path):
    cfg = tmp_path / "ctagent.toml"
    e = {"CTAGENT_CONFIG": str(cfg), "CTAGENT_AGENT_FLUSH_INTERVAL_S": "1",
         # the machine's own clock state is not what these tests are about (tests/test_timesync.py)
         "CTAGENT_AGENT_CLOCK_CHECK": "off"}
    r = CliRunner().invoke(cli.main, ["init", "--data-dir", str(tmp_path / "data"), "--radio", "sim"], env=e)
    assert r.exit_code == 0, r.output
    assert oct((tmp_path / "data" / "master.key").stat().st_mode & 0o777) == "0o600"
    return e, tmp_path


def invoke(env, *args):
    return CliRunner().invoke(cli.main, list(args), env=env)


def daemon_status(tmp):
    path = tmp / "data" / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_until(e, tmp, condition, what):
    """``ctagent run --radio sim`` as a process, until ``condition(status)``; then SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--radio", "sim"], env={**os.environ, **e},
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: condition(daemon_status(tmp)), what=what)
    finally:
        proc.send_signal(signal.SIGTERM)
    t = time.monotonic()
    assert proc.wait(timeout=10) == 0, proc.stderr.read()
    assert time.monotonic() - t < 5
    return proc.stderr.read()


def test_run_sigterm_status_encounters_export_purge(env):
    e, tmp = env
    logs = run_until(e, tmp, lambda st: st.get("sightings", 0) > 0, "the daemon to hear its simulated peers")
    assert "daemon stopped cleanly" in logs
    assert "level=INFO" in logs  # structured, one line per event

    r = invoke(e, "status", "--json")
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    figures = st["daemon"]["figures"]  # the daemon's last figures, from before it stopped
    assert st["identifiers_heard"] >= 1 and st["own_keys"] == 1 and figures["rotations"] >= 1
    assert figures["mode"] == "normal" and st["protocol"] == "gaen" and st["daemon"]["running"] is False
    r = invoke(e, "status")
    assert "no exposure found" in r.output
    r = invoke(e, "encounters", "--json")
    rows = json.loads(r.output)
    assert rows and rows[0]["samples"] > 0
    assert "identifier-minutes" in invoke(e, "encounters").output

    r = invoke(e, "export", "--format", "json")
    assert r.exit_code == 1 and "consent" in r.output
    r = invoke(e, "export", "--consent", "--format", "json")
    data = json.loads(r.output)
    assert data and set(data[0]) >= {"pseudonym", "day", "samples"} and len(data[0]["pseudonym"]) == 12
    assert "rpi" not in r.output.lower()
    assert invoke(e, "export", "--consent").output.startswith("pseudonym,")

    assert invoke(e, "exposures").output.strip() == "no exposure found"
    r = invoke(e, "purge", "--yes")
    assert r.exit_code == 0 and not (tmp / "data" / "agent.db").exists()
    assert not any(p.name.startswith("agent.db") for p in (tmp / "data").iterdir())
    r = invoke(e, "status")
    assert r.exit_code == 1 and "ctagent init" in r.output and "Traceback" not in r.output


def test_declare_and_sync_against_a_live_backend(env):
    e, tmp = env
    clock = ManualClock(time.time())
    backend = Backend(BackendConfig(tmp / "backend", export_min_keys=10), clock=clock)
    with BackgroundServer(backend) as srv:
        e = {**e, "CTAGENT_SYNC_BACKEND_URL": srv.url, "CTAGENT_SYNC_TRUSTED_KEYS": backend.public_key_b64}
        r = invoke(e, "sync")
        assert r.exit_code == 0 and "0 new export file(s)" in r.output
        run_until(e, tmp, lambda st: st.get("rotations", 0) >= 1, "a first rotation (today's key)")
        code = backend.verification.issue_code("lab")["code"]
        r = invoke(e, "declare", "--code", code)  # asks first
        assert r.exit_code == 1 and "Aborted" in r.output and "Upload your 1 key(s)" in r.output
        r = invoke(e, "declare", "--code", code, "--yes")
        assert r.exit_code == 0 and "published: 1 key(s)" in r.output, r.output
        r = invoke(e, "declare", "--code", code, "--yes")
        assert r.exit_code == 1 and "already used" in r.output
        clock.advance(2 * DAY)  # after the embargo
        assert len(backend.exports.run()) == 1
        r = invoke(e, "sync", "--json")
        out = json.loads(r.output)
        assert out["files"] == 1 and out["keys"] >= 10 and out["exposed"] is False
        r = invoke(e, "exposures", "--json")
        assert json.loads(r.output) == []


def test_exposures_explain_for_both_families(env):
    """One shape for every family: a GAEN decision explains its windows, a ROBERT one
    says the server decided (this used to crash with KeyError: 'explain')."""
    e, tmp = env
    today = utc_day(time.time())  # the CLI runs on the real clock: recent days, or retention erases them
    window = WindowDecision(today * DAY + 600, 4, False, 48.2, 0.87, 1.0)
    with Store.open(tmp / "data" / "agent.db", KeyFile(tmp / "data" / "master.key")) as store:
        store.exposures.add(Exposure(day=today - 1, protocol="gaen", decided_by="distance", found_at=today * DAY,
                                     minutes=16.0, threshold_min=15.0, key_rolling_start=1, windows=(window,)))
        store.exposures.add(Exposure(day=today, protocol="robert", decided_by="server", found_at=today * DAY,
                                     risk=0.12))
    r = invoke(e, "exposures", "--explain")
    assert r.exit_code == 0, r.output
    assert "attenuation 48.2 dB, ~0.87 m, counted 1.0 min" in r.output
    assert "decided by the robert server (risk score 0.12)" in r.output
    doc = json.loads(invoke(e, "exposures", "--explain", "--json").output)
    assert [x["date"] for x in doc] == [iso_date(today - 1), iso_date(today)]
    assert doc[0]["windows"][0]["distance_m"] == 0.87 and doc[1]["windows"] == []
    assert "windows" not in json.loads(invoke(e, "exposures", "--json").output)[0]


def test_bad_configuration_names_file_key_and_reason(env):
    e, tmp = env
    cfg = tmp / "ctagent.toml"
    cfg.write_text(cfg.read_text().replace('kind = "sim"', 'kind = "wifi"'))
    r = invoke(e, "status")
    assert r.exit_code == 1 and str(cfg) in r.output and "[radio] kind" in r.output
    cfg.write_text("[agent]\nretention_dayz = 3\n")
    assert "[agent] retention_dayz: unknown setting" in invoke(e, "status").output
    cfg.write_text("[proximity]\ndistance_threshold_m = -1\n")
    assert "[proximity]" in invoke(e, "status").output
    cfg.write_text("")  # defaults; now the environment overrides
    r = invoke({**e, "CTAGENT_AGENT_RETENTION_DAYS": "many"}, "status")
    assert "$CTAGENT_AGENT_RETENTION_DAYS" in r.output
    r = invoke({**e, "CTAGENT_RADIO_DUTY_CYCLE": "often"}, "status")
    assert "[radio] duty_cycle" in r.output
    r = invoke({**e, "CTAGENT_RADIO_GATT_STATUS": "maybe"}, "status")
    assert "gatt_status" in r.output
    r = invoke({**e, "CTAGENT_AGENT_PROTOCOL": "dp3t"}, "status")
    assert r.exit_code == 1 and "[agent] protocol" in r.output and "'robert'" in r.output
    cfg.write_text(f'[agent]\ndata_dir = "{tmp / "data"}"\n')  # a store exists; the family checks its settings
    r = invoke({**e, "CTAGENT_SYNC_BACKEND_URL": "http://127.0.0.1:9"}, "status")
    assert r.exit_code == 1 and str(cfg) in r.output and "[sync] trusted_keys" in r.output
    r = invoke(e, "init", "--data-dir", str(tmp / "d2"))
    assert r.exit_code == 1 and "already exists" in r.output


def test_a_bug_is_reported_as_a_bug(env, monkeypatch):
    e, _ = env
    import agent.reports

    def broken(*a, **kw):
        raise KeyError("explain")

    monkeypatch.setattr(agent.reports, "status_report", broken)
    r = invoke(e, "status")
    assert r.exit_code == 2 and "bug in ctagent" in r.output and "--debug" in r.output
    assert "Traceback" not in r.output
    r = invoke(e, "--debug", "status")
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)  # --debug: the real exception


def test_doctor_without_bluetooth_says_so():
    r = CliRunner().invoke(cli.main, ["doctor"])
    if os.path.exists("/sys/class/bluetooth"):
        pytest.skip("this machine has Bluetooth")
    assert r.exit_code == 1 and "no Bluetooth in its kernel" in r.output


def test_run_with_the_bluez_radio_on_a_fake_bluetoothd(env):
    from .fake_bluez_fixture import FakeBluezEnv
    e, tmp = env
    fake = FakeBluezEnv(adapters=1)
    try:
        if not fake.start():
            pytest.skip(fake.skip_reason)
        e = {**e, "DBUS_SYSTEM_BUS_ADDRESS": fake.address, "CTAGENT_RADIO_KIND": "bluez",
             "CTAGENT_RADIO_DUTY_CYCLE": "1,1"}
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run"], env={**os.environ, **e},
                                stderr=subprocess.PIPE, text=True)
        try:
            # the duty cycle turns advertising off half the time, so wait for a fact that
            # stays true (a registration BlueZ accepted), not for the phase at one snapshot;
            # generous for a loaded CI machine (the real-stack VM runs beside this test)
            wait_until(lambda: (daemon_status(tmp).get("advertiser") or {}).get("last_rotation"),
                       timeout_s=60, what="BlueZ to accept the advertisement")
        except AssertionError:
            proc.kill()
            raise AssertionError(f"no registration; the daemon said: {proc.communicate()[1][-2000:]}") from None
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        st = daemon_status(tmp)
        assert st["rotations"] >= 1 and st["scanner"] is not None
    finally:
        fake.stop()


def test_robert_mode_commands(env):
    from backend.robert import RobertServer
    e, tmp = env
    backend = Backend(BackendConfig(tmp / "backend"), clock=ManualClock(time.time()))
    rs = RobertServer(backend)
    with BackgroundServer(backend, robert_server=rs) as srv:
        e = {**e, "CTAGENT_AGENT_PROTOCOL": "robert", "CTAGENT_SYNC_BACKEND_URL": srv.url}
        run_until(e, tmp, lambda st: st.get("rotations", 0) >= 1 and st.get("sightings", 0) > 0,
                  "registration, a broadcast and HELLOs heard")
        assert daemon_status(tmp)["protocol"] == "robert"
        st = json.loads(invoke(e, "status", "--json").output)
        assert st["identifiers_heard"] >= 1 and st["registered"] is True and st["server_call"] == "risk status"
        text = invoke(e, "status").output
        assert "heard        " in text and "registered   yes" in text and "last risk status" in text
        rows = json.loads(invoke(e, "encounters", "--json").output)
        assert rows and rows[0]["samples"] >= rows[0]["identifiers"] >= 1  # the HELLOs, per day
        code = backend.verification.issue_code("lab")["code"]
        r = invoke(e, "declare", "--code", code)
        assert r.exit_code == 1 and "HELLO(s) your device heard" in r.output  # asks first
        r = invoke(e, "declare", "--code", code, "--yes")
        # the sim peers' HELLOs were never issued by this server: none accepted, and why
        assert r.exit_code == 1 and "0 HELLO(s) accepted" in r.output, r.output
        assert "could verify none" in r.output and "did not register" in r.output
        r = invoke(e, "delete-history")
        assert r.exit_code == 1 and "cannot be undone" in r.output  # asks first
        r = invoke(e, "delete-history", "--yes")
        assert r.exit_code == 0, r.output
        r = invoke(e, "unregister", "--yes")
        assert r.exit_code == 0 and "unregistered" in r.output
        text = invoke(e, "status").output
        assert "registered   NO (left the server" in text and "`ctagent register` joins again" in text
        proc = subprocess.run([sys.executable, "-m", "cli", "run"], env={**os.environ, **e}, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 1 and "left the ROBERT server" in proc.stderr, proc.stderr  # no silent re-join
        assert "ctagent register" in proc.stderr
        r = invoke(e, "register")
        assert r.exit_code == 0 and "registered" in r.output, r.output
        assert json.loads(invoke(e, "status", "--json").output)["registered"] is True
    r = invoke({k: v for k, v in e.items() if k not in ("CTAGENT_AGENT_PROTOCOL", "CTAGENT_SYNC_BACKEND_URL")},
               "unregister", "--yes")
    assert r.exit_code == 1 and "ROBERT mode" in r.output
    r = invoke({k: v for k, v in e.items() if k not in ("CTAGENT_AGENT_PROTOCOL", "CTAGENT_SYNC_BACKEND_URL")},
               "register")
    assert r.exit_code == 1 and "ROBERT mode" in r.output
