"""The demo's scenarios: where every person is, minute by minute, with known truth.

Everyone sits at a desk (six to a room, 2.5 m apart, rooms 60 m apart) from 07:30 to
18:00 UTC, except during situations (events) that put people elsewhere: the morning
train, a meeting around a table, the lunch queue, coffee. Person 0 is the one who will
test positive; the truth is who spent >= 15 minutes within 1 m of her on one day.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from ..clock import DAY_SECONDS

DAY0 = 20_400 * DAY_SECONDS  # a Monday, 2025-11-10 00:00 UTC
#: the simulated part of each day (seconds after midnight): nights are not simulated
ACTIVE = (7.5 * 3600, 18 * 3600)
DESK_SPACING_M = 2.5
ROOM_SPACING_M = 60.0
ROOM_SIZE = 6
SCENARIOS = ("office", "train")


@dataclass
class Event:
    start: float
    end: float
    positions: dict[int, tuple[float, float]]
    room: int
    label: str


def circle(center: tuple[float, float], n: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(center[0] + radius * math.cos(phase + 2 * math.pi * k / n),
             center[1] + radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def build_events(scenario: str, n: int, days: int, rng: random.Random) -> list[Event]:
    """Known situations with person 0 (the future positive) and around her."""
    ev: list[Event] = []
    others = list(range(1, n))
    for day in range(days):
        base = DAY0 + day * DAY_SECONDS

        def h(x: float, base: float = base) -> float:
            return base + x * 3600

        if scenario == "train" or day > 0:
            # morning train: person 0 seated next to one person (0.5 m), others 1.4-3 m away
            seat, mid = rng.choice(others), list(rng.sample(others, min(5, len(others))))
            pos = {0: (500.0, 0.0), seat: (500.5, 0.0)}
            for k, p in enumerate(x for x in mid if x != seat):
                pos[p] = (500.0 + 1.4 + 0.5 * k, 1.0 + 0.3 * k)
            ev.append(Event(h(7.6), h(7.6 + rng.uniform(0.45, 0.7)), pos, 99, "train"))
        if scenario == "office":
            # meeting of six around a table (radius 0.8 m: neighbours 0.8 m, others 1.4-1.6 m)
            members = [0] + rng.sample(others, min(5, len(others)))
            pts = circle((5.0, 12.0), len(members), 0.8, rng.uniform(0, 1))
            ev.append(Event(h(10), h(10 + rng.choice([0.5, 0.75])), dict(zip(members, pts)), 0, "meeting"))
            # lunch queue: everyone in line 0.8 m apart, 12 minutes (< 15 on its own)
            line = [0] + rng.sample(others, len(others))
            ev.append(Event(h(12), h(12.2), {p: (200.0 + 0.8 * k, 0.0) for k, p in enumerate(line)}, 50, "queue"))
            # coffee: person 0 and one colleague at 0.6 m for 20 min, two more at 1.3 m
            trio = rng.sample(others, min(3, len(others)))
            pos = {0: (300.0, 0.0), trio[0]: (300.6, 0.0)}
            for k, p in enumerate(trio[1:]):
                pos[p] = (300.0, 1.3 * (1 if k == 0 else -1))
            ev.append(Event(h(15), h(15 + 1 / 3), pos, 51, "coffee"))
    return ev


def desk(i: int) -> tuple[tuple[float, float], int]:
    room, k = divmod(i, ROOM_SIZE)
    return (room * ROOM_SPACING_M + (k % 3) * DESK_SPACING_M, (k // 3) * DESK_SPACING_M), room


class Scenario:
    """Positions and rooms of ``n`` people at any time of the simulated days."""

    def __init__(self, name: str, n: int, days: int, rng: random.Random) -> None:
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
        self.name, self.n, self.days = name, n, days
        self.events = build_events(name, n, days, rng)
        self._desks = [desk(i) for i in range(n)]

    def active_span(self, day: int) -> tuple[float, float]:
        base = DAY0 + day * DAY_SECONDS
        return base + ACTIVE[0], base + ACTIVE[1]

    def layout(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(positions (n, 2) in metres, room ids (n,)) at ``t``, before position noise."""
        pos = np.empty((self.n, 2))
        room = np.empty(self.n, dtype=int)
        for i, ((x, y), r) in enumerate(self._desks):
            pos[i, 0], pos[i, 1], room[i] = x, y, r
        for e in self.events:
            if e.start <= t < e.end:
                for p, xy in e.positions.items():
                    pos[p] = xy
                    room[p] = e.room
        return pos, room
