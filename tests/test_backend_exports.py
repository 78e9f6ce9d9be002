"""The publish -> export path under hostile or concurrent use, over real HTTP on
127.0.0.1, on SQLite and PostgreSQL: a number outside its range never reaches an export
file, a bad stored row never stops a batch."""

import collections
import logging
import os
import secrets
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa

from agent.protocol import export, gaen
from backend import Backend, BackendConfig, db
from backend import exports as export_job

from .backend_requests import certified, prepared_publish, publish_body, random_keys
from .helpers import wait_until

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exported_keys(backend) -> list[bytes]:
    """Every key in the files index.txt lists (padding included), once per appearance."""
    out = []
    for name in (backend.config.exports_dir / "index.txt").read_text().split():
        exp = export.parse_export((backend.config.exports_dir / name).read_bytes(),
                                  trusted_keys=[backend.public_key_b64])
        out += [k.key_data for k in exp.keys]
    return out


def assert_every_key_in_exactly_one_file(backend, published: list[bytes]) -> None:
    """The invariant of the export files: index.txt names each file once, every
    published key is in exactly one listed file, and a key marked exported is in one."""
    index = (backend.config.exports_dir / "index.txt").read_text().split()
    seen = collections.Counter(exported_keys(backend))
    waiting = set(pending_ids(backend))
    marked = {r.key_data for r in stored(backend) if r.id not in waiting and r.batch_id != export_job.QUARANTINED}
    missing = [k for k in published if seen[k] == 0]
    twice = [k for k in published if seen[k] > 1]
    assert len(index) == len(set(index)) and not missing and not twice, (
        f"{len(published)} published keys: {len(missing)} in no file, {len(twice)} in more than one; "
        f"index.txt: {len(index)} lines, {len(set(index))} files")
    assert set(published) <= marked and all(seen[k] == 1 for k in marked)


def twin(backend, clock):
    """A second backend on the same data folder and database: another process's view."""
    return Backend(BackendConfig(backend.config.data_dir, database_url=backend.config.database_url,
                                 export_min_keys=backend.config.export_min_keys,
                                 export_period_s=backend.config.export_period_s), clock=clock)


def pending_ids(backend) -> list[int]:
    """The rows that wait for an export run."""
    with backend.engine.connect() as c:
        return [i for (i,) in c.execute(sa.select(db.pending.c.id))]


def stored(backend, **where):
    with backend.engine.connect() as c:
        q = sa.select(db.exposures)
        for col, value in where.items():
            q = q.where(getattr(db.exposures.c, col) == value)
        return c.execute(q.order_by(db.exposures.c.id)).fetchall()


# -- point 7: one upload must not stop all exports ----------------------------------------

def test_one_poisoned_upload_does_not_stop_exports(backend, live, clock):
    """An onset of 2**40 outside the certificate's HMAC was stored (SQLite) or answered
    500 (PostgreSQL), and every later export failed with 'Value out of range'."""
    legit = []
    with httpx.Client(base_url=live.url) as http:
        for i in range(20):
            body, keys = prepared_publish(backend, clock.t)
            if i == 10:
                poisoned, _ = prepared_publish(backend, clock.t, symptomOnsetInterval=2**40)
                r = http.post("/v1/publish", json=poisoned)
                assert r.status_code == 400 and r.json()["code"] == "invalid_request"
                assert "symptomOnsetInterval" in r.json()["error"]
            assert http.post("/v1/publish", json=body).json()["insertedExposures"] == 14
            legit += keys
        # a 32-bit onset that makes no sense (far in the future) is ignored, as the key server does
        odd, odd_keys = prepared_publish(backend, clock.t, symptomOnsetInterval=2**31 - 1)
        assert http.post("/v1/publish", json=odd).json()["insertedExposures"] == 14
    assert all(r.days_since_onset is None for r in stored(backend) if r.key_data in odd_keys)
    assert len(stored(backend)) == 294
    clock.advance(3600)
    assert backend.exports.run() != []
    assert sorted(set(exported_keys(backend)) & set(legit + odd_keys)) == sorted(legit + odd_keys)


