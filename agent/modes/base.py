"""The seam between the device and a protocol family.

A :class:`ProtocolMode` is the only place that knows which family runs. The daemon, the
CLI, the demo and the simulated radio talk to this face and hold no branch on the family:

- **advertise policy**: :meth:`~ProtocolMode.broadcast` says what to put on air and
  until when, and whether the payload comes with a new identity (payload and address
  rotate together) or refreshes the current one (same address);
- **hearing**: :meth:`~ProtocolMode.decode` turns a scanner's service data into the
  family's payload (once per payload), :meth:`~ProtocolMode.record` keeps one reception
  (the hot path), :meth:`~ProtocolMode.flush` writes them to the store;
- **the server**: :meth:`~ProtocolMode.prepare` (once at start: ROBERT registers),
  :meth:`~ProtocolMode.check` (periodically: GAEN syncs exports and matches, ROBERT asks
  for its status), :meth:`~ProtocolMode.declare`, and an optional
  :class:`ServerAccount` (unregister, delete history);
- **status** fields, and a simulated peer of the family for ``--radio sim``.

A new family is one module implementing this face plus one line in ``agent.modes.MODES``.
"""

from __future__ import annotations

import abc
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import httpx
import numpy as np

from ..ble.base import SimulatedPeer
from ..clock import Clock
from ..exposure.calibration import DEFAULT_CALIBRATION, DeviceCalibration
from ..exposure.rule import ProximityConfig
from ..records import DaySummary, DeclareResult
from ..store import Store
from ..sync.keyserver import DEFAULT_MAX_EXPORT_BYTES

P = TypeVar("P")


@dataclass(frozen=True)
class Broadcast:
    """What to put on air from now until ``next_at``."""

    service_data: bytes
    #: the BLE address to use ("" lets the radio choose a fresh random one, as BlueZ does)
    address: str
    #: True: a new identity (payload and address rotate together); False: a refreshed
    #: payload of the current identity, on the same address
    new_identity: bool
    next_at: float

    def __repr__(self) -> str:  # no payload or address in logs
        return f"Broadcast(new_identity={self.new_identity}, next_at={self.next_at:.0f})"


@dataclass(frozen=True)
class ServerSchedule:
    """When the daemon calls :meth:`ProtocolMode.check`: first after a uniform delay in
    ``first_delay_s``, then every ``interval_s`` plus a uniform jitter up to ``jitter_s``."""

    first_delay_s: tuple[float, float]
    interval_s: float
    jitter_s: float


@dataclass(frozen=True)
class CoverTraffic:
    """When the daemon sends chaff (:meth:`ProtocolMode.send_chaff`): every ``tick_s``
    plus a uniform jitter up to ``tick_s``/2, it sends with ``probability``, so that on
    average once per ``tick_s / probability`` at unforeseeable times (the Android app: a
    4-hour tick, probability 1/12, about once in two days); between the requests of one
    chaff declaration, a "user" pause of up to ``user_delay_s``."""

    tick_s: float
    probability: float
    user_delay_s: float = 10.0


@dataclass(frozen=True)
class CheckResult:
    """One periodic server call (GAEN: a sync and the exposure check; ROBERT: a status)."""

    at: float
    offline: bool
    #: key=value line for the log (no identifiers)
    summary: str
    #: one sentence for the user
    message: str
    #: True when the call found this device exposed
    exposed: bool = False
    #: the family's own figures, JSON-ready
    details: Mapping[str, Any] = field(default_factory=dict)
    #: one sentence when the call did not do its whole job (offline, files that failed)
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "offline": self.offline, "exposed": self.exposed, **self.details}


@dataclass(frozen=True)
class DeviceContext:
    """Everything a mode may need to run on one device; each family takes what it uses."""

    store: Store
    clock: Clock
    calibration: DeviceCalibration = DEFAULT_CALIBRATION
    proximity: ProximityConfig = field(default_factory=ProximityConfig)
    #: the family's server ("" = none configured)
    backend_url: str = ""
    #: public keys that sign the key server's export files
    trusted_keys: tuple[str, ...] = ()
    #: where the key server's index and export files are ("" = under backend_url/exports/)
    index_url: str = ""
    export_base_url: str = ""
    #: a key the server requires to register, if any
    api_key: str = ""
    #: ROBERT: the server's ECDH public key (base64 SubjectPublicKeyInfo) when the server
    #: does not send it, and the (solution, id) of a captcha solved for registration
    server_public_key: str = ""
    captcha: tuple[str, str] = ("", "")
    #: randomness for schedules and jitter; key material comes from ``random_bytes``
    rng: random.Random = field(default_factory=random.SystemRandom)
    random_bytes: Callable[[int], bytes] = os.urandom
    #: how often to call the server ([sync] interval_s and jitter_s; a family with a
    #: deployed pace of its own, like ROBERT's status, ignores them)
    sync_interval_s: float = 4 * 3600.0
    sync_jitter_s: float = 1800.0
    match_workers: int | None = None
    http_retries: int = 3
    #: seconds a server call may take, retries included ([sync] timeout_s)
    http_timeout_s: float = 10.0
    #: the largest export file downloaded ([sync] max_export_bytes)
    max_export_bytes: int = DEFAULT_MAX_EXPORT_BYTES
    #: on average, seconds between two chaff declarations ([sync] chaff_interval_s; 0: none)
    chaff_interval_s: float = 0.0
    #: an HTTP client to share (many simulated devices in one process); None: each its own
    http: httpx.Client | None = None


