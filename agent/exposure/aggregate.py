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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .encounter import Encounter, ScanWindow, Sighting, valid_rssi
from .minutes import MINUTE_S, HeardMinute, summarise

#: ScanWindow.add's power of each whole dBm (index: RSSI + 128), computed as it computes it
_POWER_MW = np.array([10.0 ** (r / 10.0) for r in range(-128, 128)])

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

    def add_block(self, times: np.ndarray, ids: np.ndarray, rssis: np.ndarray,
                  identifiers: Mapping[int, tuple[bytes, bytes]]) -> None:
        """Many advertisements at once, in reception order (a simulator's block):
        sample ``k`` was identifier ``ids[k]``, whose (RPI, AEM) is ``identifiers[ids[k]]``.
        The encounters come out exactly as from :meth:`add_raw` on each sample in order
        (power sums accumulated in the same order, from the same per-dBm powers), at a
        Python step per identifier and window instead of per sample."""
        times = np.asarray(times, dtype=float)
        ids = np.asarray(ids, dtype=np.int64)
        rssis = np.asarray(rssis, dtype=np.int64)
        valid = (rssis >= -126) & (rssis <= 20)  # valid_rssi: the unavailable markers are outside
        bad = len(rssis) - int(np.count_nonzero(valid))
        if bad:
            self.stats.dropped_rssi += bad
            times, ids, rssis = times[valid], ids[valid], rssis[valid]
        if not len(times):
            return
        win = np.floor_divide(times, self.window_s).astype(np.int64)
        low = int(win.min())
        span = int(win.max()) - low + 1
        groups, inv = np.unique(ids * span + (win - low), return_inverse=True)  # by identifier, then window
        inv = inv.reshape(-1)
        powers = _POWER_MW[rssis + 128]
        counts = np.bincount(inv, minlength=len(groups))
        partial = np.zeros(len(groups))
        np.add.at(partial, inv, powers)  # unbuffered: in sample order, as ScanWindow.add sums
        strongest = np.full(len(groups), -128, dtype=np.int64)
        np.maximum.at(strongest, inv, rssis)
        # per identifier: its encounter, first and last time
        group_ids = groups // span
        starts = np.flatnonzero(np.r_[True, group_ids[1:] != group_ids[:-1]])
        id_of_sample = np.searchsorted(group_ids[starts], ids)
        first = np.full(len(starts), np.inf)
        np.minimum.at(first, id_of_sample, times)
        last = np.full(len(starts), -np.inf)
        np.maximum.at(last, id_of_sample, times)
        encounters = []
        for ident, t0, t1 in zip(group_ids[starts].tolist(), first.tolist(), last.tolist()):
            rpi, aem = identifiers[ident]
            enc = self._open.get(rpi)
            if enc is None:
                enc = self._open[rpi] = Encounter(rpi, aem, t0, t1, self.window_s)
            else:
                if t0 < enc.first_seen:
                    enc.first_seen = t0
                if t1 > enc.last_seen:
                    enc.last_seen = t1
            self._dirty.add(rpi)
            encounters.append(enc)
        # per identifier and window: merge into the encounter's window
        enc_of_group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(groups)]))
        order: np.ndarray | None = None
        ends = np.cumsum(counts)
        for g, (e, w, n, total, top) in enumerate(zip(enc_of_group.tolist(), (groups % span + low).tolist(),
                                                      counts.tolist(), partial.tolist(), strongest.tolist())):
            windows = encounters[e].windows
            if not windows or w > windows[-1].index:  # the usual case: a new window, in order
                windows.append(ScanWindow(w, n, total, top))  # top >= -126 > ScanWindow's -127
                continue
            window = encounters[e].window(w)
            if window.count:  # it had samples: go on summing from its total, sample by sample
                if order is None:
                    order = np.argsort(inv, kind="stable")
                total = window.power_sum_mw
                for v in powers[order[ends[g] - n : ends[g]]].tolist():
                    total += v
            window.count += n
            window.power_sum_mw = total
            if top > window.rssi_max:
                window.rssi_max = top
        self.stats.accepted += len(times)

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