def test_certificate_onset_wins_and_keys_far_from_it_are_not_saved(backend, live, clock):
    today = gaen.rolling_start_for_day(clock.t)
    keys = random_keys(clock.t, 14)  # 1..14 days old
    onset = today - 2 * gaen.TEK_ROLLING_PERIOD
    body = publish_body(keys, certified(backend, keys, onset=onset), symptomOnsetInterval=today - 10 * 144)
    r = httpx.post(live.url + "/v1/publish", json=body)
    assert r.status_code == 200 and r.json()["insertedExposures"] == 14
    assert sorted(r.days_since_onset for r in stored(backend)) == list(range(-12, 2))  # the certificate's onset

    keys = random_keys(clock.t, 15)
    onset = today  # the 14-day-old key is 14 days before it: saved; the 15-day-old one is not
    body = publish_body(keys, certified(backend, keys, onset=onset))
    r = httpx.post(live.url + "/v1/publish", json=body).json()
    assert r["insertedExposures"] == 14 and r["warnings"] == ["key 14 is 15 days from the symptom onset (over 14): "
                                                              "not saved"]
    assert len(stored(backend)) == 28 and keys[14].key_data not in {r.key_data for r in stored(backend)}


def test_lab_api_refuses_an_onset_out_of_range(backend, live, clock):
    key = backend.verification.add_api_key("lab-1")
    today = gaen.rolling_start_for_day(clock.t)
    for onset, code in ((2**40, "invalid_request"), (today + 2 * 144, "onset_invalid"),
                        (today - 40 * 144, "onset_invalid")):
        r = httpx.post(live.url + "/api/issue", json={"symptomOnsetInterval": onset}, headers={"X-API-Key": key})
        assert r.status_code == 400 and r.json()["errorCode"] == code, onset
    r = httpx.post(live.url + "/api/issue", json={"symptomOnsetInterval": today - 3 * 144}, headers={"X-API-Key": key})
    assert r.status_code == 200


def test_export_sets_a_bad_stored_row_aside(backend, clock, caplog):
    """Rows written around the API (an older version, a hand edit) that no export file
    can hold: the batch goes on without them, each is logged once (no key bytes) and
    stays in the database, out of every file."""
    good, keys = prepared_publish(backend, clock.t)
    backend.publisher.publish(good)
    yesterday = gaen.rolling_start_for_day(clock.t) - gaen.TEK_ROLLING_PERIOD
    base = {"rolling_start": yesterday, "rolling_period": 144, "transmission_risk": 0, "report_type": 1,
            "days_since_onset": None, "health_authority": "x", "received_at": clock.t, "export_after": clock.t}
    bad = [dict(base, key_data=b"\xab" * 15), dict(base, key_data=b"\xac" * 16, report_type=99),
           dict(base, key_data=b"\xad" * 16, rolling_period=0)]
    if backend.engine.dialect.name == "sqlite":  # PostgreSQL's INTEGER cannot even hold these
        bad += [dict(base, key_data=b"\xae" * 16, days_since_onset=2**40),
                dict(base, key_data=b"\xaf" * 16, rolling_start=2**40)]
    with backend.engine.begin() as c:
        c.execute(sa.insert(db.exposures), bad)
    clock.advance(3600)
    with caplog.at_level(logging.INFO, logger="ctagent.backend"):
        assert len(backend.exports.run()) == 1
    assert sorted(set(exported_keys(backend)) & set(keys)) == sorted(keys)
    assert len(stored(backend, batch_id=export_job.QUARANTINED)) == len(bad)
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == len(bad)
    assert not any(b in line for line in lines for b in ("\\xab", "\\xac", "abab", "q6ur", "\\xad", "\\xae"))
    caplog.clear()
    clock.advance(3600)
    with caplog.at_level(logging.INFO, logger="ctagent.backend"):
        backend.exports.run()
    assert not [r for r in caplog.records if "quarantined" in r.getMessage()]  # set aside once, for good


# -- point 8: overlapping export jobs must not lose keys -----------------------------------

def test_a_second_export_job_waits_for_the_first(backend, clock, caplog, monkeypatch):
    """Job A has read its rows and is signing; more keys arrive; job B (another process's
    backend) starts. B used to export them all under A's file name, then A overwrote that
    file with its older rows: the late keys were marked exported but in no file, and
    index.txt listed the name twice."""
    other = twin(backend, clock)
    published = []
    for _ in range(3):
        body, keys = prepared_publish(backend, clock.t)
        backend.publisher.publish(body)
        published += keys
    clock.advance(3600)
    signing, go = threading.Event(), threading.Event()
    build = export.build_export_packed

    def slow_build(*a, **kw):
        if threading.current_thread().name == "job-a":
            signing.set()
            assert go.wait(30)
        return build(*a, **kw)

    monkeypatch.setattr(export_job.export, "build_export_packed", slow_build)
    caplog.set_level(logging.INFO, logger="ctagent.backend")
    a = threading.Thread(target=backend.exports.run, name="job-a")
    b = threading.Thread(target=other.exports.run, name="job-b")
    a.start()
    wait_until(signing.is_set, what="job A to sign")
    for _ in range(2):
        body, keys = prepared_publish(backend, clock.t)
        backend.publisher.publish(body)
        published += keys
    b.start()
    wait_until(lambda: not b.is_alive() or "another export job is running" in caplog.text, what="job B")
    go.set()
    a.join(30)
    b.join(30)
    assert not a.is_alive() and not b.is_alive()
    clock.advance(3600)
    backend.exports.run()
    assert_every_key_in_exactly_one_file(backend, published)
    other.engine.dispose()


