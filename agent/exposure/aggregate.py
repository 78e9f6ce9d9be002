"""Sightings -> encounters, sans-I/O.

The aggregator keeps one open :class:`Encounter` per RPI. ``flush(now)`` returns the
encounters changed since the last flush (for the store to insert or update) and forgets
those not heard for ``close_after_s`` (an RPI lives 10-20 minutes, so a silent one is
gone). Memory is bounded by the number of peers in range, not by time.

``completed_minutes(now)``, called before ``flush``, returns what was heard in each
minute that ended since the last call, of every identifier
(:class:`~.minutes.HeardMinute`): the minute context that the ``hmm`` rule reads when
keys arrive, days later, naming only a few of the identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .encounter import RSSI_UNAVAILABLE, Encounter, Sighting, valid_rssi
from .minutes import MINUTE_S, HeardMinute, summarise

#: A minute is summarised this long after it ended: a scanner delivers in batches.
MINUTE_GRACE_S = 5.0


@dataclass
class AggregatorStats:
    accepted: int = 0
    dropped_rssi: int = 0


class Aggregator:
    def __init__(self, *, window_s: int = 60, close_after_s: float = 300.0) -> None:
        if window_s <= 0 or close_after_s <= 0:
            raise ValueError("window_s and close_after_s must be positive")
        self.window_s = window_s
        self.close_after_s = close_after_s
        self._open: dict[bytes, Encounter] = {}
        self._dirty: set[bytes] = set()
        self.stats = AggregatorStats()
        #: minutes before this one were summarised (None: none yet)
        self._minutes_done: int | None = None
        self._minutes_retry: list[HeardMinute] = []

    def __len__(self) -> int:
        return len(self._open)

    def add(self, s: Sighting) -> None:
        self.add_raw(s.t, s.rpi, s.aem, s.rssi, s.tx_power)

    def add_raw(self, t: float, rpi: bytes, aem: bytes, rssi: int, tx_power: int | None = None) -> None:
        """Hot path: one received advertisement."""
        if not valid_rssi(rssi):
            self.stats.dropped_rssi += 1
            return
        enc = self._open.get(rpi)
        if enc is None:
            enc = self._open[rpi] = Encounter(rpi, aem, t, t, self.window_s)
        enc.add(t, rssi, tx_power)
        self._dirty.add(rpi)
        self.stats.accepted += 1

    def add_many(self, times: Sequence[float], rpi: bytes, aem: bytes, rssis: Sequence[int]) -> None:
        """Several advertisements of one identifier, as :meth:`add_raw` takes each."""
        enc = self._open.get(rpi)
        accepted = 0
        for t, rssi in zip(times, rssis):
            if rssi in RSSI_UNAVAILABLE or not -126 <= rssi <= 20:  # valid_rssi, inline: the hot path
                self.stats.dropped_rssi += 1
                continue
            if enc is None:
                enc = self._open[rpi] = Encounter(rpi, aem, t, t, self.window_s)
            enc.add(t, rssi)
            accepted += 1
        if accepted:
            self._dirty.add(rpi)
            self.stats.accepted += accepted

    def completed_minutes(self, now: float, *, final: bool = False) -> list[HeardMinute]:
        """The minutes that ended (plus ``MINUTE_GRACE_S``) since the last call, each
        summarised over every identifier heard in it; ``final`` includes the minute in
        progress (shutdown). Call it before :meth:`flush`, which forgets closed encounters.
        Samples arriving for a minute already summarised are not added to its summary."""
        if self.window_s != MINUTE_S:
            raise ValueError("minute summaries need 1-minute windows")
        end = int(now // MINUTE_S) + 1 if final else int((now - MINUTE_GRACE_S) // MINUTE_S)
        start = self._minutes_done
        if start is None:
            firsts = [e.windows[0].index for e in self._open.values() if e.windows]
            start = min(firsts) if firsts else end
        out = self._minutes_retry + (summarise(self._open.values(), start, end) if end > start else [])
        self._minutes_retry = []
        self._minutes_done = max(start, end)
        return out

    def requeue_minutes(self, minutes: list[HeardMinute]) -> None:
        """Take back minute summaries that could not be written: the next call returns them."""
        self._minutes_retry = list(minutes) + self._minutes_retry

    def flush(self, now: float, *, final: bool = False) -> list[Encounter]:
        """Encounters changed since the last flush; closes (forgets) silent ones after."""
        return self.flush_closing(now, final=final)[0]

    def flush_closing(self, now: float, *, final: bool = False) -> tuple[list[Encounter], list[Encounter]]:
        """(encounters changed since the last flush, encounters closed now): silent ones
        (all with ``final``) are forgotten; they will not change again."""
        changed = [self._open[r] for r in self._dirty]
        self._dirty.clear()
        cutoff = now - self.close_after_s
        closed = [e for e in self._open.values() if final or e.last_seen < cutoff]
        for e in closed:
            del self._open[e.rpi]
        return changed, closed

    def requeue(self, encounters: Sequence[Encounter], closed: Sequence[Encounter] = ()) -> None:
        """Take back a flushed batch that could not be written (a full disk): the next
        flush returns it again (and closes the ``closed`` ones again), so nothing heard
        is lost."""
        for e in [*encounters, *closed]:
            self._open.setdefault(e.rpi, e)
            self._dirty.add(e.rpi)
