"""Diagnosis keys -> RPIs -> hits among stored encounters, sans-I/O.

Two steps. :func:`find_candidates` takes the keys as arrays (:class:`PackedKeys`, no
object per key) and the stored encounters as arrays (:class:`EncounterIndex`: RPIs, first
and last EN interval, row ids) and returns the few (key, RPI offset, encounter) triples
whose RPIs are equal. It derives each key's RPIK, computes only the RPIs of the intervals
of the days the stored encounters reach (± the tolerance), and looks each up among the
RPIs stored for that interval's day: an RPI can only match an encounter whose
[first - tolerance, last + tolerance] reaches the RPI's day. The optional C kernel does
this with per-day Bloom filters and a hash table (its cost per key does not grow with
the store) on threads; the pure-Python path does the same with numpy, on processes.

:func:`confirm` then checks those few against the full encounters (read by row id): a
hit is kept when the encounter's time lies within ± tolerance intervals of the RPI's
interval (clocks drift; the Pi has no RTC) and its AEM decrypts to well-formed
metadata. Keys with a hit become :class:`KeyMatch` records.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..protocol import gaen
from ..protocol.export import DiagnosisKey, PackedKeys
from . import _fastcrypto
from .encounter import Encounter

try:  # the optional C kernel (setup.py); the pure-Python path below does the same work
    from . import _fastmatch  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _fastmatch = None

#: ± 2 hours in 10-minute intervals.
DEFAULT_TOLERANCE_INTERVALS = 12
_PERIOD = gaen.TEK_ROLLING_PERIOD
_BATCH_KEYS = 4096
#: below this many keys one thread (or process) does it all
_PARALLEL_MIN_KEYS = 20_000
_rpik = _fastcrypto.rpik


@dataclass
class Hit:
    encounter: Encounter
    enin: int  # the interval of the matching RPI
    tx_power_dbm: int


@dataclass
class KeyMatch:
    key: DiagnosisKey
    hits: list[Hit] = field(default_factory=list)
    rejected_metadata: int = 0
    #: RPIs heard on the RPI's day (± tolerance) but outside ± tolerance of its interval
    rejected_time: int = 0


@dataclass
class MatchStats:
    keys: int = 0
    skipped_no_overlap: int = 0
    keys_derived: int = 0
    rpis_computed: int = 0
    #: RPIs that passed the filter (the C kernel's Bloom filter, the Python path's prefix table)
    candidates: int = 0
    #: (key, RPI, encounter) triples with equal RPIs
    rpi_hits: int = 0


@dataclass(frozen=True)
class Candidates:
    """(key position, RPI offset j, index entry) of every RPI found among the stored ones."""

    key_pos: npt.NDArray[np.uint32]
    offset: npt.NDArray[np.uint32]
    entry: npt.NDArray[np.uint32]

    def __len__(self) -> int:
        return len(self.key_pos)

    @classmethod
    def from_triples(cls, triples: npt.NDArray[np.uint32]) -> Candidates:
        t = triples.reshape(-1, 3)
        return cls(t[:, 0].copy(), t[:, 1].copy(), t[:, 2].copy())


def _floordiv_day(e: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.floor_divide(e, _PERIOD)


class EncounterIndex:
    """What matching needs of the stored encounters, as arrays: RPIs (n x 16 bytes),
    first and last EN interval and the store's row id of each. From encounter records
    (``EncounterIndex(encounters)``: tests, small stores; they are kept for
    :func:`match_keys`) or from the store's bulk form (:meth:`from_arrays`)."""

    def __init__(self, encounters: Sequence[Encounter] = ()) -> None:
        encs = list(encounters)
        firsts = np.fromiter((gaen.en_interval_number(e.first_seen) for e in encs), np.int64, len(encs))
        lasts = np.fromiter((gaen.en_interval_number(e.last_seen) for e in encs), np.int64, len(encs))  # clipped below
        self._init(b"".join(e.rpi for e in encs), firsts, lasts, np.arange(len(encs), dtype=np.int64))
        #: row id -> encounter, when built from records
        self.encounters: dict[int, Encounter] | None = dict(enumerate(encs))

    @classmethod
    def from_arrays(cls, rpis: bytes, first_enin: npt.ArrayLike, last_enin: npt.ArrayLike,
                    row_ids: npt.ArrayLike) -> EncounterIndex:
        self = cls.__new__(cls)
        self._init(rpis, np.asarray(first_enin), np.asarray(last_enin), np.asarray(row_ids))
        self.encounters = None
        return self

    def _init(self, rpis: bytes, first: npt.NDArray[np.integer], last: npt.NDArray[np.integer],
              row_ids: npt.NDArray[np.integer]) -> None:
        n = len(first)
        if len(rpis) != 16 * n or len(last) != n or len(row_ids) != n:
            raise ValueError("inconsistent encounter arrays")
        self.rpis = bytes(rpis)
        # intervals are 32-bit on the air: anything else is a clock gone wrong, kept in range
        if first.dtype != np.uint32:
            first = np.clip(first, 0, 2**32 - 1).astype(np.uint32)
        if last.dtype != np.uint32:
            last = np.clip(last, 0, 2**32 - 1).astype(np.uint32)
        self.first = first
        self.last = np.maximum(last, first)
        self.row_ids = row_ids
        self.min_enin = int(self.first.min()) if n else 1
        self.max_enin = int(self.last.max()) if n else 0
        self._native: dict[int, object] = {}
        self._py: dict[int, _PyIndex] = {}

    def __len__(self) -> int:
        return len(self.first)

    def interval_range(self, tolerance: int) -> tuple[int, int]:
        """The intervals whose RPIs are looked up: the whole days from the first
        encounter's first interval - tolerance to the last one's last + tolerance
        (empty, lo > hi, without encounters)."""
        if not len(self):
            return 1, 0
        return ((self.min_enin - tolerance) // _PERIOD * _PERIOD,
                ((self.max_enin + tolerance) // _PERIOD + 1) * _PERIOD - 1)

    def native(self, tolerance: int) -> object:
        ix = self._native.get(tolerance)
        if ix is None:
            assert _fastmatch is not None
            ix = self._native[tolerance] = _fastmatch.Index(
                self.rpis, self.first.astype("<u4", copy=False), self.last.astype("<u4", copy=False), tolerance,
                secrets.token_bytes(40))
        return ix

    def python(self, tolerance: int) -> _PyIndex:
        ix = self._py.get(tolerance)
        if ix is None:
            ix = self._py[tolerance] = _PyIndex(self, tolerance)
        return ix


class _PyIndex:
    """The pure-Python path's look-up: a 2^b-entry table of RPI prefixes (numpy) in front
    of a dict of the stored RPIs, each with its entries and the days it can match on."""

    def __init__(self, index: EncounterIndex, tolerance: int) -> None:
        n = len(index)
        self.bits = min(26, max(16, int(n).bit_length() + 5))  # ~3 % of the table set
        self.table = np.zeros(1 << self.bits, dtype=np.bool_)
        if n:
            prefixes = np.frombuffer(index.rpis, dtype="<u4")[::4] & ((1 << self.bits) - 1)
            self.table[prefixes] = True
        lo_day = _floordiv_day(index.first.astype(np.int64) - tolerance).tolist()
        hi_day = _floordiv_day(index.last.astype(np.int64) + tolerance).tolist()
        self.entries: dict[bytes, list[tuple[int, int, int]]] = {}
        rp = index.rpis
        for i in range(n):
            self.entries.setdefault(rp[16 * i : 16 * i + 16], []).append((i, lo_day[i], hi_day[i]))


_blocks_cache: dict[tuple[int, int], bytes] = {}


def _blocks(start: int, count: int) -> bytes:
    b = _blocks_cache.get((start, count))
    if b is None:
        if len(_blocks_cache) > 4096:
            _blocks_cache.clear()
        b = _blocks_cache[(start, count)] = b"".join(gaen.padded_data(start + j) for j in range(count))
    return b


def _scan_python(ix: _PyIndex, lo: int, hi: int, keys: PackedKeys, base: int) -> tuple[list[tuple[int, int, int]],
                                                                                         int, int, int]:
    """(key position + base, j, entry) of the RPI hits of ``keys``, and the keys derived,
    RPIs computed and candidates, like the C kernel."""
    hits: list[tuple[int, int, int]] = []
    encrypt, rpik = _fastcrypto.ecb.encrypt, _rpik
    mask = (1 << ix.bits) - 1
    derived = computed = candidates = 0
    kd = keys.key_data
    starts, periods = keys.rolling_start.tolist(), keys.rolling_period.tolist()
    for b0 in range(0, len(starts), _BATCH_KEYS):
        parts, owners, firsts, offsets = [], [], [], [0]
        for pos in range(b0, min(b0 + _BATCH_KEYS, len(starts))):
            start, period = starts[pos], periods[pos]
            a, b = max(start, lo), min(start + period - 1, hi)
            if a > b:
                continue
            parts.append(encrypt(rpik(kd[16 * pos : 16 * pos + 16]), _blocks(a, b - a + 1)))
            owners.append(pos)
            firsts.append(a)
            offsets.append(offsets[-1] + b - a + 1)
        if not parts:
            continue
        derived += len(parts)
        computed += offsets[-1]
        buf = b"".join(parts)
        cand = np.flatnonzero(ix.table[np.frombuffer(buf, dtype="<u4")[::4] & mask])
        candidates += int(cand.size)
        if cand.size == 0:
            continue
        owner_of = np.searchsorted(np.asarray(offsets), cand, side="right") - 1
        for c, k in zip(cand.tolist(), owner_of.tolist()):
            found = ix.entries.get(buf[c * 16 : c * 16 + 16])
            if not found:
                continue
            e = firsts[k] + c - offsets[k]
            day = e // _PERIOD
            pos = owners[k]
            for entry, lo_day, hi_day in found:
                if lo_day <= day <= hi_day:
                    hits.append((base + pos, e - starts[pos], entry))
    return hits, derived, computed, candidates


_worker_state: tuple[_PyIndex, int, int] | None = None


def _worker(keys: PackedKeys, base: int) -> tuple[list[tuple[int, int, int]], int, int, int]:
    assert _worker_state is not None
    ix, lo, hi = _worker_state
    return _scan_python(ix, lo, hi, keys, base)


def find_candidates(keys: PackedKeys, index: EncounterIndex, *,
                    tolerance_intervals: int = DEFAULT_TOLERANCE_INTERVALS, workers: int | None = None,
                    stats: MatchStats | None = None, native: bool = True) -> Candidates:
    """The (key, j, entry) triples whose RPIs are equal. ``workers``: threads (C kernel)
    or processes (pure Python); default all CPUs for large inputs, in-process for small
    ones. ``native=False`` forces the pure-Python path."""
    global _worker_state
    st = stats if stats is not None else MatchStats()
    n = len(keys)
    st.keys += n
    if workers is None:
        workers = (os.cpu_count() or 1) if n >= _PARALLEL_MIN_KEYS else 1
    lo, hi = index.interval_range(tolerance_intervals)
    if len(index) == 0 or n == 0:
        st.skipped_no_overlap += n
        return Candidates.from_triples(np.zeros(0, np.uint32))
    if _fastmatch is not None and native:
        raw, derived, computed, cand = index.native(tolerance_intervals).scan(  # type: ignore[attr-defined]
            keys.key_data, keys.rolling_start.astype("<u4", copy=False), keys.rolling_period.astype("<u2", copy=False),
            workers)
        triples = np.frombuffer(raw, dtype="<u4")
    else:
        ix = index.python(tolerance_intervals)
        if workers <= 1 or n < 2 * _BATCH_KEYS:
            found, derived, computed, cand = _scan_python(ix, lo, hi, keys, 0)
        else:
            _worker_state = (ix, lo, hi)  # inherited by the forked workers, not pickled
            try:
                chunk = -(-n // workers)
                ctx = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                    futs = [ex.submit(_worker, keys.span(i, min(n, i + chunk)), i) for i in range(0, n, chunk)]
                    parts = [f.result() for f in futs]
            finally:
                _worker_state = None
            found = [h for p in parts for h in p[0]]
            derived, computed, cand = (sum(p[1] for p in parts), sum(p[2] for p in parts), sum(p[3] for p in parts))
        triples = np.asarray(sorted(found), dtype=np.uint32)
    st.keys_derived += derived
    st.skipped_no_overlap += n - derived
    st.rpis_computed += computed
    st.candidates += cand
    out = Candidates.from_triples(triples)
    st.rpi_hits += len(out)
    return out


def confirm(keys: PackedKeys, candidates: Candidates, index: EncounterIndex, encounters: Mapping[int, Encounter], *,
            tolerance_intervals: int = DEFAULT_TOLERANCE_INTERVALS) -> list[KeyMatch]:
    """Check time and metadata of each candidate against its encounter (``encounters``:
    row id -> record, for the row ids of the candidates' entries); the keys with at least
    one candidate, in key order."""
    matches: dict[int, KeyMatch] = {}
    for pos, j, entry in zip(candidates.key_pos.tolist(), candidates.offset.tolist(), candidates.entry.tolist()):
        m = matches.get(pos)
        if m is None:
            m = matches[pos] = KeyMatch(keys.key(pos))
        enc = encounters.get(int(index.row_ids[entry]))
        if enc is None:  # gone between reading the index and the rows (retention): not a hit
            continue
        key = m.key
        enin = key.rolling_start_interval_number + j
        rpi = gaen.rpis_from_rpik(_rpik(key.key_data), enin, 1)[0]
        if rpi != enc.rpi:
            raise AssertionError("the index and the encounter disagree on an RPI")
        first, last = gaen.en_interval_number(enc.first_seen), gaen.en_interval_number(enc.last_seen)
        if last < enin - tolerance_intervals or first > enin + tolerance_intervals:
            m.rejected_time += 1
            continue
        try:
            meta = gaen.Metadata.from_bytes(gaen.decrypt_aem(gaen.derive_aemk(key.key_data), rpi, enc.aem))
        except (gaen.MetadataError, gaen.CryptoInputError):
            m.rejected_metadata += 1
            continue
        m.hits.append(Hit(enc, enin, meta.tx_power_dbm))
    return [m for _, m in sorted(matches.items())]


def match_keys(
    keys: Sequence[DiagnosisKey] | PackedKeys,
    index: EncounterIndex,
    *,
    tolerance_intervals: int = DEFAULT_TOLERANCE_INTERVALS,
    workers: int | None = None,
    stats: MatchStats | None = None,
    native: bool = True,
    encounters: Mapping[int, Encounter] | None = None,
) -> list[KeyMatch]:
    """Both steps: matches for the keys with at least one candidate. ``encounters``
    (row id -> record) defaults to those the index was built from."""
    packed = keys if isinstance(keys, PackedKeys) else PackedKeys.from_keys(keys)
    cands = find_candidates(packed, index, tolerance_intervals=tolerance_intervals, workers=workers, stats=stats,
                            native=native)
    records = encounters if encounters is not None else index.encounters
    if records is None:
        raise ValueError("this index holds no encounter records: pass encounters=")
    return confirm(packed, cands, index, records, tolerance_intervals=tolerance_intervals)