def test_concurrent_publishes_and_export_runs_keep_every_key_once(backend, live, clock):
    """Publishes over HTTP while two export jobs (two backends, as two processes) run at
    once, again and again: every acknowledged key ends in exactly one listed file."""
    backend.config.export_period_s = 60
    backend.config.export_min_keys = 2000  # padding: each run signs long enough to overlap
    other = twin(backend, clock)
    published = []
    with httpx.Client(base_url=live.url) as http, ThreadPoolExecutor(8) as pool:
        def publish(body):
            r = http.post("/v1/publish", json=body)
            assert r.status_code == 200, r.text
            return r.json()["insertedExposures"]

        for _ in range(6):
            clock.advance(60)
            prepared = [prepared_publish(backend, clock.t) for _ in range(9)]
            runs = [pool.submit(job.run) for job in (backend.exports, other.exports)]
            acked = list(pool.map(publish, [b for b, _ in prepared]))
            assert acked == [14] * 9
            published += [k for _, keys in prepared for k in keys]
            for r in runs:
                r.result(timeout=60)
    clock.advance(120)
    backend.exports.run()
    assert len(published) == 6 * 9 * 14
    assert_every_key_in_exactly_one_file(backend, published)
    other.engine.dispose()


def test_two_export_processes_at_once(backend, clock):
    """Two `ctagent backend export` commands started together (cron and a person, say)."""
    n = 40_000
    rows = [{"key_data": secrets.token_bytes(16), "rolling_start": gaen.rolling_start_for_day(clock.t) - 144,
             "rolling_period": 144, "transmission_risk": 0, "report_type": 1, "days_since_onset": None,
             "health_authority": "x", "received_at": clock.t, "export_after": 0.0} for _ in range(n)]
    with backend.engine.begin() as c:
        c.execute(sa.insert(db.exposures), rows)
    cmd = [sys.executable, "-m", "cli", "backend", "--data-dir", str(backend.config.data_dir)]
    if backend.config.database_url:
        cmd += ["--database", backend.config.database_url]
    procs = [subprocess.Popen(cmd + ["export"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_every_key_in_exactly_one_file(backend, [r["key_data"] for r in rows])
    written = sorted(out.strip().splitlines()[0] for out, _ in outs)
    assert written == ["0 export file(s) written", "1 export file(s) written"], outs


def test_the_export_lock_gives_up_in_time_and_dies_with_its_holder(backend):
    with db.job_lock(backend.engine, "export", wait_s=1):
        with pytest.raises(db.JobBusy, match="another export job"):
            with db.job_lock(backend.engine, "export", wait_s=0.2):
                pass
        with db.job_lock(backend.engine, "other-job", wait_s=0):  # locks are per name
            pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from backend import db\n"
         "with db.job_lock(db.make_engine(sys.argv[1]), 'export', wait_s=0):\n"
         "    print('held', flush=True); time.sleep(120)", backend.config.database],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(db.JobBusy):
            with db.job_lock(backend.engine, "export", wait_s=0):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    with db.job_lock(backend.engine, "export", wait_s=10):
        pass


# -- publishes at the same moment ------------------------------------------------------------

def at_once(pool, http, bodies):
    """POST every body to /v1/publish at the same moment; the answers."""
    gate = threading.Barrier(len(bodies))

    def send(body):
        gate.wait(10)
        return http.post("/v1/publish", json=body)

    return list(pool.map(send, bodies))


def unpadded(r: httpx.Response) -> dict:
    return {k: v for k, v in r.json().items() if k != "padding"}


def test_publishes_racing_each_other_are_answered_as_one_after_the_other(backend, live, clock):
    """A client's retry sent while the first request is being stored, and two uploads
    sharing keys: each was a 500 (a unique key clash) and a retry could be told it
    inserted 0 keys; now as if they came one after the other."""
    with httpx.Client(base_url=live.url) as http, ThreadPoolExecutor(4) as pool:
        for _ in range(8):
            body, _ = prepared_publish(backend, clock.t)
            answers = at_once(pool, http, [body, body])
            assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
            first, second = (unpadded(r) for r in answers)  # each answer has its own random padding
            assert first == second and first["insertedExposures"] == 14
        for _ in range(8):  # two certificates, the same keys
            keys = random_keys(clock.t)
            answers = at_once(pool, http, [publish_body(keys, certified(backend, keys)) for _ in range(2)])
            assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
            assert sorted(r.json()["insertedExposures"] for r in answers) == [0, 14]
    assert len(stored(backend)) == 16 * 14


# -- exports at scale: one step, no parameter per key ---------------------------------------

def _insert_keys(backend, clock, n) -> list[bytes]:
    """``n`` uploaded keys past their embargo, made by the database itself (quick)."""
    start = gaen.rolling_start_for_day(clock.t) - 144
    rows = ("SELECT decode(md5(random()::text || i::text), 'hex') AS k FROM generate_series(1, :n) AS i"
            if backend.engine.dialect.name == "postgresql" else
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n) "
            "SELECT randomblob(16) AS k FROM s")
    with backend.engine.begin() as c:
        c.execute(sa.text("INSERT INTO exposures (key_data, rolling_start, rolling_period, transmission_risk, "
                          "report_type, health_authority, received_at, export_after) "
                          f"SELECT k, :start, 144, 0, 1, 'x', :now, 0 FROM ({rows}) AS keys"),
                  {"n": n, "start": start, "now": clock.t})
        return [k for (k,) in c.execute(sa.select(db.exposures.c.key_data).join(
            db.pending, db.pending.c.id == db.exposures.c.id))]


def test_a_run_killed_between_its_files_and_its_commit_leaves_nothing_half_done(backend, clock):
    """SIGKILL after the files are written, before the transaction that records them:
    no batch, no key marked, index.txt as it was; the next run removes the orphan files
    and exports every key once."""
    import signal
    keys = _insert_keys(backend, clock, 3000)
    index_before = (backend.config.exports_dir / "index.txt").read_bytes()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from agent.clock import ManualClock\n"
         "from backend import Backend, BackendConfig, exports\n"
         "def stop(*a):\n"
         "    print('files written', flush=True); time.sleep(120)\n"
         "exports.ExportJob._commit_batch = staticmethod(stop)\n"
         "b = Backend(BackendConfig(__import__('pathlib').Path(sys.argv[1]), database_url=sys.argv[2] or None,"
         " export_max_keys=1000), clock=ManualClock(float(sys.argv[3])))\n"
         "b.exports.run()\n",
         str(backend.config.data_dir), backend.config.database_url or "", str(clock.t + 3600)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "files written"
        orphans = sorted(p.name for p in backend.config.exports_dir.glob("*.zip"))
        assert len(orphans) == 3
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    with backend.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(db.batches)).scalar() == 0
    assert len(pending_ids(backend)) == len(keys)  # every key still waits
    assert (backend.config.exports_dir / "index.txt").read_bytes() == index_before
    clock.advance(3600)
    names = backend.exports.run()
    assert len(names) == 1  # the orphans are gone (one name may come again: the same window and batch id)
    assert sorted(p.name for p in backend.config.exports_dir.glob("*.zip")) == names
    assert_every_key_in_exactly_one_file(backend, keys)


