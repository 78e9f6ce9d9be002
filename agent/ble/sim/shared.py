"""One simulated medium shared by several processes on one machine, so that ``ctagent run``
in two terminals (plus ``backend serve``) rehearse the whole loop by hand: the devices
hear each other, not private virtual peers.

``ctagent sim-medium --socket PATH`` runs :class:`MediumService` on a Unix socket with
every device's position (a scenario file or ``--position NAME=X,Y``). A device with
``[radio] kind = "sim"`` and ``sim_medium = PATH`` (and ``sim_name``) connects to it:
its advertiser tells the medium what it has on air, its scanner receives what it hears.
Each tick the medium draws receptions with the project's one radio model
(:class:`~agent.ble.sim.medium.Medium`: path loss, body loss, shadowing, fading), only
between devices that are connected, advertising and scanning.

The wire protocol is one JSON object per line (the socket is local and private, mode
0600):

- device -> medium: ``{"hello": NAME, "tx_power": dBm, "rx_correction": dB}`` first,
  then ``{"advertise": {"address": "..", "uuid": "..", "data": HEX}}`` or
  ``{"advertise": null}`` (paused/stopped) and ``{"scanning": true|false}``;
- medium -> device: ``{"ok": true}`` or ``{"error": SENTENCE}`` after the hello, then
  ``{"heard": [[t, address, rssi, uuid, HEX], ...]}`` every tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...clock import Clock
from ...errors import InputFileError, RadioError
from ..base import Advertiser, RadioHealth, RawSighting, Scanner
from .medium import CARRIAGE_DB, Medium, MediumConfig, SimDevice

log = logging.getLogger("ctagent.sim")

#: a line longer than this is not ours: the connection is closed
MAX_LINE = 64 * 1024
TICK_S = 1.0


@dataclass(frozen=True)
class Placement:
    x: float
    y: float
    carriage: str = "hand"
    room: int = 0


def load_scenario(path: Path) -> dict[str, Placement]:
    """``{"devices": {"alice": {"position": [0, 0], "carriage": "hand", "room": 0}, ...}}``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        devices = doc["devices"]
        out = {str(name): Placement(float(d["position"][0]), float(d["position"][1]), str(d.get("carriage", "hand")),
                                    int(d.get("room", 0)))
               for name, d in devices.items()}
    except OSError as e:
        raise InputFileError(f"{path}: cannot read the scenario: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise InputFileError(f"{path}: not a scenario ({{\"devices\": {{NAME: {{\"position\": [X, Y]}}}}}}): "
                             f"{type(e).__name__} {e}") from None
    return check_placements(out, str(path))


def parse_position(text: str) -> tuple[str, Placement]:
    """``alice=0.5,0`` -> ("alice", Placement(0.5, 0))."""
    name, sep, xy = text.partition("=")
    try:
        x, y = (float(v) for v in xy.split(","))
    except ValueError:
        raise InputFileError(f"--position {text!r}: write NAME=X,Y in metres (e.g. alice=0,0)") from None
    if not sep or not name:
        raise InputFileError(f"--position {text!r}: write NAME=X,Y in metres (e.g. alice=0,0)")
    return name, Placement(x, y)


def check_placements(placements: dict[str, Placement], where: str) -> dict[str, Placement]:
    for name, p in placements.items():
        if not (math.isfinite(p.x) and math.isfinite(p.y)):
            raise InputFileError(f"{where}: {name}: the position must be finite")
        if p.carriage not in CARRIAGE_DB:
            raise InputFileError(f"{where}: {name}: carriage must be one of {', '.join(CARRIAGE_DB)}")
    return placements


@dataclass
class _Member:
    name: str
    writer: asyncio.StreamWriter
    tx_power: float
    rx_correction: float
    on_air: tuple[str, str, str] | None = None  # address, uuid, hex payload
    scanning: bool = False


class MediumService:
    """The medium: devices connect, say what they advertise and whether they scan, and
    receive what they hear every ``tick_s`` seconds of ``clock`` time."""

    def __init__(self, placements: dict[str, Placement], *, clock: Clock, tick_s: float = TICK_S, seed: int = 0,
                 config: MediumConfig | None = None) -> None:
        self.placements = placements
        self.clock, self.tick_s, self.seed = clock, tick_s, seed
        self.config = config or MediumConfig()
        self.members: dict[str, _Member] = {}
        self._medium: Medium | None = None
        self._medium_of: tuple[str, ...] = ()
        self.delivered = 0

    async def serve(self, socket_path: Path, *, ready: asyncio.Event | None = None) -> None:
        socket_path = Path(socket_path)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        old_umask = os.umask(0o077)  # the socket is created 0600: only this user's devices join
        try:
            server = await asyncio.start_unix_server(self._member, path=str(socket_path), limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        os.chmod(socket_path, 0o600)
        log.info("sim medium: listening devices=%d tick_s=%g", len(self.placements), self.tick_s)
        if ready is not None:
            ready.set()
        try:
            async with server:
                while True:
                    await self.clock.sleep(self.tick_s)
                    await self.tick()
        finally:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()

    async def _member(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        member: _Member | None = None
        try:
            hello = json.loads(await reader.readline())
            name = hello.get("hello") if isinstance(hello, dict) else None
            error = None
            if not isinstance(name, str) or name not in self.placements:
                error = (f"{name!r} is not in the medium's scenario (it has {', '.join(sorted(self.placements))}); "
                         "set [radio] sim_name to one of them")
            elif name in self.members:
                error = f"a device named {name!r} is on the medium already"
            if error:
                writer.write(json.dumps({"error": error}).encode() + b"\n")
                await writer.drain()
                return
            member = _Member(str(name), writer, float(hello.get("tx_power", 4.0)),
                             float(hello.get("rx_correction", 0.0)))
            self.members[member.name] = member
            writer.write(b'{"ok": true}\n')
            await writer.drain()
            log.info("sim medium: %s joined", member.name)
            while line := await reader.readline():
                self._update(member, json.loads(line))
        except (ValueError, TypeError, AttributeError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a device that speaks nonsense (or is gone) is dropped; the others go on
        finally:
            if member is not None and self.members.get(member.name) is member:
                del self.members[member.name]
                log.info("sim medium: %s left", member.name)
            writer.close()

    @staticmethod
    def _update(member: _Member, msg: dict[str, Any]) -> None:
        if "advertise" in msg:
            adv = msg["advertise"]
            member.on_air = None if adv is None else (str(adv["address"]), str(adv["uuid"]),
                                                      bytes.fromhex(adv["data"]).hex())
        if "scanning" in msg:
            member.scanning = bool(msg["scanning"])

    def _medium_for(self, names: tuple[str, ...]) -> Medium:
        if self._medium is None or names != self._medium_of:  # a device joined or left
            devices = [SimDevice(n, self.members[n].tx_power, self.members[n].rx_correction,
                                 self.placements[n].carriage) for n in names]
            self._medium, self._medium_of = Medium(devices, self.config, seed=self.seed), names
        return self._medium

    async def tick(self) -> None:
        names = tuple(sorted(self.members))
        if len(names) < 2:
            return
        medium = self._medium_for(names)
        members = [self.members[n] for n in names]
        pos = np.array([[self.placements[n].x, self.placements[n].y] for n in names])
        room = np.array([self.placements[n].room for n in names])
        active = np.ones(len(names), dtype=bool)
        heard: dict[int, list[list[Any]]] = {}

        def deliver(rx: int, tx: int, t: float, rssi: int) -> None:
            on_air = members[tx].on_air
            if on_air is not None and members[rx].scanning:
                heard.setdefault(rx, []).append([round(t, 3), on_air[0], rssi, on_air[1], on_air[2]])

        medium.tick(self.clock.now() - self.tick_s, self.tick_s, pos, room, active, deliver)
        for rx, items in heard.items():
            self.delivered += len(items)
            with contextlib.suppress(ConnectionError, RuntimeError):
                members[rx].writer.write(json.dumps({"heard": items}).encode() + b"\n")
        for m in members:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await m.writer.drain()


class MediumLink:
    """A device's one connection to the medium, shared by its advertiser and scanner."""

    def __init__(self, socket_path: Path, name: str, *, tx_power: float, rx_correction: float) -> None:
        self.socket_path, self.name = Path(socket_path), name
        self.tx_power, self.rx_correction = tx_power, rx_correction
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._lock:
            if self._writer is not None:
                return
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=16 * MAX_LINE)
            except OSError as e:
                raise RadioError("sim.Unavailable", f"no simulated medium at {self.socket_path} ({e.strerror}): "
                                 f"start one with `ctagent sim-medium --socket {self.socket_path}`") from None
            writer.write(json.dumps({"hello": self.name, "tx_power": self.tx_power,
                                     "rx_correction": self.rx_correction}).encode() + b"\n")
            await writer.drain()
            answer = json.loads(await reader.readline() or b"{}")
            if not answer.get("ok"):
                writer.close()
                raise RadioError("sim.Refused", f"the simulated medium at {self.socket_path} refused this device: "
                                 f"{answer.get('error', 'it closed the connection')}")
            self._reader, self._writer = reader, writer

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def send(self, msg: dict[str, Any]) -> None:
        await self.connect()
        assert self._writer is not None
        try:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
        except ConnectionError:
            self._reader = self._writer = None
            raise RadioError("sim.Gone", f"the simulated medium at {self.socket_path} went away") from None

    async def heard(self) -> AsyncIterator[list[list[Any]]]:
        await self.connect()
        assert self._reader is not None
        while line := await self._reader.readline():
            msg = json.loads(line)
            if "heard" in msg:
                yield msg["heard"]
        self._reader = self._writer = None
        raise RadioError("sim.Gone", f"the simulated medium at {self.socket_path} went away")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None


class SharedMediumAdvertiser(Advertiser):
    def __init__(self, link: MediumLink, clock: Clock, uuid: str) -> None:
        self.link, self.clock, self.uuid = link, clock, uuid
        self._health = RadioHealth()
        self._on_air: tuple[bytes, str] | None = None

    async def _tell(self) -> None:
        on_air = self._on_air if self._health.advertising else None
        await self.link.send({"advertise": None if on_air is None else
                              {"address": on_air[1], "uuid": self.uuid, "data": on_air[0].hex()}})

    async def start(self, service_data: bytes, address: str) -> None:
        self._health.advertising = True
        await self.rotate(service_data, address)

    async def rotate(self, service_data: bytes, address: str) -> None:
        self._on_air = (bytes(service_data), address)  # payload and address change together
        self._health.last_rotation = self.clock.now()
        await self._tell()

    async def update(self, service_data: bytes) -> None:
        assert self._on_air is not None
        self._on_air = (bytes(service_data), self._on_air[1])
        await self._tell()

    async def pause(self) -> None:
        self._health.advertising = False
        await self._tell()

    async def resume(self) -> None:
        self._health.advertising = self._on_air is not None
        await self._tell()

    async def stop(self) -> None:
        self._health.advertising = False
        if self.link.connected:  # not a new connection just to say goodbye
            with contextlib.suppress(RadioError):
                await self._tell()

    def health(self) -> RadioHealth:
        return self._health


class SharedMediumScanner(Scanner):
    def __init__(self, link: MediumLink, clock: Clock) -> None:
        self.link, self.clock = link, clock
        self._health = RadioHealth()
        self._recent: list[float] = []
        self._stopped = False

    async def sightings(self) -> AsyncIterator[RawSighting]:
        await self.link.send({"scanning": True})
        self._health.scanning = True
        try:
            async for items in self.link.heard():
                if self._stopped:
                    return
                now = self.clock.now()
                self._recent = [t for t in self._recent if t > now - 60] + [now] * len(items)
                self._health.samples_last_minute = len(self._recent)
                for t, address, rssi, uuid, data in items:
                    yield RawSighting(float(t), str(address), int(rssi), None, {str(uuid): bytes.fromhex(data)})
        finally:
            self._health.scanning = False

    async def pause(self) -> None:
        self._health.scanning = False
        await self.link.send({"scanning": False})

    async def resume(self) -> None:
        self._health.scanning = True
        await self.link.send({"scanning": True})

    async def stop(self) -> None:
        self._stopped = True
        await self.link.close()

    def health(self) -> RadioHealth:
        return self._health
