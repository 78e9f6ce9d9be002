"""``--radio sim``: this device plus virtual peers on the simulated medium.

The peers run their own identifier schedules (real EN payloads) and wander between
0.3 and 8 m from this device; the scanner yields what this device would hear. It is the
radio of ``ctagent run --radio sim`` (a dry run of the daemon without Bluetooth) and of
the daemon tests on a virtual clock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import numpy as np

from ..protocol import robert
from ..protocol.payload import EN_SERVICE_UUID

ROBERT_SERVICE_UUID = "0000fd64-0000-1000-8000-00805f9b34fb"
from ..protocol.schedule import IdSchedule
from .base import Advertiser, RadioHealth, RawSighting, Scanner
from .sim import Medium, MediumConfig, SimDevice


class SimAdvertiser(Advertiser):
    def __init__(self, clock) -> None:
        self.clock = clock
        self._health = RadioHealth()
        self.rotations = 0
        self.payload: bytes | None = None
        self.address: str | None = None

    async def start(self, service_data: bytes, address: str) -> None:
        self._health.advertising = True
        await self.rotate(service_data, address)

    async def rotate(self, service_data: bytes, address: str) -> None:
        if len(service_data) < 18:
            raise ValueError("service data must be 20 bytes (EN) or 18+ (ROBERT)")
        self.payload, self.address = service_data, address
        self.rotations += 1
        self._health.last_rotation = self.clock.now()

    async def update(self, service_data: bytes) -> None:
        self.payload = service_data
        self.updates = getattr(self, "updates", 0) + 1

    async def stop(self) -> None:
        self._health.advertising = False

    def health(self) -> RadioHealth:
        return self._health


class SimScanner(Scanner):
    def __init__(self, clock, *, peers: int = 5, seed: int = 0, tick_s: float = 4.0,
                 tx_cal: float = 4.0, rx_corr: float = 0.0, protocol: str = "gaen") -> None:
        """``protocol="robert"``: the peers broadcast well-formed ROBERT HELLOs (0xFD64)
        from identifiers no server issued (a dry run: a real server drops them)."""
        self.clock = clock
        self.protocol = protocol
        self.tick_s = tick_s
        self.rng = random.Random(seed)
        devices = [SimDevice("self", tx_cal, rx_corr)] + [SimDevice(f"peer{i}", tx_cal, rx_corr) for i in range(peers)]
        self.medium = Medium(devices, MediumConfig(), seed=seed)
        self.schedules = [IdSchedule(tx_power_dbm=int(tx_cal), rng=random.Random(self.rng.getrandbits(64)),
                                     tek_factory=lambda r=random.Random(self.rng.getrandbits(64)): r.randbytes(16))
                          for _ in range(peers)]
        self._rot = [None] * peers
        self._pos = np.array([[0.0, 0.0]] + [[self.rng.uniform(0.5, 6), 0.0] for _ in range(peers)])
        self._goal = self._pos.copy()
        self._health = RadioHealth()
        self._stopped = False
        self._recent: list[float] = []

    def _move(self) -> None:
        for i in range(1, len(self._pos)):
            if np.linalg.norm(self._goal[i] - self._pos[i]) < 0.2:
                r, a = self.rng.uniform(0.3, 8.0), self.rng.uniform(0, 6.283)
                self._goal[i] = [r * np.cos(a), r * np.sin(a)]
            step = self._goal[i] - self._pos[i]
            self._pos[i] += step * min(1.0, 0.5 * self.tick_s / (np.linalg.norm(step) + 1e-9)) * 0.1

    async def sightings(self) -> AsyncIterator[RawSighting]:
        self._health.scanning = True
        n = len(self._pos)
        room = np.zeros(n, dtype=int)
        active = np.ones(n, dtype=bool)
        try:
            while not self._stopped:
                now = self.clock.now()
                for i, sched in enumerate(self.schedules):
                    rot = self._rot[i]
                    if rot is None or now >= rot.next_at:
                        self._rot[i] = sched.rotate(now)
                self._move()
                out: list[RawSighting] = []

                def deliver(rx, tx, ts, rssi):
                    if rx == 0 and tx > 0:
                        rot = self._rot[tx - 1]
                        if self.protocol == "robert":
                            hello = rot.payload.rpi[:9] + robert.time16(robert.ntp_seconds(ts)) + rot.payload.aem[:5].ljust(5, b"\0")
                            sd = {ROBERT_SERVICE_UUID: robert.service_data(hello, 4)}
                        else:
                            sd = {EN_SERVICE_UUID: rot.payload.service_data}
                        out.append(RawSighting(ts, rot.address, rssi, None, sd))

                self.medium.tick(now, self.tick_s, self._pos, room, active, deliver)
                out.sort(key=lambda s: s.t)
                self._recent = [t for t in self._recent if t > now - 60] + [s.t for s in out]
                self._health.samples_last_minute = len(self._recent)
                for s in out:
                    yield s
                await self.clock.sleep(self.tick_s)
        finally:
            self._health.scanning = False

    async def stop(self) -> None:
        self._stopped = True

    def health(self) -> RadioHealth:
        return self._health
