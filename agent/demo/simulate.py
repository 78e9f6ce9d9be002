"""The demo's simulated days: every tick, each device advertises what its protocol mode
says, the medium decides who hears whom and how loud, receivers record it; the truth
(minutes within 1 m of person 0) is accumulated alongside."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ble.sim.medium import Draws
from ..protocol.payload import uuid128
from ..timesync import simulated_clock
from .fleet import Fleet
from .scenario import Scenario

#: seconds of simulated time between writes to the stores, as a daemon configured with
#: ``[agent] flush_interval_s = 1800`` writes. The daemon's default is a minute, so that a
#: power cut loses little; simulated devices cannot lose power, and writing every
#: simulated minute re-encrypted every open encounter each time (most of the demo's
#: time). The windows stored are the same; only an identifier silent for more than
#: ``close_after_s`` and heard again before the next write stays one encounter, as it
#: would on such a daemon (the decisions are unchanged: tests/test_demo.py).
FLUSH_EVERY_S = 1800.0
#: research batches are written less often (each write is a durable transaction: the
#: demo's many stores on one disk would wait on them)
RESEARCH_FLUSH_S = 600.0
CARRIAGES = (("table", "pocket", "bag"), (0.6, 0.25, 0.15))  # hand/table 60 %, pocket 25 %, bag 15 %


@dataclass
class Trace:
    """What happened, for scoring and the figure."""

    #: truth: minutes within the rule's distance of person 0, per day and device
    close_minutes: np.ndarray
    #: each day's carriage of every device
    carriages: list[list[str]] = field(default_factory=list)
    t: list[float] = field(default_factory=list)
    distance_to_p0: list[np.ndarray] = field(default_factory=list)
    attenuation_from_p0: list[np.ndarray] = field(default_factory=list)
    sightings: int = 0
    rotations: int = 0
    #: ground truth for research bundles (when the fleet records): every pair within
    #: TRUTH_RANGE_M per tick, (a, b, start, end, distance_m)
    pair_truth: list[tuple[int, int, float, float, float]] = field(default_factory=list)


#: pairs farther apart than this are left out of the exported ground truth (no contact)
TRUTH_RANGE_M = 5.0


def simulate(fleet: Fleet, scenario: Scenario, rng: random.Random, *, tick_s: float, distance_m: float,
             progress: Callable[[str, float], None] | None = None) -> Trace:
    modes, medium, clock = fleet.modes, fleet.medium, fleet.clock
    n = len(modes)
    service_key = uuid128(fleet.mode_cls.service_uuid16)
    limit = fleet.mode_cls.samples_per_scan
    #: every payload put on air, by id; each transmitter's current id (-1: silent)
    payloads: list[Any] = []
    raws: list[tuple[str, bytes]] = []  # each payload's address and service data
    on_air = np.full(n, -1, dtype=np.int64)
    next_at = [0.0] * n
    trace = Trace(close_minutes=np.zeros((scenario.days, n)))
    research = fleet.recorders
    heard = _Heard()

    def deliver() -> None:
        """The block heard since the last flush, to each receiver (in reception order)."""
        for rx, times, ids, rssis in heard.by_receiver():
            modes[rx].record_block(times, ids, rssis, payloads)
            if research:
                for ts, i, rssi in zip(times.tolist(), ids.tolist(), rssis.tolist()):
                    address, data = raws[i]
                    research[rx].heard(ts, address, rssi, None, data)

    total_ticks = scenario.days * int((scenario.active_span(0)[1] - scenario.active_span(0)[0]) / tick_s)
    done_ticks = 0
    for day in range(scenario.days):
        for i in range(n):
            medium.set_carriage(i, rng.choices(*CARRIAGES)[0])
        trace.carriages.append([dv.carriage for dv in fleet.sim_devices])
        t, end = scenario.active_span(day)
        next_flush = t + FLUSH_EVERY_S
        next_research_flush = t + RESEARCH_FLUSH_S
        for r in research:
            r.restart(t)  # nights are not simulated: a gap, as a stopped device leaves
        active = np.ones(n, dtype=bool)
        while t < end:
            clock.t = t
            for i, mode in enumerate(modes):
                if t >= next_at[i]:
                    b = mode.broadcast(t)
                    if b is None:
                        on_air[i], next_at[i] = -1, t + tick_s
                        continue
                    payload = mode.decode({service_key: b.service_data})
                    if payload is None:
                        on_air[i] = -1
                    else:
                        on_air[i] = len(payloads)
                        payloads.append(payload)
                        raws.append((b.address, b.service_data))
                    if research:
                        research[i].advertised(t, b.address, b.service_data, b.new_identity)
                    next_at[i] = b.next_at
                    trace.rotations += int(b.new_identity)
            pos, room = scenario.layout(t)
            pos += np.asarray(medium.rng.normal(0, 0.05, pos.shape))
            dr = medium.draw(t, tick_s, pos, room, active)
            trace.sightings += heard.add(dr, on_air, n, limit)
            d = dr.distance
            trace.close_minutes[day] += (d[:, 0] <= distance_m) * (tick_s / 60)
            if research:
                near_i, near_j = np.nonzero(np.triu(d <= TRUTH_RANGE_M, 1))
                trace.pair_truth.extend((i, j, t, t + tick_s, float(d[i, j]))
                                        for i, j in zip(near_i.tolist(), near_j.tolist()))
            trace.t.append(t)
            trace.distance_to_p0.append(d[:, 0].copy())
            trace.attenuation_from_p0.append(medium.last_attenuation[:, 0].copy())  # device i hearing person 0
            t += tick_s
            if t >= next_flush:
                deliver()
                for m in modes:
                    m.flush(t)
                if t >= next_research_flush:
                    for r in research:
                        r.flush(t, simulated_clock(t))
                    next_research_flush = t + RESEARCH_FLUSH_S
                next_flush = t + FLUSH_EVERY_S
            done_ticks += 1
            if progress and done_ticks % 200 == 0:
                progress("simulating", done_ticks / total_ticks)
        deliver()
        for m in modes:
            m.flush(end, final=True)
        for r in research:
            r.flush(t, simulated_clock(t))
    if progress:
        progress("simulating", 1.0)
    return trace


class _Heard:
    """The samples received since the last flush, as arrays, tick after tick."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, dr: Draws, on_air: np.ndarray, n: int, limit: int | None) -> int:
        """One tick's draws: samples of silent transmitters dropped, at most ``limit``
        per pair (the family's app keeps that many per scan). Returns how many were kept."""
        ids = on_air[dr.tx]
        keep = ids >= 0
        if limit is not None and len(ids):
            pair = dr.rx * n + dr.tx  # a pair's samples are contiguous
            starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
            rank = np.arange(len(pair)) - np.repeat(starts, np.diff(np.r_[starts, len(pair)]))
            keep &= rank < limit
        if not keep.all():
            rx, t, ids, rssi = dr.rx[keep], dr.t[keep], ids[keep], dr.rssi[keep]
        else:
            rx, t, rssi = dr.rx, dr.t, dr.rssi
        self._parts.append((rx, t, ids, rssi))
        return len(rx)

    def by_receiver(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(receiver, times, payload ids, RSSIs) per receiver, each in reception order; then empty."""
        if not self._parts:
            return
        rx, t, ids, rssi = (np.concatenate(a) for a in zip(*self._parts))
        self._parts = []
        order = np.argsort(rx, kind="stable")
        rx, t, ids, rssi = rx[order], t[order], ids[order], rssi[order]
        cuts = np.flatnonzero(np.diff(rx)) + 1
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rx)].tolist()):
            if hi > lo:
                yield int(rx[lo]), t[lo:hi], ids[lo:hi], rssi[lo:hi]
