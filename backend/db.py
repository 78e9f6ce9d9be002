"""Tables (SQLAlchemy Core: SQLite embedded by default, PostgreSQL from a URL), the
engine, and :func:`job_lock`: one holder at a time across threads and processes."""

from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from agent.errors import UserError

metadata = sa.MetaData()

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(64), unique=True, nullable=False),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("health_authority", sa.String(64), nullable=False),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("health_authority", sa.String(64), nullable=False),
)

codes = sa.Table(
    "codes", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("short_hash", sa.String(64), unique=True, nullable=False),
    sa.Column("long_hash", sa.String(64), unique=True, nullable=False),
    sa.Column("short_expires_at", sa.Float, nullable=False),
    sa.Column("long_expires_at", sa.Float, nullable=False),
    sa.Column("test_type", sa.String(16), nullable=False),
    sa.Column("symptom_onset_interval", sa.Integer, nullable=True),
    sa.Column("issued_by", sa.String(64), nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=True),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("code_id", sa.Integer, sa.ForeignKey("codes.id"), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float, nullable=True),
)

certificates = sa.Table(
    "certificates", metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("used_at", sa.Float, nullable=True),
    sa.Column("response", sa.Text, nullable=True),  # for idempotent re-publish
)

exposures = sa.Table(
    "exposures", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key_data", sa.LargeBinary(16), nullable=False, unique=True),
    sa.Column("rolling_start", sa.Integer, nullable=False),
    sa.Column("rolling_period", sa.Integer, nullable=False),
    sa.Column("transmission_risk", sa.Integer, nullable=False),
    sa.Column("report_type", sa.Integer, nullable=False),
    sa.Column("days_since_onset", sa.Integer, nullable=True),
    sa.Column("health_authority", sa.String(64), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("export_after", sa.Float, nullable=False),
    # 0: cannot be exported (quarantined); older versions wrote here the batch a key went
    # out in (whether a key waits is export_pending's to say)
    sa.Column("batch_id", sa.Integer, nullable=True),
)

#: the keys that wait for an export run (a trigger adds every new exposures row): a run
#: takes its rows from here and, in the transaction that records its batch, deletes them,
#: a narrow table's rows instead of a million wide rows of ``exposures`` rewritten (on
#: PostgreSQL, with every index of theirs: 21 s instead of 2 for a million keys)
pending = sa.Table(
    "export_pending", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("export_after", sa.Float, nullable=False, index=True),
)

#: every new exposures row waits for an export (publishes, and rows written around the API)
_PENDING_TRIGGER = {
    "sqlite": ["CREATE TRIGGER IF NOT EXISTS exposures_pending AFTER INSERT ON exposures WHEN NEW.batch_id IS NULL "
               "BEGIN INSERT INTO export_pending (id, export_after) VALUES (NEW.id, NEW.export_after); END"],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION ctagent_exposure_pending() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO export_pending (id, export_after) VALUES (NEW.id, NEW.export_after); RETURN NULL; END $$",
        "CREATE OR REPLACE TRIGGER exposures_pending AFTER INSERT ON exposures FOR EACH ROW "
        "WHEN (NEW.batch_id IS NULL) EXECUTE FUNCTION ctagent_exposure_pending()"],
}

