"""The demo's simulated days: every tick, each device advertises what its protocol mode
says, the medium decides who hears whom and how loud, receivers record it; the truth
(minutes within 1 m of person 0) is accumulated alongside."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..protocol.payload import uuid128
from ..timesync import simulated_clock
from .fleet import Fleet
from .scenario import Scenario

#: seconds of simulated time between writes to the stores (the daemon's flush interval)
FLUSH_EVERY_S = 60.0
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
    on_air: list[Any] = [None] * n  # each transmitter's decoded payload
    next_at = [0.0] * n
    trace = Trace(close_minutes=np.zeros((scenario.days, n)))
    records = [m.record_many for m in modes]
    research = fleet.recorders
    raw: list[tuple[str, bytes] | None] = [None] * n  # each transmitter's address and service data

    def deliver_many(rx: int, tx: int, times: list[float], rssis: list[int]) -> None:
        """One pair's samples of the tick (all of the same payload: one broadcast per tick)."""
        if limit is not None:
            times, rssis = times[:limit], rssis[:limit]
        payload = on_air[tx]
        if payload is not None:
            records[rx](times, payload, rssis)
            trace.sightings += len(times)
            if research:
                address, data = raw[tx]  # type: ignore[misc]
                for ts, rssi in zip(times, rssis):
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
                        on_air[i], next_at[i] = None, t + tick_s
                        continue
                    on_air[i] = mode.decode({service_key: b.service_data})
                    raw[i] = (b.address, b.service_data)
                    if research:
                        research[i].advertised(t, b.address, b.service_data, b.new_identity)
                    next_at[i] = b.next_at
                    trace.rotations += int(b.new_identity)
            pos, room = scenario.layout(t)
            pos += np.asarray(medium.rng.normal(0, 0.05, pos.shape))
            d = medium.tick(t, tick_s, pos, room, active, deliver_many=deliver_many)
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
        for m in modes:
            m.flush(end, final=True)
        for r in research:
            r.flush(t, simulated_clock(t))
    if progress:
        progress("simulating", 1.0)
    return trace

