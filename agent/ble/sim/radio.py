"""The simulated radio (``--radio sim``): this device plus virtual peers on the medium.

The peers are devices of the running protocol family (``ProtocolMode.simulated_peer``:
real EN payloads, or well-formed ROBERT HELLOs) wandering between 0.3 and 8 m from this
device; the scanner yields what this device would hear. It is the radio of ``ctagent run
--radio sim`` (a dry run of the daemon without Bluetooth) and of the daemon tests on a
virtual clock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable

import numpy as np

from ...clock import Clock
from ..base import Advertiser, RadioHealth, RawSighting, Scanner, SimulatedPeer
from .medium import Medium, MediumConfig, SimDevice


class SimAdvertiser(Advertiser):
    """Holds what would be on air; counts rotations and in-place updates."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._health = RadioHealth()
        self.rotations = 0
        self.updates = 0
        self.payload: bytes | None = None
        self.address: str | None = None

    async def start(self, service_data: bytes, address: str) -> None:
        self._health.advertising = True
        await self.rotate(service_data, address)

    async def rotate(self, service_data: bytes, address: str) -> None:
        self.payload, self.address = bytes(service_data), address
        self.rotations += 1
        self._health.last_rotation = self.clock.now()

    async def update(self, service_data: bytes) -> None:
        self.payload = bytes(service_data)
        self.updates += 1

    async def pause(self) -> None:
        self._health.advertising = False

    async def resume(self) -> None:
        self._health.advertising = self.payload is not None

    async def stop(self) -> None:
        self._health.advertising = False

    def health(self) -> RadioHealth:
        return self._health


class SimScanner(Scanner):
    def __init__(self, clock: Clock, *, peer_factory: Callable[[random.Random, int], SimulatedPeer], peers: int = 5,
                 seed: int = 0, tick_s: float = 4.0, tx_cal: float = 4.0, rx_corr: float = 0.0) -> None:
        self.clock = clock
        self.tick_s = tick_s
        self.rng = random.Random(seed)
        devices = [SimDevice("self", tx_cal, rx_corr)] + [SimDevice(f"peer{i}", tx_cal, rx_corr) for i in range(peers)]
        self.medium = Medium(devices, MediumConfig(), seed=seed)
        self.peers = [peer_factory(self.rng, int(tx_cal)) for _ in range(peers)]
        self._pos = np.array([[0.0, 0.0]] + [[self.rng.uniform(0.5, 6), 0.0] for _ in range(peers)])
        self._goal = self._pos.copy()
        self._health = RadioHealth()
        self._stopped = False
        self._paused = False
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
                on_air = [p.advertisement(now) for p in self.peers]
                self._move()
                out: list[RawSighting] = []

                def deliver(rx: int, tx: int, ts: float, rssi: int, on_air: list[tuple[str, dict[str, bytes]]] = on_air,
                            out: list[RawSighting] = out) -> None:
                    if rx == 0 and tx > 0:
                        address, service_data = on_air[tx - 1]
                        out.append(RawSighting(ts, address, rssi, None, service_data))

                self.medium.tick(now, self.tick_s, self._pos, room, active, deliver)
                if self._paused:
                    out = []
                out.sort(key=lambda s: s.t)
                self._recent = [t for t in self._recent if t > now - 60] + [s.t for s in out]
                self._health.samples_last_minute = len(self._recent)
                for s in out:
                    yield s
                await self.clock.sleep(self.tick_s)
        finally:
            self._health.scanning = False

    async def pause(self) -> None:
        self._paused = True
        self._health.scanning = False

    async def resume(self) -> None:
        self._paused = False
        self._health.scanning = True

    async def stop(self) -> None:
        self._stopped = True

    def health(self) -> RadioHealth:
        return self._health
