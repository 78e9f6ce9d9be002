"""The encrypted encounter store: one SQLite file (WAL) plus its keyring.

Every sensitive value (own TEKs, observed RPIs and AEMs, RSSI series, exact times,
exposures) is stored only as AES-256-GCM ciphertext under the key of its UTC day, with
``table|row id|day`` as associated data, so a row cannot be moved to another row, table
or day. Only the day number is in clear, for retention. See ``keys.py`` for why the
day keys live in a keyring file beside the database.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..exposure.encounter import SECONDS_PER_DAY, Encounter
from ..protocol.gaen import TEK_ROLLING_PERIOD
from ..protocol.schedule import TekRecord
from .keys import NONCE_LEN, Keyring, MasterKeySource, StoreKeyError

log = logging.getLogger("ctagent.store")

SCHEMA_VERSION = 2
DEFAULT_RETENTION_DAYS = 14
_ENCRYPTED_TABLES = ("teks", "encounters", "exposures", "hellos", "secrets")
#: Key slot of long-lived secrets (a ROBERT registration): never reached by retention,
#: erased with the keyring by `ctagent purge`.
PERSISTENT_DAY = 2**31 - 1


class StoreError(Exception):
    """The store cannot be used as asked (one clear sentence)."""


class StoreVersionError(StoreError):
    """The database was written by a newer ctagent."""


@dataclass
class StoreStats:
    corrupt_rows: int = 0
    missing_key_rows: int = 0


def keyring_path(db_path: Path) -> Path:
    return Path(str(db_path) + ".keyring")


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    for table in ("teks", "encounters", "exposures"):
        db[table].create({"id": int, "day": int, "blob": bytes}, pk="id", not_null={"day", "blob"})
        db[table].create_index(["day"])
    db["sync_state"].create({"name": str, "value": str}, pk="name")


def _migrate_to_2(db: sqlite_utils.Database) -> None:
    """ROBERT mode: HELLOs heard (reported as they are) and the registration secrets."""
    for table in ("hellos", "secrets"):
        db[table].create({"id": int, "day": int, "blob": bytes}, pk="id", not_null={"day", "blob"})
        db[table].create_index(["day"])


#: version -> migration bringing the schema from version-1 to version
MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _migrate_to_1, 2: _migrate_to_2}


class Store:
    """Open with :meth:`create` or :meth:`open`; close with :meth:`close` (or ``with``)."""

    def __init__(self, path: Path, keyring: Keyring, db: sqlite_utils.Database, *,
                 clock: Callable[[], float], retention_days: int) -> None:
        self.path = Path(path)
        self.keyring = keyring
        self.db = db
        self.conn: sqlite3.Connection = db.conn
        self.clock = clock
        self.retention_days = retention_days
        self.stats = StoreStats()
        self._next_id = {t: (self.conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {t}").fetchone()[0] + 1)
                         for t in _ENCRYPTED_TABLES}
        self._aead: dict[int, AESGCM] = {}
        self.last_retention_day: int | None = None

    # -- opening ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, key: MasterKeySource, *, clock: Callable[[], float] = time.time,
               retention_days: int = DEFAULT_RETENTION_DAYS) -> "Store":
        path = Path(path)
        if path.exists() or keyring_path(path).exists():
            raise StoreError(f"{path} already exists; open it instead of creating it")
        path.parent.mkdir(parents=True, exist_ok=True)
        ring = Keyring.create(keyring_path(path), key)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # SQLite gives -wal/-shm the same mode
        os.close(fd)
        return cls._open_db(path, ring, clock=clock, retention_days=retention_days)

    @classmethod
    def open(cls, path: str | os.PathLike, key: MasterKeySource, *, clock: Callable[[], float] = time.time,
             retention_days: int = DEFAULT_RETENTION_DAYS) -> "Store":
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no store at {path}; create one with `ctagent init`")
        ring = Keyring.load(keyring_path(path), key)  # wrong key fails here, before the DB is touched
        return cls._open_db(path, ring, clock=clock, retention_days=retention_days)

    @classmethod
    def _open_db(cls, path: Path, ring: Keyring, *, clock, retention_days: int) -> "Store":
        if retention_days < 1:
            raise StoreError("retention_days must be at least 1")
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            version = cls._schema_version(conn)
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"{path} has schema version {version}, newer than this ctagent understands "
                    f"({SCHEMA_VERSION}); upgrade ctagent")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # each committed batch survives a power cut
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA foreign_keys=ON")
            db = sqlite_utils.Database(conn)
            cls._migrate(db, version)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"{path} is not a usable ctagent database: {e}") from None
        except BaseException:
            conn.close()
            raise
        store = cls(path, ring, db, clock=clock, retention_days=retention_days)
        store.apply_retention()
        return store

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
        if row is None:
            return 0
        v = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        return v or 0

    @staticmethod
    def _migrate(db: sqlite_utils.Database, version: int) -> None:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with db.conn:  # one transaction per step
                db.conn.execute("BEGIN IMMEDIATE")
                if target == 1:
                    db["schema_version"].create({"version": int, "applied_at": float}, pk="version")
                MIGRATIONS[target](db)
                db["schema_version"].insert({"version": target, "applied_at": time.time()})

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- encryption ---------------------------------------------------------------
    def _cipher(self, day: int, *, create: bool) -> AESGCM | None:
        aead = self._aead.get(day)
        if aead is None:
            key = self.keyring.key_for_day(day, create=create)
            if key is None:
                return None
            aead = self._aead[day] = AESGCM(key)
        return aead

    @staticmethod
    def _aad(table: str, row_id: int, day: int) -> bytes:
        return b"%s|%d|%d" % (table.encode(), row_id, day)

    def _seal(self, table: str, row_id: int, day: int, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_LEN)
        return nonce + self._cipher(day, create=True).encrypt(nonce, plaintext, self._aad(table, row_id, day))

    def _unseal(self, table: str, row_id: int, day: int, blob: bytes) -> bytes | None:
        aead = self._cipher(day, create=False)
        if aead is None:
            self.stats.missing_key_rows += 1
            log.warning("row skipped: no key for its day (table=%s day=%d)", table, day)
            return None
        try:
            return aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], self._aad(table, row_id, day))
        except (InvalidTag, ValueError):
            self.stats.corrupt_rows += 1
            log.warning("row skipped: ciphertext fails authentication (table=%s id=%d day=%d)", table, row_id, day)
            return None

    def _new_id(self, table: str) -> int:
        i = self._next_id[table]
        self._next_id[table] = i + 1
        return i

    def _rows(self, table: str, where: str = "", params: tuple = ()) -> Iterator[tuple[int, int, bytes]]:
        sql = f"SELECT id, day, blob FROM {table} {where} ORDER BY id"
        for row_id, day, blob in self.conn.execute(sql, params):
            plain = self._unseal(table, row_id, day, blob)
            if plain is not None:
                yield row_id, day, plain

    # -- own TEKs -----------------------------------------------------------------
    def add_tek(self, rec: TekRecord) -> None:
        day = rec.rolling_start // TEK_ROLLING_PERIOD
        row_id = self._new_id("teks")
        plain = json.dumps({"tek": rec.tek.hex(), "rs": rec.rolling_start, "rp": rec.rolling_period}).encode()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO teks (id, day, blob) VALUES (?, ?, ?)",
                              (row_id, day, self._seal("teks", row_id, day, plain)))

    def teks(self, since_day: int | None = None) -> list[TekRecord]:
        where, params = ("WHERE day >= ?", (since_day,)) if since_day is not None else ("", ())
        out = []
        for _, _, plain in self._rows("teks", where, params):
            d = json.loads(plain)
            out.append(TekRecord(bytes.fromhex(d["tek"]), d["rs"], d["rp"]))
        return out

    # -- encounters ---------------------------------------------------------------
    def write_encounters(self, encounters: Iterable[Encounter]) -> int:
        """Insert new encounters and update written ones, in one transaction (a batch).
        Assigns ``row_id`` to new encounters. Returns the number of rows written."""
        rows = []
        for e in encounters:
            if e.row_id is None:
                e.row_id = self._new_id("encounters")
            day = e.day
            rows.append((e.row_id, day, self._seal("encounters", e.row_id, day, e.to_bytes())))
        if not rows:
            return 0
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT OR REPLACE INTO encounters (id, day, blob) VALUES (?, ?, ?)", rows)
        return len(rows)

    def encounters(self, *, since_day: int | None = None, until_day: int | None = None) -> Iterator[Encounter]:
        clauses, params = [], []
        if since_day is not None:
            clauses.append("day >= ?")
            params.append(since_day)
        if until_day is not None:
            clauses.append("day <= ?")
            params.append(until_day)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        for row_id, _, plain in self._rows("encounters", where, tuple(params)):
            try:
                yield Encounter.from_bytes(plain, row_id)
            except (ValueError, Exception):  # authenticated but not decodable: a bug, not an attack
                self.stats.corrupt_rows += 1
                log.warning("row skipped: undecodable encounter (id=%d)", row_id)

    def encounter_days(self) -> dict[int, int]:
        """Rows per day (clear metadata only)."""
        return dict(self.conn.execute("SELECT day, COUNT(*) FROM encounters GROUP BY day ORDER BY day"))

    # -- exposures ----------------------------------------------------------------
    def add_exposure(self, day: int, record: dict) -> int:
        row_id = self._new_id("exposures")
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO exposures (id, day, blob) VALUES (?, ?, ?)",
                              (row_id, day, self._seal("exposures", row_id, day, json.dumps(record).encode())))
        return row_id

    def exposures(self) -> list[dict]:
        return [{**json.loads(p), "day": day} for _, day, p in self._rows("exposures")]

    # -- ROBERT: heard HELLOs and registration secrets -----------------------------------
    _HELLO_REC = struct.Struct("<d16sb")  # reception time, HELLO, RSSI

    def add_hellos(self, hellos: Iterable[tuple[float, bytes, int]]) -> int:
        """(reception unix time, 16-byte HELLO, RSSI), packed into one encrypted row per
        day and call (a flush), in one transaction."""
        by_day: dict[int, list[bytes]] = {}
        n = 0
        for t, hello, rssi in hellos:
            by_day.setdefault(int(t // SECONDS_PER_DAY), []).append(
                self._HELLO_REC.pack(t, bytes(hello), max(-128, min(127, int(rssi)))))
            n += 1
        rows = []
        for day, recs in by_day.items():
            row_id = self._new_id("hellos")
            rows.append((row_id, day, self._seal("hellos", row_id, day, b"".join(recs))))
        if rows:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.executemany("INSERT INTO hellos (id, day, blob) VALUES (?, ?, ?)", rows)
        return n

    def hellos(self, since_day: int | None = None) -> list[tuple[float, bytes, int]]:
        where, params = ("WHERE day >= ?", (since_day,)) if since_day is not None else ("", ())
        out = []
        for row_id, _, plain in self._rows("hellos", where, params):
            if len(plain) % self._HELLO_REC.size:
                self.stats.corrupt_rows += 1
                log.warning("row skipped: undecodable HELLO batch (id=%d)", row_id)
                continue
            out.extend(self._HELLO_REC.iter_unpack(plain))
        return out

    def clear_hellos(self) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("DELETE FROM hellos")

    def put_secret(self, name: str, value: bytes) -> None:
        """A long-lived secret (encrypted in the persistent key slot), replacing any older one."""
        row_id = self._new_id("secrets")
        plain = json.dumps({"n": name, "v": bytes(value).hex()}).encode()
        old = [i for i, _, p in self._rows("secrets") if json.loads(p)["n"] == name]
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("DELETE FROM secrets WHERE id = ?", [(i,) for i in old])
            self.conn.execute("INSERT INTO secrets (id, day, blob) VALUES (?, ?, ?)",
                              (row_id, PERSISTENT_DAY, self._seal("secrets", row_id, PERSISTENT_DAY, plain)))

    def get_secret(self, name: str) -> bytes | None:
        for _, _, p in self._rows("secrets"):
            d = json.loads(p)
            if d["n"] == name:
                return bytes.fromhex(d["v"])
        return None

    # -- sync state (not sensitive: export file names and times of our own syncs) ------
    def get_state(self, name: str, default=None):
        row = self.conn.execute("SELECT value FROM sync_state WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_state(self, name: str, value) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR REPLACE INTO sync_state (name, value) VALUES (?, ?)",
                              (name, json.dumps(value)))

    # -- retention and crypto-erasure -------------------------------------------------
    def today(self) -> int:
        return int(self.clock() // SECONDS_PER_DAY)

    def oldest_kept_day(self) -> int:
        return self.today() - self.retention_days + 1

    def apply_retention(self) -> list[int]:
        """Delete rows of days older than the retention period and destroy their keys.
        Returns the days erased."""
        cutoff = self.oldest_kept_day()
        days = set(d for d in self.keyring.days() if d < cutoff)
        for t in _ENCRYPTED_TABLES:
            days.update(d for (d,) in self.conn.execute(f"SELECT DISTINCT day FROM {t} WHERE day < ?", (cutoff,)))
        if days:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                for t in _ENCRYPTED_TABLES:
                    self.conn.execute(f"DELETE FROM {t} WHERE day < ?", (cutoff,))
            for d in days:
                self._aead.pop(d, None)
            self.keyring.destroy_days(sorted(days))
            # old page images leave the WAL too (they were already useless without the key)
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            log.info("retention: erased %d day(s) older than %d days", len(days), self.retention_days)
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
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]
