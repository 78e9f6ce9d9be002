"""The export role: uploaded keys whose embargo ended -> signed ``EK Export v1`` files
and ``index.txt``, the listing the agents poll.

Pure parts: :func:`plan_batches` (which time window a run covers),
:func:`padding_keys` (random keys that hide how few real ones there are, as the key
server pads, google/exposure-notifications-server ``internal/export/worker.go``; each
copies every field but the key bytes from a real key of the same file, so no field
tells them apart), :func:`split_batches` (files of at most ``export_max_keys`` keys,
each its own batch "1 of 1", as Google writes them "to avoid a device side issue") and
:func:`stored_key` (a stored row as a key that fits an export file, or the reason it
does not). :class:`ExportJob`
signs, writes each file atomically (a reader sees the whole file or none), records the
batch and rewrites the index; one run at a time, whichever process runs it (a database
lock, :func:`~backend.db.job_lock`), and every batch's files carry its id in their
names, so no run can overwrite another's. A row that cannot be written to a file is set
aside (quarantined, one log line without key bytes), never the whole batch.

At scale (a million keys in a run): the keys that wait are the rows of ``export_pending``
(a trigger adds every new key); a run's are fixed once in a temporary table of their ids,
read in chunks into arrays (no object per key) and taken out of ``export_pending`` by one
statement that joins that table, never a statement with a parameter per key. The files
and the database are committed as one step: the files are written first, under names
no committed batch has; then one transaction records the batch with its files and takes
its keys out of the waiting ones. A run that dies before that commit leaves only files
nobody lists, removed by the next run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import secrets
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import sqlalchemy as sa

from agent.clock import DAY_SECONDS, Clock
from agent.protocol import export, gaen
from agent.protocol.export import INT32_MAX, INT32_MIN, DiagnosisKey, ExportFormatError, PackedKeys, ReportType

from . import db
from .config import BackendConfig
from .keyfiles import load_or_create_ec_key

log = logging.getLogger("ctagent.backend")

T = TypeVar("T")
INDEX = "index.txt"
_NO_FILES = "[]"
#: how long a run waits for another one (another process) to finish before giving up
EXPORT_LOCK_WAIT_S = 600
#: rows read from the database at a time
READ_CHUNK = 50_000
#: export files built at once (each holds its keys' export.bin and zip while it is built)
FILE_THREADS = 2
#: ``exposures.batch_id`` of a row that cannot be exported (no batch has id 0): it stays
#: in the database, out of every file, and is not read again
QUARANTINED = 0
#: the temporary table of a run's row ids (one per connection)
RUN_TABLE = "export_run"
#: the names :func:`file_name` gives, and the temporary files of :func:`_write_atomic`
_FILE_NAME = re.compile(r"^\d+-\d+-(\d+)-\d{5}\.zip$")
_TEMP_NAME = re.compile(r"^\..+\.tmp$")


@dataclass(frozen=True, slots=True)
class BatchWindow:
    """Keys exported in one run: their embargo ended before ``end`` (Unix seconds)."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ExportBacklog:
    """Keys uploaded and not yet in a file: how many, and the first run (a period
    boundary, Unix seconds) that can export the earliest of them; None when none wait."""

    waiting: int
    first_export_at: float | None


