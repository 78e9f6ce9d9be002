"""What the receiver heard each minute, of everything, not only of matched peers; sans-I/O.

The ``hmm`` proximity rule judges a peer's minute also against the rest of that minute
(how the peer ranks among all identifiers heard) and against the receiver's recent past
(the peer's signal relative to the median of everything heard lately: a self-calibration
of the receiver's own offset, carriage included). Diagnosis keys arrive days later and
only name a few peers, so the device keeps, for every minute, a small summary of all it
heard: a :class:`HeardMinute` (the count of identifiers and their mean RSSI, strongest
first). No identifier is kept in it.

:func:`summarise` builds them from the aggregator's open encounters; :func:`pack` /
:func:`unpack` are the compact form the store encrypts (one row per day and flush:
about 9 bytes a minute plus one byte per identifier heard, at most
:data:`MAX_KEPT`).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

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
    for enc in encounters:
        for w in reversed(enc.windows):  # recent windows last: stop at the first older one
            if w.index < first_minute:
                break
            if w.index < end_minute and w.count:
                by_minute.setdefault(w.index, []).append(round(w.rssi_mean))
    out = []
    for minute in sorted(by_minute):
        values = sorted(by_minute[minute], reverse=True)
        out.append(HeardMinute(minute, len(values), tuple(values[:MAX_KEPT])))
    return out


def pack(minutes: Iterable[HeardMinute]) -> bytes:
    parts = []
    for m in minutes:
        kept = m.rssi[:MAX_KEPT]
        parts.append(_HEAD.pack(m.minute, min(m.heard, 0xFFFF), len(kept)))
        parts.append(struct.pack(f"<{len(kept)}b", *(max(-128, min(127, r)) for r in kept)))
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


class RecentMedian:
    """The median of every RSSI the receiver heard in the ``span`` minutes up to and
    including a minute: the reference of the ``hmm`` rule's relative-signal evidence.
    Computed once per minute and shared by every peer of the day (the rule asks for the
    same minutes again and again)."""

    def __init__(self, heard: Mapping[int, HeardMinute], *, span_minutes: int, min_values: int) -> None:
        self._heard = heard
        self._span = span_minutes
        self._min = min_values
        self._cache: dict[int, float | None] = {}

    def at(self, minute: int) -> float | None:
        """None when fewer than ``min_values`` values were heard in the span."""
        if minute in self._cache:
            return self._cache[minute]
        values: list[int] = []
        for m in range(minute - self._span + 1, minute + 1):
            h = self._heard.get(m)
            if h is not None:
                values.extend(h.rssi)
        med = _median(values) if len(values) >= self._min else None
        self._cache[minute] = med
        return med


def _median(values: Sequence[int]) -> float:
    s = sorted(values)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0
