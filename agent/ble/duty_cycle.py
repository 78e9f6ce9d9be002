"""Alternate advertising and scanning, on any radio backend.

For controllers that stop advertising while scanning (some Raspberry Pi kernels) or have
a single advertising set: advertise for ``advertise_s``, then scan for ``scan_s``. With
20 s / 10 s a peer is heard a third of the time and we are heard two thirds of the
time; the rule's minute windows and gap filling absorb the holes (at most 20 s)."""

from __future__ import annotations

import asyncio

from ..clock import Clock
from .base import Advertiser, RadioEvents, Scanner


async def duty_cycle(advertiser: Advertiser, scanner: Scanner, *, advertise_s: float, scan_s: float, clock: Clock,
                     stop: asyncio.Event, events: RadioEvents | None = None) -> None:
    """``events``: the pauses, as radio-down intervals for research recording."""
    events = events or RadioEvents()
    await scanner.pause()
    events.down("scan_paused", clock.now(), "duty cycle")
    while not stop.is_set():
        await advertiser.resume()
        events.up("advertise_paused", clock.now())
        await clock.sleep(advertise_s)
        if stop.is_set():
            break
        await advertiser.pause()
        events.down("advertise_paused", clock.now(), "duty cycle")
        await scanner.resume()
        events.up("scan_paused", clock.now())
        await clock.sleep(scan_s)
        if stop.is_set():
            break
        await scanner.pause()
        events.down("scan_paused", clock.now(), "duty cycle")


def parse_duty_cycle(text: str) -> tuple[float, float] | None:
    """"ADVERTISE_S,SCAN_S" -> (advertise_s, scan_s); "" -> None. Raises ValueError."""
    if not text:
        return None
    a, b = (float(x) for x in text.split(","))
    if not (a > 0 and b > 0):
        raise ValueError("both phases must be positive")
    return a, b