def first_run_at(export_after: float, period: int) -> float:
    """The first run boundary at or after ``export_after`` (runs cover up to a boundary)."""
    return -(-export_after // period) * period


def plan_batches(last_end: int | None, now: float, period: int) -> BatchWindow | None:
    """The window of the next run: from the end of the last batch (or one period back)
    to the last period boundary before ``now``; None when that boundary was covered."""
    end = int(now // period * period)
    start = int(last_end) if last_end else end - period
    return BatchWindow(start, end) if end > start else None


def split_batches(keys: Sequence[T], max_keys: int) -> list[Sequence[T]]:
    """Files of at most ``max_keys`` keys each; every file is a batch of its own (1 of 1)."""
    return [keys[i : i + max_keys] for i in range(0, len(keys), max_keys)]


def padding_keys(n: int, real: Sequence[DiagnosisKey], rng: random.Random) -> list[DiagnosisKey]:
    """``n`` keys that cannot be told from the ``real`` ones of the file: each is a real key
    drawn at random with fresh random key bytes, so every field (start interval, rolling
    period, transmission risk, report type, days since onset, variant), and every
    combination of them, has the distribution of the real keys. Key bytes are uniformly
    random in both (a TEK is 16 random bytes)."""
    if n > 0 and not real:
        raise ValueError("padding copies the real keys of its file: there are none")
    return [dataclasses.replace(rng.choice(real), key_data=rng.randbytes(gaen.KEY_LEN)) for _ in range(n)]


def stored_key(row: Any) -> DiagnosisKey:
    """The key of an ``exposures`` row, checked against what an export file can hold;
    :class:`ValueError` (an :class:`ExportFormatError` or an unknown report type) if it
    cannot be exported. The message never holds key bytes."""
    try:
        report_type = ReportType(row.report_type)
    except ValueError:
        raise ExportFormatError(f"unknown report_type {row.report_type}") from None
    key = DiagnosisKey(bytes(row.key_data), row.rolling_start, row.rolling_period, row.transmission_risk,
                       report_type, row.days_since_onset)
    key.validate()
    return key


def _integers(values: Sequence[Any], lo: int, hi: int) -> tuple[Any, Any]:
    """``values`` as int64 (0 where not an integer) and whether each is an integer in lo..hi."""
    try:
        a = np.array(values, dtype=np.int64)
        return a, (a >= lo) & (a <= hi)
    except (TypeError, ValueError, OverflowError):  # None, text or a huge number (SQLite keeps anything)
        ok = np.fromiter((type(v) is int and lo <= v <= hi for v in values), np.bool_, len(values))
        return np.array([v if good else 0 for v, good in zip(values, ok.tolist())], dtype=np.int64), ok


#: the run's rows, in id order (the columns of :class:`_StoredRow`)
_RUN_ROWS = (f"SELECT e.id, e.key_data, e.rolling_start, e.rolling_period, e.transmission_risk, e.report_type, "
             f"e.days_since_onset FROM exposures e JOIN {RUN_TABLE} r ON r.id = e.id ORDER BY e.id")


class _StoredRow(NamedTuple):
    """The columns an export run reads, by name (for :func:`stored_key`)."""

    id: int
    key_data: bytes
    rolling_start: Any
    rolling_period: Any
    transmission_risk: Any
    report_type: Any
    days_since_onset: Any


def _onsets(values: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    """days_since_onset as int64 (0 where absent), whether present, whether an int32."""
    try:
        f = np.array(values, dtype=np.float64)  # None: NaN (numbers beyond int32 stay out of range)
        has = ~np.isnan(f)
        ok = ~has | ((f >= INT32_MIN) & (f <= INT32_MAX) & (f == np.round(f)))
        return np.where(has & ok, f, 0).astype(np.int64), has, ok
    except (TypeError, ValueError, OverflowError):  # text (SQLite keeps anything)
        has = np.fromiter((v is not None for v in values), np.bool_, len(values))
        onset, ok = _integers([0 if v is None else v for v in values], INT32_MIN, INT32_MAX)
        return onset, has, ok


def _rows_to_keys(rows: Sequence[Any]) -> tuple[PackedKeys, list[Any]]:
    """Rows (id, key_data, rolling_start, rolling_period, transmission_risk, report_type,
    days_since_onset) as arrays of the keys an export file can hold, and the other rows."""
    if not rows:
        return PackedKeys.empty(), []
    n = len(rows)
    _, kd, rs, rp, risk, rt, dso = zip(*rows)
    start, ok = _integers(rs, 0, INT32_MAX)
    period, ok_period = _integers(rp, 1, gaen.TEK_ROLLING_PERIOD)
    trl, ok_trl = _integers(risk, INT32_MIN, INT32_MAX)
    report, ok_report = _integers(rt, min(ReportType), max(ReportType))
    onset, has, ok_onset = _onsets(dso)
    ok &= ok_period & ok_trl & ok_report & ok_onset
    if set(map(type, kd)) <= {bytes}:
        ok &= np.fromiter(map(len, kd), np.int64, n) == gaen.KEY_LEN
    else:
        ok &= np.fromiter((isinstance(k, bytes | memoryview) and len(k) == gaen.KEY_LEN for k in kd), np.bool_, n)
    good = np.flatnonzero(ok)
    key_data = b"".join(kd) if len(good) == n else b"".join([bytes(kd[i]) for i in good.tolist()])
    keys = PackedKeys(key_data, start[good].astype(np.uint32), period[good].astype(np.uint16),
                      trl[good].astype(np.int32), report[good].astype(np.uint8), onset[good].astype(np.int32),
                      has[good], np.zeros(len(good), np.uint8))  # the variant is not stored: UNKNOWN
    return keys, [rows[i] for i in np.flatnonzero(~ok).tolist()]


def file_name(window: BatchWindow, batch_id: int, batch_num: int) -> str:
    """``<start>-<end>-<batch id>-<batch num>.zip``: unique per batch, whatever its window."""
    return f"{window.start}-{window.end}-{batch_id}-{batch_num:05d}.zip"


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` whole, through a temporary file of this writer's own."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # public files, served as they are
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ExportJob:
    def __init__(self, config: BackendConfig, engine: sa.Engine, clock: Clock, *,
                 rng: random.Random | None = None) -> None:
        self.config, self.engine, self.clock = config, engine, clock
        #: padding and shuffling: a CSPRNG, so padding cannot be told from real keys
        self.rng = rng or secrets.SystemRandom()
        self.signing_key = load_or_create_ec_key(config.data_dir / "export-signing-key.pem")
        self.public_key_b64 = export.public_key_b64(self.signing_key)
        config.exports_dir.mkdir(parents=True, exist_ok=True)
        if not (config.exports_dir / INDEX).exists():
            try:  # the first start; a run going on elsewhere writes it anyway
                with db.job_lock(engine, "export", wait_s=0):
                    self.write_index(clock.now())
            except db.JobBusy:
                pass

    def run(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Write the export files of keys whose embargo ended; refresh index.txt. The
        names of the new files. Waits for a run of another thread or process to end."""
        with db.job_lock(self.engine, "export", wait_s=EXPORT_LOCK_WAIT_S,
                         on_wait=lambda: log.info("export: another export job is running; waiting for it")):
            return self._run(progress)

    def _run(self, progress: Callable[[int, int], None] | None) -> list[str]:
        now, cfg, b_ = self.clock.now(), self.config, db.batches.c
        with self.engine.connect() as c:
            self._remove_unfinished(c)
            last = c.execute(sa.select(sa.func.max(b_.end)).where(b_.files != _NO_FILES)).scalar()
            window = plan_batches(last, now, cfg.export_period_s)
            if window is None:
                c.commit()
                self.write_index(now)
                return []
            # this run's rows, fixed once: later uploads wait for the next run
            c.execute(sa.text(f"DROP TABLE IF EXISTS {RUN_TABLE}"))
            c.execute(sa.text(f"CREATE TEMPORARY TABLE {RUN_TABLE} (id INTEGER PRIMARY KEY)"))
            c.execute(sa.text(f"INSERT INTO {RUN_TABLE} (id) SELECT id FROM export_pending "
                              "WHERE export_after <= :end"), {"end": window.end})
            c.commit()
            try:
                keys = self._read_run(c)
                real = len(keys)
                names = []
                if real:
                    keys = self._padded_and_shuffled(keys, now)  # rebound: the unshuffled arrays go
                    names = self._write_batch(c, window, keys, real, now, progress)
            finally:
                c.execute(sa.text(f"DROP TABLE IF EXISTS {RUN_TABLE}"))
                c.commit()
        self.write_index(now)
        return names

    def _read_run(self, c: sa.Connection) -> PackedKeys:
        """The keys of the run's rows, as arrays; rows no file can hold are quarantined.
        Read through the driver's own cursor (PostgreSQL: a server-side one), in chunks of
        plain tuples: a million rows as SQLAlchemy Row objects cost a second more."""
        e_ = db.exposures.c
        dbapi = c.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor(name="ctagent_export_run") if c.dialect.name == "postgresql" else dbapi.cursor()
        parts, bad = [], []
        try:
            cursor.execute(_RUN_ROWS)
            while rows := cursor.fetchmany(READ_CHUNK):
                part, bad_rows = _rows_to_keys(rows)
                parts.append(part)
                bad += bad_rows
        finally:
            cursor.close()
            dbapi.commit()  # the read's transaction (PostgreSQL), which SQLAlchemy did not begin
        if bad:
            for row in bad:
                try:
                    stored_key(_StoredRow(*row))
                except ValueError as e:
                    log.error("export: row %d cannot be exported (%s); quarantined, the batch goes on", row[0], e)
            with c.begin():
                ids = [{"row_id": r[0]} for r in bad]
                c.execute(sa.update(db.exposures).where(e_.id == sa.bindparam("row_id")).values(batch_id=QUARANTINED),
                          ids)
                c.execute(sa.delete(db.pending).where(db.pending.c.id == sa.bindparam("row_id")), ids)
        return PackedKeys.concat(parts)

    def _padded_and_shuffled(self, keys: PackedKeys, now: float) -> PackedKeys:
        cfg = self.config
        if len(keys) < cfg.export_min_keys:  # few real keys: records are cheap
            keys = PackedKeys.concat([keys, PackedKeys.from_keys(padding_keys(cfg.export_min_keys - len(keys),
                                                                              keys.keys(), self.rng))])
        # padding must not be told apart by position: a permutation from the CSPRNG
        order = np.argsort(np.frombuffer(self.rng.randbytes(8 * len(keys)), np.uint64), kind="stable")
        return keys.take(order)

    def _write_batch(self, c: sa.Connection, window: BatchWindow, keys: PackedKeys, real: int, now: float,
                     progress: Callable[[int, int], None] | None) -> list[str]:
        cfg, b_ = self.config, db.batches.c
        bid = int(c.execute(sa.select(sa.func.coalesce(sa.func.max(b_.id), 0))).scalar_one()) + 1
        c.commit()
        count = -(-len(keys) // cfg.export_max_keys)
        names: list[str] = []

        def write_file(i: int) -> str:
            chunk = keys.span(i * cfg.export_max_keys, min(len(keys), (i + 1) * cfg.export_max_keys))
            # batch 1 of 1 per file, as Google's export worker: the Android verifier wants
            # every file of a batch in one call, and each file here stands alone
            blob = export.build_export_packed(chunk, signing_key=self.signing_key, start_timestamp=window.start,
                                              end_timestamp=window.end, region=cfg.region, key_id=cfg.key_id,
                                              key_version=cfg.key_version, batch_num=1, batch_size=1)
            name = file_name(window, bid, i + 1)
            _write_atomic(cfg.exports_dir / name, blob)
            return name

        try:
            if count == 1:
                names.append(write_file(0))
                if progress:
                    progress(1, 1)
            else:  # files side by side: deflate, the most of a file's time, lets the other threads run
                with ThreadPoolExecutor(min(count, FILE_THREADS)) as pool:
                    for name in pool.map(write_file, range(count)):
                        names.append(name)
                        if progress:
                            progress(len(names), count)
            self._commit_batch(c, bid, window, names, now)
        except BaseException:
            for name in names:  # what a run that failed wrote; its keys stay for the next run
                (cfg.exports_dir / name).unlink(missing_ok=True)
            raise
        log.info("export: %d real key(s) in %d file(s), batch %d", real, len(names), bid)
        return names

    @staticmethod
    def _commit_batch(c: sa.Connection, bid: int, window: BatchWindow, names: list[str], now: float) -> None:
        """The one step that publishes a run: the batch with its files, its keys no longer waiting."""
        run_ids = sa.select(sa.table(RUN_TABLE, sa.column("id")).c.id)
        with c.begin():
            c.execute(sa.insert(db.batches).values(id=bid, start=window.start, end=window.end,
                                                   files=json.dumps(names), created_at=now))
            c.execute(sa.delete(db.pending).where(db.pending.c.id.in_(run_ids)))

    def _remove_unfinished(self, c: sa.Connection) -> None:
        """What runs that died before their commit left: files no committed batch lists
        (and temporary files), and the empty batch rows older versions reserved first."""
        b_ = db.batches.c
        c.execute(sa.delete(db.batches).where(b_.files == _NO_FILES))
        listed = {n for (files,) in c.execute(sa.select(b_.files)) for n in json.loads(files)}
        c.commit()
        for p in self.config.exports_dir.iterdir():
            if (_FILE_NAME.match(p.name) and p.name not in listed) or _TEMP_NAME.match(p.name):
                p.unlink(missing_ok=True)
                log.warning("export: removed %s, left by a run that did not finish", p.name)

    def write_index(self, now: float) -> None:
        """``index.txt``: the files of the batches of the retention period, oldest first.
        Written only when that changed: its ETag (its time and size, to the file server)
        is what lets an agent skip a sync's downloads, and a run with nothing new would
        have given it a new one."""
        cutoff = now - self.config.export_retention_days * DAY_SECONDS
        with self.engine.connect() as c:
            rows = c.execute(sa.select(db.batches.c.files).where(db.batches.c.end >= cutoff)
                             .order_by(db.batches.c.id)).fetchall()
        lines = [n for r in rows for n in json.loads(r.files)]
        path, text = self.config.exports_dir / INDEX, "".join(f"{n}\n" for n in lines).encode()
        try:
            if path.read_bytes() == text:
                return
        except FileNotFoundError:
            pass
        _write_atomic(path, text)

    def backlog(self) -> ExportBacklog:
        """What waits for a later run (the ``backend export`` command says it)."""
        p_ = db.pending.c
        with self.engine.connect() as c:
            row = c.execute(sa.select(sa.func.count(), sa.func.min(p_.export_after))).one()
        waiting, earliest = int(row[0]), row[1]
        first = None if earliest is None else first_run_at(float(earliest), self.config.export_period_s)
        return ExportBacklog(waiting, first)
