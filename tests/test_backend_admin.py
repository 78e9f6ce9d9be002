"""Running the backend as an operator does: one well-known data folder, options before
or after the subcommand, accounts and API keys from the command line (passwords never on
it), the export job run by the server on its period, and what `backend export` says
about keys still under embargo."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import cli
from agent.clock import ManualClock, iso_time
from agent.protocol import gaen
from agent.protocol.export import key_fingerprint
from agent.protocol.gaen import TemporaryExposureKey
from backend import Backend, BackendConfig
from backend.verification import API_KEY_CACHE_S

from .backend_requests import certified, publish_body
from .helpers import wait_until

ROOT = Path(__file__).parent.parent


def ctagent(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          input=input, env={**os.environ, **(env or {})}, cwd=cwd, timeout=60)


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli.main, list(args), input=input, env=env)


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    """A home of our own: the default data folder is $XDG_DATA_HOME/ctagent-backend."""
    monkeypatch.delenv("CTAGENT_BACKEND_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "ctagent-backend"


@pytest.mark.integration
def test_the_data_folder_is_one_place_whatever_the_current_directory(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "CTAGENT_BACKEND_DIR": ""}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # no backend yet: a command other than init/serve says so and creates nothing
    r = ctagent("backend", "code", env=env, cwd=elsewhere)
    assert r.returncode == 1 and "there is no backend in" in r.stderr and "ctagent backend init" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "xdg").exists() and not list(elsewhere.iterdir())
    r = ctagent("backend", "init", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "new backend in" in r.stdout
    key = ctagent("backend", "public-key", env=env, cwd=elsewhere)
    assert key.returncode == 0 and len(key.stdout.splitlines()) == 1  # the key alone: scripts capture it
    assert key.stderr.strip() == f"fingerprint {key_fingerprint(key.stdout.strip())}"
    assert key.stdout.strip() in r.stdout and key_fingerprint(key.stdout.strip()) in r.stdout
    # the environment variable (what the systemd unit sets) and the option after the subcommand
    other = tmp_path / "other"
    assert ctagent("backend", "init", env={"CTAGENT_BACKEND_DIR": str(other)}).returncode == 0
    via_env = ctagent("backend", "public-key", env={"CTAGENT_BACKEND_DIR": str(other)}).stdout
    via_option = ctagent("backend", "public-key", "--data-dir", str(other), env=env).stdout
    via_group = ctagent("backend", "--data-dir", str(other), "public-key", env=env).stdout
    assert via_env == via_option == via_group != key.stdout
    again = ctagent("backend", "init", env=env, cwd=elsewhere)
    assert "backend already in" in again.stdout and key.stdout.strip() in again.stdout
    assert not list(elsewhere.iterdir())  # nothing was ever written where the commands ran


def test_accounts_from_the_command_line_never_take_a_password_as_an_argument(xdg):
    assert invoke("backend", "init").exit_code == 0
    r = invoke("backend", "user", "add", "dr.who", input="short\nshort\n")
    assert r.exit_code == 1 and "at least 8 characters" in r.output and "Traceback" not in r.output
    r = invoke("backend", "user", "add", "dr.who", input="tardis-1963\nother-one\ntardis-1963\ntardis-1963\n")
    assert r.exit_code == 0 and "do not match" in r.output and "user dr.who added" in r.output
    r = invoke("backend", "user", "add", "dr.who", "--password-stdin", input="tardis-1963\n")
    assert r.exit_code == 1 and "exists already" in r.output and "scrypt" not in r.output
    assert invoke("backend", "user", "add", "dr.no", "--password-stdin", "--health-authority", "ha-2",
                  input="goldfinger\n").exit_code == 0
    listed = json.loads(invoke("backend", "user", "list", "--json").output)
    assert listed == [{"user": "dr.no", "health_authority": "ha-2"}, {"user": "dr.who", "health_authority": "default"}]
    assert "--add-user" not in invoke("backend", "serve", "--help").output

    b = Backend(BackendConfig(xdg), clock=ManualClock(time.time()))
    session = b.verification.login("dr.who", "tardis-1963")
    assert b.verification.session_user(session) == "dr.who"
    r = invoke("backend", "user", "passwd", "dr.who", "--password-stdin", input="new-password-1\n")
    assert r.exit_code == 0 and "sessions ended" in r.output
    assert b.verification.session_user(session) is None  # the old session ended with the old password
    assert b.verification.login("dr.who", "new-password-1")
    r = invoke("backend", "user", "remove", "dr.who", input="n\n")
    assert r.exit_code == 1 and [u for u, _ in b.verification.users()] == ["dr.no", "dr.who"]  # declined
    assert invoke("backend", "user", "remove", "dr.who", "--yes").exit_code == 0
    assert [u for u, _ in b.verification.users()] == ["dr.no"]
    r = invoke("backend", "user", "passwd", "dr.who", "--password-stdin", input="whatever-long\n")
    assert r.exit_code == 1 and "no user named 'dr.who'" in r.output


def test_api_keys_are_shown_once_and_revoked_by_name(xdg):
    assert invoke("backend", "init").exit_code == 0
    r = invoke("backend", "api-key", "add", "lab-1")
    assert r.exit_code == 0
    key = r.output.strip().splitlines()[-1]
    clock = ManualClock(time.time())
    b = Backend(BackendConfig(xdg), clock=clock)
    assert b.verification.api_key_owner(key) == "lab-1"
    assert invoke("backend", "api-key", "add", "lab-1").exit_code == 1  # names are unique
    assert json.loads(invoke("backend", "api-key", "list", "--json").output) == [
        {"name": "lab-1", "health_authority": "default"}]
    assert key not in invoke("backend", "api-key", "list").output
    assert invoke("backend", "api-key", "remove", "lab-1").exit_code == 0
    # a running server (here ``b``) trusts a key it found for API_KEY_CACHE_S, not longer
    assert b.verification.api_key_owner(key) == "lab-1"
    clock.advance(API_KEY_CACHE_S)
    with pytest.raises(Exception, match="X-API-Key"):
        b.verification.api_key_owner(key)
    fresh = Backend(BackendConfig(xdg), clock=clock)  # a process that had not seen it: at once
    with pytest.raises(Exception, match="X-API-Key"):
        fresh.verification.api_key_owner(key)
    r = invoke("backend", "api-key", "remove", "lab-1")
    assert r.exit_code == 1 and "no API key named" in r.output


def test_an_api_key_removed_by_the_same_process_is_refused_at_once(tmp_path):
    b = Backend(BackendConfig(tmp_path / "backend"), clock=ManualClock(time.time()))
    key = b.verification.add_api_key("lab-2")
    assert b.verification.api_key_owner(key) == "lab-2"
    b.verification.remove_api_key("lab-2")
    with pytest.raises(Exception, match="X-API-Key"):
        b.verification.api_key_owner(key)


def test_backend_export_says_how_many_keys_wait_and_until_when(xdg):
    assert invoke("backend", "init").exit_code == 0
    now = time.time()
    b = Backend(BackendConfig(xdg), clock=ManualClock(now))
    today = TemporaryExposureKey(os.urandom(16), gaen.rolling_start_for_day(now))  # broadcast until midnight
    b.publisher.publish(publish_body([today], certified(b, [today])))
    r = invoke("backend", "export", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    midnight = (gaen.rolling_start_for_day(now) + gaen.TEK_ROLLING_PERIOD) * gaen.INTERVAL_SECONDS
    assert out == {"files_written": [], "keys_waiting": 1, "first_export_at": iso_time(midnight)}
    r = invoke("backend", "export")
    assert "0 export file(s) written\n1 key(s) wait for their embargo" in r.output and iso_time(midnight) in r.output


def _ppid(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_runs_the_export_job_on_its_period_and_a_rehearsal_embargo_is_explicit(tmp_path, workers):
    """With --workers 2 (the production set-up) the requests go to worker processes and
    the export job runs once, in the parent."""
    data = tmp_path / "backend"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "backend", "serve", "--data-dir", str(data),
                             "--port", str(port), "--export-period", "2", "--rehearsal-embargo", "0",
                             "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(url + "/healthz").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # died: fail below with its output
        wait_until(healthy, what="the backend to answer")
        assert proc.poll() is None
        b = Backend(BackendConfig(data), clock=ManualClock(time.time()))  # the same folder: codes it issues work
        today = TemporaryExposureKey(os.urandom(16), gaen.rolling_start_for_day(time.time()))
        r = httpx.post(url + "/v1/publish", json=publish_body([today], certified(b, [today])))
        assert r.status_code == 200 and r.json()["insertedExposures"] == 1

        def exported() -> bool:
            return bool(httpx.get(url + "/exports/index.txt").text.strip())
        wait_until(exported, timeout_s=30, what="the server's own export run to list a file")
        name = httpx.get(url + "/exports/index.txt").text.split()[0]
        assert re.fullmatch(r"[\w./-]+", name) and httpx.get(f"{url}/exports/{name}").status_code == 200
        if workers > 1:  # the parent supervises its workers (and runs the export job)
            children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == proc.pid]
            assert len(children) >= workers
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=15)
    assert "REHEARSAL" in err and "never run this with real users" in err
    assert "no physician account yet" in err


@pytest.mark.integration
def test_serve_stops_on_sigterm_while_a_client_stalls_in_its_body(tmp_path):
    """A client that sent half a request and went quiet kept ``backend serve --workers 2``
    from stopping (uvicorn waited for it for ever; benchmarks.bench_load left servers
    behind): now the requests in flight get SHUTDOWN_GRACE_S, then the server exits."""
    import socket

    from backend.server import SHUTDOWN_GRACE_S

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "backend", "serve", "--data-dir",
                             str(tmp_path / "backend"), "--port", str(port), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stalled = []
    try:
        def healthy() -> bool:
            try:
                return httpx.get(url + "/healthz").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None
        wait_until(healthy, what="the backend to answer")
        for _ in range(4):  # likely on both workers
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"temporaryExposureKeys\": [")
            stalled.append(s)
        time.sleep(0.5)
        started = time.monotonic()
        proc.terminate()
        proc.wait(timeout=SHUTDOWN_GRACE_S + 10)
        assert time.monotonic() - started < SHUTDOWN_GRACE_S + 10
    finally:
        for s in stalled:
            s.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_embargo_is_the_key_servers_unless_a_rehearsal_says_otherwise(tmp_path):
    from backend.publish import embargo_end

    now = time.time()
    today = TemporaryExposureKey(os.urandom(16), gaen.rolling_start_for_day(now))
    midnight = (today.rolling_start_interval_number + gaen.TEK_ROLLING_PERIOD) * gaen.INTERVAL_SECONDS
    from agent.protocol.export import DiagnosisKey
    key = DiagnosisKey(today.key_data, today.rolling_start_interval_number, today.rolling_period, 0)
    assert embargo_end(key, now) == midnight
    assert embargo_end(key, now, rehearsal_embargo_s=30) == now + 30
    assert BackendConfig(tmp_path).rehearsal_embargo_s is None  # never by default
