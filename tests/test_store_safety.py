"""Nothing lost on the device: one writer at a time, readers read-only, day keys durable
before use, no key material left in temporary files, purge refused while in use."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from agent.clock import ManualClock
from agent.errors import StoreError
from agent.exposure.aggregate import Aggregator
from agent.modes.base import DeviceContext
from agent.modes.gaen import GaenMode
from agent.store import Store, keyring_path

from .helpers import DAY, T0, fast_passphrase, wait_until

ROOT = Path(__file__).resolve().parents[1]


def encounters(n, t0=T0, seed=0):
    import random
    rng = random.Random(seed)
    agg = Aggregator()
    for k in range(60):
        for i in range(n):
            agg.add_raw(t0 + k, bytes([seed, i]) * 8, rng.randbytes(4), -60)
    return agg.flush(t0 + 3600, final=True)


def readable_everything(store: Store) -> int:
    """Read every table; the number of rows that could not be read."""
    list(store.encounters.read())
    store.teks.all()
    store.exposures.all()
    store.hellos.all()
    return store.stats.corrupt_rows + store.stats.missing_key_rows


# -- one writer ------------------------------------------------------------------------------

def test_a_second_writer_is_refused_in_one_sentence(tmp_path, clock):
    path = tmp_path / "agent.db"
    first = Store.create(path, fast_passphrase(), clock=clock)
    with pytest.raises(StoreError, match=r"in use by another ctagent process \(pid \d+\)"):
        Store.open(path, fast_passphrase(), clock=clock)
    first.close()
    Store.open(path, fast_passphrase(), clock=clock).close()  # free again once the first closed


def test_readers_open_read_only_beside_a_writer_and_change_nothing(tmp_path, clock):
    path = tmp_path / "agent.db"
    writer = Store.create(path, fast_passphrase(), clock=clock)
    writer.encounters.write(encounters(3))
    ring_before = hashlib.sha256(keyring_path(path).read_bytes()).hexdigest()
    clock.advance(30 * DAY)  # a reader must not apply retention, nor create keys
    with Store.open(path, fast_passphrase(), clock=clock, read_only=True) as reader:
        assert len(list(reader.encounters.read())) == 3
        with pytest.raises(StoreError, match="read-only"):
            reader.encounters.write(encounters(1, seed=9))
    assert hashlib.sha256(keyring_path(path).read_bytes()).hexdigest() == ring_before
    writer.encounters.write(encounters(1, t0=T0 + 600, seed=2))  # the writer is unaffected
    writer.close()


# -- day keys: durable before any row uses them ------------------------------------------------

def test_disk_full_at_day_key_creation_loses_no_row(tmp_path, clock, monkeypatch):
    import agent.store.keys as keys_module

    path = tmp_path / "agent.db"
    store = Store.create(path, fast_passphrase(), clock=clock)
    real_write = keys_module.write_private_file
    calls = []

    def disk_full_once(p, data, **kw):
        calls.append(p)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(p))
        return real_write(p, data, **kw)

    monkeypatch.setattr(keys_module, "write_private_file", disk_full_once)
    with pytest.raises(StoreError, match="No space left on device"):
        store.encounters.write(encounters(20))  # the day's first row needs a new day key
    store.encounters.write(encounters(20, seed=1))  # space again: the key is saved, then used
    store.close()
    with Store.open(path, fast_passphrase(), clock=clock) as again:
        assert len(list(again.encounters.read())) == 20
        assert readable_everything(again) == 0


def test_a_failed_flush_keeps_what_was_heard(new_store, clock, monkeypatch):
    store = new_store()
    rng_bytes = iter(range(10**6))
    mode = GaenMode(DeviceContext(store=store, clock=clock, random_bytes=lambda n: bytes([next(rng_bytes) % 256]) * n))
    for i in range(40):
        mode.aggregator.add_raw(clock.t + i, bytes([i]) * 16, bytes(4), -55)
    real = store.encounters.write

    def failing(_encs, closed=()):
        raise StoreError("the disk is full")

    monkeypatch.setattr(store.encounters, "write", failing)
    with pytest.raises(StoreError):
        mode.flush(clock.t + 1000, final=True)
    monkeypatch.setattr(store.encounters, "write", real)
    assert mode.flush(clock.t + 1000, final=True) == 40
    assert len(list(store.encounters.read())) == 40
    # and indexed for matching: closed again at the flush that wrote them
    assert len(store.encounters.matching_arrays()) == 40 and store.encounters.index_unindexed() == 0


# -- temporary files of the keyring ------------------------------------------------------------

def test_stale_keyring_temp_files_are_erased_when_a_writer_opens(tmp_path, clock):
    path = tmp_path / "agent.db"
    Store.create(path, fast_passphrase(), clock=clock).close()
    stale = tmp_path / "agent.db.keyring.tmp4242"
    stale.write_bytes(b"day keys that retention destroyed")
    with Store.open(path, fast_passphrase(), clock=clock) as s:
        s.encounters.write(encounters(2))  # rewrites the keyring: under the lock, one fixed temp name
        assert not stale.exists()
        assert sorted(p.name for p in tmp_path.iterdir() if ".keyring" in p.name) == ["agent.db.keyring"]


KEY_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from agent.clock import ManualClock
    from agent.store import Store
    from helpers import fast_passphrase
    clock = ManualClock({t0})
    s = Store.open({path!r}, fast_passphrase(), clock=clock, retention_days=2)
    day = 0
    while True:  # a new day key every round, and retention destroying the old ones
        clock.advance(86400)
        s.keyring.key_for_day(s.today(), create=True)
        s.apply_retention()
        day += 1
        print(day, flush=True)
""")


