"""``ctagent run --radio bumble`` as real processes: two agents, each on its own virtual
controller (``python -m agent.ble.bumble.vhci`` serving them on tcp-server transports, a
legacy-only and an extended one, 1 m apart), hear each other and record sightings with
the modelled RSSI; and the bumble settings' errors name file, key and reason."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli

from .helpers import wait_until

pytest.importorskip("bumble")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init(tmp: Path, name: str, **settings: str) -> dict[str, str]:
    env = {"CTAGENT_CONFIG": str(tmp / f"{name}.toml"), "CTAGENT_AGENT_FLUSH_INTERVAL_S": "1"}
    sets = [a for k, v in settings.items() for a in ("--set", f"radio.{k}={v}")]
    r = CliRunner().invoke(cli.main, ["init", "--data-dir", str(tmp / name), "--radio", "sim", *sets], env=env)
    assert r.exit_code == 0, r.output
    return env


def status(tmp: Path, name: str) -> dict:
    path = tmp / name / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.integration
def test_two_agents_on_bumble_controllers_record_each_other(tmp_path: Path) -> None:
    ports = {"alice": free_port(), "bob": free_port()}
    controllers = subprocess.Popen(
        [sys.executable, "-m", "agent.ble.bumble.vhci", "alice=0,0", "bob=1,0:legacy", "--duration", "60",
         *[a for n, p in ports.items() for a in ("--transport", f"{n}=tcp-server:127.0.0.1:{p}")]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agents: dict[str, subprocess.Popen[str]] = {}
    try:
        assert controllers.stdout is not None
        lines = [json.loads(controllers.stdout.readline()) for _ in range(3)]
        assert lines[-1] == {"ready": True} and [x["kind"] for x in lines[:2]] == ["extended", "legacy"]
        for name, port in ports.items():
            env = init(tmp_path, name, bumble_snoop=str(tmp_path / f"{name}.btsnoop"))
            env |= {"CTAGENT_RADIO_BUMBLE_TRANSPORT": f"tcp-client:127.0.0.1:{port}"}
            agents[name] = subprocess.Popen([sys.executable, "-m", "cli", "run", "--radio", "bumble"],
                                            env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: all(status(tmp_path, n).get("rows_written", 0) > 0 for n in agents),
                   timeout_s=40, what="both agents to record sightings")
    finally:
        for proc in agents.values():
            proc.send_signal(signal.SIGTERM)
        errors = {n: (p.wait(timeout=10), p.stderr.read() if p.stderr else "") for n, p in agents.items()}
        controllers.send_signal(signal.SIGTERM)
        out, _ = controllers.communicate(timeout=10)
    for name, (code, stderr) in errors.items():
        assert code == 0, stderr
        st = status(tmp_path, name)
        assert st["advertiser"]["advertising"] is False and st["rotations"] >= 1 and st["sightings"] > 0
        assert oct((tmp_path / f"{name}.btsnoop").stat().st_mode & 0o777) == "0o600"
    assert json.loads(out.strip().splitlines()[-1])["delivered"] > 0
    r = CliRunner().invoke(cli.main, ["encounters"], env=init_env(tmp_path, "bob"))
    assert r.exit_code == 0 and "minute" in r.output.lower(), r.output


def init_env(tmp: Path, name: str) -> dict[str, str]:
    return {"CTAGENT_CONFIG": str(tmp / f"{name}.toml")}


def test_bumble_settings_are_checked(tmp_path: Path) -> None:
    env = init(tmp_path, "dev")
    cfg = tmp_path / "dev.toml"

    def status_output(**env_over: str) -> str:
        r = CliRunner().invoke(cli.main, ["status"], env={**env, **env_over})
        assert r.exit_code == 1, r.output
        return r.output

    out = status_output(CTAGENT_RADIO_KIND="bumble")
    assert "[radio] bumble_transport" in out and "usb:0" in out
    out = status_output(CTAGENT_RADIO_KIND="bumble", CTAGENT_RADIO_BUMBLE_TRANSPORT="bluetooth:0")
    assert "[radio] bumble_transport" in out and "unknown transport 'bluetooth'" in out
    out = status_output(CTAGENT_RADIO_KIND="bumble", CTAGENT_RADIO_BUMBLE_TRANSPORT="tcp-client:localhost")
    assert "HOST:PORT" in out
    out = status_output(CTAGENT_RADIO_KIND="bumble", CTAGENT_RADIO_BUMBLE_TRANSPORT="serial:/dev/ttyACM0,fast")
    assert "serial:DEVICE[,BAUD]" in out
    cfg.write_text(cfg.read_text().replace('kind = "sim"', 'kind = "bumble"').replace(
        'bumble_transport = ""', 'bumble_transport = "usb:0"').replace("gatt_status = false", "gatt_status = true"))
    out = status_output()
    assert str(cfg) in out and "[radio] gatt_status" in out and "bumble" in out


@pytest.mark.integration
def test_run_without_the_controller_says_which_transport_and_exits_3(tmp_path: Path) -> None:
    env = init(tmp_path, "dev") | {"CTAGENT_RADIO_BUMBLE_TRANSPORT": f"tcp-client:127.0.0.1:{free_port()}",
                                   "CTAGENT_RADIO_START_ATTEMPTS": "1"}
    r = subprocess.run([sys.executable, "-m", "cli", "run", "--radio", "bumble"], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "bumble.TransportUnavailable" in r.stderr and "tcp-client:127.0.0.1" in r.stderr


@pytest.mark.integration
def test_doctor_on_a_bumble_controller(tmp_path: Path) -> None:
    port = free_port()
    controllers = subprocess.Popen(
        [sys.executable, "-m", "agent.ble.bumble.vhci", "pi3=0,0:legacy", "--duration", "30",
         "--transport", f"pi3=tcp-server:127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
    try:
        assert controllers.stdout is not None
        while json.loads(controllers.stdout.readline()) != {"ready": True}:
            pass
        r = CliRunner().invoke(cli.main, ["doctor", "--json", "--radio", "bumble", "--transport",
                                          f"tcp-client:127.0.0.1:{port}"],
                               env={"CTAGENT_CONFIG": str(tmp_path / "none.toml")})
    finally:
        controllers.send_signal(signal.SIGTERM)
        controllers.communicate(timeout=10)
    checks = {c["name"]: c for c in json.loads(r.output)["checks"]}
    assert all(c["ok"] for name, c in checks.items() if name != "clock"), checks  # this machine's clock may not be
    assert "Bluetooth 4.1" in checks[f"transport tcp-client:127.0.0.1:{port}"]["detail"]
    assert "scanning off" in checks["rotation while scanning"]["detail"]
    r = CliRunner().invoke(cli.main, ["doctor", "--radio", "bumble", "--transport", "usb"],
                           env={"CTAGENT_CONFIG": str(tmp_path / "none.toml")})
    assert r.exit_code == 1 and "usb:0" in r.output
