"""When to rotate identifiers: a pure schedule over times and a random source.

- A new RPI, AEM and BLE random address are always rotated together (Exposure
  Notification Bluetooth Specification v1.2, "Rotation": the RPI changes each time the
  address changes; an address must never outlive its RPI or the reverse).
- Rotation k happens at the start of 10-minute interval k plus a random offset drawn
  per rotation from [0, max_offset_s), so that devices started together do not rotate
  in step (the specification allows rotation every ~10-20 minutes). With the default
  300 s, consecutive rotations are 5-15 minutes apart and an RPI is never broadcast
  outside its own interval by more than 5 minutes.
- A new TEK at each UTC day start (Cryptography Specification v1.2, "Temporary
  Exposure Key": TEKRollingPeriod = 144 intervals).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from . import gaen
from .gaen import TemporaryExposureKey
from .payload import ENPayload

DEFAULT_MAX_OFFSET_S = 300.0


def random_nrpa(rng: random.Random) -> str:
    """A non-resolvable private address (Core spec Vol 6 Part B 1.3.2.2): the two most
    significant bits are 0b00 and the random part is neither all zeros nor all ones."""
    while True:
        value = rng.getrandbits(46)
        if value not in (0, (1 << 46) - 1):
            break
    raw = value.to_bytes(6, "big")
    return ":".join(f"{b:02X}" for b in raw)


@dataclass(frozen=True)
class Rotation:
    """What to broadcast from ``at`` until ``next_at``."""

    at: float
    next_at: float
    enin: int
    payload: ENPayload
    address: str
    tek: TemporaryExposureKey
    #: True when this rotation started a TEK that the caller must persist.
    new_tek: bool

    def __repr__(self) -> str:
        return f"Rotation(at={self.at}, next_at={self.next_at}, enin={self.enin}, new_tek={self.new_tek})"


class IdSchedule:
    """Decides, for a given time, the payload and address to advertise and when to rotate.

    Pure apart from the injected ``rng`` and ``tek_factory``: no clock, no I/O. Feed it
    previously stored TEKs with :meth:`load_tek` after a restart so that the same day
    keeps its key.
    """

    def __init__(
        self,
        *,
        tx_power_dbm: int,
        rng: random.Random | None = None,
        max_offset_s: float = DEFAULT_MAX_OFFSET_S,
        tek_factory: Callable[[], bytes] = gaen.new_tek,
    ) -> None:
        if not 0 <= max_offset_s < gaen.INTERVAL_SECONDS:
            raise ValueError(f"max_offset_s must be in [0, {gaen.INTERVAL_SECONDS})")
        self._metadata = gaen.metadata(tx_power_dbm)
        self._rng = rng if rng is not None else random.SystemRandom()
        self._max_offset = max_offset_s
        self._tek_factory = tek_factory
        self._teks: dict[int, TemporaryExposureKey] = {}
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # rolling_start -> (rpik, aemk)

    def load_tek(self, key: TemporaryExposureKey) -> None:
        self._teks[key.rolling_start_interval_number] = key
        self._keys.pop(key.rolling_start_interval_number, None)

    def tek_for(self, now: float) -> tuple[TemporaryExposureKey, bool]:
        start = gaen.rolling_start_for_day(now)
        rec = self._teks.get(start)
        if rec is not None:
            return rec, False
        tek = self._tek_factory()
        if len(tek) != gaen.KEY_LEN:
            raise ValueError("tek_factory must return 16 bytes")
        rec = TemporaryExposureKey(tek, start)
        self._teks = {s: r for s, r in self._teks.items() if s >= start - 15 * gaen.TEK_ROLLING_PERIOD}
        self._teks[start] = rec
        return rec, True

    def payload_for(self, tek: TemporaryExposureKey, enin: int) -> ENPayload:
        keys = self._keys.get(tek.rolling_start_interval_number)
        if keys is None:
            keys = (gaen.derive_rpik(tek.key_data), gaen.derive_aemk(tek.key_data))
            self._keys = {tek.rolling_start_interval_number: keys}  # only today's keys stay derived
        rpik, aemk = keys
        r = gaen.rpi(rpik, enin)
        return ENPayload(r, gaen.encrypt_aem(aemk, r, self._metadata))

    def next_rotation_after(self, now: float) -> float:
        """Start of the next interval plus a fresh random offset."""
        boundary = gaen.interval_start_seconds(gaen.en_interval_number(now) + 1)
        return boundary + self._rng.uniform(0.0, self._max_offset)

    def rotate(self, now: float) -> Rotation:
        """The rotation to apply at ``now``: fresh RPI/AEM and address, and when to rotate next."""
        enin = gaen.en_interval_number(now)
        tek, created = self.tek_for(now)
        return Rotation(
            at=now,
            next_at=self.next_rotation_after(now),
            enin=enin,
            payload=self.payload_for(tek, enin),
            address=random_nrpa(self._rng),
            tek=tek,
            new_tek=created,
        )
