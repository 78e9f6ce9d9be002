"""The CLI's own behaviour: help, version, one-sentence errors, the backend commands."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

import cli
from agent import __version__

from .helpers import wait_until


def test_version_and_help():
    r = CliRunner().invoke(cli.main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(cli.main, ["--help"])
    assert r.exit_code == 0 and "demo" in r.output


def test_errors_are_one_sentence_without_traceback():
    r = CliRunner().invoke(cli.main, ["demo", "--devices", "2"])
    assert r.exit_code == 1 and "at least 4 devices" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli.main, ["demo", "--days", "20"])
    assert r.exit_code == 1 and "between 1 and 14" in r.output


def test_backend_code_export_and_public_key(tmp_path):
    import json
    base = ["backend", "--data-dir", str(tmp_path / "b")]
    assert CliRunner().invoke(cli.main, base + ["init"]).exit_code == 0
    r = CliRunner().invoke(cli.main, base + ["code", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)["code"]) == 8
    r = CliRunner().invoke(cli.main, base + ["public-key"])
    assert r.exit_code == 0 and len(r.output.strip()) > 80
    r = CliRunner().invoke(cli.main, base + ["export"])
    assert r.exit_code == 0 and "0 export file(s)" in r.output
    assert (tmp_path / "b" / "exports" / "index.txt").exists()


@pytest.mark.integration
def test_backend_serve_both_roles_subprocess(tmp_path):
    import socket

    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli", "backend", "--data-dir", str(tmp_path / "b"), "serve",
                             "--port", str(port), "--protocol", "both"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, what="the backend to answer /healthz")
        clock = httpx.get(f"http://127.0.0.1:{port}/api/v6/clock").json()
        assert clock["epoch"] >= 0 and clock["time"].endswith("Z") and len(clock["serviceStartDate"]) == 10
        assert httpx.get(f"http://127.0.0.1:{port}/v1/public-key").json()["publicKey"]
    finally:
        proc.terminate()
        proc.wait(10)
