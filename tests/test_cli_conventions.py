"""One set of conventions for every command (operations issue, point 11): valid JSON in
one style (times in ISO 8601 UTC, no NaN), errors as JSON under --json, --debug anywhere
on the line, --log-level in any case, and a backend that hangs costs at most
[sync] timeout_s."""

from __future__ import annotations

import base64
import json
import math
import socket
import threading
import time

from click.testing import CliRunner

import cli


def invoke(env, *args):
    return CliRunner().invoke(cli.main, list(args), env=env)


def device(tmp_path, **settings):
    env = {"CTAGENT_CONFIG": str(tmp_path / "c.toml"), "CTAGENT_AGENT_CLOCK_CHECK": "off", **settings}
    r = invoke(env, "init", "--data-dir", str(tmp_path / "d"), "--radio", "sim")
    assert r.exit_code == 0, r.output
    return env


def test_json_is_valid_and_in_one_style():
    doc = cli.json_ready({"now": 1_795_574_984.87, "last_sync": None, "precision": math.nan, "found_at": 0,
                          "failing": {"flush": {"since": 1_795_574_000, "failures": 3}}, "rssi": [-60.5, math.inf],
                          "windows": [{"start": 1_795_572_540, "minutes": 1.0}], "ok": True})
    assert doc == {"now": "2026-11-25T02:49:44Z", "last_sync": None, "precision": None,
                   "found_at": "1970-01-01T00:00:00Z",
                   "failing": {"flush": {"since": "2026-11-25T02:33:20Z", "failures": 3}}, "rssi": [-60.5, None],
                   "windows": [{"start": "2026-11-25T02:09:00Z", "minutes": 1.0}], "ok": True}
    json.loads(json.dumps(doc, allow_nan=False))


def test_errors_are_json_under_json_and_debug_goes_anywhere(tmp_path):
    env = {"CTAGENT_CONFIG": str(tmp_path / "missing.toml")}
    for args in (["status", "--json"], ["encounters", "--json"], ["sync", "--json"], ["doctor", "--help"]):
        r = invoke(env, *args)
        if "--help" in args:
            continue
        assert r.exit_code == 1
        doc = json.loads(r.stdout)  # one document, nothing else on stdout
        assert doc["error"]["kind"] == "user" and "ctagent init" in doc["error"]["message"]
    r = invoke(env, "status")
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "{" not in r.output
    r = invoke(env, "status", "--debug")  # after the subcommand: the real exception, no "no such option"
    assert r.exit_code == 1 and "No such option" not in r.output and r.exception is not None
    r = invoke(env, "--", "status")
    assert r.exit_code != 0


def test_log_level_in_any_case(tmp_path):
    env = device(tmp_path, CTAGENT_AGENT_PROTOCOL="robert")  # refuses at once: no ROBERT server configured
    for level in ("debug", "Info", "WARNING"):
        r = invoke(env, "run", "--log-level", level)
        assert "Invalid value for '--log-level'" not in r.output
        assert r.exit_code == 1 and "ROBERT mode needs its server" in r.output


def a_public_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    spki = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(spki).decode()


def test_a_hanging_backend_costs_at_most_the_timeout(tmp_path):
    """A server that accepts the connection and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = device(tmp_path, CTAGENT_SYNC_BACKEND_URL=url, CTAGENT_SYNC_TIMEOUT_S="1.5",
                     CTAGENT_SYNC_TRUSTED_KEYS=a_public_key())
        started = time.monotonic()
        r = invoke(env, "sync", "--json")
        took = time.monotonic() - started
        doc = json.loads(r.stdout)
        assert r.exit_code == 1 and doc["offline"] is True
        assert "unreachable" in doc["problem"] and "no answer within 1.5 s" in doc["problem"]
        assert took < 5, took  # the retries stop at the deadline (4 attempts x 1.5 s before)
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()
