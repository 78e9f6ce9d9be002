"""The encrypted store's core: one SQLite file (WAL) plus its keyring, the encrypted-row
envelope, schema migrations, retention with crypto-erasure, and purge.

One writer at a time (``lock.py``: the daemon, a write command, purge); readers (status,
reports, the analysis of a copied SD card) open read-only beside it, and change nothing:
no migration, no retention, no new key.

Every sensitive value is stored only as AES-256-GCM ciphertext under the key of its UTC
day, with ``table|row id|day`` as associated data, so a row cannot be moved to another
row, table or day. Only the day number is in clear, for retention; long-lived secrets
use a persistent key slot that retention never reaches. See ``keys.py`` for why the day
keys live in a keyring file beside the database. The typed tables on top are in
``tables.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
from sqlite_utils.db import Table

from ..clock import Clock, RealClock, utc_day
from ..errors import StoreError, StoreVersionError
from ..files import erase_file
from .envelope import Envelope, EnvelopeError
from .keys import Keyring, MasterKeySource, erase_stale_temp_files
from .lock import StoreLock, lock_path

log = logging.getLogger("ctagent.store")

SCHEMA_VERSION = 7
DEFAULT_RETENTION_DAYS = 14
#: Key slot of long-lived secrets (a ROBERT registration, a pending declaration): never
#: reached by retention, erased with the keyring by purge.
PERSISTENT_DAY = 2**31 - 1
#: Research recording (``agent.experiment``) seals its rows under key slot
#: ``RESEARCH_SLOT + day``: its own day keys, so that its own retention can keep them
#: longer or shorter than the agent's (far below PERSISTENT_DAY, far above any real day).
RESEARCH_SLOT = 2**30
ENCRYPTED_TABLES = ("teks", "encounters", "exposures", "hellos", "secrets", "heard_minutes", "encounter_index")


def keyring_path(db_path: Path) -> Path:
    return Path(str(db_path) + ".keyring")


def store_files(db_path: Path) -> list[Path]:
    """Every file a store at ``db_path`` may have written, keyring first (erasing it
    first makes the rest unreadable at once)."""
    db_path = Path(db_path)
    ring = keyring_path(db_path)
    leftovers = sorted(db_path.parent.glob(ring.name + ".tmp*")) if db_path.parent.exists() else []
    return [ring, *leftovers, db_path, Path(str(db_path) + "-wal"), Path(str(db_path) + "-shm"), lock_path(db_path)]


def purge(db_path: Path) -> list[Path]:
    """Erase the store: the keyring first (crypto-erasure), then the database files.
    Refused (:class:`~agent.store.lock.StoreBusy`) while another process writes to it."""
    lock = StoreLock(db_path).acquire()
    try:
        return [p for p in store_files(db_path) if erase_file(p)]
    finally:
        lock.release()


@dataclass
class StoreStats:
    corrupt_rows: int = 0
    missing_key_rows: int = 0


# -- schema -------------------------------------------------------------------------------

def _table(db: sqlite_utils.Database, name: str) -> Table:
    t = db[name]
    assert isinstance(t, Table)
    return t


def _encrypted_table(db: sqlite_utils.Database, name: str) -> None:
    _table(db, name).create({"id": int, "day": int, "blob": bytes}, pk="id", not_null={"day", "blob"},
                            if_not_exists=True)
    _table(db, name).create_index(["day"], if_not_exists=True)


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    for table in ("teks", "encounters", "exposures"):
        _encrypted_table(db, table)
    _table(db, "sync_state").create({"name": str, "value": str}, pk="name")


def _migrate_to_2(db: sqlite_utils.Database) -> None:
    """ROBERT mode: HELLOs heard (reported as they are) and long-lived secrets."""
    for table in ("hellos", "secrets"):
        _encrypted_table(db, table)


def _migrate_to_3(db: sqlite_utils.Database) -> None:
    """Exposures get a uniqueness key: a keyed hash (never the identity in clear), filled
    for older rows on the first open with the keys (``ExposureTable.backfill``)."""
    db.conn.execute("ALTER TABLE exposures ADD COLUMN uid TEXT")
    db.conn.execute("CREATE UNIQUE INDEX exposures_uid ON exposures (uid)")


def _migrate_to_4(db: sqlite_utils.Database) -> None:
    """What the receiver heard each minute, of every identifier (the ``hmm`` rule's minute
    context): a new table, so existing stores only gain it."""
    _encrypted_table(db, "heard_minutes")


def _migrate_to_5(db: sqlite_utils.Database) -> None:
    """Research recording: batches of raw sightings and the radio's and clock's state,
    sealed under their own key slots (``RESEARCH_SLOT + day``); ``kind`` says which
    batch it is (no identifier)."""
    _encrypted_table(db, "research")
    db.conn.execute("ALTER TABLE research ADD COLUMN kind TEXT NOT NULL DEFAULT ''")


def _migrate_to_6(db: sqlite_utils.Database) -> None:
    """What matching reads of the encounters (RPI, first and last interval, row id),
    packed per day and flush into one encrypted row: read and decrypted in bulk. The
    rows of older encounters are indexed on the first open with the keys
    (``EncounterTable.index_unindexed``)."""
    _encrypted_table(db, "encounter_index")


def _migrate_to_7(db: sqlite_utils.Database) -> None:
    """Encounter rows are written in the compact record from now on
    (``Encounter.to_bytes``: a crowded day's row 117 bytes sealed instead of 154). The tables stay
    as they are: rows of the older record read as they are, and take the new one when
    rewritten. The version keeps an older ctagent, which cannot read the new record, from
    opening the store (it would skip those rows as undecodable)."""


#: version -> migration bringing the schema from version-1 to version
MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _migrate_to_1, 2: _migrate_to_2,
                                                                   3: _migrate_to_3, 4: _migrate_to_4, 5: _migrate_to_5,
                                                                   6: _migrate_to_6, 7: _migrate_to_7}


# -- the encrypted-row core ---------------------------------------------------------------

class EncryptedRows:
    """Sealing, reading and numbering rows of the encrypted tables; transactions."""

    def __init__(self, conn: sqlite3.Connection, keyring: Keyring, stats: StoreStats, *, path: Path,
                 read_only: bool) -> None:
        self.conn = conn
        self.keyring = keyring
        self.stats = stats
        self.path = path
        self.read_only = read_only
        self._next_id = {t: conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {t}").fetchone()[0] + 1
                         for t in (*ENCRYPTED_TABLES, "research")}
        self._envelopes: dict[int, Envelope] = {}
        self._uid_keys: dict[int, bytes] = {}
        self._depth = 0  # transactions open (the inner ones, of the same thread, join the outer)
        self._owner = 0

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (a batch): all of it is committed, or none. A failed
        write (a full disk) is a :class:`StoreError`; integrity errors pass through.
        Inside another one it joins it: the outer one commits (one sync to the disk)."""
        if self.read_only:
            raise StoreError(f"the store {self.path} was opened read-only")
        if self._depth and self._owner == threading.get_ident():
            yield self.conn
            return
        self._depth += 1
        self._owner = threading.get_ident()
        try:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                yield self.conn
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as e:
            raise StoreError(f"cannot write to the store {self.path}: {e}") from None
        finally:
            self._depth -= 1

    def forget_days(self, days: list[int]) -> None:
        for d in days:
            self._envelopes.pop(d, None)
            self._uid_keys.pop(d, None)

    def _envelope(self, day: int, *, create: bool) -> Envelope | None:
        env = self._envelopes.get(day)
        if env is None:
            key = self.keyring.key_for_day(day, create=create)
            if key is None:
                return None
            env = self._envelopes[day] = Envelope(key)
        return env

    @staticmethod
    def _aad(table: str, row_id: int, day: int) -> bytes:
        return b"%s|%d|%d" % (table.encode(), row_id, day)

    def new_id(self, table: str) -> int:
        i = self._next_id[table]
        self._next_id[table] = i + 1
        return i

    def seal(self, table: str, row_id: int, day: int, plaintext: bytes) -> bytes:
        env = self._envelope(day, create=True)
        assert env is not None
        return env.seal(plaintext, self._aad(table, row_id, day))

    def unseal(self, table: str, row_id: int, day: int, blob: bytes) -> bytes | None:
        env = self._envelope(day, create=False)
        if env is None:
            self.stats.missing_key_rows += 1
            log.warning("row skipped: no key for its day (table=%s day=%d)", table, day)
            return None
        try:
            return env.open(blob, self._aad(table, row_id, day))
        except EnvelopeError:
            self.stats.corrupt_rows += 1
            log.warning("row skipped: ciphertext fails authentication (table=%s id=%d day=%d)", table, row_id, day)
            return None

    def rows(self, table: str, where: str = "", params: tuple[object, ...] = ()) -> Iterator[tuple[int, int, bytes]]:
        """(row id, day, plaintext) of every readable row, in id order."""
        sql = f"SELECT id, day, blob FROM {table} {where} ORDER BY id"
        for row_id, day, blob in self.conn.execute(sql, params):
            plain = self.unseal(table, row_id, day, blob)
            if plain is not None:
                yield row_id, day, plain

    def uid(self, day: int, identity: bytes) -> str:
        """A keyed hash of ``identity`` under a key derived from the day's key: unique
        per day without revealing what it identifies."""
        k = self._uid_keys.get(day)
        if k is None:
            day_key = self.keyring.key_for_day(day, create=True)
            assert day_key is not None
            k = self._uid_keys[day] = hmac.new(day_key, b"ctagent row uid", hashlib.sha256).digest()
        return hmac.new(k, identity, hashlib.sha256).hexdigest()[:32]


# -- the store ----------------------------------------------------------------------------

class Store:
    """Open with :meth:`create` or :meth:`open`; close with :meth:`close` (or ``with``).

    Tables: ``teks`` (own keys), ``encounters``, ``exposures``, ``hellos`` (ROBERT),
    ``heard_minutes`` (what was heard each minute, for the ``hmm`` rule), ``state`` (sync
    progress in clear, sensitive state encrypted: chosen by its type)."""

    def __init__(self, path: Path, keyring: Keyring, db: sqlite_utils.Database, *, clock: Clock,
                 retention_days: int, lock: StoreLock | None, research_retention_days: int | None = None) -> None:
        from .tables import (EncounterTable, ExposureTable, HeardMinuteTable, HelloTable, ResearchTable, StateTable,
                             TekTable)

        self.path = Path(path)
        #: held while open for writing; None: opened read-only
        self.lock = lock
        self.keyring = keyring
        self.db = db
        self.conn: sqlite3.Connection = db.conn
        self.clock = clock
        self.retention_days = retention_days
        self.stats = StoreStats()
        self.rows = EncryptedRows(self.conn, keyring, self.stats, path=self.path, read_only=self.read_only)
        self.teks = TekTable(self.rows)
        self.encounters = EncounterTable(self.rows)
        self.exposures = ExposureTable(self.rows)
        self.hellos = HelloTable(self.rows)
        self.heard_minutes = HeardMinuteTable(self.rows)
        self.state = StateTable(self.rows)
        self.research = ResearchTable(self.rows)
        #: days of research recording kept ([experiment] retention_days; default: the agent's)
        self.research_retention_days = research_retention_days or retention_days
        self.last_retention_day: int | None = None

    @property
    def read_only(self) -> bool:
        return self.lock is None

    # -- opening ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], key: MasterKeySource, *, clock: Clock | None = None,
               retention_days: int = DEFAULT_RETENTION_DAYS, research_retention_days: int | None = None,
               durable: bool = True) -> Store:
        """A new store. ``durable=False``: its commits are not synced to the disk (SQLite
        ``synchronous=OFF``), for stores that need not survive a power cut (the demo's
        simulated devices, whose durability is not what the demo shows); a device's store
        is always durable."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = StoreLock(path).acquire()
        try:
            if path.exists() or keyring_path(path).exists():
                raise StoreError(f"{path} already exists; open it instead of creating it")
            ring = Keyring.create(keyring_path(path), key)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # SQLite gives -wal/-shm the same mode
            os.close(fd)
            return cls._open_db(path, ring, clock=clock or RealClock(), retention_days=retention_days, lock=lock,
                                research_retention_days=research_retention_days, durable=durable)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], key: MasterKeySource, *, clock: Clock | None = None,
             retention_days: int = DEFAULT_RETENTION_DAYS, read_only: bool = False,
             research_retention_days: int | None = None) -> Store:
        """For writing (the default: takes the lock, or refuses while another process
        writes), or ``read_only`` (beside a writer, or a copy on read-only media)."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no store at {path}; create one with `ctagent init`")
        lock = None if read_only else StoreLock(path).acquire()
        try:
            if lock is not None:
                erase_stale_temp_files(keyring_path(path))
            # a wrong key fails here, before the database is touched
            ring = Keyring.load(keyring_path(path), key, read_only=read_only)
            return cls._open_db(path, ring, clock=clock or RealClock(), retention_days=retention_days, lock=lock,
                                research_retention_days=research_retention_days)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def _open_db(cls, path: Path, ring: Keyring, *, clock: Clock, retention_days: int,
                 lock: StoreLock | None, research_retention_days: int | None = None, durable: bool = True) -> Store:
        if retention_days < 1:
            raise StoreError("retention_days must be at least 1")
        try:
            conn = cls._connect(path, read_only=lock is None)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path} is not a usable ctagent database: {e}") from None
        try:
            version = cls._schema_version(conn)
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"{path} has schema version {version}, newer than this ctagent understands "
                    f"({SCHEMA_VERSION}); upgrade ctagent")
            db = sqlite_utils.Database(conn)
            if lock is not None:
                conn.execute("PRAGMA journal_mode=WAL")
                # each committed batch survives a power cut (unless asked not to: see create)
                conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=OFF")
                conn.execute("PRAGMA secure_delete=ON")
                conn.execute("PRAGMA foreign_keys=ON")
                cls._migrate(db, version, clock.now())
            elif version < SCHEMA_VERSION:
                raise StoreVersionError(f"{path} was written by an older ctagent (schema {version}); open it once "
                                        "for writing (`ctagent run`, or any command that writes) to upgrade it")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"{path} is not a usable ctagent database: {e}") from None
        except BaseException:
            conn.close()
            raise
        store = cls(path, ring, db, clock=clock, retention_days=retention_days, lock=lock,
                    research_retention_days=research_retention_days)
        if lock is not None:
            store.exposures.backfill()
            store.state.encrypt_legacy_clear_values()
            store.apply_retention()
            store.encounters.index_unindexed()
        return store

    @staticmethod
    def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
        if not read_only:
            return sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
            return conn
        except sqlite3.OperationalError:
            # read-only media (a copied SD card): nobody can be writing, read it as it is
            return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, isolation_level=None,
                                   check_same_thread=False)

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
        if row is None:
            return 0
        v = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        return v or 0

    @staticmethod
    def _migrate(db: sqlite_utils.Database, version: int, now: float) -> None:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with db.conn:  # one transaction per step
                db.conn.execute("BEGIN IMMEDIATE")
                if target == 1:
                    _table(db, "schema_version").create({"version": int, "applied_at": float}, pk="version")
                MIGRATIONS[target](db)
                _table(db, "schema_version").insert({"version": target, "applied_at": now})

    def close(self) -> None:
        if self.lock is not None:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
        self.conn.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def files(self) -> list[Path]:
        return [p for p in store_files(self.path) if p.exists()]

    # -- retention and crypto-erasure -------------------------------------------------
    def today(self) -> int:
        return utc_day(self.clock.now())

    def oldest_kept_day(self) -> int:
        return self.today() - self.retention_days + 1

    def apply_retention(self) -> list[int]:
        """Delete rows of days older than the retention period and destroy their keys.
        Returns the days erased."""
        cutoff = self.oldest_kept_day()
        days = {d for d in self.keyring.days() if d < cutoff}
        for t in ENCRYPTED_TABLES:
            days.update(d for (d,) in self.conn.execute(f"SELECT DISTINCT day FROM {t} WHERE day < ?", (cutoff,)))
        # research rows: their own slots and their own retention
        research_cutoff = RESEARCH_SLOT + self.today() - self.research_retention_days + 1
        slots = {d for d in self.keyring.days() if RESEARCH_SLOT <= d < research_cutoff}
        slots.update(d for (d,) in self.conn.execute("SELECT DISTINCT day FROM research WHERE day < ?",
                                                     (research_cutoff,)))
        days |= slots
        if days:
            with self.rows.transaction() as c:
                for t in ENCRYPTED_TABLES:
                    c.execute(f"DELETE FROM {t} WHERE day < ?", (cutoff,))
                c.execute("DELETE FROM research WHERE day < ?", (research_cutoff,))
            self.rows.forget_days(sorted(days))
            self.keyring.destroy_days(sorted(days))
            # old page images leave the WAL too (they were already useless without the key)
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            log.info("retention: erased %d day(s) older than %d days", len(days), self.retention_days)
        self.encounters.compact_index(before_day=self.today())
        self.last_retention_day = self.today()
        return sorted(days)

    def maybe_apply_retention(self) -> list[int]:
        """Run retention if it has not run yet today (the daemon calls this periodically)."""
        if self.last_retention_day != self.today():
            return self.apply_retention()
        return []

    def rotate_master_key(self, new_key: MasterKeySource) -> None:
        self.keyring.rewrap(new_key)

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])
