import hashlib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from agent.exposure.aggregate import Aggregator
from agent.exposure.encounter import Encounter
from agent.protocol.schedule import TekRecord
from agent.store import (KeyFile, Passphrase, Store, StoreError, StoreKeyError, StoreVersionError,
                         create_key_file, keyring_path)

from .helpers import FAST_SCRYPT, FakeClock, fast_passphrase

DAY = 86_400
T0 = 20_000 * DAY + 8 * 3600  # 08:00 UTC on day 20000


def make_encounters(n, t0=T0, seed=0):
    import random
    rng = random.Random(seed)
    agg = Aggregator()
    rpis = [rng.randbytes(16) for _ in range(n)]
    for k in range(600):
        for r in rpis:
            agg.add_raw(t0 + k, r, rng.randbytes(4), rng.randint(-90, -40))
    return agg.flush(t0 + 600, final=True)


@pytest.fixture
def clock():
    return FakeClock(T0)


@pytest.fixture
def store(tmp_path, clock):
    s = Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock)
    yield s
    try:
        s.close()
    except sqlite3.ProgrammingError:
        pass


def files_of(path):
    return [p for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
                        keyring_path(path)) if p.exists()]


def test_schema_wal_and_modes(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    from agent.store import SCHEMA_VERSION
    assert store.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    tables = set(store.db.table_names())
    assert {"teks", "encounters", "exposures", "sync_state", "schema_version"} <= tables
    store.write_encounters(make_encounters(2))
    for p in files_of(store.path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_round_trip_and_updates(store, clock):
    encs = make_encounters(5)
    assert store.write_encounters(encs) == 5
    encs[0].add(T0 + 650, -30)
    store.write_encounters([encs[0]])  # update in place, same row
    got = {e.rpi: e for e in store.encounters()}
    assert len(got) == 5
    e0 = got[encs[0].rpi]
    assert e0.row_id == encs[0].row_id and e0.last_seen == T0 + 650 and e0.sample_count == 601
    assert store.encounter_days() == {20000: 5}
    store.add_tek(TekRecord(b"k" * 16, 20000 * 144))
    assert store.teks() == [TekRecord(b"k" * 16, 20000 * 144)]
    store.add_exposure(20000, {"risk": "high", "minutes": 20})
    assert store.exposures() == [{"risk": "high", "minutes": 20, "day": 20000}]
    store.set_state("cursor", {"last": "a.zip"})
    assert store.get_state("cursor") == {"last": "a.zip"} and store.get_state("nope", 3) == 3


def test_nothing_identifying_in_the_raw_files(tmp_path, clock):
    path = tmp_path / "agent.db"
    s = Store.create(path, fast_passphrase(), clock=clock)
    teks = [os.urandom(16) for _ in range(3)]
    for i, t in enumerate(teks):
        s.add_tek(TekRecord(t, (20000 - i) * 144))
    encs = make_encounters(50)
    s.write_encounters(encs)
    secrets_ = teks + [e.rpi for e in encs] + [e.aem for e in encs]

    def check(blobs):
        for needle in secrets_:
            for b in blobs:
                assert needle not in b
                assert needle.hex().encode() not in b and needle.hex().upper().encode() not in b

    check([p.read_bytes() for p in files_of(path)])  # while open: WAL and shm hold the data
    assert path.with_name("agent.db-wal").stat().st_size > 0
    s.close()
    check([p.read_bytes() for p in files_of(path)])


def test_wrong_passphrase_changes_nothing(tmp_path, clock):
    path = tmp_path / "agent.db"
    with Store.create(path, fast_passphrase(), clock=clock) as s:
        s.write_encounters(make_encounters(3))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files_of(path)}
    with pytest.raises(StoreKeyError, match="wrong passphrase or key file"):
        Store.open(path, Passphrase("wrong"), clock=clock)
    with pytest.raises(StoreKeyError):
        Store.open(path, KeyFile(create_key_file(tmp_path / "k")), clock=clock)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files_of(path)} == before


