"""The store's typed tables, one small class per table, on the encrypted-row core.

- :class:`TekTable`: own Temporary Exposure Keys.
- :class:`EncounterTable`: what was heard, as :class:`~agent.exposure.encounter.Encounter`.
- :class:`ExposureTable`: :class:`~agent.records.Exposure`, unique per family, day and key.
- :class:`HelloTable`: ROBERT HELLOs heard, packed per flush.
- :class:`HeardMinuteTable`: what was heard each minute, of every identifier
  (:class:`~agent.exposure.minutes.HeardMinute`), packed per day and flush.
- :class:`ResearchTable`: research recording's batches (``agent.experiment.recording``
  packs them), under their own key slots and retention.
- :class:`StateTable`: small state records; a record type says whether it is sensitive
  (encrypted in the persistent key slot) or not (clear, e.g. which export files were
  processed).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import struct
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

from ..clock import utc_day
from ..exposure import minutes as heard_minutes
from ..exposure.encounter import Encounter
from ..exposure.minutes import HeardMinute
from ..protocol.gaen import TemporaryExposureKey
from ..records import Exposure
from .core import PERSISTENT_DAY, RESEARCH_SLOT, EncryptedRows

log = logging.getLogger("ctagent.store")


class TekTable:
    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    def add(self, key: TemporaryExposureKey) -> None:
        day = key.day
        row_id = self._rows.new_id("teks")
        plain = json.dumps({"tek": key.key_data.hex(), "rs": key.rolling_start_interval_number,
                            "rp": key.rolling_period}).encode()
        with self._rows.transaction() as c:
            c.execute("INSERT INTO teks (id, day, blob) VALUES (?, ?, ?)",
                      (row_id, day, self._rows.seal("teks", row_id, day, plain)))

    def all(self, since_day: int | None = None) -> list[TemporaryExposureKey]:
        where, params = ("WHERE day >= ?", (since_day,)) if since_day is not None else ("", ())
        out = []
        for _, _, plain in self._rows.rows("teks", where, params):
            d = json.loads(plain)
            out.append(TemporaryExposureKey(bytes.fromhex(d["tek"]), d["rs"], d["rp"]))
        return out


class EncounterTable:
    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    def write(self, encounters: Iterable[Encounter]) -> int:
        """Insert new encounters and update written ones, in one transaction (a batch).
        Assigns ``row_id`` to new encounters. Returns the number of rows written."""
        rows = []
        for e in encounters:
            if e.row_id is None:
                e.row_id = self._rows.new_id("encounters")
            day = e.day
            rows.append((e.row_id, day, self._rows.seal("encounters", e.row_id, day, e.to_bytes())))
        if not rows:
            return 0
        with self._rows.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO encounters (id, day, blob) VALUES (?, ?, ?)", rows)
        return len(rows)

    def read(self, *, since_day: int | None = None, until_day: int | None = None) -> Iterator[Encounter]:
        clauses, params = [], []
        if since_day is not None:
            clauses.append("day >= ?")
            params.append(since_day)
        if until_day is not None:
            clauses.append("day <= ?")
            params.append(until_day)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        for row_id, _, plain in self._rows.rows("encounters", where, tuple(params)):
            try:
                yield Encounter.from_bytes(plain, row_id)
            except (ValueError, struct.error):  # authenticated but not decodable: a bug, not an attack
                self._rows.stats.corrupt_rows += 1
                log.warning("row skipped: undecodable encounter (id=%d)", row_id)

    def count_by_day(self) -> dict[int, int]:
        """Rows per day (clear metadata only)."""
        return dict(self._rows.conn.execute("SELECT day, COUNT(*) FROM encounters GROUP BY day ORDER BY day"))


class ExposureTable:
    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    def add(self, exposure: Exposure) -> bool:
        """Store ``exposure`` unless one with the same uniqueness key exists; True if new."""
        day = exposure.day
        row_id = self._rows.new_id("exposures")
        uid = self._rows.uid(day, exposure.uniqueness_key)
        try:
            with self._rows.transaction() as c:
                c.execute("INSERT INTO exposures (id, day, blob, uid) VALUES (?, ?, ?, ?)",
                          (row_id, day, self._rows.seal("exposures", row_id, day, exposure.to_bytes()), uid))
        except sqlite3.IntegrityError:
            return False
        return True

    def all(self) -> list[Exposure]:
        return [Exposure.from_bytes(p, day) for _, day, p in self._rows.rows("exposures")]

    def days(self) -> list[int]:
        return sorted({e.day for e in self.all()})

    def backfill(self) -> None:
        """Rows written before the uniqueness key existed get theirs; a duplicate among
        them (same family, day and key) is deleted."""
        for row_id, day, plain in list(self._rows.rows("exposures", "WHERE uid IS NULL")):
            uid = self._rows.uid(day, Exposure.from_bytes(plain, day).uniqueness_key)
            with self._rows.transaction() as c:
                try:
                    c.execute("UPDATE exposures SET uid = ? WHERE id = ?", (uid, row_id))
                except sqlite3.IntegrityError:
                    c.execute("DELETE FROM exposures WHERE id = ?", (row_id,))


class HeardHello(NamedTuple):
    """A ROBERT HELLO as received: reception time (Unix s), the 16-byte HELLO, RSSI."""

    t: float
    hello: bytes
    rssi: int


class HelloTable:
    _REC = struct.Struct("<d16sb")  # reception time, HELLO, RSSI

    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    def add(self, hellos: Iterable[HeardHello]) -> int:
        """Packed into one encrypted row per day and call (a flush), in one transaction."""
        by_day: dict[int, list[bytes]] = {}
        n = 0
        pack = self._REC.pack
        for t, hello, rssi in hellos:
            by_day.setdefault(utc_day(t), []).append(pack(t, bytes(hello), max(-128, min(127, int(rssi)))))
            n += 1
        rows = []
        for day, recs in by_day.items():
            row_id = self._rows.new_id("hellos")
            rows.append((row_id, day, self._rows.seal("hellos", row_id, day, b"".join(recs))))
        if rows:
            with self._rows.transaction() as c:
                c.executemany("INSERT INTO hellos (id, day, blob) VALUES (?, ?, ?)", rows)
        return n

    def all(self, since_day: int | None = None) -> list[HeardHello]:
        where, params = ("WHERE day >= ?", (since_day,)) if since_day is not None else ("", ())
        out: list[HeardHello] = []
        for row_id, _, plain in self._rows.rows("hellos", where, params):
            if len(plain) % self._REC.size:
                self._rows.stats.corrupt_rows += 1
                log.warning("row skipped: undecodable HELLO batch (id=%d)", row_id)
                continue
            out.extend(HeardHello(*r) for r in self._REC.iter_unpack(plain))
        return out

    def clear(self) -> None:
        with self._rows.transaction() as c:
            c.execute("DELETE FROM hellos")


class HeardMinuteTable:
    """One encrypted row per day and call (a flush) holding that call's minutes."""

    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    def add(self, minutes: Iterable[HeardMinute]) -> int:
        by_day: dict[int, list[HeardMinute]] = {}
        for m in minutes:
            by_day.setdefault(m.day, []).append(m)
        rows = []
        for day, ms in by_day.items():
            row_id = self._rows.new_id("heard_minutes")
            rows.append((row_id, day, self._rows.seal("heard_minutes", row_id, day, heard_minutes.pack(ms))))
        if rows:
            with self._rows.transaction() as c:
                c.executemany("INSERT INTO heard_minutes (id, day, blob) VALUES (?, ?, ?)", rows)
        return sum(len(ms) for ms in by_day.values())

    def read(self, *, since_day: int | None = None, until_day: int | None = None) -> dict[int, HeardMinute]:
        """By Unix minute (a minute written twice keeps the record that heard more)."""
        clauses, params = [], []
        if since_day is not None:
            clauses.append("day >= ?")
            params.append(since_day)
        if until_day is not None:
            clauses.append("day <= ?")
            params.append(until_day)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        found: list[HeardMinute] = []
        for row_id, _, plain in self._rows.rows("heard_minutes", where, tuple(params)):
            try:
                found.extend(heard_minutes.unpack(plain))
            except (ValueError, struct.error):
                self._rows.stats.corrupt_rows += 1
                log.warning("row skipped: undecodable heard-minute batch (id=%d)", row_id)
        return heard_minutes.merge(found)


