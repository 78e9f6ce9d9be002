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
from agent.clock import ManualClock
from backend import Backend, BackendConfig

from .backend_helpers import LiveServer


@pytest.fixture
def env(tmp_path):
    cfg = tmp_path / "ctagent.toml"
    e = {"CTAGENT_CONFIG": str(cfg), "CTAGENT_AGENT_FLUSH_INTERVAL_S": "1"}
    r = CliRunner().invoke(cli.main, ["init", "--data-dir", str(tmp_path / "data"), "--radio", "sim"], env=e)
    assert r.exit_code == 0, r.output
    assert oct((tmp_path / "data" / "master.key").stat().st_mode & 0o777) == "0o600"
    return e, tmp_path


def invoke(env, *args):
    return CliRunner().invoke(cli.main, list(args), env=env)


def test_run_sigterm_status_encounters_export_purge(env):
    e, tmp = env
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--radio", "sim"], env={**os.environ, **e},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    status_file = tmp / "data" / "status.json"
    while time.time() < deadline and not (status_file.exists() and json.loads(status_file.read_text())["sightings"] > 0):
        time.sleep(0.3)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    t = time.time()
    assert proc.wait(timeout=10) == 0 and time.time() - t < 5
    logs = proc.stderr.read()
    assert "daemon stopped cleanly" in logs
    assert "level=INFO" in logs  # structured, one line per event

    r = invoke(e, "status", "--json")
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["encounters"] >= 1 and st["own_keys"] == 1 and st["daemon"]["rotations"] >= 1
    assert st["daemon"]["mode"] == "normal"
    r = invoke(e, "status")
    assert "no exposure found" in r.output
    r = invoke(e, "encounters", "--json")
    rows = json.loads(r.output)
    assert rows and rows[0]["samples"] > 0
    assert "identifiers heard" in invoke(e, "encounters").output

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
    r = invoke(e, "status")
    assert r.exit_code == 1 and "ctagent init" in r.output and "Traceback" not in r.output


def test_declare_and_sync_against_a_live_backend(env):
    e, tmp = env
    clock = ManualClock(time.time())
    backend = Backend(BackendConfig(tmp / "backend", export_min_keys=10), clock=clock)
    with LiveServer(backend) as srv:
        e = {**e, "CTAGENT_SYNC_BACKEND_URL": srv.url, "CTAGENT_SYNC_TRUSTED_KEYS": backend.public_key_b64}
        r = invoke(e, "sync")
        assert r.exit_code == 0 and "0 new export file(s)" in r.output
        # a key exists once the daemon rotated; make one with a short run
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--radio", "sim"], env={**os.environ, **e},
                                stderr=subprocess.DEVNULL)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        code = backend.verification.issue_code("lab")["code"]
        r = invoke(e, "declare", "--code", code)  # asks first
        assert r.exit_code == 1 and "Aborted" in r.output
        r = invoke(e, "declare", "--code", code, "--yes")
        assert r.exit_code == 0 and "published: 1 key(s)" in r.output, r.output
        r = invoke(e, "declare", "--code", code, "--yes")
        assert r.exit_code == 1 and "already used" in r.output
        clock.t = time.time() + 2 * 86400  # after the embargo
        assert len(backend.exports.run()) == 1
        r = invoke(e, "sync", "--json")
        out = json.loads(r.output)
        assert out["files"] == 1 and out["keys"] >= 10 and out["exposed"] is False
        r = invoke(e, "exposures", "--json")
        assert json.loads(r.output) == []


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
    r = invoke(e, "init", "--data-dir", str(tmp / "d2"))
    assert r.exit_code == 1 and "already exists" in r.output


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
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--radio", "bluez"],
                                env={**os.environ, **e, "DBUS_SYSTEM_BUS_ADDRESS": fake.address,
                                     "CTAGENT_RADIO_DUTY_CYCLE": "1,1"},
                                stderr=subprocess.PIPE, text=True)
        status_file = tmp / "data" / "status.json"
        deadline = time.time() + 15
        while time.time() < deadline:
            if status_file.exists() and (json.loads(status_file.read_text()).get("advertiser") or {}).get("advertising"):
                break
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        st = json.loads(status_file.read_text())
        assert st["rotations"] >= 1 and st["scanner"] is not None
    finally:
        fake.stop()


def test_robert_mode_commands(env):
    from backend.robert import RobertServer
    e, tmp = env
    backend = Backend(BackendConfig(tmp / "backend"))
    rs = RobertServer(backend)
    with LiveServer(backend, robert_server=rs) as srv:
        e = {**e, "CTAGENT_AGENT_PROTOCOL": "robert", "CTAGENT_SYNC_BACKEND_URL": srv.url}
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--radio", "sim"], env={**os.environ, **e},
                                stderr=subprocess.PIPE, text=True)
        status_file = tmp / "data" / "status.json"
        deadline = time.time() + 20
        while time.time() < deadline:
            if status_file.exists() and json.loads(status_file.read_text()).get("rotations", 0) >= 1:
                break
            time.sleep(0.3)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        assert json.loads(status_file.read_text())["protocol"] == "robert"
        code = backend.verification.issue_code("lab")["code"]
        r = invoke(e, "declare", "--code", code, "--yes")
        assert r.exit_code == 0 and "HELLO(s) accepted" in r.output, r.output
        assert "dropped" in r.output  # the sim peers' HELLOs were never issued by this server
        r = invoke(e, "delete-history")
        assert r.exit_code == 0, r.output
        r = invoke(e, "unregister", "--yes")
        assert r.exit_code == 0 and "unregistered" in r.output
    r = invoke({k: v for k, v in e.items() if k not in ("CTAGENT_AGENT_PROTOCOL", "CTAGENT_SYNC_BACKEND_URL")},
               "unregister", "--yes")
    assert r.exit_code == 1 and "ROBERT mode" in r.output