def test_100k_keys_exported_with_no_statement_holding_a_parameter_per_key(backend, clock):
    """PostgreSQL takes at most 65,535 parameters in a statement: the run marks its rows
    by joining its temporary table of ids, never by listing them."""
    if backend.engine.dialect.name != "postgresql":
        pytest.skip("the limit is PostgreSQL's (SQLite's is 250,000 here, 32,766 in stock builds)")
    keys = _insert_keys(backend, clock, 100_000)
    assert len(keys) == 100_000
    widest = []

    def count(conn, cursor, statement, parameters, context, executemany):
        widest.append(len(parameters) if isinstance(parameters, dict | tuple | list) and not executemany else 1)

    sa.event.listen(backend.engine, "before_cursor_execute", count)
    try:
        clock.advance(3600)
        assert len(backend.exports.run()) == 1
    finally:
        sa.event.remove(backend.engine, "before_cursor_execute", count)
    assert max(widest) <= 10
    assert_every_key_in_exactly_one_file(backend, keys)


def test_a_database_of_an_older_version_keeps_its_waiting_keys(backend, clock):
    """Before export_pending, a waiting key was one with no batch: the first start of this
    version puts those (and only those) in export_pending; new rows wait by themselves."""
    pg = backend.engine.dialect.name == "postgresql"
    with backend.engine.begin() as c:  # as an older version left it
        c.exec_driver_sql("DROP TRIGGER exposures_pending" + (" ON exposures" if pg else ""))
        c.exec_driver_sql("DROP TABLE export_pending")
    base = {"rolling_start": gaen.rolling_start_for_day(clock.t) - 144, "rolling_period": 144,
            "transmission_risk": 0, "report_type": 1, "days_since_onset": None, "health_authority": "x",
            "received_at": clock.t, "export_after": 0.0}
    waiting = [dict(base, key_data=os.urandom(16)) for _ in range(5)]
    done = [dict(base, key_data=os.urandom(16), batch_id=7) for _ in range(3)]
    with backend.engine.begin() as c:  # two statements: an executemany takes the first row's columns
        c.execute(sa.insert(db.exposures), waiting)
        c.execute(sa.insert(db.exposures), done)
    engine = db.make_engine(backend.config.database)  # the first start of this version
    try:
        with engine.begin() as c:
            c.execute(sa.insert(db.exposures), [dict(base, key_data=os.urandom(16))])
            keys = {k for (k,) in c.execute(sa.select(db.exposures.c.key_data).join(
                db.pending, db.pending.c.id == db.exposures.c.id))}
        assert len(keys) == 6 and {r["key_data"] for r in waiting} <= keys
        assert not keys & {r["key_data"] for r in done}
    finally:
        engine.dispose()


