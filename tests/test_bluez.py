"""The real BlueZ code paths (our D-Bus advertiser, the bleak scanner) against a fake
bluetoothd on a private dbus-daemon: no Bluetooth hardware needed."""

import asyncio
import statistics

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from agent.ble.bluez import BluezAdvertiser, BluezScanner
from agent.clock import RealClock
from agent.errors import RadioError
from agent.protocol.payload import EN_SERVICE_UUID16, parse_service_data
from agent.protocol.robert import ROBERT_SERVICE_UUID16

from .fake_bluez_fixture import FakeBluezEnv
from .helpers import eventually

pytestmark = pytest.mark.integration
CLOCK = RealClock()


def make_advertiser(adapter, uuid16=EN_SERVICE_UUID16, **kw):
    return BluezAdvertiser(adapter, clock=CLOCK, service_uuid16=uuid16, **kw)


def make_scanner(adapter, uuid16=EN_SERVICE_UUID16, **kw):
    return BluezScanner(adapter, clock=CLOCK, service_uuid16=uuid16, **kw)


@pytest.fixture
def fake_bluez():
    env = FakeBluezEnv(adapters=2)
    if not env.start():
        env.stop()
        pytest.skip(env.skip_reason)
    yield env
    env.stop()


async def control(member, sig="", body=()):
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        r = await bus.call(Message(destination="org.bluez", path="/ctagent_fake", interface="ctagent.FakeBluez1",
                                   member=member, signature=sig, body=list(body)))
        assert r.message_type != MessageType.ERROR, r.body
        return r.body
    finally:
        bus.disconnect()


async def collect(scanner, seconds):
    out = []

    async def run():
        async for s in scanner.sightings():
            out.append(s)

    task = asyncio.create_task(run())
    await asyncio.sleep(seconds)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return out


def payload(i: int) -> bytes:
    return bytes([i]) * 16 + bytes([0x40, i, 0, 0])


async def test_every_rotation_seen_with_new_address_and_payload(fake_bluez):
    adv = make_advertiser("hci0")
    scanner = make_scanner("hci1")
    got = []

    async def scan():
        async for s in scanner.sightings():
            p = parse_service_data(s.service_data)
            got.append((s.address, p.rpi))

    task = asyncio.create_task(scan())
    await adv.start(payload(1), "")
    for i in range(2, 7):  # rotate as soon as the current payload was heard twice
        await eventually(lambda i=i: sum(rpi[0] == i - 1 for _, rpi in got) >= 2, what=f"payload {i - 1} on air")
        if i < 6:
            await adv.rotate(payload(i), "")
    task.cancel()
    await scanner.stop()
    await adv.stop()
    by_rpi = {}
    for addr, rpi in got:
        by_rpi.setdefault(rpi, set()).add(addr)
    assert sorted(r[0] for r in by_rpi) == [1, 2, 3, 4, 5]  # every rotation received
    # each payload came from exactly one address, and no address carried two payloads
    assert all(len(a) == 1 for a in by_rpi.values())
    assert len({next(iter(a)) for a in by_rpi.values()}) == 5
    assert adv.registrations == 5 and adv.health().advertising is False


async def test_rssi_follows_distance(fake_bluez):
    adv, scanner = make_advertiser("hci0"), make_scanner("hci1")
    await adv.start(payload(7), "")
    await control("SetPosition", "udd", [1, 0.5, 0.0])
    near = await collect(scanner, 1.5)
    await scanner.stop()
    scanner = make_scanner("hci1")
    await control("SetPosition", "udd", [1, 6.0, 0.0])
    far = await collect(scanner, 1.5)
    await scanner.stop()
    await adv.stop()
    assert len(near) > 10 and len(far) > 5
    assert statistics.median(s.rssi for s in near) - statistics.median(s.rssi for s in far) > 12