@pytest.mark.integration
def test_killed_during_keyring_rewrites_leaves_no_key_material_behind(tmp_path):
    path = tmp_path / "agent.db"
    Store.create(path, fast_passphrase(), clock=ManualClock(T0)).close()
    code = KEY_WRITER.format(root=str(ROOT), tests=str(ROOT / "tests"), t0=T0, path=str(path))
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3 + os.getpid() % 5):  # some rewrites, then a kill in the middle of one
            proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Store.open(path, fast_passphrase(), clock=ManualClock(T0)) as s:  # a writer open cleans up
            assert s.integrity_check() == "ok"
        assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# -- the daemon and the CLI -------------------------------------------------------------------

@pytest.fixture
def device(tmp_path):
    cfg = tmp_path / "ctagent.toml"
    env = {"CTAGENT_CONFIG": str(cfg), "CTAGENT_AGENT_FLUSH_INTERVAL_S": "1"}
    r = CliRunner().invoke(cli.main, ["init", "--data-dir", str(tmp_path / "data"), "--radio", "sim"], env=env)
    assert r.exit_code == 0, r.output
    return env, tmp_path


def run_daemon(env):
    return subprocess.Popen([sys.executable, "-m", "cli", "run"], env={**os.environ, **env}, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)


def status_file(tmp):
    p = tmp / "data" / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


@pytest.mark.integration
def test_two_daemons_on_one_store_the_second_refuses(device):
    env, tmp = device
    first = run_daemon(env)
    try:
        wait_until(lambda: status_file(tmp).get("rotations", 0) >= 1, what="the first daemon running")
        t = time.monotonic()
        second = run_daemon(env)
        assert second.wait(timeout=20) == 1 and time.monotonic() - t < 20
        err = second.stderr.read()
        assert "in use by another ctagent process" in err and "Traceback" not in err
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0
    r = CliRunner().invoke(cli.main, ["status", "--json"], env=env)
    assert r.exit_code == 0 and json.loads(r.output)["own_keys"] == 1
    with Store.open(tmp / "data" / "agent.db", __import__("agent.store", fromlist=["KeyFile"]).KeyFile(
            tmp / "data" / "master.key")) as s:
        assert readable_everything(s) == 0


@pytest.mark.integration
def test_while_the_daemon_runs_readers_work_and_writers_and_purge_are_refused(device):
    env, tmp = device
    daemon = run_daemon(env)
    try:
        wait_until(lambda: status_file(tmp).get("sightings", 0) > 0, what="the daemon hearing its peers")
        for args in (["status"], ["encounters"], ["exposures"], ["export", "--consent"]):
            r = CliRunner().invoke(cli.main, args, env=env)
            assert r.exit_code == 0, (args, r.output)
        r = CliRunner().invoke(cli.main, ["purge", "--yes"], env=env)
        assert r.exit_code == 1 and "in use by another ctagent process" in r.output
        assert (tmp / "data" / "agent.db").exists() and daemon.poll() is None
        r = CliRunner().invoke(cli.main, ["declare", "--code", "12345678", "--yes"],
                               env={**env, "CTAGENT_SYNC_BACKEND_URL": "http://127.0.0.1:9",
                                    "CTAGENT_SYNC_TRUSTED_KEYS": _a_public_key()})
        assert r.exit_code == 1 and "in use by another ctagent process" in r.output
    finally:
        daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0
    assert "Traceback" not in daemon.stderr.read()


def _a_public_key() -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.protocol.export import public_key_b64
    return public_key_b64(ec.generate_private_key(ec.SECP256R1()))
