"""The two radio interfaces. Implementations: ``sim`` (simulated medium); the BlueZ
advertiser and bleak scanner for real hardware are tracked in issue 5."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class RadioHealth:
    advertising: bool = False
    scanning: bool = False
    last_rotation: float | None = None
    samples_last_minute: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RawSighting:
    """What a scanner reports: time, address, RSSI, TX power level if present, service data."""

    t: float
    address: str
    rssi: int
    tx_power: int | None
    service_data: dict[str, bytes]

    def __repr__(self) -> str:  # no address or payload in logs
        return f"RawSighting(t={self.t:.3f}, rssi={self.rssi})"


class Advertiser(abc.ABC):
    @abc.abstractmethod
    async def start(self, service_data: bytes, address: str) -> None: ...

    @abc.abstractmethod
    async def rotate(self, service_data: bytes, address: str) -> None:
        """Change payload and address together."""

    async def update(self, service_data: bytes) -> None:
        """Change the payload, keeping the address (ROBERT refreshes its HELLO within an epoch)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def health(self) -> RadioHealth: ...


class Scanner(abc.ABC):
    @abc.abstractmethod
    def sightings(self) -> AsyncIterator[RawSighting]: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def health(self) -> RadioHealth: ...