@pytest.mark.parametrize("n", [21, 24])
async def test_over_long_advertisement_refused_before_registering(fake_bluez, n):
    """21-23 bytes BlueZ accepts but mangles, 24 it refuses with a plain Failed (as the
    real stack does, tests/realstack): refused here, at once, not retried."""
    adv = make_advertiser("hci0", retries=5, backoff_s=5.0)
    with pytest.raises(RadioError) as e:
        await adv.start(b"\x00" * n, "")  # 3 + 4 + 4 + n > 31
    assert e.value.name == "org.ctagent.Error.AdvertisementTooLong" and f"{7 + 4 + n} bytes" in e.value.text
    assert (await control("Stats"))[0]["rejected"] == 0 and adv.registrations == 0
    await adv.stop()


async def test_maximum_advertisements_and_serialised_rotation(fake_bluez):
    await control("SetMaxAdvertisements", "uu", [0, 1])  # a controller with one set left for us
    other = make_advertiser("hci0", retries=0)
    await other.start(payload(1), "")
    mine = make_advertiser("hci0", retries=1, backoff_s=0.05)
    with pytest.raises(RadioError) as e:
        await mine.start(payload(2), "")
    assert e.value.name == "org.bluez.Error.NotPermitted"
    await other.stop()
    await mine.start(payload(2), "")
    # concurrent rotations are serialised: no "Maximum advertisements reached"
    await asyncio.gather(*(mine.rotate(payload(i), "") for i in range(3, 8)))
    assert mine.registrations == 6
    await mine.stop()


async def test_bluetoothd_restart_is_recovered(fake_bluez):
    adv, scanner = make_advertiser("hci0"), make_scanner("hci1", stall_s=1.0, backoff_s=0.2)
    await adv.start(payload(9), "")
    got = []

    async def scan():
        async for s in scanner.sightings():
            got.append(s.t)

    task = asyncio.create_task(scan())
    await eventually(lambda: len(got) >= 5, what="samples before the restart")
    await control("Restart")
    await eventually(lambda: adv.recoveries >= 1 and adv.health().advertising,
                     what="the advertisement registered again")
    after_recovery = len(got)
    await eventually(lambda: len(got) > after_recovery + 5, what="samples after the restart")
    task.cancel()  # samples flow again: the scanner was restarted or its session survived
    await scanner.stop()
    await adv.stop()


async def test_duplicate_data_changes_the_sample_rate(fake_bluez):
    adv = make_advertiser("hci0")
    await adv.start(payload(5), "")
    await control("SetPosition", "udd", [1, 2.0, 0.0])
    with_dup = await collect(make_scanner("hci1", duplicate_data=True), 2.0)  # samples in a 2 s window
    without = await collect(make_scanner("hci1", duplicate_data=False), 2.0)
    await adv.stop()
    # without DuplicateData BlueZ only reports 8 dB RSSI moves or new data
    assert len(with_dup) > 2 * len(without) > 0


async def test_gatt_status_service_read_through_bluez(fake_bluez):
    from agent.ble.bluez.gatt import GattStatusService
    from agent.ble.status import STATUS_CHAR_UUID, parse_status, status_bytes

    await control("SetMaxAdvertisements", "uu", [0, 2])
    svc = GattStatusService("hci0")
    await svc.start()
    stats = (await control("Stats"))[0]
    assert stats.get("gatt_apps") == 1
    (raw,) = await control("ReadCharacteristic", "s", [STATUS_CHAR_UUID])
    assert parse_status(raw)["exposed"] is False
    svc.update(status_bytes(exposed_days=[20000], advertising=True, scanning=True, last_sync=0, now=7200))
    (raw,) = await control("ReadCharacteristic", "s", [STATUS_CHAR_UUID])
    st = parse_status(raw)
    assert st == {"version": 1, "exposed": True, "advertising": True, "scanning": True,
                  "last_exposure_day": 20000, "hours_since_sync": 2}
    assert len(raw) == 8  # nothing identifying fits in there
    await svc.stop()