class ServerAccount(Protocol):
    """A registration with the server that the user can start and end (ROBERT)."""

    def register(self) -> None: ...

    def unregister(self, now: float) -> None: ...

    def delete_history(self, now: float) -> None: ...


class ProtocolMode(abc.ABC, Generic[P]):
    #: the family's name in configuration and status ("gaen", "robert")
    name: ClassVar[str]
    #: the 16-bit service UUID the family advertises and scans for
    service_uuid16: ClassVar[int]
    #: how the family's deployed app samples a peer: None = every advertisement heard,
    #: 1 = one sample per peer per scan (the simulator models it)
    samples_per_scan: ClassVar[int | None] = None
    #: True when the device decides exposure itself (and can explain its minutes);
    #: False when the server decides
    decides_on_device: ClassVar[bool] = True

    def __init__(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.clock = ctx.clock

    # -- advertise policy ------------------------------------------------------------
    @abc.abstractmethod
    def broadcast(self, now: float) -> Broadcast | None:
        """What to advertise from ``now``; None when there is nothing yet (ask again later)."""

    # -- hearing ----------------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, service_data: Mapping[Any, Any]) -> P | None:
        """The family's payload in a scanner's service data; None if there is none or it is malformed."""

    @abc.abstractmethod
    def record(self, t: float, payload: P, rssi: int, tx_power: int | None = None) -> None:
        """Keep one reception of ``payload`` (hot path: no I/O)."""

    def record_block(self, times: np.ndarray, ids: np.ndarray, rssis: np.ndarray, payloads: Sequence[P]) -> None:
        """Keep many receptions at once, in reception order (a simulator's block): sample
        ``k`` heard ``payloads[ids[k]]`` at ``times[k]`` with ``rssis[k]``. The same as
        :meth:`record` on each; families override it where arrays are faster."""
        for t, i, rssi in zip(times.tolist(), ids.tolist(), rssis.tolist()):
            self.record(t, payloads[i], rssi)

    @abc.abstractmethod
    def flush(self, now: float, *, final: bool = False) -> int:
        """Write what was recorded to the store (one transaction); rows or records written."""

    # -- the server ---------------------------------------------------------------------
    @property
    def server_schedule(self) -> ServerSchedule | None:
        """When to call :meth:`check`; None when no server is configured."""
        return None

    def prepare(self, now: float) -> None:
        """Blocking set-up with the server before the first broadcast (default: nothing)."""

    @property
    def cover_traffic(self) -> CoverTraffic | None:
        """When to send chaff; None (the default) when the family or the settings send none."""
        return None

    def send_chaff(self, now: float, user_delay_s: float) -> int:
        """Send one chaff declaration (blocking); how many requests got an answer."""
        raise NotImplementedError

    def check(self, now: float, progress: Callable[[int, int], None] | None = None) -> CheckResult:
        """The periodic server call (blocking); ``progress(done, total)`` where it has
        steps to count. Raises :class:`~agent.errors.BackendError`."""
        raise NotImplementedError

    @abc.abstractmethod
    def declare_prompt(self, now: float) -> str:
        """The question to ask before :meth:`declare` (what will be uploaded, and its effect)."""

    @abc.abstractmethod
    def declare(self, code: str, now: float) -> DeclareResult:
        """The user tested positive: upload what the family uploads, with the health authority's code."""

    @property
    def account(self) -> ServerAccount | None:
        """The server registration the user can end, if the family has one."""
        return None

    def refuse_to_run(self) -> str | None:
        """One sentence when the daemon must not start (ROBERT: the user left the server);
        None: it may."""
        return None

    # -- status -------------------------------------------------------------------------
    #: what the periodic server call is called in ``status`` ("sync", "risk status")
    server_call: ClassVar[str] = "sync"

    @abc.abstractmethod
    def status_fields(self) -> dict[str, Any]:
        """The family's figures for ``status`` (no identifiers)."""

    def identifiers_by_day(self) -> dict[int, int]:
        """Distinct identifiers heard per UTC day, cheaply (``status``)."""
        return {s.day: s.identifiers for s in self.heard_by_day()}

    def heard_by_day(self) -> list[DaySummary]:
        """What was heard per UTC day (``encounters``); a family that keeps nothing: []."""
        return []

    def last_server_success(self) -> float | None:
        """When the server last answered a periodic call, as kept in the store."""
        return None

    # -- research ---------------------------------------------------------------------
    def own_identifiers(self) -> list[tuple[str, bytes, int, int]]:
        """This device's identifiers for a research bundle, handed over with consent so
        that analysis can tell which device sent what: ``(kind, id, start, period)``."""
        return []

    # -- simulation ---------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def simulated_peer(cls, rng: random.Random, tx_power_dbm: int) -> SimulatedPeer:
        """A peer of this family for the simulated radio (identifiers no server issued)."""
