"""What the receiver heard each minute, of everything, not only of matched peers; sans-I/O.

The ``hmm`` proximity rule judges a peer's minute also against the rest of that minute
(how the peer ranks among all identifiers heard) and against the receiver's recent past
(the peer's signal relative to the median of everything heard lately: a self-calibration
of the receiver's own offset, carriage included). Diagnosis keys arrive days later and
only name a few peers, so the device keeps, for every minute, a small summary of all it
heard: a :class:`HeardMinute` (the count of identifiers and their mean RSSI, strongest
first). No identifier is kept in it.

:func:`summarise` builds them from the aggregator's open encounters (and
:func:`heard_from_arrays` from recorded minutes); :func:`pack` /
:func:`unpack` are the compact form the store encrypts (one row per day and flush:
about 9 bytes a minute plus one byte per identifier heard, at most
:data:`MAX_KEPT`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from ..clock import DAY_SECONDS
from .encounter import Encounter

#: At most this many identifiers' RSSI are kept per minute (the strongest): a rank beyond
#: it is "not among the strongest" whatever its exact value, and a crowd stays small.
MAX_KEPT = 64
MINUTE_S = 60

_HEAD = struct.Struct("<IHB")  # minute index (Unix minutes), identifiers heard, RSSI values kept


@dataclass(frozen=True, slots=True)
class HeardMinute:
    """Everything the receiver heard in one minute."""

    #: Unix minute: ``floor(t / 60)``, the index of the aggregator's 1-minute windows.
    minute: int
    #: Distinct identifiers (RPIs) heard in the minute.
    heard: int
    #: Their mean RSSI (power-domain mean, rounded dBm), strongest first; at most MAX_KEPT.
    rssi: tuple[int, ...]

    @property
    def day(self) -> int:
        return self.minute * MINUTE_S // DAY_SECONDS

    def stronger_than(self, rssi_dbm: float) -> int:
        """How many identifiers were heard stronger than ``rssi_dbm`` (0: the strongest).
        Beyond the kept values the count is a lower bound, which is all a rank needs."""
        ascending = [-r for r in self.rssi]  # rssi is descending
        return bisect.bisect_left(ascending, -round(rssi_dbm))


def summarise(encounters: Iterable[Encounter], first_minute: int, end_minute: int) -> list[HeardMinute]:
    """The minutes ``[first_minute, end_minute)`` of the given encounters (one per RPI),
    in minute order; minutes with nothing heard are left out. The encounters' windows
    must be 1-minute windows."""
    by_minute: dict[int, list[int]] = {}
    log10 = math.log10
    for enc in encounters:
        for w in reversed(enc.windows):  # recent windows last: stop at the first older one
            if w.index < first_minute:
                break
            if w.index < end_minute and w.count:
                # round(w.rssi_mean), inline: every window of every peer passes here
                by_minute.setdefault(w.index, []).append(round(10.0 * log10(w.power_sum_mw / w.count)))
    out = []
    for minute in sorted(by_minute):
        values = sorted(by_minute[minute], reverse=True)
        out.append(HeardMinute(minute, len(values), tuple(values[:MAX_KEPT])))
    return out


def heard_from_arrays(minutes: np.ndarray, rssi_dbm: np.ndarray) -> dict[int, HeardMinute]:
    """The receiver's minutes from one row per (identifier, minute heard): the Unix minute
    and that identifier's mean RSSI in it (power-domain mean, as the aggregator's
    windows). What :func:`summarise` makes on the device, for recorded data (field
    experiments) where the identifiers' minutes come as arrays."""
    minutes = np.asarray(minutes, dtype=np.int64)
    values = np.rint(np.asarray(rssi_dbm, dtype=float)).astype(np.int64)
    order = np.lexsort((-values, minutes))
    minutes, values = minutes[order], values[order]
    cuts = np.flatnonzero(np.diff(minutes)) + 1
    out = {}
    for m, v in zip(np.split(minutes, cuts), np.split(values, cuts)):
        if len(m):
            out[int(m[0])] = HeardMinute(int(m[0]), len(v), tuple(v[:MAX_KEPT].tolist()))
    return out


def pack(minutes: Iterable[HeardMinute]) -> bytes:
    parts = []
    for m in minutes:
        kept = m.rssi[:MAX_KEPT]
        parts.append(_HEAD.pack(m.minute, min(m.heard, 0xFFFF), len(kept)))
        if kept and not (-128 <= min(kept) and max(kept) <= 127):
            kept = tuple(max(-128, min(127, r)) for r in kept)
        parts.append(struct.pack(f"<{len(kept)}b", *kept))
    return b"".join(parts)