async def test_duty_cycle_alternates_advertising_and_scanning(fake_bluez):
    from agent.ble.duty_cycle import duty_cycle

    peer = make_advertiser("hci1")  # someone else near us, advertising all the time
    await peer.start(payload(3), "")
    adv, scanner = make_advertiser("hci0"), make_scanner("hci0", stall_s=30)
    await adv.start(payload(4), "")
    got = []

    async def scan():
        async for s in scanner.sightings():
            got.append(s.t)

    stop = asyncio.Event()
    scan_task = asyncio.create_task(scan())
    await eventually(lambda: got, what="the peer heard")
    dc = asyncio.create_task(duty_cycle(adv, scanner, advertise_s=0.8, scan_s=0.8, clock=CLOCK, stop=stop))
    await asyncio.sleep(3.5)  # the measurement: two cycles of the duty cycle
    stop.set()
    await dc
    scan_task.cancel()
    # advertising was registered again for each advertise phase
    assert adv.registrations >= 3
    # samples arrive in bursts (scan phases), with gaps of at least the advertise phase
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert got and max(gaps) >= 0.6
    await scanner.stop()
    await adv.stop()
    await peer.stop()


def test_doctor_checks_advertising_while_scanning_through_bluez(fake_bluez):
    from agent.ble.bluez.doctor import doctor
    ok, checks = doctor("hci0")
    by = {c.name: (c.ok, c.detail) for c in checks}
    assert by["D-Bus system bus"][0]
    # the fake's legacy controller refuses a rotation while it scans; paused, it works
    assert by["rotation while scanning"][0], by["rotation while scanning"][1]
    assert "refuses a rotation while it scans" in by["rotation while scanning"][1]
    assert "legacy" in by["controller"][1]


@pytest.mark.parametrize("kind,privacy", [("extended", "device"), ("extended", "off"), ("legacy", "off")])
async def test_payload_update_stays_on_air(kind, privacy):
    """ROBERT refreshes its HELLO (time, MAC) within an epoch. Extended controllers change
    it in place (the address kept with Privacy = device, a new one with Privacy off, as on
    the real stack); a legacy one is re-registered with scanning paused (it would refuse
    the new address while scanning and go silent)."""
    from agent.ble.bluez import open_radio
    from agent.ble.base import RadioRequest

    env = FakeBluezEnv(adapters=2, kinds=(kind, kind), privacy=privacy)
    if not env.start():
        env.stop()
        pytest.skip(env.skip_reason)
    try:
        radio = open_radio(RadioRequest(clock=CLOCK, service_uuid16=ROBERT_SERVICE_UUID16, adapter="hci0"))
        scanner = make_scanner("hci1", ROBERT_SERVICE_UUID16)
        got = []

        async def scan():
            async for s in scanner.sightings():
                got.append((s.address, bytes(next(iter(s.service_data.values())))))

        async def own_scan():  # the daemon scans on the advertising adapter all the time
            async for _ in radio.scanner.sightings():
                pass

        tasks = [asyncio.create_task(scan()), asyncio.create_task(own_scan())]
        await eventually(lambda: radio.scanner.health().scanning, what="scanning on the advertising adapter")
        await radio.advertiser.start(b"\x01" * 18, "")
        await eventually(lambda: any(p[:1] == b"\x01" for _, p in got), what="the first HELLO heard")
        await radio.advertiser.update(b"\x02" * 18)
        await eventually(lambda: any(p[:1] == b"\x02" for _, p in got), what="the refreshed HELLO heard")
        for t in tasks:
            t.cancel()
        await scanner.stop()
        await radio.scanner.stop()
        await radio.advertiser.stop()
        addresses = {a for a, _ in got}
        assert {p[:1] for _, p in got} == {b"\x01", b"\x02"}
        assert (len(addresses) == 1) == (privacy == "device")
        assert radio.advertiser.registrations == (1 if kind == "extended" else 2)
        assert len(radio.scanner.quiet_gaps) == (0 if kind == "extended" else 2)
    finally:
        env.stop()
