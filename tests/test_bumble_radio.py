"""The bumble radio (agent.ble.bumble.radio) on bumble's linked virtual controllers with
the project's radio model (agent.ble.bumble.controller), in-process and on virtual
event-loop time (looptime): agents hear each other with RSSI falling with distance,
every rotation changes address and payload together (from the received reports and from
a btsnoop trace), a legacy-only controller rotates while scanning, update() keeps the
address, pause/resume, a lost transport comes back."""

from __future__ import annotations

import asyncio
import statistics
import struct
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("bumble")

from bumble import hci
from bumble.transport.common import Transport

from agent.ble.base import RawSighting
from agent.ble.bumble.controller import ModelledController, RadioLink
from agent.ble.bumble.radio import BumbleAdvertiser, BumbleScanner, HciSession, _service_data
from agent.ble.sim.shared import Placement
from agent.errors import RadioError
from agent.protocol.payload import EN_SERVICE_UUID, EN_SERVICE_UUID16

from .helpers import T0

pytestmark = pytest.mark.looptime


class LoopClock:
    """The event loop's (virtual) time as the agent's clock."""

    def now(self) -> float:
        return T0 + asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class Air:
    """Controllers on one RadioLink, opened by moniker ``link:NAME`` (a replug gives a
    fresh controller at the same place)."""

    def __init__(self, seed: int = 0) -> None:
        self.link = RadioLink(seed=seed)
        self.spec: dict[str, tuple[Placement, bool]] = {}
        self.controllers: dict[str, ModelledController] = {}
        self.unplugged: set[str] = set()
        self.opens = 0

    def place(self, name: str, x: float, *, legacy: bool = False) -> str:
        self.spec[name] = (Placement(x, 0.0), legacy)
        return f"link:{name}"

    async def open(self, moniker: str) -> Transport:
        self.opens += 1
        name = moniker.removeprefix("link:")
        if name in self.unplugged or name not in self.spec:
            raise OSError(19, "No such device")
        if (old := self.controllers.get(name)) is not None:
            old.detach()
        placement, legacy = self.spec[name]
        c = ModelledController(name, link=self.link, placement=placement, legacy=legacy)
        self.controllers[name] = c
        return Transport(c, c)

    def unplug(self, name: str) -> None:
        self.unplugged.add(name)
        c = self.controllers[name]
        c.detach()
        c.terminated.set_result(None)


class Agent:
    def __init__(self, air: Air, name: str, x: float, *, legacy: bool = False, snoop: Path | None = None) -> None:
        self.session = HciSession(air.place(name, x, legacy=legacy), clock=LoopClock(),
                                  uuid16=EN_SERVICE_UUID16, opener=air.open, snoop=str(snoop or ""), probe_s=5)
        self.advertiser = BumbleAdvertiser(self.session)
        self.scanner = BumbleScanner(self.session)
        self.heard: list[RawSighting] = []
        self._task: asyncio.Task[None] | None = None

    async def start_scanning(self) -> None:
        async def collect() -> None:
            async for s in self.scanner.sightings():
                self.heard.append(s)

        self._task = asyncio.create_task(collect())
        await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await self.scanner.stop()
        await self.advertiser.stop()
        if self._task is not None:
            await asyncio.wait_for(self._task, 1)


def payload(i: int) -> bytes:
    return bytes([i]) * 16 + bytes(4)


def nrpa(i: int) -> str:
    return f"3{i % 10}:00:00:00:{i // 256:02X}:{i % 256:02X}"


async def test_three_agents_hear_each_other_with_rssi_falling_with_distance() -> None:
    air = Air(seed=2)
    a, b, c = Agent(air, "a", 0.0), Agent(air, "b", 1.0, legacy=True), Agent(air, "c", 5.0)
    for i, agent in enumerate((a, b, c)):
        await agent.advertiser.start(payload(i), nrpa(i))
        await agent.start_scanning()
    await asyncio.sleep(30)
    for agent in (a, b, c):
        await agent.stop()
    heard_by_a = defaultdict(list)
    for s in a.heard:
        heard_by_a[s.service_data[EN_SERVICE_UUID][0]].append(s.rssi)
    assert set(heard_by_a) == {1, 2}
    assert statistics.median(heard_by_a[1]) > statistics.median(heard_by_a[2]) + 10  # 1 m vs 5 m
    # advertising every 200-270 ms, continuous scanning, 10 % loss: ~3.8 samples/s per peer
    rate = len(heard_by_a[1]) / 30
    assert 3.0 < rate < 4.6, rate
    assert {s.service_data[EN_SERVICE_UUID][0] for s in b.heard} == {0, 2}
    assert {s.address for s in c.heard} == {nrpa(0), nrpa(1)}
    assert a.scanner.health().samples_last_minute == len(a.heard)  # all within the last minute


