"""The protocol-family seam: every family passes the same contract, and a new family is
one module plus one registry line (a toy one, defined here, runs through the daemon and
the demo with no other change)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from agent.ble.base import Radio, SimulatedPeer
from agent.ble.sim import SimAdvertiser, SimScanner
from agent.clock import VirtualClock
from agent.daemon import Daemon
from agent.exposure.aggregate import Aggregator
from agent.modes import MODES, mode_class
from agent.modes.base import Broadcast, CheckResult, DeviceContext, ProtocolMode
from agent.modes.gaen import GaenMode
from agent.modes.robert import RobertMode
from agent.protocol.payload import find_service_data, uuid128
from agent.records import DeclareResult

from .helpers import MIDNIGHT

TOY_UUID16 = 0xFEAA


class ToyMode(ProtocolMode[bytes]):
    """A made-up family: a random 16-byte identifier, new every 10 minutes, kept as
    encounters; no server."""

    name = "toy"
    service_uuid16 = TOY_UUID16

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        self.aggregator = Aggregator()

    def broadcast(self, now: float) -> Broadcast:
        return Broadcast(self.ctx.random_bytes(16), "", True, now + 600)

    def decode(self, service_data: Mapping[Any, Any]) -> bytes | None:
        value = find_service_data(service_data, TOY_UUID16)
        return value if value is not None and len(value) == 16 else None

    def record(self, t: float, payload: bytes, rssi: int, tx_power: int | None = None) -> None:
        self.aggregator.add_raw(t, payload, bytes(4), rssi)

    def flush(self, now: float, *, final: bool = False) -> int:
        return self.store.encounters.write(self.aggregator.flush(now, final=final))

    def check(self, now: float, progress: Callable[[int, int], None] | None = None) -> CheckResult:
        return CheckResult(now, False, "toy check", "nothing to ask")

    def declare_prompt(self, now: float) -> str:
        return "Nothing to upload?"

    def declare(self, code: str, now: float) -> DeclareResult:
        return DeclareResult(0, 0, "nothing uploaded")

    def status_fields(self) -> dict[str, Any]:
        return {"open": len(self.aggregator)}

    @classmethod
    def simulated_peer(cls, rng: random.Random, tx_power_dbm: int) -> SimulatedPeer:
        return _ToyPeer(random.Random(rng.getrandbits(64)))


class _ToyPeer:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def advertisement(self, now: float) -> tuple[str, dict[str, bytes]]:
        return "", {uuid128(TOY_UUID16): self.rng.randbytes(16)}


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(MODES, "toy", "tests.test_modes:ToyMode")


def context(store, clock, **kw):
    rng = random.Random(7)
    return DeviceContext(store=store, clock=clock, rng=rng, random_bytes=rng.randbytes, **kw)


@pytest.mark.parametrize("cls,url", [(GaenMode, ""), (RobertMode, "http://127.0.0.1:9"), (ToyMode, "")])
def test_every_family_keeps_the_contract(cls, url, store, clock, monkeypatch):
    mode = cls(context(store, clock, backend_url=url))
    if cls is RobertMode:  # a registration as the server would give it, without a server
        from agent.protocol import robert
        from agent.sync.robert import RobertRegistration
        epoch = robert.epoch_id(robert.ntp_seconds(clock.t), robert.ntp_seconds(clock.t) - 3600)
        mode.registration = RobertRegistration(b"m" * 32, b"t" * 32, robert.ntp_seconds(clock.t) - 3600,
                                               {epoch: (b"e" * 8, b"c")})
    first = mode.broadcast(clock.t)
    assert first.new_identity and first.next_at > clock.t
    # what a device of the family puts on air, the family decodes; others' beacons it ignores
    heard = mode.decode({uuid128(cls.service_uuid16): first.service_data})
    assert heard is not None
    assert mode.decode({uuid128(0x180A): b"x" * 20}) is None and mode.decode({}) is None
    for k in range(30):
        mode.record(clock.t + k, heard, -60)
    assert mode.flush(clock.t + 60, final=True) >= 1
    json.dumps(mode.status_fields())  # the status file takes it as it is
    assert isinstance(mode.declare_prompt(clock.t), str)
    # the simulated peers of the family are heard by the family
    peer = cls.simulated_peer(random.Random(1), 4)
    _, service_data = peer.advertisement(clock.t)
    assert mode.decode(service_data) is not None


def test_the_registry_names_every_family_and_refuses_others(toy_registered):
    assert mode_class("gaen") is GaenMode and mode_class("robert") is RobertMode
    assert mode_class("toy").name == "toy"
    from agent.errors import ConfigError
    with pytest.raises(ConfigError, match="choose one of gaen, robert, toy"):
        mode_class("dp3t")


async def test_a_new_family_runs_in_the_daemon(toy_registered, new_store):
    clock = VirtualClock(MIDNIGHT)
    store = new_store()
    mode = mode_class("toy")(context(store, clock))
    scanner = SimScanner(clock, peer_factory=mode.simulated_peer, peers=3, seed=2, tick_s=20)
    d = Daemon(mode, Radio(SimAdvertiser(clock), scanner), clock=clock, rng=random.Random(3), flush_interval_s=300)
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(MIDNIGHT + 2 * 3600)
    st = d.status()
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0
    assert st["protocol"] == "toy" and st["rotations"] >= 12 and st["sightings"] > 100 and st["bad_payloads"] == 0


@pytest.mark.integration
def test_a_new_family_runs_in_the_demo(toy_registered, tmp_path):
    from agent.demo import run_demo

    res = run_demo(devices=4, days=1, seed=3, protocol="toy", out_dir=tmp_path, log=lambda m: None, png=False)
    assert res.protocol == "toy" and res.sightings > 1000 and res.rotations >= 4 * 60
    assert res.tp == 0 and res.fp == 0  # nobody is notified: the toy family has no server