def unpack(data: bytes) -> list[HeardMinute]:
    """Inverse of :func:`pack`; ``ValueError`` on a malformed blob."""
    out = []
    off = 0
    while off < len(data):
        if off + _HEAD.size > len(data):
            raise ValueError("truncated heard-minute record")
        minute, heard, kept = _HEAD.unpack_from(data, off)
        off += _HEAD.size
        if off + kept > len(data) or kept > heard or kept > MAX_KEPT:
            raise ValueError("malformed heard-minute record")
        out.append(HeardMinute(minute, heard, struct.unpack_from(f"<{kept}b", data, off)))
        off += kept
    return out


def merge(minutes: Iterable[HeardMinute]) -> dict[int, HeardMinute]:
    """By minute; a minute written twice (a batch retried after a failed write) keeps the
    record that heard more."""
    out: dict[int, HeardMinute] = {}
    for m in minutes:
        cur = out.get(m.minute)
        if cur is None or m.heard > cur.heard:
            out[m.minute] = m
    return out


#: RSSI values (dBm) as the minute summaries keep them: int8
_LOWEST = -128
_ROW = 256  # key stride per minute: room for every int8 value


def stronger_counts(heard: Mapping[int, HeardMinute], minutes: np.ndarray,
                    rssi_dbm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (minute, RSSI): how many identifiers the receiver heard that minute (0 if
    the minute is unknown) and how many of them stronger than the RSSI
    (:meth:`HeardMinute.stronger_than`, for many at once)."""
    uniq, inv = np.unique(minutes, return_inverse=True)
    found = [heard.get(m) for m in uniq.tolist()]
    count = np.fromiter((0 if h is None else h.heard for h in found), dtype=np.int64, count=len(found))
    kept = [() if h is None else h.rssi for h in found]
    lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
    values = np.fromiter(itertools.chain.from_iterable(kept), dtype=np.int64, count=int(lengths.sum()))
    # one sorted key per value: its minute's row, then its RSSI; "stronger than r in row j"
    # is then the distance from (j, r) to the end of row j
    keys = np.sort(np.repeat(np.arange(len(kept)), lengths) * _ROW + (values - _LOWEST))
    row = inv.astype(np.int64) * _ROW
    r = np.clip(np.rint(rssi_dbm).astype(np.int64) - _LOWEST, -1, _ROW - 1)
    stronger = np.searchsorted(keys, row + _ROW - 1, side="right") - np.searchsorted(keys, row + r, side="right")
    return count[inv], stronger


def recent_medians(heard: Mapping[int, HeardMinute], minutes: np.ndarray, span_minutes: int,
                   min_values: int) -> np.ndarray:
    """For each minute: the median of every RSSI value the receiver heard in the
    ``span_minutes`` minutes up to and including it (the ``hmm`` rule's reference for the
    relative signal); NaN where fewer than ``min_values`` were heard. Computed once per
    distinct minute from per-minute histograms and their running sums (RSSI values are
    whole dBm), whatever the number of peers asking."""
    uniq, inv = np.unique(minutes, return_inverse=True)
    if not len(uniq):
        return np.empty(0)
    lo, hi = int(uniq[0]) - span_minutes + 1, int(uniq[-1])
    rows = sorted(m for m in heard if lo <= m <= hi)
    per_row = [heard[m].rssi for m in rows]
    lengths = np.fromiter(map(len, per_row), dtype=np.int64, count=len(rows))
    values = np.fromiter(itertools.chain.from_iterable(per_row), dtype=np.int64, count=int(lengths.sum()))
    if not len(values):
        return np.full(len(inv), np.nan)
    low = int(values.min())
    bins = int(values.max()) - low + 1  # only the values heard: fewer bins to sum
    cells = np.repeat(np.arange(1, len(rows) + 1), lengths) * bins + (values - low)
    hist = np.bincount(cells, minlength=(len(rows) + 1) * bins).reshape(len(rows) + 1, bins)
    running = np.cumsum(hist, axis=0)  # row r: minutes rows[:r]
    rows_arr = np.asarray(rows, dtype=np.int64)
    first = np.searchsorted(rows_arr, uniq - span_minutes + 1, side="left")
    last = np.searchsorted(rows_arr, uniq, side="right")
    window = running[last] - running[first]  # (distinct minutes, bins)
    cum = np.cumsum(window, axis=1)
    n = cum[:, -1]
    k_lo, k_hi = (n + 1) // 2, n // 2 + 1  # the two middle order statistics (the same one when n is odd)
    v_lo = np.argmax(cum >= k_lo[:, None], axis=1)
    v_hi = np.argmax(cum >= k_hi[:, None], axis=1)
    med = (v_lo + v_hi) / 2.0 + low
    return np.where(n >= min_values, med, np.nan)[inv]
