import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.clock import ManualClock
from agent.exposure.aggregate import Aggregator
from agent.protocol.gaen import TemporaryExposureKey
from agent.records import Exposure
from agent.store import (HeardHello, KeyFile, Passphrase, Store, StoreError, StoreKeyError, StoreVersionError,
                         create_key_file, keyring_path)
from agent.sync.keyserver import PendingDeclaration, ProcessedExports
from agent.sync.robert import RobertRegistration, RobertStatus

from .helpers import DAY, FAST_SCRYPT, T0, fast_passphrase


def make_encounters(n, t0=T0, seed=0):
    import random
    rng = random.Random(seed)
    agg = Aggregator()
    rpis = [rng.randbytes(16) for _ in range(n)]
    for k in range(600):
        for r in rpis:
            agg.add_raw(t0 + k, r, rng.randbytes(4), rng.randint(-90, -40))
    return agg.flush(t0 + 600, final=True)


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
    store.encounters.write(make_encounters(2))
    for p in files_of(store.path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_round_trip_and_updates(store, clock):
    encs = make_encounters(5)
    assert store.encounters.write(encs) == 5
    encs[0].add(T0 + 650, -30)
    store.encounters.write([encs[0]])  # update in place, same row
    got = {e.rpi: e for e in store.encounters.read()}
    assert len(got) == 5
    e0 = got[encs[0].rpi]
    assert e0.row_id == encs[0].row_id and e0.last_seen == T0 + 650 and e0.sample_count == 601
    assert store.encounters.count_by_day() == {20000: 5}
    store.teks.add(TemporaryExposureKey(b"k" * 16, 20000 * 144))
    assert store.teks.all() == [TemporaryExposureKey(b"k" * 16, 20000 * 144)]
    store.state.put(ProcessedExports(("a.zip",)))
    assert store.state.get(ProcessedExports) == ProcessedExports(("a.zip",))
    assert store.state.get(PendingDeclaration) is None


def test_nothing_identifying_in_the_raw_files(tmp_path, clock):
    path = tmp_path / "agent.db"
    s = Store.create(path, fast_passphrase(), clock=clock)
    teks = [os.urandom(16) for _ in range(3)]
    for i, t in enumerate(teks):
        s.teks.add(TemporaryExposureKey(t, (20000 - i) * 144))
    encs = make_encounters(50)
    s.encounters.write(encs)
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
        s.encounters.write(make_encounters(3))
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
        s.encounters.write(make_encounters(2))
    with Store.open(path, KeyFile(kf), clock=clock) as s:
        assert len(list(s.encounters.read())) == 2
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
        s.encounters.write(make_encounters(4))
        s.rotate_master_key(Passphrase("new", scrypt=FAST_SCRYPT))
    with pytest.raises(StoreKeyError):
        Store.open(path, Passphrase("old"), clock=clock)
    with Store.open(path, Passphrase("new"), clock=clock) as s:
        assert len(list(s.encounters.read())) == 4
        kf = create_key_file(tmp_path / "k")
        s.rotate_master_key(KeyFile(kf))
    with Store.open(path, KeyFile(kf), clock=clock) as s:
        assert len(list(s.encounters.read())) == 4


def test_retention_crypto_erases_even_old_copies(tmp_path, clock):
    path = tmp_path / "agent.db"
    key = fast_passphrase()
    with Store.create(path, key, clock=clock) as s:
        s.encounters.write(make_encounters(3, t0=T0 - 20 * DAY, seed=1))  # day 19980
        s.teks.add(TemporaryExposureKey(b"o" * 16, 19980 * 144))
        s.encounters.write(make_encounters(2, t0=T0, seed=2))
        assert s.encounters.count_by_day() == {19980: 3, 20000: 2}  # day 19980 was written today with a past time
    backup = tmp_path / "backup"
    backup.mkdir()
    for p in files_of(path):
        shutil.copy2(p, backup / p.name)
    # The purge happens on the next open (retention runs on open).
    with Store.open(path, key, clock=clock) as s:
        assert s.encounters.count_by_day() == {20000: 2}
        assert 19980 not in s.keyring.days()
        assert s.teks.all() == []
    # The old database copy, with the master key and the current keyring, reveals nothing of that day.
    shutil.copy2(keyring_path(path), backup / keyring_path(path).name)
    old = backup / "agent.db"
    s = Store.open(old, key, clock=ManualClock(T0 - 20 * DAY))  # a clock that would keep the day
    try:
        assert list(s.encounters.read(until_day=19980)) == [] and s.teks.all() == []
        assert s.stats.missing_key_rows >= 4
        assert s.conn.execute("SELECT COUNT(*) FROM encounters WHERE day = 19980").fetchone()[0] == 3
    finally:
        s.close()


def test_retention_runs_daily(store, clock):
    store.encounters.write(make_encounters(1))
    assert store.maybe_apply_retention() == []
    clock.advance(13 * DAY)
    assert store.maybe_apply_retention() == []
    assert store.encounters.count_by_day() == {20000: 1}
    clock.advance(DAY)
    assert store.maybe_apply_retention() == [20000]
    assert store.encounters.count_by_day() == {}


def test_tampered_and_swapped_rows_are_skipped(store):
    encs = make_encounters(4)
    store.encounters.write(encs)
    ids = [e.row_id for e in encs]
    blob = bytearray(store.conn.execute("SELECT blob FROM encounters WHERE id=?", (ids[0],)).fetchone()[0])
    blob[30] ^= 0xFF
    store.conn.execute("UPDATE encounters SET blob=? WHERE id=?", (bytes(blob), ids[0]))
    b1 = store.conn.execute("SELECT blob FROM encounters WHERE id=?", (ids[1],)).fetchone()[0]
    b2 = store.conn.execute("SELECT blob FROM encounters WHERE id=?", (ids[2],)).fetchone()[0]
    store.conn.execute("UPDATE encounters SET blob=? WHERE id=?", (b2, ids[1]))
    store.conn.execute("UPDATE encounters SET blob=? WHERE id=?", (b1, ids[2]))
    got = list(store.encounters.read())
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
    from agent.clock import ManualClock
    from agent.store import Store
    from agent.exposure.aggregate import Aggregator
    from helpers import fast_passphrase
    clock = ManualClock({t0})
    s = Store.create({path!r}, fast_passphrase(), clock=clock)
    rng = random.Random(5)
    batch = 0
    while True:
        agg = Aggregator()
        for i in range({batch_size}):
            agg.add_raw({t0} + batch, rng.randbytes(16), rng.randbytes(4), -60)
        s.encounters.write(agg.flush({t0} + batch, final=True))
        batch += 1
        print(batch, flush=True)
""")


@pytest.mark.integration
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
    proc.send_signal(signal.SIGKILL)  # a batch is in flight: the writer commits one every few ms
    rest = proc.stdout.read().split()
    proc.wait()
    committed = int(rest[-1]) if rest else committed
    assert committed >= 15
    with Store.open(path, fast_passphrase(), clock=ManualClock(T0)) as s:
        assert s.integrity_check() == "ok"
        n = s.conn.execute("SELECT COUNT(*) FROM encounters").fetchone()[0]
        assert committed * 200 <= n <= (committed + 1) * 200
        assert n % 200 == 0  # whole batches only
        assert len(list(s.encounters.read())) == n and s.stats.corrupt_rows == 0


# -- migrations: databases written by older versions open, and keep their data ----------

LEGACY_GAEN_EXPOSURE = {"key_rolling_start": 20000 * 144, "minutes": 22.0, "rule": "distance", "report_type": 1,
                        "found_at": T0, "explain": {"key_rolling_start": 20000 * 144, "report_type": 1,
                                                    "days_since_onset": None, "day": 20000, "exposed": True,
                                                    "minutes": 22.0, "threshold_min": 15.0, "rule": "distance",
                                                    "windows": [{"start": T0, "samples": 3, "filled": False,
                                                                 "attenuation_db": 48.5, "distance_m": 0.87,
                                                                 "minutes": 1.0}]}}
LEGACY_ROBERT_EXPOSURE = {"rule": "robert", "minutes": None, "risk": 0.12, "found_at": T0}
LEGACY_PENDING = {"certificate": "eyJ-legacy-certificate", "hmacKey": "aG1hYw==", "rolling_starts": [2880000]}


def _legacy_database(path, clock, version):
    """A database as schema ``version`` (1 or 2) wrote it, with the record shapes of then."""
    s = Store.create(path, fast_passphrase(), clock=clock)
    s.encounters.write(make_encounters(2))

    def legacy_row(table, day, doc, plain=None):
        row_id = s.rows.new_id(table)
        blob = s.rows.seal(table, row_id, day, plain if plain is not None else json.dumps(doc).encode())
        s.conn.execute(f"INSERT INTO {table} (id, day, blob) VALUES (?, ?, ?)", (row_id, day, blob))

    for doc in (LEGACY_GAEN_EXPOSURE, LEGACY_GAEN_EXPOSURE, LEGACY_ROBERT_EXPOSURE):  # the first twice: a duplicate
        legacy_row("exposures", 20000, doc)
    s.conn.execute("INSERT INTO sync_state (name, value) VALUES ('declare.pending', ?)", (json.dumps(LEGACY_PENDING),))
    s.conn.execute("INSERT INTO sync_state (name, value) VALUES ('exports.done', ?)", (json.dumps(["a.zip"]),))
    if version >= 2:
        s.conn.execute("INSERT INTO sync_state (name, value) VALUES ('robert.status', ?)",
                       (json.dumps({"at": T0, "atRisk": True, "riskLevel": 4}),))
        reg = {"k_mac": "00" * 32, "k_tuples": "11" * 32, "time_start": 3_900_000_000,
               "tuples": {"7": ["22" * 8, "33"]}}
        legacy_row("secrets", 2**31 - 1, None,
                   json.dumps({"n": "robert.registration", "v": json.dumps(reg).encode().hex()}).encode())
    s.conn.execute("DROP TABLE encounter_index")  # schema 6
    s.conn.execute("DROP TABLE research")  # schema 5
    s.conn.execute("DROP INDEX exposures_uid")
    s.conn.execute("ALTER TABLE exposures DROP COLUMN uid")
    if version < 2:
        s.conn.execute("DROP TABLE hellos")
        s.conn.execute("DROP TABLE secrets")
    s.conn.execute("DELETE FROM schema_version WHERE version > ?", (version,))
    s.close()


@pytest.mark.parametrize("version", [1, 2])
def test_migration_keeps_data_and_encrypts_sensitive_state(tmp_path, clock, version):
    from agent.store import SCHEMA_VERSION
    path = tmp_path / "agent.db"
    _legacy_database(path, clock, version)
    assert b"legacy-certificate" in path.read_bytes()  # the old version kept it in clear
    with Store.open(path, fast_passphrase(), clock=clock) as s:
        assert s.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        assert {"hellos", "secrets", "encounter_index"} <= set(s.db.table_names())
        assert len(list(s.encounters.read())) == 2
        # the encounters were indexed for matching on the first open with the keys
        assert s.encounters.index_unindexed() == 0
        arrays = s.encounters.matching_arrays()
        assert sorted(arrays.rpis[i:i + 16] for i in range(0, 32, 16)) == sorted(e.rpi for e in s.encounters.read())
        found = sorted(s.exposures.all(), key=lambda e: e.protocol)
        assert [(e.protocol, e.decided_by, e.day) for e in found] == [("gaen", "distance", 20000),
                                                                      ("robert", "server", 20000)]
        gaen_exposure, robert_exposure = found
        assert gaen_exposure.minutes == 22.0 and gaen_exposure.windows[0].distance_m == 0.87
        assert robert_exposure.minutes is None and robert_exposure.risk == 0.12
        # the same exposure cannot be added twice
        assert not s.exposures.add(gaen_exposure) and len(s.exposures.all()) == 2
        assert s.state.get(PendingDeclaration).certificate == LEGACY_PENDING["certificate"]
        assert s.state.get(ProcessedExports) == ProcessedExports(("a.zip",))
        clear_names = {n for (n,) in s.conn.execute("SELECT name FROM sync_state")}
        assert clear_names == {"exports.done"}
        if version >= 2:
            assert s.state.get(RobertStatus).at_risk is True
            reg = s.state.get(RobertRegistration)
            assert reg.time_start == 3_900_000_000 and reg.tuples[7] == (b"\x22" * 8, b"\x33")
        s.hellos.add([HeardHello(T0, b"h" * 16, -50)])
        assert s.hellos.all() == [HeardHello(T0, b"h" * 16, -50)]
    for p in files_of(path):  # nothing sensitive left in clear, in any file
        assert b"legacy-certificate" not in p.read_bytes()


def test_exposures_typed_and_unique(store):
    e = Exposure(day=20000, protocol="gaen", decided_by="distance", found_at=T0, minutes=16.0, threshold_min=15.0,
                 key_rolling_start=20000 * 144, report_type=1)
    assert store.exposures.add(e) and not store.exposures.add(e)
    other_key = Exposure(day=20000, protocol="gaen", decided_by="distance", found_at=T0, minutes=30.0,
                         key_rolling_start=19999 * 144)
    assert store.exposures.add(other_key)
    assert store.exposures.all() == [e, other_key] and store.exposures.days() == [20000]
    raw = store.conn.execute("SELECT uid FROM exposures").fetchall()
    assert all(str(20000 * 144) not in u for (u,) in raw)  # the uniqueness key reveals nothing


def test_hellos_as_arrays_are_stored_as_one_by_one(tmp_path, clock):
    """The simulator's array path writes the very bytes the daemon's path writes: the
    same rows per day, the same records in the same order (RSSI clamped to int8)."""
    import numpy as np

    rng = np.random.default_rng(5)
    times = T0 + np.sort(rng.uniform(-DAY / 2, DAY, 500))  # across UTC days
    hellos = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(500)]
    hellos[3] = b"\x00" * 15 + b"\x07"  # leading and trailing zero bytes survive
    hellos[4] = b"\x07" + b"\x00" * 15
    rssis = rng.integers(-140, 140, 500)
    plain = []
    for name, write in (("one", lambda s: s.hellos.add(HeardHello(t, h, int(r))
                                                       for t, h, r in zip(times.tolist(), hellos, rssis))),
                        ("arrays", lambda s: s.hellos.add_arrays(times, np.array(hellos, dtype="S16"), rssis))):
        with Store.create(tmp_path / f"{name}.db", fast_passphrase(), clock=clock) as s:
            assert write(s) == 500
            plain.append([(day, blob) for _, day, blob in s.rows.rows("hellos", "", ())])
            assert [h.hello for h in s.hellos.all()] == hellos
            assert {h.rssi for h in s.hellos.all()} <= set(range(-128, 128))
    assert len(plain[0]) >= 2 and plain[0] == plain[1]
    with Store.create(tmp_path / "bad.db", fast_passphrase(), clock=clock) as s:
        with pytest.raises(ValueError, match="same length"):
            s.hellos.add_arrays(times, np.array(hellos[:10], dtype="S16"), rssis)


def test_sensitive_state_is_encrypted_and_survives_retention(tmp_path, clock):
    with Store.create(tmp_path / "a.db", fast_passphrase(), clock=clock) as s:
        s.hellos.add([HeardHello(T0, b"h" * 16, -50)])
        reg = RobertRegistration(b"m" * 32, b"t" * 32, 3_900_000_000, {1: (b"e" * 8, b"c")})
        s.state.put(reg)
        s.state.put(PendingDeclaration("the-certificate", "aG1hYw==", (1, 2)))
        assert b"the-certificate" not in (tmp_path / "a.db").read_bytes()
        assert b"the-certificate" not in (tmp_path / "a.db-wal").read_bytes()
        clock.advance(30 * DAY)
        s.apply_retention()
        assert s.hellos.all() == [] and s.state.get(RobertRegistration) == reg
        s.state.clear(RobertRegistration)
        assert s.state.get(RobertRegistration) is None


def test_purge_erases_every_file_the_store_wrote(tmp_path, clock):
    from agent.store import purge
    path = tmp_path / "agent.db"
    with Store.create(path, fast_passphrase(), clock=clock) as s:
        s.encounters.write(make_encounters(2))
        (tmp_path / "agent.db.keyring.tmp123").write_bytes(b"a stale keyring copy")
    removed = purge(path)
    assert {p.name for p in removed} >= {"agent.db", "agent.db.keyring", "agent.db.keyring.tmp123"}
    assert list(tmp_path.iterdir()) == []


# -- what matching reads ------------------------------------------------------------------

def test_matching_index_is_bulk_encrypted_compacted_and_erased(tmp_path):
    """Closed encounters are indexed per flush (one encrypted row per day and flush), open
    ones are read from their rows; both agree with the encounters themselves; a finished
    day is merged into one row; retention erases it with the day; the file shows no RPI."""
    import random
    d0 = T0 // DAY
    clock = ManualClock((d0 + 1) * DAY - 3600)  # an hour before midnight: two days
    path = tmp_path / "agent.db"
    rng = random.Random(5)
    rpis = []
    with Store.create(path, fast_passphrase(), clock=clock) as s:
        agg = Aggregator()
        for minute in range(120):
            t = clock.t + minute * 60
            if minute % 7 == 0:
                rpis.append(rng.randbytes(16))  # a new peer identifier every 7 minutes; each heard 10 min
            for r in rpis[-2:]:
                agg.add_raw(t, r, bytes(4), -60)
            changed, closed = agg.flush_closing(t + 60)
            s.encounters.write(changed, closed=closed)
        assert len(agg) > 0  # some still open: in rows, not yet in the index
        clock.t += 2 * 3600

        def as_set(arrays):
            return sorted(zip(arrays.row_ids.tolist(), (arrays.rpis[i:i + 16] for i in range(0, len(arrays.rpis), 16)),
                              arrays.first_enin.tolist(), arrays.last_enin.tolist()))

        want = sorted((e.row_id, e.rpi, int(e.first_seen // 600), int(e.last_seen // 600))
                      for e in s.encounters.read())
        assert as_set(s.encounters.matching_arrays()) == want and len(want) == len(rpis)
        index_rows = dict(s.conn.execute("SELECT day, COUNT(*) FROM encounter_index GROUP BY day"))
        assert sorted(index_rows) == [d0, d0 + 1] and max(index_rows.values()) > 1
        assert s.encounters.compact_index(before_day=d0 + 1) == 1  # yesterday, over: one row
        assert dict(s.conn.execute("SELECT day, COUNT(*) FROM encounter_index GROUP BY day"))[d0] == 1
        assert as_set(s.encounters.matching_arrays()) == want
        today = {e.row_id for e in s.encounters.read(since_day=d0 + 1)}
        assert as_set(s.encounters.matching_arrays(since_day=d0 + 1)) == [w for w in want if w[0] in today]
    raw = b"".join(p.read_bytes() for p in files_of(path))
    assert not any(r in raw for r in rpis)
    clock.t += 20 * DAY
    with Store.open(path, fast_passphrase(), clock=clock) as s:  # retention: both days erased, index too
        assert s.conn.execute("SELECT COUNT(*) FROM encounter_index").fetchone()[0] == 0
        assert len(s.encounters.matching_arrays()) == 0


def test_index_rows_are_22_bytes_an_entry_and_older_32_byte_rows_still_read(tmp_path):
    """Index rows are written packed (a mark byte, 22 bytes an entry); the 32-byte entries
    of stores written before are read as they are, beside packed ones of the same day, and
    an entry that does not fit the packed form (a span over 255 intervals, a clock that
    went back) makes its row the 32-byte form: every entry comes back exactly."""
    import numpy as np

    from agent.store import tables

    d0 = T0 // DAY
    clock = ManualClock(d0 * DAY + 3600)
    with Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock) as s:
        new = make_encounters(5, t0=d0 * DAY + 3600)
        s.encounters.write(new, closed=new)
        (plain,) = [p for _, _, p in s.rows.rows("encounter_index")]
        assert plain[:1] == b"\x02" and len(plain) == 1 + 22 * 5
        # an older store's row (32-byte entries) of the same day, and rows that cannot be packed
        old = make_encounters(3, t0=d0 * DAY + 7200, seed=1)
        s.encounters.write(old)
        entries = tables._index_entries(old)
        row_id = s.rows.new_id("encounter_index")
        with s.rows.transaction() as c:
            c.execute("INSERT INTO encounter_index (id, day, blob) VALUES (?, ?, ?)",
                      (row_id, d0, s.rows.seal("encounter_index", row_id, d0, entries.tobytes())))
        odd = make_encounters(2, t0=d0 * DAY + 10800, seed=2)
        odd[0].last_seen = odd[0].first_seen + 300 * 600  # heard for 300 intervals (a replay)
        odd[1].last_seen = odd[1].first_seen - 1200  # the clock went back
        s.encounters.write(odd, closed=odd)
        packed_forms = sorted(len(p) % 2 for _, _, p in s.rows.rows("encounter_index"))
        assert packed_forms == [0, 0, 1]  # the older row, the row that did not fit; the packed one

        def as_set(arrays):
            return sorted(zip(arrays.row_ids.tolist(), (arrays.rpis[i:i + 16] for i in range(0, len(arrays.rpis), 16)),
                              arrays.first_enin.tolist(), arrays.last_enin.tolist()))

        want = sorted((e.row_id, e.rpi, int(e.first_seen // 600), max(0, int(e.last_seen // 600)))
                      for e in [*new, *old, *odd])
        assert as_set(s.encounters.matching_arrays()) == want
        assert s.encounters.compact_index(before_day=d0 + 1) == 1  # merged: one row, in the form its entries fit
        assert as_set(s.encounters.matching_arrays()) == want
        assert tables._unpack_index(b"\x02" + bytes(21), d0) is None  # neither form: skipped as corrupt
        assert len(tables._unpack_index(b"\x02", d0)) == 0 and np.all(
            tables._unpack_index(tables._pack_index(tables._index_entries(new), d0), d0) == tables._index_entries(new))


def _old_version_store(name, tmp_path):
    """A copy (0600) of the real store of an older version under tests/data/``name``, and
    what that version read of it (its expected.json)."""
    data = Path(__file__).parent / "data" / name
    for file in ("agent.db", "agent.db.keyring"):
        shutil.copy(data / file, tmp_path / file)
        os.chmod(tmp_path / file, 0o600)
    return tmp_path / "agent.db", json.loads((data / "expected.json").read_text())


def _matching_list(arrays):
    """Matching arrays as sorted [row id, RPI hex, first interval, last interval] lists."""
    return sorted([r, arrays.rpis[16 * i:16 * i + 16].hex(), f, la] for i, (r, f, la) in enumerate(
        zip(arrays.row_ids.tolist(), arrays.first_enin.tolist(), arrays.last_enin.tolist())))


def test_a_store_written_before_the_packed_index_reads_the_same(tmp_path):
    """A real store of the previous version (tests/data/store-32-byte-index, written by
    commit c52278d's own code): its 32-byte index rows give matching what that version
    read; new encounters of the same day are indexed packed beside them, and the day's
    rows merged give all of them back."""
    path, expected = _old_version_store("store-32-byte-index", tmp_path)
    d0 = 20420
    clock = ManualClock((d0 + 1) * DAY + 4 * 3600)

    with Store.open(path, Passphrase("old-store"), clock=clock) as s:
        assert sorted(len(p) % 32 for _, _, p in s.rows.rows("encounter_index")) == [0] * len(
            expected["index_row_lengths"])  # the old form, as written
        assert _matching_list(s.encounters.matching_arrays()) == expected["want"]
        new = make_encounters(4, t0=(d0 + 1) * DAY + 3600, seed=9)
        s.encounters.write(new, closed=new)
        assert any(len(p) % 2 for _, _, p in s.rows.rows("encounter_index"))  # packed, beside the old rows
        want = sorted(expected["want"] + [[e.row_id, e.rpi.hex(), int(e.first_seen // 600), int(e.last_seen // 600)]
                                          for e in new])
        assert _matching_list(s.encounters.matching_arrays()) == want
        s.encounters.compact_index(before_day=d0 + 2)
        assert _matching_list(s.encounters.matching_arrays()) == want


def test_a_store_of_schema_6_reads_back_exactly(tmp_path):
    """A real store of schema 6 (tests/data/store-schema-6-encounters, written by commit
    a9bd506's own code, float64 times in its records): opened by this version it reads
    back every field of every encounter as that version did, times bit for bit, and
    matching reads the same; a record rewritten takes the compact form (odd length), new
    ones are written beside, and all read back; no RPI in clear in any file."""
    from agent.exposure.encounter import Encounter
    from agent.store import SCHEMA_VERSION

    path, expected = _old_version_store("store-schema-6-encounters", tmp_path)
    d0 = 20430
    clock = ManualClock((d0 + 1) * DAY + 6 * 3600)

    def fields(e):
        return {"row": e.row_id, "day": e.day, "rpi": e.rpi.hex(), "aem": e.aem.hex(),
                "first": float(e.first_seen).hex(), "last": float(e.last_seen).hex(), "window_s": e.window_s,
                "tx": e.tx_power,
                "windows": [[w.index, w.count, w.power_sum_mw.hex(), w.rssi_max] for w in e.windows]}


    with Store.open(path, Passphrase("old-store-6"), clock=clock) as s:
        assert s.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION == 7
        assert sorted(len(p) for _, _, p in s.rows.rows("encounters")) == expected["record_lengths"]  # as written
        assert [fields(e) for e in s.encounters.read()] == expected["encounters"]
        assert _matching_list(s.encounters.matching_arrays()) == expected["matching"]
        assert s.stats.corrupt_rows == 0
        # one old encounter heard again: rewritten in the compact form
        old = next(iter(s.encounters.get_many([expected["encounters"][-5]["row"]]).values()))
        old.add(old.last_seen + 30.125, -44)
        new = make_encounters(3, t0=(d0 + 1) * DAY + 4 * 3600 + 0.375, seed=4)
        s.encounters.write([old, *new], closed=[old, *new])
        lengths = {i: len(p) for i, _, p in s.rows.rows("encounters")}
        assert lengths[old.row_id] % 2 == 1 and all(lengths[e.row_id] == 37 + 4 * len(e.windows) for e in new)
        # as written (a window's power sum is kept as its mean, rounded: read back, not as in memory)
        want = [*expected["encounters"][:-5], *[fields(Encounter.from_bytes(e.to_bytes(), e.row_id)) for e in [old]],
                *expected["encounters"][-4:], *[fields(Encounter.from_bytes(e.to_bytes(), e.row_id)) for e in new]]
        assert [fields(e) for e in s.encounters.read()] == want
        assert (want[-8]["first"], want[-8]["last"]) == (old.first_seen.hex(), old.last_seen.hex())
        assert [w[:2] + w[3:] for w in want[-8]["windows"]] == [[w.index, w.count, w.rssi_max] for w in old.windows]
        s.encounters.compact_index(before_day=d0 + 2)
        assert len(s.encounters.matching_arrays()) == len(want)
    with Store.open(path, Passphrase("old-store-6"), clock=clock, read_only=True) as s:
        assert [fields(e) for e in s.encounters.read()] == want
    raw = b"".join(p.read_bytes() for p in files_of(path))
    assert not any(bytes.fromhex(e["rpi"]) in raw for e in want)


# -- durability: the daemon's store syncs every commit; only the demo's may not ------------

_COUNT_SYNCS = r"""
import sys
from pathlib import Path
from agent.clock import ManualClock
from agent.store import Passphrase, Store
from tests.test_store import make_encounters
durable = sys.argv[2] == "durable"
s = Store.create(Path(sys.argv[1]), Passphrase("p", scrypt={"n": 2**10, "r": 8, "p": 1}),
                 clock=ManualClock(20000 * 86400 + 3600), durable=durable)
print("WRITING", flush=True)
for k in range(20):
    s.encounters.write(make_encounters(3, seed=k))
print("DONE", flush=True)
"""


def _fdatasyncs_while_writing(tmp_path, mode: str) -> int:
    """fdatasync calls (SQLite's commits; the keyring's new day keys use fsync) between
    WRITING and DONE, counted by strace (writes of the marker lines delimit the span)."""
    import re
    log = tmp_path / f"strace-{mode}.txt"
    r = subprocess.run(["strace", "-f", "-e", "trace=fdatasync,fsync,write", "-o", str(log), sys.executable, "-c",
                        _COUNT_SYNCS, str(tmp_path / f"{mode}.db"), mode], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0 or "DONE" not in r.stdout:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()[-200:]}")
    text = log.read_text()
    span = text[text.index("WRITING"):text.index("DONE")]
    return len(re.findall(r"\bfdatasync\(", span))


def test_the_daemons_store_syncs_every_commit_and_the_demos_need_not(tmp_path, store):
    """The daemon opens its store through agent.app (durable: synchronous=FULL, an
    fdatasync per committed batch); the demo's simulated devices ask for synchronous=OFF."""
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the default
    from agent import app
    from agent.config import Config
    cfg = Config()
    cfg.agent.data_dir = str(tmp_path / "device")
    cfg.agent.key = "keyfile"
    (tmp_path / "device").mkdir()
    create_key_file(cfg.key_file)
    Store.create(cfg.db_path, KeyFile(cfg.key_file)).close()
    with app.open_store(cfg) as device_store:  # the daemon's and every command's way in
        assert device_store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    from agent.demo.fleet import Fleet
    import random
    from agent.exposure.rule import ProximityConfig
    with Fleet("gaen", 4, 1, 1, random.Random(1), ManualClock(T0), ProximityConfig()) as fleet:
        assert {s.conn.execute("PRAGMA synchronous").fetchone()[0] for s in fleet.stores} == {0}  # OFF
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: the syscalls themselves are not counted")
    assert _fdatasyncs_while_writing(tmp_path, "durable") >= 20  # one (or more) per committed batch
    assert _fdatasyncs_while_writing(tmp_path, "not-durable") == 0