batches = sa.Table(
    "export_batches", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("start", sa.Integer, nullable=False),
    sa.Column("end", sa.Integer, nullable=False),
    sa.Column("files", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


#: the journals SQLite keeps beside a database in WAL mode
SQLITE_JOURNALS = ("-wal", "-shm")


def private_sqlite_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does (SQLite gives its WAL and shared
    memory files the database's mode), and take group and other access from ones an
    older version left readable."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for p in (path, *(Path(f"{path}{suffix}") for suffix in SQLITE_JOURNALS)):
        try:
            if os.stat(p).st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


def _without_row_values(ctx: sa.engine.ExceptionContext) -> None:
    """PostgreSQL's errors carry DETAIL lines that quote the row (``Key (key_data)=(\\x2a11...)
    already exists``): keep its one-line message only, in the driver's exception and in
    SQLAlchemy's, which the log's traceback prints both."""
    orig = ctx.original_exception
    primary = getattr(getattr(orig, "diag", None), "message_primary", None)
    if not primary:
        return
    orig.args = (primary,)
    if ctx.sqlalchemy_exception is not None:
        ctx.sqlalchemy_exception.args = (f"({type(orig).__module__}.{type(orig).__name__}) {primary}",)


#: database connections a process keeps (a server process runs up to 40 requests at once
#: in its thread pool; most wait on the network, a few on the database)
POOL_SIZE = 20
POOL_OVERFLOW = 20


def make_engine(url: str) -> sa.Engine:
    """The engine of ``url``. An error's text never holds SQL parameters or row values
    (keys, hashes, codes): errors go to logs."""
    if url.startswith(("postgresql:", "postgres:")):  # SQLAlchemy's default driver would be psycopg2
        url = "postgresql+psycopg:" + url.split(":", 1)[1]
    if url.startswith("postgresql+psycopg:"):
        from agent.extras import require

        require("postgresql", what="a PostgreSQL database (--database postgresql://...)")
    kw: dict = {"hide_parameters": True}
    if url.startswith("sqlite"):
        kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # as many kept connections as requests a process serves at once: beyond the pool,
        # each request would open (PostgreSQL: fork) a connection and close it after
        kw.update(pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
    engine = sa.create_engine(url, **kw)
    if engine.dialect.name == "postgresql":
        sa.event.listen(engine, "handle_error", _without_row_values)
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        private_sqlite_file(Path(str(engine.url.database)))
    if url.startswith("sqlite"):
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _rec):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    with schema_change(engine) as c:
        had_pending = sa.inspect(c).has_table("export_pending")
        metadata.create_all(c)
        _pending_on_insert(c, migrate=not had_pending)
    return engine


@contextmanager
def schema_change(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction for creating or changing the schema, one process at a time on
    PostgreSQL (an advisory lock held to its end): processes that open a new database
    together, a server's workers or an export run from cron, raced in ``CREATE TABLE``
    (a duplicate type) and in ``CREATE OR REPLACE FUNCTION`` ("tuple concurrently
    updated"), and one of them failed. SQLite's writers are one at a time already."""
    with engine.begin() as c:
        if c.dialect.name == "postgresql":
            c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _advisory_key("schema")})
        yield c


def _pending_on_insert(c: sa.Connection, *, migrate: bool) -> None:
    """The trigger that makes every new exposures row wait for an export; ``migrate``: a
    database of an older version, whose waiting keys were those with no batch, gets them
    in export_pending and loses the two indexes the runs no longer read."""
    for ddl in _PENDING_TRIGGER[c.dialect.name]:
        c.exec_driver_sql(ddl)
    if migrate:
        c.exec_driver_sql("INSERT INTO export_pending (id, export_after) SELECT id, export_after FROM exposures "
                          "WHERE batch_id IS NULL AND id NOT IN (SELECT id FROM export_pending)")
        for index in ("ix_exposures_batch_id", "ix_exposures_export_after"):
            c.exec_driver_sql(f"DROP INDEX IF EXISTS {index}")


def insert_new(conn: sa.Connection, table: sa.Table, rows: list[dict], unique: str) -> int:
    """Insert the rows whose ``unique`` column holds no stored value yet, in one
    statement (``ON CONFLICT DO NOTHING``: a row another transaction is inserting at the
    same moment is waited for, then skipped, never an error); how many were inserted."""
    if not rows:
        return 0
    columns = tuple(rows[0])
    if conn.dialect.name == "postgresql":
        # the rows as one JSON parameter: the statement's text is the same whatever the
        # number of rows, so the driver prepares it once (a VALUES row per key was a new
        # text, parsed and planned each time); one string to send instead of an array a
        # column (psycopg builds arrays in Python: 0.41-0.46 ms of a 14-key publish, the
        # JSON 0.21-0.27 ms, with the same database CPU)
        doc = json.dumps([{c: base64.b64encode(v).decode() if isinstance(v, bytes) else v for c, v in r.items()}
                          for r in rows])
        return len(conn.exec_driver_sql(_pg_json_insert(table, columns, unique), (doc,)).fetchall())
    from sqlalchemy.dialects import sqlite

    primary = list(table.primary_key.columns)[0]
    stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=[unique]).returning(primary)
    return len(conn.execute(stmt, rows).fetchall())


@functools.lru_cache(maxsize=32)
def _pg_json_insert(table: sa.Table, columns: tuple[str, ...], unique: str) -> str:
    """``INSERT … SELECT`` from ``json_to_recordset`` of one parameter: binary columns as
    base64 text (JSON has no bytes), every other value as JSON holds it (a float's
    shortest repr reads back as the same double)."""
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    binary = {c for c in columns if isinstance(table.c[c].type, sa.LargeBinary)}
    record = ", ".join(f"{c} {'text' if c in binary else table.c[c].type.compile(dialect=dialect)}" for c in columns)
    values = ", ".join(f"decode(x.{c}, 'base64')" if c in binary else f"x.{c}" for c in columns)
    primary = list(table.primary_key.columns)[0].name
    return (f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {values} FROM json_to_recordset(%s::json) "
            f"AS x({record}) ON CONFLICT ({unique}) DO NOTHING RETURNING {primary}")


# -- one job at a time -------------------------------------------------------------------

#: how often a waiting SQLite job looks at the lock again
_LOCK_POLL_S = 0.05
#: job locks of databases without a file (SQLite in memory: one process)
_memory_locks: dict[str, threading.Lock] = {}


class JobBusy(UserError):
    """Another holder kept a job lock for longer than the caller would wait."""


def _advisory_key(name: str) -> int:
    """A stable signed 64-bit key of PostgreSQL's advisory lock space for ``name``."""
    return int.from_bytes(hashlib.sha256(f"ctagent|{name}".encode()).digest()[:8], "big", signed=True)


def lock_file(engine: sa.Engine, name: str) -> Path | None:
    """The file beside a SQLite database that its ``name`` jobs lock; None in memory."""
    database = engine.url.database
    if not database or database == ":memory:":
        return None
    return Path(f"{database}.{name}.lock")


@contextmanager
def job_lock(engine: sa.Engine, name: str, *, wait_s: float,
             on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock ``name`` of this database for the ``with`` block: one holder at a time,
    whichever thread or process, on any machine sharing the database. Waits up to
    ``wait_s`` seconds for a holder to finish (calling ``on_wait`` once first), then
    raises :class:`JobBusy`. A holder that dies releases the lock with it.

    PostgreSQL: a transaction-level advisory lock (``pg_advisory_xact_lock``) on a
    connection of its own, kept for the block. SQLite: an exclusive ``flock`` on a file
    beside the database (an exclusive transaction on the database itself would stall
    every writer, the publish requests too, for as long as the job runs)."""
    busy = JobBusy(f"another {name} job has been running for over {wait_s:g} s; try again when it is done")
    if engine.dialect.name == "postgresql":
        key = _advisory_key(name)
        with engine.connect() as c, c.begin():
            if not c.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar():
                if on_wait:
                    on_wait()
                c.execute(sa.text(f"SET LOCAL lock_timeout = {max(1, int(wait_s * 1000))}"))
                try:
                    c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
                except sa.exc.OperationalError:
                    raise busy from None
            yield  # released when this transaction ends, however it ends
        return
    path = lock_file(engine, name)
    if path is None:
        lock = _memory_locks.setdefault(name, threading.Lock())
        if not lock.acquire(blocking=False):
            if on_wait:
                on_wait()
            if not lock.acquire(timeout=wait_s):
                raise busy
        try:
            yield
        finally:
            lock.release()
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is None:
                    deadline = time.monotonic() + wait_s
                    if on_wait:
                        on_wait()
                if time.monotonic() >= deadline:
                    raise busy from None
                time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
