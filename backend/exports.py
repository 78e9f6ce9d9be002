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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from agent.clock import DAY_SECONDS, Clock
from agent.protocol import export, gaen
from agent.protocol.export import DiagnosisKey, ExportFormatError, ReportType

from . import db
from .config import BackendConfig
from .keyfiles import load_or_create_ec_key

log = logging.getLogger("ctagent.backend")

T = TypeVar("T")
INDEX = "index.txt"
_NO_FILES = "[]"
#: how long a run waits for another one (another process) to finish before giving up
EXPORT_LOCK_WAIT_S = 600
#: rows marked exported per statement (PostgreSQL takes at most 65,535 parameters)
MARK_CHUNK = 10_000
#: ``exposures.batch_id`` of a row that cannot be exported (no batch has id 0): it stays
#: in the database, out of every file, and is not read again
QUARANTINED = 0


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
        now, cfg, e_, b_ = self.clock.now(), self.config, db.exposures.c, db.batches.c
        with self.engine.connect() as c:
            # a batch without files is one whose run did not finish: it covered nothing
            last = c.execute(sa.select(sa.func.max(b_.end)).where(b_.files != _NO_FILES)).scalar()
            window = plan_batches(last, now, cfg.export_period_s)
            rows = [] if window is None else c.execute(
                sa.select(db.exposures).where(e_.batch_id.is_(None), e_.export_after <= window.end)
                .order_by(e_.id)).fetchall()
        rows, keys = self._set_aside_bad_rows(rows)
        if window is None or not rows:
            self.write_index(now)
            return []
        if len(keys) < cfg.export_min_keys:
            keys += padding_keys(cfg.export_min_keys - len(keys), keys, self.rng)
        self.rng.shuffle(keys)  # padding must not be told apart by position
        chunks = split_batches(keys, cfg.export_max_keys)
        with self.engine.begin() as c:  # the batch's id first: it names the files
            res = c.execute(sa.insert(db.batches).values(start=window.start, end=window.end, files=_NO_FILES,
                                                         created_at=now))
            assert res.inserted_primary_key is not None
            bid = int(res.inserted_primary_key[0])
        names: list[str] = []
        try:
            for i, chunk in enumerate(chunks, 1):
                # batch 1 of 1 per file, as Google's export worker: the Android verifier wants
                # every file of a batch in one call, and each file here stands alone
                blob = export.build_export(chunk, signing_key=self.signing_key, start_timestamp=window.start,
                                           end_timestamp=window.end, region=cfg.region, key_id=cfg.key_id,
                                           key_version=cfg.key_version, batch_num=1, batch_size=1)
                name = file_name(window, bid, i)
                _write_atomic(cfg.exports_dir / name, blob)
                names.append(name)
                if progress:
                    progress(i, len(chunks))
            with self.engine.begin() as c:  # the files and their keys together, or neither
                c.execute(sa.update(db.batches).where(b_.id == bid).values(files=json.dumps(names)))
                ids = [r.id for r in rows]
                for part in split_batches(ids, MARK_CHUNK):
                    c.execute(sa.update(db.exposures).where(e_.id.in_(part), e_.batch_id.is_(None))
                              .values(batch_id=bid))
        except BaseException:
            self._forget_batch(bid, names)
            raise
        self.write_index(now)
        log.info("export: %d real key(s) in %d file(s), batch %d", len(rows), len(names), bid)
        return names

    def _forget_batch(self, bid: int, names: Sequence[str]) -> None:
        """Undo what a failed run wrote; its keys stay unexported for the next run."""
        for name in names:
            (self.config.exports_dir / name).unlink(missing_ok=True)
        try:
            with self.engine.begin() as c:
                c.execute(sa.delete(db.batches).where(db.batches.c.id == bid, db.batches.c.files == _NO_FILES))
        except sa.exc.SQLAlchemyError:
            log.warning("export: could not remove the unfinished batch %d (it lists no files)", bid)

    def _set_aside_bad_rows(self, rows: Sequence[Any]) -> tuple[list[Any], list[DiagnosisKey]]:
        """The rows that can be exported and their keys; the others are quarantined."""
        good, keys, bad = [], [], []
        for r in rows:
            try:
                keys.append(stored_key(r))
                good.append(r)
            except ValueError as e:
                bad.append(r.id)
                log.error("export: row %d cannot be exported (%s); quarantined, the batch goes on", r.id, e)
        if bad:
            with self.engine.begin() as c:
                c.execute(sa.update(db.exposures).where(db.exposures.c.id.in_(bad)).values(batch_id=QUARANTINED))
        return good, keys

    def write_index(self, now: float) -> None:
        """``index.txt``: the files of the batches of the retention period, oldest first."""
        cutoff = now - self.config.export_retention_days * DAY_SECONDS
        with self.engine.connect() as c:
            rows = c.execute(sa.select(db.batches.c.files).where(db.batches.c.end >= cutoff)
                             .order_by(db.batches.c.id)).fetchall()
        lines = [n for r in rows for n in json.loads(r.files)]
        _write_atomic(self.config.exports_dir / INDEX, "".join(f"{n}\n" for n in lines).encode())

    def backlog(self) -> ExportBacklog:
        """What waits for a later run (the ``backend export`` command says it)."""
        e_ = db.exposures.c
        with self.engine.connect() as c:
            row = c.execute(sa.select(sa.func.count(), sa.func.min(e_.export_after))
                            .where(e_.batch_id.is_(None))).one()
        waiting, earliest = int(row[0]), row[1]
        first = None if earliest is None else first_run_at(float(earliest), self.config.export_period_s)
        return ExportBacklog(waiting, first)
