"""The store's typed tables, one small class per table, on the encrypted-row core.

- :class:`TekTable`: own Temporary Exposure Keys.
- :class:`EncounterTable`: what was heard, as :class:`~agent.exposure.encounter.Encounter`,
  and what matching reads of it, packed per day (:class:`MatchingArrays`).
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from ..clock import DAY_SECONDS
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


#: one encounter in the matching index: row id, RPI, first and last EN interval (in
#: memory, and the stored form of index rows written before 2026-12-03, 32 bytes each)
_INDEX_ENTRY = np.dtype([("row", "<u8"), ("rpi", "V16"), ("first", "<u4"), ("last", "<u4")])
#: the stored form since: a mark byte, then 22 bytes an entry: row id, RPI, first interval
#: within the row's day (0-143) and the intervals to the last (a crowded day's index 0.5 MB
#: instead of 0.7). Told apart by length: 1 + 22 n is odd, 32 n even. A row whose entries
#: do not fit (row id >= 2^32, a span over 255 intervals, a clock that went back) is
#: written in the 32-byte form.
_PACKED_ENTRY = np.dtype([("row", "<u4"), ("rpi", "V16"), ("first", "u1"), ("span", "u1")])
_PACKED_MARK = b"\x02"
_DAY_INTERVALS = 144


def _pack_index(entries: npt.NDArray[np.void], day: int) -> bytes:
    """The stored form of one index row's entries (of encounters of ``day``)."""
    first = entries["first"].astype(np.int64) - day * _DAY_INTERVALS
    span = entries["last"].astype(np.int64) - entries["first"].astype(np.int64)
    if len(entries) and (int(entries["row"].max()) >= 2**32 or first.min() < 0 or first.max() >= _DAY_INTERVALS
                         or span.min() < 0 or span.max() > 255):
        return entries.tobytes()
    packed = np.zeros(len(entries), _PACKED_ENTRY)
    packed["row"], packed["rpi"], packed["first"], packed["span"] = entries["row"], entries["rpi"], first, span
    return _PACKED_MARK + packed.tobytes()


def _unpack_index(plain: bytes, day: int) -> npt.NDArray[np.void] | None:
    """The entries of a stored index row (either form); None if it is neither."""
    if len(plain) % 2 == 1:
        if plain[:1] != _PACKED_MARK or (len(plain) - 1) % _PACKED_ENTRY.itemsize:
            return None
        packed = np.frombuffer(plain, _PACKED_ENTRY, offset=1)
        out = np.zeros(len(packed), _INDEX_ENTRY)
        out["row"], out["rpi"] = packed["row"], packed["rpi"]
        out["first"] = packed["first"].astype(np.uint32) + np.uint32(day * _DAY_INTERVALS)
        out["last"] = out["first"] + packed["span"]
        return out
    if len(plain) % _INDEX_ENTRY.itemsize:
        return None
    return np.frombuffer(plain, _INDEX_ENTRY)


#: rows read per statement by id (far below SQLite's limit on parameters)
_IDS_PER_QUERY = 500


@dataclass(frozen=True)
class MatchingArrays:
    """What matching needs of the stored encounters: their RPIs (n x 16 bytes), first and
    last EN interval, and row ids (to read the few that match in full)."""

    rpis: bytes
    first_enin: npt.NDArray[np.uint32]
    last_enin: npt.NDArray[np.uint32]
    row_ids: npt.NDArray[np.uint64]

    def __len__(self) -> int:
        return len(self.row_ids)


