"""The radio's face: an :class:`Advertiser` and a :class:`Scanner` (each can pause and
resume, for the duty cycle), an optional :class:`StatusService` (the GATT status for a
companion device), and what a backend is given to build them (:class:`RadioRequest`).
Backends: ``sim`` (the simulated medium), ``bluez`` (BlueZ over D-Bus + bleak), ``bumble``
(our own host on a USB/UART HCI controller)."""

from __future__ import annotations

import abc
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from ..clock import Clock


@dataclass
class RadioHealth:
    advertising: bool = False
    scanning: bool = False
    last_rotation: float | None = None
    samples_last_minute: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, name: str) -> None:
        """Remember an error name (the last ten)."""
        self.errors = (self.errors + [name])[-10:]


class Check(NamedTuple):
    """One line of ``ctagent doctor``: what was checked, whether it is fine, what to do."""

    name: str
    ok: bool
    detail: str


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


@dataclass(frozen=True)
class RadioDown:
    """An interval when this device could not hear (``scan_*``) or be heard
    (``advertise_*``): research recording keeps them, so that analysis can tell "nobody
    there" from "the radio was not listening". ``end`` None: still down."""

    kind: str
    start: float
    end: float | None
    detail: str = ""


#: the kinds of interval during which the scanner heard nothing by construction
SCAN_DOWN = ("scan_failed", "scanner_stall", "scan_paused")
ADVERTISE_DOWN = ("advertise_failed", "advertise_paused")


class RadioEvents:
    """Where the daemon, the duty cycle and the scanners say when a radio goes down and
    comes back; :meth:`drain` hands the intervals to research recording."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[float, str]] = {}
        self._closed: list[RadioDown] = []

    def down(self, kind: str, t: float, detail: str = "") -> None:
        self._open.setdefault(kind, (t, detail))

    def up(self, kind: str, t: float) -> None:
        opened = self._open.pop(kind, None)
        if opened is not None:
            self._closed.append(RadioDown(kind, opened[0], max(t, opened[0]), opened[1]))

    def is_down(self, kind: str) -> bool:
        return kind in self._open

    def drain(self, now: float) -> list[RadioDown]:
        """Intervals closed since the last call, and open ones up to ``now`` (continued
        from ``now`` at the next call), so each flush accounts exactly its own window."""
        out = self._closed + [RadioDown(k, t, now, d) for k, (t, d) in self._open.items()]
        self._closed = []
        self._open = {k: (max(t, now), d) for k, (t, d) in self._open.items()}
        return out


class Advertiser(abc.ABC):
    @abc.abstractmethod
    async def start(self, service_data: bytes, address: str) -> None: ...

    @abc.abstractmethod
    async def rotate(self, service_data: bytes, address: str) -> None:
        """Change payload and address together."""

    @abc.abstractmethod
    async def update(self, service_data: bytes) -> None:
        """Change the payload, keeping the address (ROBERT refreshes its HELLO within an epoch)."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop transmitting but keep the payload (duty cycle)."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def health(self) -> RadioHealth: ...


class Scanner(abc.ABC):
    #: set by the daemon: where a backend reports its own outages (a stalled scan)
    events: RadioEvents | None = None

    @abc.abstractmethod
    def sightings(self) -> AsyncIterator[RawSighting]: ...

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop scanning without ending :meth:`sightings` (duty cycle)."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def health(self) -> RadioHealth: ...


class StatusService(Protocol):
    """Serves the agent's status bytes (``agent.ble.status``) to a companion device."""

    async def start(self) -> None: ...

    def update(self, value: bytes) -> None: ...

    async def stop(self) -> None: ...


class SimulatedPeer(Protocol):
    """A simulated device (of the running protocol family), as the simulated radio hears it."""

    def advertisement(self, now: float) -> tuple[str, dict[str, bytes]]:
        """(address, service data keyed by 128-bit UUID) on air at ``now``."""
        ...


@dataclass(frozen=True)
class RadioRequest:
    """What a radio backend is asked to build."""

    clock: Clock
    #: the 16-bit service UUID advertised and scanned for (the protocol family's)
    service_uuid16: int
    adapter: str = "hci0"
    gatt_status: bool = False
    #: the simulated radio: this device's calibration, and its peers
    tx_power_dbm: float = 4.0
    rx_correction_db: float = 0.0
    sim_peers: int = 5
    sim_seed: int = 0
    simulated_peer: Callable[[random.Random, int], SimulatedPeer] | None = None
    #: the simulated radio on a medium shared across processes (``agent.ble.sim.shared``):
    #: its socket and this device's name there; empty: private virtual peers
    sim_medium: str = ""
    sim_name: str = ""
    #: the bumble radio: its HCI transport moniker, and a btsnoop file to write (empty: none)
    bumble_transport: str = ""
    bumble_snoop: str = ""


@dataclass
class Radio:
    advertiser: Advertiser
    scanner: Scanner
    status_service: StatusService | None = None
    #: what research recording notes of the radio, for the analysis' loss accounting:
    #: the mean advertising interval (s) and the controller's scan duty (fraction of the
    #: time it listens while scanning), when the backend knows them
    advertising_interval_s: float | None = None
    scan_duty: float | None = None