class ResearchTable:
    """Batches of research recording: ``kind`` (clear: which batch, never an identifier)
    and the packed batch, sealed under the day's research key slot. Several batches go
    in one transaction (one flush)."""

    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    def add(self, batches: Iterable[tuple[str, int, bytes]]) -> int:
        """``(kind, UTC day, packed batch)`` each; returns the rows written."""
        rows = []
        for kind, day, plain in batches:
            row_id = self._rows.new_id("research")
            slot = RESEARCH_SLOT + day
            rows.append((row_id, slot, kind, self._rows.seal("research", row_id, slot, plain)))
        if rows:
            with self._rows.transaction() as c:
                c.executemany("INSERT INTO research (id, day, kind, blob) VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    def read(self, kind: str) -> Iterator[tuple[int, bytes]]:
        """``(UTC day, packed batch)`` of every readable batch of ``kind``, in write order."""
        for _, slot, plain in self._rows.rows("research", "WHERE kind = ?", (kind,)):
            yield slot - RESEARCH_SLOT, plain

    def count_by_kind(self) -> dict[str, int]:
        return dict(self._rows.conn.execute("SELECT kind, COUNT(*) FROM research GROUP BY kind ORDER BY kind"))


class StateRecord(Protocol):
    """A small piece of state kept in the store under ``STATE_NAME``; ``SENSITIVE``
    chooses encrypted (persistent key slot) or clear storage."""

    STATE_NAME: ClassVar[str]
    SENSITIVE: ClassVar[bool]

    def to_json(self) -> Any: ...

    @classmethod
    def from_json(cls, doc: Any) -> Any: ...


S = TypeVar("S", bound=StateRecord)

#: Sensitive values that older versions kept in clear; encrypted on the next open.
_LEGACY_CLEAR_SENSITIVE = ("declare.pending", "robert.status")


class StateTable:
    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    # -- clear values (sync_state) ----------------------------------------------------
    def _get_clear(self, name: str) -> Any:
        row = self._rows.conn.execute("SELECT value FROM sync_state WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    # -- encrypted values (secrets, persistent key slot) ----------------------------------
    def _secret_rows(self, name: str) -> list[tuple[int, Any]]:
        out = []
        for row_id, _, plain in self._rows.rows("secrets"):
            d = json.loads(plain)
            if d["n"] == name:
                out.append((row_id, json.loads(bytes.fromhex(d["v"]))))
        return out

    def _put_secret(self, c: sqlite3.Connection, name: str, doc: Any) -> None:
        row_id = self._rows.new_id("secrets")
        plain = json.dumps({"n": name, "v": json.dumps(doc).encode().hex()}).encode()
        c.execute("INSERT INTO secrets (id, day, blob) VALUES (?, ?, ?)",
                  (row_id, PERSISTENT_DAY, self._rows.seal("secrets", row_id, PERSISTENT_DAY, plain)))

    # -- the typed face ---------------------------------------------------------------
    def get(self, kind: type[S]) -> S | None:
        if kind.SENSITIVE:
            found = self._secret_rows(kind.STATE_NAME)
            doc = found[-1][1] if found else None
        else:
            doc = self._get_clear(kind.STATE_NAME)
        return None if doc is None else kind.from_json(doc)

    def put(self, record: StateRecord) -> None:
        self._write(type(record), record.to_json())

    def clear(self, kind: type[StateRecord]) -> None:
        self._write(kind, None)

    def _write(self, kind: type[StateRecord], doc: Any) -> None:
        name = kind.STATE_NAME
        if kind.SENSITIVE:
            old = [i for i, _ in self._secret_rows(name)]
            with self._rows.transaction() as c:
                c.executemany("DELETE FROM secrets WHERE id = ?", [(i,) for i in old])
                if doc is not None:
                    self._put_secret(c, name, doc)
        else:
            with self._rows.transaction() as c:
                if doc is None:
                    c.execute("DELETE FROM sync_state WHERE name = ?", (name,))
                else:
                    c.execute("INSERT OR REPLACE INTO sync_state (name, value) VALUES (?, ?)",
                              (name, json.dumps(doc)))

    def encrypt_legacy_clear_values(self) -> None:
        for name in _LEGACY_CLEAR_SENSITIVE:
            doc = self._get_clear(name)
            if doc is None:
                continue
            with self._rows.transaction() as c:
                self._put_secret(c, name, doc)
                c.execute("DELETE FROM sync_state WHERE name = ?", (name,))