def _interval(t: float) -> int:
    """The EN interval of ``t``, kept within 32 bits whatever the clock said."""
    return max(0, min(2**32 - 1, int(t // 600)))


def _index_entries(encounters: Iterable[Encounter]) -> npt.NDArray[np.void]:
    es = [e for e in encounters if e.row_id is not None]
    out = np.zeros(len(es), _INDEX_ENTRY)
    if es:
        out["row"] = [e.row_id for e in es]
        out["rpi"] = np.frombuffer(b"".join(e.rpi for e in es), "V16")
        out["first"] = [_interval(e.first_seen) for e in es]
        out["last"] = [_interval(e.last_seen) for e in es]
    return out


class EncounterTable:
    """One encrypted row per encounter (rewritten while it is heard), and an index for
    matching: when an encounter closes, its RPI, first and last interval and row id go
    into one encrypted row per day and flush (``encounter_index``), merged into one row
    per day once the day is over. Matching decrypts those few rows in bulk instead of one
    row per encounter; the encounters not indexed yet (heard now, or left by a crash) are
    read one by one. Both are sealed under the day's key: erasing a day erases both."""

    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    def write(self, encounters: Iterable[Encounter], *, closed: Iterable[Encounter] = ()) -> int:
        """Insert new encounters and update written ones, and index the ``closed`` ones
        (no longer heard: they will not change again), in one transaction (a batch).
        Assigns ``row_id`` to new encounters. Returns the number of rows written."""
        rows = []
        for e in encounters:
            if e.row_id is None:
                e.row_id = self._rows.new_id("encounters")
            day = e.day
            rows.append((e.row_id, day, self._rows.seal("encounters", e.row_id, day, e.to_bytes())))
        index_rows = self._index_rows(closed)
        if not rows and not index_rows:
            return 0
        with self._rows.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO encounters (id, day, blob) VALUES (?, ?, ?)", rows)
            c.executemany("INSERT INTO encounter_index (id, day, blob) VALUES (?, ?, ?)", index_rows)
        return len(rows)

    def _index_rows(self, encounters: Iterable[Encounter]) -> list[tuple[int, int, bytes]]:
        by_day: dict[int, list[Encounter]] = {}
        for e in encounters:
            if e.row_id is not None:
                by_day.setdefault(e.day, []).append(e)
        out = []
        for day, es in sorted(by_day.items()):
            row_id = self._rows.new_id("encounter_index")
            out.append((row_id, day, self._rows.seal("encounter_index", row_id, day,
                                                     _pack_index(_index_entries(es), day))))
        return out

    def read(self, *, since_day: int | None = None, until_day: int | None = None) -> Iterator[Encounter]:
        clauses, params = [], []
        if since_day is not None:
            clauses.append("day >= ?")
            params.append(since_day)
        if until_day is not None:
            clauses.append("day <= ?")
            params.append(until_day)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        yield from self._decoded(self._rows.rows("encounters", where, tuple(params)))

    def _decoded(self, rows: Iterable[tuple[int, int, bytes]]) -> Iterator[Encounter]:
        for row_id, _, plain in rows:
            try:
                yield Encounter.from_bytes(plain, row_id)
            except (ValueError, struct.error):  # authenticated but not decodable: a bug, not an attack
                self._rows.stats.corrupt_rows += 1
                log.warning("row skipped: undecodable encounter (id=%d)", row_id)

    def get_many(self, row_ids: Iterable[int]) -> dict[int, Encounter]:
        """The encounters of these rows (those that still exist), by row id."""
        ids = sorted({int(i) for i in row_ids})
        out: dict[int, Encounter] = {}
        for k in range(0, len(ids), _IDS_PER_QUERY):
            part = ids[k : k + _IDS_PER_QUERY]
            where = f"WHERE id IN ({','.join('?' * len(part))})"
            out.update((e.row_id, e) for e in self._decoded(self._rows.rows("encounters", where, tuple(part)))
                       if e.row_id is not None)
        return out

    def _indexed(self, where: str, params: tuple[object, ...]) -> dict[int, npt.NDArray[np.void]]:
        """Per day, the index entries of the index rows ``where`` selects, one per row
        id (the last written)."""
        blobs: dict[int, list[npt.NDArray[np.void]]] = {}
        for row_id, day, plain in self._rows.rows("encounter_index", where, params):
            entries = _unpack_index(plain, day)
            if entries is None:
                self._rows.stats.corrupt_rows += 1
                log.warning("row skipped: undecodable encounter index (id=%d)", row_id)
                continue
            blobs.setdefault(day, []).append(entries)
        out = {}
        for day, parts in blobs.items():
            entries = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if len(parts) > 1:  # one merged row holds each row id once; several may repeat one
                rows = entries["row"][::-1]
                order = np.argsort(rows, kind="stable")
                keep = np.ones(len(rows), np.bool_)
                keep[1:] = rows[order[1:]] != rows[order[:-1]]
                if not keep.all():
                    entries = entries[::-1][np.sort(order[keep])]
            out[day] = entries
        return out

    def _unindexed_ids(self, indexed: dict[int, npt.NDArray[np.void]], where: str,
                       params: tuple[object, ...]) -> list[int]:
        """Encounter rows (of the days ``where`` selects) without an index entry. A day
        whose rows and entries agree in number and sum of row ids is not listed."""
        conn = self._rows.conn
        out: list[int] = []
        # an encounter is indexed when it closes, minutes after it was last heard; one left
        # open by a crash (or written before the index) is indexed at the next open. So
        # only the two latest days, and days whose index rows were not merged into one,
        # can miss rows: the others are not counted (a scan of every row's id)
        (latest,) = conn.execute(f"SELECT MAX(day) FROM encounters {where}", params).fetchone()
        if latest is None:
            return out
        days = [d for d, entries in indexed.items() if d < latest - 1 and self._index_rows_of(d) == 1]
        where += (" AND " if where else "WHERE ") + f"day NOT IN ({','.join('?' * len(days))})"
        params = (*params, *days)
        for day, n, total in conn.execute(f"SELECT day, COUNT(*), SUM(id) FROM encounters {where} GROUP BY day",
                                          params):
            entries = indexed.get(day)
            have = entries["row"] if entries is not None else np.zeros(0, np.uint64)
            if len(have) == n and int(have.sum(dtype=np.uint64)) == total:
                continue
            known = set(have.tolist())
            out.extend(i for (i,) in conn.execute("SELECT id FROM encounters WHERE day = ?", (day,)) if i not in known)
        return out

    def _index_rows_of(self, day: int) -> int:
        return int(self._rows.conn.execute("SELECT COUNT(*) FROM encounter_index WHERE day = ?", (day,)).fetchone()[0])

    def matching_arrays(self, *, since_day: int | None = None) -> MatchingArrays:
        """The RPI, first and last interval and row id of every encounter since
        ``since_day``: the index decrypted in bulk, plus the rows not indexed yet."""
        where, params = ("WHERE day >= ?", (since_day,)) if since_day is not None else ("", ())
        indexed = self._indexed(where, params)
        loose = self.get_many(self._unindexed_ids(indexed, where, params)).values()
        parts = [*indexed.values(), _index_entries(loose)]
        del indexed
        # column by column: no second copy of the whole index at once
        return MatchingArrays(b"".join([p["rpi"].tobytes() for p in parts]),
                              np.concatenate([p["first"] for p in parts]), np.concatenate([p["last"] for p in parts]),
                              np.concatenate([p["row"] for p in parts]))

    def index_unindexed(self) -> int:
        """Index the encounter rows that have no entry (written before the index
        existed, or left open by a crash); at open, when no aggregator holds them."""
        ids = self._unindexed_ids(self._indexed("", ()), "", ())
        if not ids:
            return 0
        rows = self._index_rows(self.get_many(ids).values())
        with self._rows.transaction() as c:
            c.executemany("INSERT INTO encounter_index (id, day, blob) VALUES (?, ?, ?)", rows)
        log.info("store: %d encounter(s) indexed for matching", len(ids))
        return len(ids)

    def compact_index(self, *, before_day: int) -> int:
        """Merge the index rows of each day before ``before_day`` into one; the days merged."""
        days = [d for (d,) in self._rows.conn.execute(
            "SELECT day FROM encounter_index WHERE day < ? GROUP BY day HAVING COUNT(*) > 1", (before_day,))]
        for day in days:
            old = [i for (i,) in self._rows.conn.execute("SELECT id FROM encounter_index WHERE day = ?", (day,))]
            entries = self._indexed("WHERE day = ?", (day,)).get(day, np.zeros(0, _INDEX_ENTRY))
            row_id = self._rows.new_id("encounter_index")
            blob = self._rows.seal("encounter_index", row_id, day, _pack_index(entries, day))
            with self._rows.transaction() as c:
                c.executemany("DELETE FROM encounter_index WHERE id = ?", [(i,) for i in old])
                c.execute("INSERT INTO encounter_index (id, day, blob) VALUES (?, ?, ?)", (row_id, day, blob))
        return len(days)

    def count_by_day(self) -> dict[int, int]:
        """Rows per day (clear metadata only)."""
        return dict(self._rows.conn.execute("SELECT day, COUNT(*) FROM encounters GROUP BY day ORDER BY day"))


class ExposureTable:
    def __init__(self, rows: EncryptedRows) -> None:
        self._rows = rows

    def add(self, exposure: Exposure) -> bool:
        """Store ``exposure`` unless one with the same uniqueness key exists; True if new."""
        return self.add_many([exposure]) == [True]

    def add_many(self, exposures: Sequence[Exposure]) -> list[bool]:
        """Store each exposure unless one with the same uniqueness key exists, in one
        transaction (one sync to the disk); for each, whether it was new."""
        if not exposures:
            return []
        new = []
        with self._rows.transaction() as c:
            for exposure in exposures:
                day = exposure.day
                row_id = self._rows.new_id("exposures")
                uid = self._rows.uid(day, exposure.uniqueness_key)
                cur = c.execute("INSERT OR IGNORE INTO exposures (id, day, blob, uid) VALUES (?, ?, ?, ?)",
                                (row_id, day, self._rows.seal("exposures", row_id, day, exposure.to_bytes()), uid))
                new.append(cur.rowcount == 1)
        return new

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

    #: _REC as a numpy record: the same 25 bytes
    _ARRAY = np.dtype([("t", "<f8"), ("hello", "S16"), ("rssi", "i1")])

    def add(self, hellos: Iterable[HeardHello]) -> int:
        """Packed into one encrypted row per day and call (a flush), in one transaction."""
        hellos = list(hellos)
        return self.add_arrays(np.fromiter((h.t for h in hellos), dtype=float, count=len(hellos)),
                               np.array([bytes(h.hello) for h in hellos], dtype="S16").reshape(len(hellos)),
                               np.fromiter((int(h.rssi) for h in hellos), dtype=np.int64, count=len(hellos)))

    def add_arrays(self, times: np.ndarray, hellos: np.ndarray, rssis: np.ndarray) -> int:
        """:meth:`add` of many HELLOs as arrays (reception times, 16-byte HELLOs, RSSIs)."""
        if any(len(a) != len(times) for a in (hellos, rssis)) or (len(hellos) and hellos.dtype.itemsize != 16):
            raise ValueError("times, 16-byte HELLOs and RSSIs must be the same length")
        recs = np.empty(len(times), dtype=self._ARRAY)
        recs["t"], recs["hello"], recs["rssi"] = times, hellos, np.clip(rssis, -128, 127)
        days = np.floor_divide(times, DAY_SECONDS).astype(np.int64)  # utc_day, for many
        rows = []
        for day in dict.fromkeys(days.tolist()):  # days in order of first reception
            row_id = self._rows.new_id("hellos")
            rows.append((row_id, day, self._rows.seal("hellos", row_id, day, recs[days == day].tobytes())))
        if rows:
            with self._rows.transaction() as c:
                c.executemany("INSERT INTO hellos (id, day, blob) VALUES (?, ?, ?)", rows)
        return len(times)

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
        self.put_many([record])

    def put_many(self, records: Sequence[StateRecord]) -> None:
        """Write the records in one transaction (one sync to the disk)."""
        with self._rows.transaction() as c:
            for record in records:
                self._write_in(c, type(record), record.to_json())

    def clear(self, kind: type[StateRecord]) -> None:
        self._write(kind, None)

    def _write(self, kind: type[StateRecord], doc: Any) -> None:
        with self._rows.transaction() as c:
            self._write_in(c, kind, doc)

    def _write_in(self, c: sqlite3.Connection, kind: type[StateRecord], doc: Any) -> None:
        name = kind.STATE_NAME
        if kind.SENSITIVE:
            old = [i for i, _ in self._secret_rows(name)]
            c.executemany("DELETE FROM secrets WHERE id = ?", [(i,) for i in old])
            if doc is not None:
                self._put_secret(c, name, doc)
        elif doc is None:
            c.execute("DELETE FROM sync_state WHERE name = ?", (name,))
        else:
            c.execute("INSERT OR REPLACE INTO sync_state (name, value) VALUES (?, ?)", (name, json.dumps(doc)))

    def encrypt_legacy_clear_values(self) -> None:
        for name in _LEGACY_CLEAR_SENSITIVE:
            doc = self._get_clear(name)
            if doc is None:
                continue
            with self._rows.transaction() as c:
                self._put_secret(c, name, doc)
                c.execute("DELETE FROM sync_state WHERE name = ?", (name,))
