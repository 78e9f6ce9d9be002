"""Shared test helpers that are not fixtures (also imported by test subprocesses)."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.clock import DAY_SECONDS
from agent.store import Passphrase

DAY = DAY_SECONDS
#: 2024-10-04 00:00 UTC: a UTC day start, so day numbers in tests are easy to read
MIDNIGHT = 20_000 * DAY
#: the tests' "now" unless they need another: 09:00 UTC that day
T0 = MIDNIGHT + 9 * 3600

#: scrypt parameters small enough for fast tests (the default is n=2**15)
FAST_SCRYPT = {"n": 2**10, "r": 8, "p": 1}


def fast_passphrase(p: str = "correct horse battery staple") -> Passphrase:
    return Passphrase(p, scrypt=FAST_SCRYPT)


def wait_until(predicate: Callable[[], object], timeout_s: float = 20.0, poll_s: float = 0.05,
               what: str = "the condition") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


async def eventually(predicate: Callable[[], object], timeout_s: float = 10.0, poll_s: float = 0.02,
                     what: str = "the condition") -> None:
    """The asyncio form of :func:`wait_until`."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(poll_s)