def test_key_file(tmp_path, clock):
    kf = create_key_file(tmp_path / "master.key")
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        create_key_file(kf)
    path = tmp_path / "agent.db"
    with Store.create(path, KeyFile(kf), clock=clock) as s:
        s.write_encounters(make_encounters(2))
    with Store.open(path, KeyFile(kf), clock=clock) as s:
        assert len(list(s.encounters())) == 2
    os.chmod(kf, 0o644)
    with pytest.raises(StoreKeyError, match="readable by others"):
        Store.open(path, KeyFile(kf), clock=clock)
    os.chmod(kf, 0o600)
    with Store.create(tmp_path / "p.db", fast_passphrase(), clock=clock):
        pass
    with pytest.raises(StoreKeyError, match="protected by a passphrase"):
        Store.open(tmp_path / "p.db", KeyFile(kf), clock=clock)


def test_master_key_rotation(tmp_path, clock):
    path = tmp_path / "agent.db"
    with Store.create(path, fast_passphrase("old"), clock=clock) as s:
        s.write_encounters(make_encounters(4))
        s.rotate_master_key(Passphrase("new", scrypt=FAST_SCRYPT))
    with pytest.raises(StoreKeyError):
        Store.open(path, Passphrase("old"), clock=clock)
    with Store.open(path, Passphrase("new"), clock=clock) as s:
        assert len(list(s.encounters())) == 4
        kf = create_key_file(tmp_path / "k")
        s.rotate_master_key(KeyFile(kf))
    with Store.open(path, KeyFile(kf), clock=clock) as s:
        assert len(list(s.encounters())) == 4


def test_retention_crypto_erases_even_old_copies(tmp_path, clock):
    path = tmp_path / "agent.db"
    key = fast_passphrase()
    with Store.create(path, key, clock=clock) as s:
        s.write_encounters(make_encounters(3, t0=T0 - 20 * DAY, seed=1))  # day 19980
        s.add_tek(TekRecord(b"o" * 16, 19980 * 144))
        s.write_encounters(make_encounters(2, t0=T0, seed=2))
        assert s.encounter_days() == {19980: 3, 20000: 2}  # day 19980 was written today with a past time
    backup = tmp_path / "backup"
    backup.mkdir()
    for p in files_of(path):
        shutil.copy2(p, backup / p.name)
    # The purge happens on the next open (retention runs on open).
    with Store.open(path, key, clock=clock) as s:
        assert s.encounter_days() == {20000: 2}
        assert 19980 not in s.keyring.days()
        assert [t.rolling_start for t in s.teks()] == []
    # The old database copy, with the master key and the current keyring, reveals nothing of that day.
    shutil.copy2(keyring_path(path), backup / keyring_path(path).name)
    old = backup / "agent.db"
    s = Store.open(old, key, clock=FakeClock(T0 - 20 * DAY))  # a clock that would keep the day
    try:
        assert list(s.encounters(until_day=19980)) == [] and s.teks() == []
        assert s.stats.missing_key_rows >= 4
        assert s.conn.execute("SELECT COUNT(*) FROM encounters WHERE day = 19980").fetchone()[0] == 3
    finally:
        s.close()


def test_retention_runs_daily(store, clock):
    store.write_encounters(make_encounters(1))
    assert store.maybe_apply_retention() == []
    clock.advance(13 * DAY)
    assert store.maybe_apply_retention() == []
    assert store.encounter_days() == {20000: 1}
    clock.advance(DAY)
    assert store.maybe_apply_retention() == [20000]
    assert store.encounter_days() == {}


def test_tampered_and_swapped_rows_are_skipped(store):
    encs = make_encounters(4)
    store.write_encounters(encs)
    ids = [e.row_id for e in encs]
    blob = bytearray(store.conn.execute("SELECT blob FROM encounters WHERE id=?", (ids[0],)).fetchone()[0])
    blob[30] ^= 0xFF
    store.conn.execute("UPDATE encounters SET blob=? WHERE id=?", (bytes(blob), ids[0]))
    b1 = store.conn.execute("SELECT blob FROM encounters WHERE id=?", (ids[1],)).fetchone()[0]
    b2 = store.conn.execute("SELECT blob FROM encounters WHERE id=?", (ids[2],)).fetchone()[0]
    store.conn.execute("UPDATE encounters SET blob=? WHERE id=?", (b2, ids[1]))
    store.conn.execute("UPDATE encounters SET blob=? WHERE id=?", (b1, ids[2]))
    got = list(store.encounters())
    assert [e.row_id for e in got] == [ids[3]]
    assert store.stats.corrupt_rows == 3