def test_insert_new_stores_each_value_as_given_and_skips_stored_keys(backend):
    """The key insert (one statement of fixed text on PostgreSQL, the rows as one JSON
    parameter; one VALUES row per key on SQLite): bytes (a NUL among them), NULLs, an int
    beside floats in a float column, floats of every digit, text that JSON escapes, a key
    stored already (skipped, not counted) and a text key column (an outside certificate's jti)."""
    rows = [{"key_data": bytes([i]) * 15 + b"\0", "rolling_start": 2_900_000 + i, "rolling_period": 144,
             "transmission_risk": i % 9, "report_type": 1, "days_since_onset": None if i % 2 else -i,
             "health_authority": 'lab "ü" \\ é', "received_at": 1_700_000_000.123456789 + i / 3,
             "export_after": 1_700_000_000 + i if i % 2 else 0.1 + 0.2}
            for i in range(5)]
    with backend.engine.begin() as c:
        assert db.insert_new(c, db.exposures, rows[:3], "key_data") == 3
        assert db.insert_new(c, db.exposures, rows, "key_data") == 2  # the first three are stored
        assert db.insert_new(c, db.exposures, [], "key_data") == 0
        assert db.insert_new(c, db.certificates, [{"jti": "a" * 64}], "jti") == 1
        assert db.insert_new(c, db.certificates, [{"jti": "a" * 64}], "jti") == 0
    with backend.engine.connect() as c:
        stored = {r.key_data: r for r in c.execute(sa.select(db.exposures))}
    assert len(stored) == 5
    for r in rows:
        s = stored[r["key_data"]]
        assert (s.rolling_start, s.transmission_risk, s.days_since_onset, s.export_after, s.received_at,
                s.health_authority) == (r["rolling_start"], r["transmission_risk"], r["days_since_onset"],
                                        r["export_after"], r["received_at"], r["health_authority"])


def test_processes_starting_together_create_the_schema_once_without_error(request, tmp_path):
    """Several processes opening one new database at once (a server's workers, an export
    run from cron): on PostgreSQL two concurrent ``CREATE OR REPLACE FUNCTION`` of the
    trigger failed one of them ("tuple concurrently updated"), and two table creations
    could race. Eight openers at once, five times, on a fresh schema each time."""
    pg = request.getfixturevalue("postgres")
    if pg.url is None:
        pytest.skip(pg.skip_reason)
    from backend.robert import metadata as robert_metadata

    def fresh() -> None:
        engine = sa.create_engine(pg.url)
        with engine.begin() as c:
            db.metadata.drop_all(c)
            robert_metadata.drop_all(c)
            c.exec_driver_sql("DROP FUNCTION IF EXISTS ctagent_exposure_pending() CASCADE")
        engine.dispose()

    def open_database(gate: threading.Barrier) -> None:
        gate.wait()
        backend = Backend(BackendConfig(tmp_path / f"b{threading.get_ident()}", database_url=pg.url))
        try:
            from backend.robert import RobertConfig, RobertServer
            RobertServer(backend, RobertConfig())
        finally:
            backend.engine.dispose()

    for _ in range(5):
        fresh()
        gate = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            for f in [pool.submit(open_database, gate) for _ in range(8)]:
                f.result(timeout=60)
    fresh()