def trace_reports(path: Path) -> list[tuple[str, bytes]]:
    """(address, advertising data) of every advertising report in a btsnoop file."""
    raw = path.read_bytes()
    assert raw[:8] == b"btsnoop\0" and struct.unpack(">II", raw[8:16]) == (1, 1002)  # H4 records
    out, i = [], 16
    while i < len(raw):
        length, included, flags, _drops, _ts = struct.unpack(">IIIIQ", raw[i:i + 24])
        packet = raw[i + 24:i + 24 + included]
        i += 24 + included
        if flags & 1 == 1 and packet[0] == 0x04:  # controller -> host, an event
            event = hci.HCI_Packet.from_bytes(packet)
            if isinstance(event, hci.HCI_LE_Advertising_Report_Event | hci.HCI_LE_Extended_Advertising_Report_Event):
                out += [(r.address.to_string(False), bytes(r.data)) for r in event.reports]
    return out


@pytest.mark.parametrize("legacy", [False, True], ids=["extended", "legacy-only"])
async def test_every_rotation_while_scanning_changes_address_and_payload_together(tmp_path: Path,
                                                                                  legacy: bool) -> None:
    air = Air(seed=5)
    rotating = Agent(air, "rot", 0.0, legacy=legacy)
    listener = Agent(air, "listen", 1.0, snoop=tmp_path / "listen.btsnoop")
    await listener.start_scanning()
    await rotating.start_scanning()  # the rotating agent scans too: the case real chips refuse
    await rotating.advertiser.start(payload(0), nrpa(0))
    # EN Bluetooth Specification v1.2: 200-270 ms, in 0.625 ms units
    c = air.controllers["rot"]
    if legacy:
        assert (c.le_legacy_advertiser.advertising_interval_min, c.le_legacy_advertiser.advertising_interval_max,
                c.le_legacy_advertiser.advertising_type) == (320, 432, 3)  # ADV_NONCONN_IND
    else:
        (adv_set,) = c.advertising_sets.values()
        assert adv_set.parameters is not None
        assert (adv_set.parameters.primary_advertising_interval_min,
                adv_set.parameters.primary_advertising_interval_max) == (320, 432)
        assert adv_set.parameters.advertising_event_properties == 0x10  # legacy PDUs, non-connectable
    for i in range(1, 12):
        await asyncio.sleep(5)
        await rotating.advertiser.rotate(payload(i), nrpa(i))
    await asyncio.sleep(5)
    await listener.stop()
    await rotating.stop()
    pairs = {(s.address, s.service_data[EN_SERVICE_UUID][0]) for s in listener.heard}
    assert pairs == {(nrpa(i), i) for i in range(12)}  # every rotation heard, never a mixed pair
    from_trace = {(a, d) for a, d in trace_reports(tmp_path / "listen.btsnoop")}
    assert {(a, _service_data(d)[0][EN_SERVICE_UUID][0]) for a, d in from_trace} == pairs
    assert controller_refusals(air, "rot") == 0  # the radio never asked for what the chip refuses
    if legacy:
        assert rotating.session.scan_gaps and max(rotating.session.scan_gaps) < 0.5
    assert len(rotating.session.rotation_gaps) == 11


def controller_refusals(air: Air, name: str) -> int:
    return air.controllers[name].refused_address_changes


@pytest.mark.parametrize("legacy", [False, True], ids=["extended", "legacy-only"])
async def test_update_keeps_the_address_and_stays_on_air(legacy: bool) -> None:
    air = Air()
    robert, listener = Agent(air, "robert", 0.0, legacy=legacy), Agent(air, "listen", 1.0)
    await listener.start_scanning()
    await robert.start_scanning()
    await robert.advertiser.start(payload(1), nrpa(1))
    await asyncio.sleep(3)
    await robert.advertiser.update(payload(2))
    await asyncio.sleep(3)
    await listener.stop()
    await robert.stop()
    seen = [(s.address, s.service_data[EN_SERVICE_UUID][0]) for s in listener.heard]
    assert set(seen) == {(nrpa(1), 1), (nrpa(1), 2)}
    assert seen[-1] == (nrpa(1), 2)


