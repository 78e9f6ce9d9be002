"""Diagnosis keys -> RPIs -> hits among stored encounters, sans-I/O.

For each key: skip it before any cryptography when its validity (± the tolerance)
cannot overlap any stored encounter; otherwise derive its RPIK, compute all its RPIs in
one AES-ECB call, and look them up. The look-up is vectorised: a batch of keys' RPIs is
filtered with numpy against a 2^24-entry table of stored RPI prefixes, and only the few
candidates are compared exactly. Keys are split over worker processes (fork) so that
every core works. A hit is kept when the encounter's time lies within ± tolerance
intervals of the RPI's interval (clocks drift; the Pi has no RTC), and its AEM decrypts
to well-formed metadata.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from ..protocol import gaen
from . import _fastcrypto

try:  # the optional C kernel (setup.py); the pure-Python path below does the same work
    from . import _fastmatch  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _fastmatch = None
from ..protocol.export import DiagnosisKey
from .encounter import Encounter

#: ± 2 hours in 10-minute intervals.
DEFAULT_TOLERANCE_INTERVALS = 12
_PREFIX_BITS = 22  # 4 MiB table: fits the cache; ~0.7% false candidates for 28k RPIs
_PREFIX_MASK = (1 << _PREFIX_BITS) - 1
_BATCH_KEYS = 4096
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
    rejected_time: int = 0


@dataclass
class MatchStats:
    keys: int = 0
    skipped_no_overlap: int = 0
    keys_derived: int = 0
    rpis_computed: int = 0
    candidates: int = 0


class EncounterIndex:
    """Stored encounters, indexed for matching."""

    def __init__(self, encounters: Sequence[Encounter]) -> None:
        self.by_rpi: dict[bytes, list[Encounter]] = {}
        for e in encounters:
            self.by_rpi.setdefault(e.rpi, []).append(e)
        if encounters:
            self.min_enin = min(gaen.en_interval_number(e.first_seen) for e in encounters)
            self.max_enin = max(gaen.en_interval_number(e.last_seen) for e in encounters)
        else:
            self.min_enin, self.max_enin = 1, 0
        self.prefix_table = np.zeros(1 << _PREFIX_BITS, dtype=np.bool_)
        if self.by_rpi:
            prefixes = np.frombuffer(b"".join(self.by_rpi), dtype="<u4")[::4] & _PREFIX_MASK
            self.prefix_table[prefixes] = True
        self.sorted_rpis = b"".join(sorted(self.by_rpi))
        self.table_bytes = self.prefix_table.view(np.uint8).tobytes()

    def __len__(self) -> int:
        return len(self.by_rpi)


_blocks_cache: dict[tuple[int, int], bytes] = {}


def _blocks(start: int, period: int) -> bytes:
    b = _blocks_cache.get((start, period))
    if b is None:
        if len(_blocks_cache) > 4096:
            _blocks_cache.clear()
        b = _blocks_cache[(start, period)] = b"".join(gaen.padded_data(start + j) for j in range(period))
    return b


def _scan(index: EncounterIndex, keys: Sequence[tuple[bytes, int, int]]) -> list[tuple[int, int]]:
    """(key position, RPI offset j) of every exact RPI hit among ``keys``."""
    table, by_rpi = index.prefix_table, index.by_rpi
    hits: list[tuple[int, int]] = []
    encrypt, rpik = _fastcrypto.ecb.encrypt, _rpik
    for b0 in range(0, len(keys), _BATCH_KEYS):
        batch = keys[b0 : b0 + _BATCH_KEYS]
        parts, owners, offsets = [], [], [0]
        for pos, (tek, start, period) in enumerate(batch, b0):
            parts.append(encrypt(rpik(tek), _blocks(start, period)))
            owners.append(pos)
            offsets.append(offsets[-1] + period)
        buf = b"".join(parts)
        pref = np.frombuffer(buf, dtype="<u4")[::4] & _PREFIX_MASK
        cand = np.flatnonzero(table[pref])
        if cand.size == 0:
            continue
        offs = np.asarray(offsets)
        for c in cand.tolist():
            rpi = buf[c * 16 : c * 16 + 16]
            if rpi in by_rpi:
                k = int(np.searchsorted(offs, c, side="right")) - 1
                hits.append((owners[k], c - offsets[k]))
    return hits


def _scan_native(index: EncounterIndex, keys: Sequence[tuple[bytes, int, int]]) -> list[tuple[int, int]]:
    n = len(keys)
    if n == 0:
        return []
    teks = b"".join(k[0] for k in keys)
    starts = np.fromiter((k[1] for k in keys), dtype="<u4", count=n).tobytes()
    periods = np.fromiter((k[2] for k in keys), dtype="<u2", count=n).tobytes()
    return _fastmatch.scan(teks, starts, periods, index.table_bytes, _PREFIX_BITS, index.sorted_rpis)


def _scan_native_threads(index: EncounterIndex, keys, workers: int) -> list[tuple[int, int]]:
    """The C kernel releases the GIL: threads use every core without forking."""
    if workers <= 1 or len(keys) < 2 * _BATCH_KEYS:
        return _scan_native(index, keys)
    from concurrent.futures import ThreadPoolExecutor
    chunk = -(-len(keys) // (workers * 4))
    parts = [(i, keys[i : i + chunk]) for i in range(0, len(keys), chunk)]
    with ThreadPoolExecutor(workers) as ex:
        results = ex.map(lambda p: [(p[0] + k, j) for k, j in _scan_native(index, p[1])], parts)
        return [h for r in results for h in r]


_worker_index: EncounterIndex | None = None


def _worker(keys: Sequence[tuple[bytes, int, int]], base: int) -> list[tuple[int, int]]:
    assert _worker_index is not None
    return [(base + p, j) for p, j in _scan(_worker_index, keys)]


def match_keys(
    keys: Sequence[DiagnosisKey],
    index: EncounterIndex,
    *,
    tolerance_intervals: int = DEFAULT_TOLERANCE_INTERVALS,
    workers: int | None = None,
    stats: MatchStats | None = None,
    native: bool = True,
) -> list[KeyMatch]:
    """Matches for the keys with at least one hit. ``workers``: threads (C kernel) or
    processes (pure Python), default all CPUs for large inputs, in-process for small
    ones. ``native=False`` forces the pure-Python path."""
    global _worker_index
    st = stats if stats is not None else MatchStats()
    st.keys += len(keys)
    todo: list[tuple[bytes, int, int]] = []
    todo_keys: list[DiagnosisKey] = []
    for k in keys:
        start, end = k.rolling_start_interval_number, k.rolling_start_interval_number + k.rolling_period - 1
        if end + tolerance_intervals < index.min_enin or start - tolerance_intervals > index.max_enin:
            st.skipped_no_overlap += 1
            continue
        todo.append((k.key_data, start, k.rolling_period))
        todo_keys.append(k)
    st.keys_derived += len(todo)
    st.rpis_computed += sum(t[2] for t in todo)
    if workers is None:
        workers = (os.cpu_count() or 1) if len(todo) >= 20_000 else 1
    if _fastmatch is not None and native:
        raw_hits = _scan_native_threads(index, todo, workers)
    elif workers <= 1 or len(todo) < 2 * _BATCH_KEYS:
        raw_hits = _scan(index, todo)
    else:
        _worker_index = index  # inherited by the forked workers, not pickled
        try:
            chunk = -(-len(todo) // workers)
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                futs = [ex.submit(_worker, todo[i : i + chunk], i) for i in range(0, len(todo), chunk)]
                raw_hits = [h for f in futs for h in f.result()]
        finally:
            _worker_index = None
    st.candidates += len(raw_hits)

    matches: dict[int, KeyMatch] = {}
    for pos, j in raw_hits:
        key = todo_keys[pos]
        enin = key.rolling_start_interval_number + j
        rpi = gaen.rpis_from_rpik(_rpik(key.key_data), enin, 1)[0]
        m = matches.get(pos) or matches.setdefault(pos, KeyMatch(key))
        aemk = gaen.derive_aemk(key.key_data)
        for enc in index.by_rpi.get(rpi, ()):
            first, last = gaen.en_interval_number(enc.first_seen), gaen.en_interval_number(enc.last_seen)
            if last < enin - tolerance_intervals or first > enin + tolerance_intervals:
                m.rejected_time += 1
                continue
            try:
                meta = gaen.Metadata.from_bytes(gaen.decrypt_aem(aemk, rpi, enc.aem))
            except (gaen.MetadataError, gaen.CryptoInputError):
                m.rejected_metadata += 1
                continue
            m.hits.append(Hit(enc, enin, meta.tx_power_dbm))
    return [m for _, m in sorted(matches.items())]
