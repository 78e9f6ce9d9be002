"""Sightings -> encounters, sans-I/O.

The aggregator keeps one open :class:`Encounter` per RPI. ``flush(now)`` returns the
encounters changed since the last flush (for the store to insert or update) and forgets
those not heard for ``close_after_s`` (an RPI lives 10-20 minutes, so a silent one is
gone). Memory is bounded by the number of peers in range, not by time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .encounter import Encounter, Sighting, valid_rssi


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