async def test_pause_and_resume_of_both_directions() -> None:
    air = Air()
    a, b = Agent(air, "a", 0.0), Agent(air, "b", 1.0)
    await b.start_scanning()
    await a.start_scanning()
    await a.advertiser.start(payload(1), nrpa(1))
    await b.advertiser.start(payload(2), nrpa(2))
    await asyncio.sleep(3)
    await a.advertiser.pause()
    assert not a.advertiser.health().advertising
    await asyncio.sleep(0.5)
    n = len(b.heard)
    await asyncio.sleep(3)
    assert len(b.heard) == n
    await a.advertiser.resume()
    await asyncio.sleep(3)
    assert len(b.heard) > n and a.advertiser.health().advertising
    await a.scanner.pause()
    assert not a.scanner.health().scanning
    m = len(a.heard)
    await asyncio.sleep(3)
    assert len(a.heard) == m
    await a.scanner.resume()
    await asyncio.sleep(3)
    assert len(a.heard) > m
    await a.stop()
    await b.stop()


async def test_a_lost_transport_is_reopened_and_the_radio_resumes(tmp_path: Path) -> None:
    air = Air()
    a, b = Agent(air, "a", 0.0, snoop=tmp_path / "a.btsnoop"), Agent(air, "b", 1.0)
    await a.start_scanning()
    await b.start_scanning()
    await a.advertiser.start(payload(1), nrpa(1))
    await b.advertiser.start(payload(2), nrpa(2))
    await asyncio.sleep(2)
    air.unplug("a")
    await asyncio.sleep(0.1)
    assert not a.advertiser.health().advertising and not a.scanner.health().scanning
    assert "bumble.TransportLost" in a.advertiser.health().errors
    await a.advertiser.rotate(payload(3), nrpa(3))  # while it is away: kept for the reopened one
    await a.advertiser.pause()  # the duty cycle goes on meanwhile, without errors
    await a.advertiser.resume()
    await a.scanner.pause()
    await a.scanner.resume()
    n_before = len(trace_reports(tmp_path / "a.btsnoop"))
    assert n_before > 0
    await asyncio.sleep(5)  # back-off 1, 2, 4 s: still unplugged
    air.unplugged.clear()
    await asyncio.sleep(10)
    assert a.session.recoveries == 1 and a.advertiser.health().advertising and a.scanner.health().scanning
    n_a, n_b = len(a.heard), len(b.heard)
    await asyncio.sleep(3)
    assert len(a.heard) > n_a and len(b.heard) > n_b
    assert b.heard[-1].address == nrpa(3) and b.heard[-1].service_data[EN_SERVICE_UUID][0] == 3
    await a.stop()
    await b.stop()
    assert len(trace_reports(tmp_path / "a.btsnoop")) > n_before  # one trace across the reopen
    assert oct((tmp_path / "a.btsnoop").stat().st_mode & 0o777) == "0o600"


async def test_a_controller_that_stops_answering_counts_as_lost() -> None:
    air = Air()
    a = Agent(air, "a", 0.0)
    await a.advertiser.start(payload(1), nrpa(1))
    air.controllers["a"].on_packet = lambda packet: None  # a wedged dongle: commands unanswered
    await asyncio.sleep(12)  # the next probe times out (5 s + 5 s)
    assert a.session.recoveries == 1 and a.advertiser.health().advertising
    await a.stop()


async def test_an_absent_controller_is_one_clear_sentence() -> None:
    air = Air()
    a = Agent(air, "a", 0.0)
    air.unplugged.add("a")
    with pytest.raises(RadioError) as e:
        await a.advertiser.start(payload(1), nrpa(1))
    assert "link:a" in str(e.value) and "No such device" in str(e.value) and "doctor" in str(e.value)


async def test_service_data_too_long_for_legacy_advertising_is_refused_at_once() -> None:
    a = Agent(Air(), "a", 0.0)
    with pytest.raises(RadioError) as e:
        await a.advertiser.start(bytes(24), nrpa(1))
    assert e.value.name == "bumble.InvalidLength"


async def test_doctor_checks_a_legacy_controller_and_what_it_hears() -> None:
    from agent.ble.bumble.doctor import check

    air = Air()
    neighbour = Agent(air, "neighbour", 2.0)
    await neighbour.advertiser.start(payload(7), nrpa(7))
    air.place("dut", 0.0, legacy=True)
    ok, checks = await check("link:dut", opener=air.open, listen_s=3)
    assert ok, checks
    lines = {c.name: c.detail for c in checks}
    assert "Bluetooth 4.1 controller by Broadcom" in lines["transport link:dut"]
    assert "legacy advertising only" in lines["transport link:dut"]
    assert "scanning off" in lines["rotation while scanning"]
    assert "from 1 devices" in lines["scanning"]
    assert air.controllers["dut"].refused_address_changes == 0
    air.unplugged.add("dut")
    ok, checks = await check("link:dut", opener=air.open)
    assert not ok and "No such device" in checks[-1].detail
    await neighbour.stop()