def test_newer_schema_is_refused(tmp_path, clock):
    path = tmp_path / "agent.db"
    with Store.create(path, fast_passphrase(), clock=clock) as s:
        s.conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    with pytest.raises(StoreVersionError, match="schema version 99"):
        Store.open(path, fast_passphrase(), clock=clock)


def test_not_a_database(tmp_path, clock):
    path = tmp_path / "agent.db"
    with Store.create(path, fast_passphrase(), clock=clock):
        pass
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError, match="not a usable"):
        Store.open(path, fast_passphrase(), clock=clock)
    with pytest.raises(StoreError, match="already exists"):
        Store.create(path, fast_passphrase(), clock=clock)
    with pytest.raises(StoreError, match="no store"):
        Store.open(tmp_path / "missing.db", fast_passphrase(), clock=clock)


WRITER = textwrap.dedent("""
    import os, sys, random
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from agent.store import Store
    from agent.exposure.aggregate import Aggregator
    from helpers import fast_passphrase, FakeClock
    clock = FakeClock({t0})
    s = Store.create({path!r}, fast_passphrase(), clock=clock)
    rng = random.Random(5)
    batch = 0
    while True:
        agg = Aggregator()
        for i in range({batch_size}):
            agg.add_raw({t0} + batch, rng.randbytes(16), rng.randbytes(4), -60)
        s.write_encounters(agg.flush({t0} + batch, final=True))
        batch += 1
        print(batch, flush=True)
""")


def test_sigkill_mid_burst_loses_at_most_the_batch_in_flight(tmp_path):
    import pathlib
    root = str(pathlib.Path(__file__).resolve().parents[1])
    path = str(tmp_path / "agent.db")
    code = WRITER.format(root=root, tests=str(pathlib.Path(__file__).parent), t0=T0, path=path, batch_size=200)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    committed = 0
    deadline = time.monotonic() + 30
    while committed < 15 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed = int(line)
    time.sleep(0.05)  # let it get into the next burst
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read().split()
    proc.wait()
    committed = int(rest[-1]) if rest else committed
    assert committed >= 15
    with Store.open(path, fast_passphrase(), clock=FakeClock(T0)) as s:
        assert s.integrity_check() == "ok"
        n = s.conn.execute("SELECT COUNT(*) FROM encounters").fetchone()[0]
        assert committed * 200 <= n <= (committed + 1) * 200
        assert n % 200 == 0  # whole batches only
        assert len(list(s.encounters())) == n and s.stats.corrupt_rows == 0


def test_migration_from_schema_1_keeps_data(tmp_path, clock):
    """A version-1 database (as written before ROBERT mode) opens and gains the new tables."""
    import sqlite_utils
    from agent.store import store as store_mod
    path = tmp_path / "agent.db"
    real = dict(store_mod.MIGRATIONS)
    real_tables = store_mod._ENCRYPTED_TABLES
    try:
        store_mod.MIGRATIONS.pop(2)
        store_mod.SCHEMA_VERSION = 1
        store_mod._ENCRYPTED_TABLES = ("teks", "encounters", "exposures")
        with Store.create(path, fast_passphrase(), clock=clock) as s:
            s.write_encounters(make_encounters(3))
            assert "hellos" not in s.db.table_names()
    finally:
        store_mod.MIGRATIONS.update(real)
        store_mod.SCHEMA_VERSION = 2
        store_mod._ENCRYPTED_TABLES = real_tables
    with Store.open(path, fast_passphrase(), clock=clock) as s:
        assert {"hellos", "secrets"} <= set(s.db.table_names())
        assert s.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 2
        assert len(list(s.encounters())) == 3
        s.add_hellos([(T0, b"h" * 16, -50)])
        s.put_secret("robert", b"k" * 32)
        s.put_secret("robert", b"q" * 32)
        assert s.hellos() == [(T0, b"h" * 16, -50)] and s.get_secret("robert") == b"q" * 32
    assert sqlite_utils  # imported for the schema helpers above


def test_secrets_survive_retention_hellos_do_not(tmp_path, clock):
    with Store.create(tmp_path / "a.db", fast_passphrase(), clock=clock) as s:
        s.add_hellos([(T0, b"h" * 16, -50)])
        s.put_secret("robert", b"k" * 32)
        clock.advance(30 * DAY)
        s.apply_retention()
        assert s.hellos() == [] and s.get_secret("robert") == b"k" * 32
