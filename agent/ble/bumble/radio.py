"""The bumble radio (``[radio] kind = "bumble"``): our own Bluetooth host (bumble) on a
dedicated HCI controller named by a bumble transport moniker (``usb:0``,
``serial:/dev/ttyACM0,1000000``, ``tcp-client:127.0.0.1:9001``, ...), without BlueZ.

One :class:`HciSession` per transport, shared by the advertiser and the scanner:

- the advertiser keeps one non-connectable advertisement with legacy PDUs (what phones
  scan for) every 200-270 ms (Exposure Notification Bluetooth Specification v1.2,
  "Advertising interval"), with its own non-resolvable random address that changes
  together with the payload:

  * on an extended-advertising controller, an advertising set: a rotation is
    stop -> ``set_random_address`` -> ``set_advertising_data`` -> start, so that no
    event goes out with the new address and the old payload or the reverse;
  * on a legacy-only controller (a Raspberry Pi 3's), the legacy commands: a rotation
    turns advertising off and pauses scanning (the controller refuses a new random
    address while either runs, Core v5.2 Vol 4 Part E 7.8.4), sets the address and the
    data, and turns both on again; the gaps are measured (``rotation_gaps``);

  ``update()`` changes the data only (same address);
- the scanner scans passively, without duplicate filtering, and yields every report
  that carries the family's service data, with its RSSI;
- a lost transport (dongle unplugged, serial error, TCP closed) or a controller that
  stops answering is reopened with back-off (1 s doubling to 60 s), and advertising and
  scanning resume as they were; ``RadioHealth`` says what runs meanwhile;
- ``bumble_snoop = PATH`` writes the HCI traffic to a btsnoop file (mode 0600: it holds
  the identifiers on air); bumble's own ``BUMBLE_SNOOPER`` works as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bumble import hci
from bumble.core import BaseBumbleError
from bumble.device import AdvertisingEventProperties, AdvertisingParameters, AdvertisingSet, Device
from bumble.snoop import BtSnooper
from bumble.transport import open_transport
from bumble.transport.common import SnoopingTransport, Transport

from ...clock import Clock
from ...errors import RadioError
from ...protocol.payload import AD_COMPLETE_UUID16, AD_FLAGS, AD_SERVICE_DATA16, EN_FLAGS, LEGACY_ADV_MAX, \
    PayloadError, iter_ad_structures, uuid128
from ..base import Advertiser, RadioHealth, RawSighting, Scanner

log = logging.getLogger("ctagent.ble")

#: Exposure Notification Bluetooth Specification v1.2: advertising interval 200-270 ms
ADV_INTERVAL_MS = (200.0, 270.0)
#: continuous passive scanning (interval = window)
SCAN_INTERVAL_MS = SCAN_WINDOW_MS = 60.0
AD_TX_POWER = 0x0A
COMMAND_TIMEOUT_S = 5.0
#: how often an idle session checks that the controller still answers
PROBE_S = 30.0
BACKOFF_S, BACKOFF_MAX_S = 1.0, 60.0
RSSI_NOT_AVAILABLE = 127

TransportOpener = Callable[[str], Awaitable[Transport]]


def advertising_data(uuid16: int, service_data: bytes) -> bytes:
    """Flags, the complete 16-bit UUID list and the service data (the Exposure
    Notification layout, agent.protocol.payload); a RadioError if over 31 bytes."""
    uuid = struct.pack("<H", uuid16)
    out = bytes([2, AD_FLAGS, EN_FLAGS, 3, AD_COMPLETE_UUID16]) + uuid
    out += bytes([1 + 2 + len(service_data), AD_SERVICE_DATA16]) + uuid + bytes(service_data)
    if len(out) > LEGACY_ADV_MAX:
        raise RadioError("bumble.InvalidLength", f"{len(service_data)} bytes of service data make a "
                         f"{len(out)}-byte advertisement; legacy advertising carries {LEGACY_ADV_MAX}")
    return out


def _service_data(raw: bytes) -> tuple[dict[str, bytes], int | None]:
    """(16-bit service data keyed by the 128-bit UUID string as bleak gives it, TX power level)."""
    found: dict[str, bytes] = {}
    tx_power = None
    for ad_type, value in iter_ad_structures(raw):
        if ad_type == AD_SERVICE_DATA16 and len(value) >= 2:
            found[uuid128(struct.unpack_from("<H", value)[0])] = bytes(value[2:])
        elif ad_type == AD_TX_POWER and len(value) == 1:
            tx_power = struct.unpack("b", value)[0]
    return found, tx_power


def _nrpa(address: str) -> hci.Address:
    try:
        return hci.Address(address, hci.Address.RANDOM_DEVICE_ADDRESS)
    except (ValueError, TypeError):
        raise RadioError("bumble.InvalidAddress", f"{address!r} is not a Bluetooth address") from None


class HciSession:
    """One bumble host on one HCI transport: opens it, keeps it open (reopening a lost
    one with back-off), and runs the advertiser's and the scanner's HCI sequences one at
    a time."""

    def __init__(self, transport: str, *, clock: Clock, uuid16: int, snoop: str = "",
                 opener: TransportOpener | None = None, legacy: bool | None = None,
                 command_timeout_s: float = COMMAND_TIMEOUT_S, probe_s: float = PROBE_S,
                 backoff_s: float = BACKOFF_S) -> None:
        self.moniker, self.clock, self.uuid16 = transport, clock, uuid16
        self.snoop = snoop
        self.opener = opener or open_transport
        self.force_legacy = legacy
        self.command_timeout_s, self.probe_s, self.backoff_s = command_timeout_s, probe_s, backoff_s
        self.lock = asyncio.Lock()
        self.device: Device | None = None
        self.transport: Transport | None = None
        self.extended = False
        self.opens = 0
        self.recoveries = 0
        self.users = 2  # the advertiser and the scanner
        self._recovering: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._snooper: BtSnooper | None = None
        self._trace: Any = None
        self._closed = False
        # what the advertiser and the scanner want; restored after a reopen
        self.on_air: tuple[bytes, hci.Address] | None = None  # advertising data, address
        self.advertise = False
        self.scan = False
        self.adv_set: AdvertisingSet | None = None
        self.legacy_advertising = False
        self.legacy_parameters_set = False
        self.scanning = False
        self.on_report: Callable[[Any], None] | None = None
        self.rotation_gaps: list[float] = []  # seconds without advertising per rotation
        self.scan_gaps: list[float] = []  # seconds without scanning per legacy rotation
        self.health = RadioHealth()

    # -- the transport ----------------------------------------------------------------------
    def _unavailable(self, e: BaseException) -> RadioError:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return RadioError("bumble.TransportUnavailable",
                          f"cannot use the HCI transport {self.moniker!r} ({why}); check that the controller is "
                          "plugged in, that this user may open it (hardware/bumble.md) and that no other program "
                          "(bluetoothd, another ctagent) holds it; `ctagent doctor --radio bumble` checks it")

    async def _open(self) -> None:
        try:
            transport = await asyncio.wait_for(self.opener(self.moniker), self.command_timeout_s)
        except Exception as e:  # bumble raises OSError, ValueError, TransportSpecError, USB errors, ...
            raise self._unavailable(e) from None
        if self.snoop:
            if self._snooper is None:  # one trace across reopens: the loss and the recovery in one file
                try:
                    fd = os.open(Path(self.snoop).expanduser(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                except OSError as e:
                    with contextlib.suppress(Exception):
                        await transport.close()
                    raise RadioError("bumble.SnoopFile", f"cannot write the HCI trace {self.snoop!r} "
                                     f"({e.strerror}); fix [radio] bumble_snoop or leave it empty") from None
                self._trace = os.fdopen(fd, "wb", buffering=0)  # one write per packet: a killed agent's trace is whole
                self._snooper = BtSnooper(self._trace)
            transport = SnoopingTransport(transport, self._snooper)
        device = Device.with_hci("ctagent", hci.Address.ANY_RANDOM, transport.source, transport.sink)
        device.command_timeout = self.command_timeout_s
        try:
            await asyncio.wait_for(device.power_on(), 3 * self.command_timeout_s)
        except Exception as e:
            with contextlib.suppress(Exception):
                await transport.close()
            raise self._unavailable(e) from None
        device.on("advertisement", self._on_advertisement)
        self.device, self.transport = device, transport
        supports = device.supports_le_extended_advertising
        self.extended = bool(supports) if self.force_legacy is None else (bool(supports) and not self.force_legacy)
        self.adv_set, self.legacy_advertising, self.scanning = None, False, False
        self.legacy_parameters_set = False
        self.opens += 1
        self._watch = asyncio.ensure_future(self._watch_transport(transport))
        log.info("bumble: HCI transport opened controller=%s", "extended" if self.extended else "legacy-only")

    @property
    def recovering(self) -> bool:
        """The transport is lost and being reopened (it restores what is wanted)."""
        return self.device is None and self._recovering is not None and not self._recovering.done()

    async def ensure_open(self) -> Device:
        if self.device is None:
            if self._recovering is not None and not self._recovering.done():
                raise RadioError("bumble.TransportLost", f"the HCI transport {self.moniker!r} is lost; "
                                 "reopening it with back-off")
            await self._open()
        assert self.device is not None
        return self.device

    async def _watch_transport(self, transport: Transport) -> None:
        """Waits for the transport's end; probes an idle controller now and then."""
        terminated = transport.source.terminated
        while not self._closed:
            try:
                await asyncio.wait_for(asyncio.shield(terminated), self.probe_s)
                break
            except TimeoutError:
                pass  # still open: probe it
            except Exception:  # some transports end with an error
                break
            try:
                async with self.lock:
                    if self.device is not None:
                        await asyncio.wait_for(self.device.host.send_command(hci.HCI_Read_BD_ADDR_Command()),
                                               self.command_timeout_s)
            except Exception:  # no answer: the same as a lost transport
                break
        if not self._closed and self.transport is transport:
            self.lost("the transport ended or the controller stopped answering")

    def lost(self, why: str) -> None:
        """The transport is gone: forget it and reopen it with back-off."""
        if self._closed or (self._recovering is not None and not self._recovering.done()):
            return
        log.warning("bumble: HCI transport lost (%s): reopening", why)
        self.health.error("bumble.TransportLost")
        transport, self.device, self.transport = self.transport, None, None
        self.adv_set, self.legacy_advertising, self.scanning = None, False, False
        self.health.advertising = self.health.scanning = False
        if transport is not None:
            self._closing = asyncio.ensure_future(self._close_quietly(transport))
        self._recovering = asyncio.ensure_future(self._recover())

    @staticmethod
    async def _close_quietly(transport: Transport) -> None:
        with contextlib.suppress(Exception):
            await transport.close()

    async def _recover(self) -> None:
        delay = self.backoff_s
        while not self._closed:
            await self.clock.sleep(delay)
            try:
                async with self.lock:
                    await self._open()
                    await self._restore()
            except Exception as e:  # still away: try again later
                self.health.error(type(e).__name__)
                log.warning("bumble: reopening %s failed (%s); next try in %.0fs", "the transport", type(e).__name__,
                            min(delay * 2, BACKOFF_MAX_S))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            self.recoveries += 1
            log.info("bumble: HCI transport back after %d recoveries", self.recoveries)
            return

    async def _restore(self) -> None:
        if self.advertise and self.on_air is not None:
            await self._advertise_on()
        if self.scan:
            await self._scan_on()

    async def run(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run an HCI sequence; a command that times out or a dead transport means: lost."""
        async with self.lock:
            await self.ensure_open()
            try:
                await step()
            except hci.HCI_Error as e:
                name = hci.HCI_Constant.error_name(e.error_code)
                self.health.error(name)
                raise RadioError(f"bumble.{name}", f"the controller on {self.moniker!r} refused a command") from None
            except (TimeoutError, ConnectionError, OSError, RuntimeError, BaseBumbleError) as e:
                # a command timeout, TransportLostError (a RuntimeError), a closed socket
                self.lost(type(e).__name__)
                raise RadioError("bumble.TransportLost", f"the HCI transport {self.moniker!r} stopped answering "
                                 "during a command; reopening it with back-off") from None

    async def release(self) -> None:
        """The advertiser or the scanner is done; the last one closes the session."""
        self.users -= 1
        if self.users <= 0:
            await self.close()

    async def close(self) -> None:
        self._closed = True
        for task in (self._recovering, self._watch):
            if task is not None:
                task.cancel()
        async with self.lock:
            if self.device is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._advertise_off(remove=True), self.command_timeout_s)
                    await asyncio.wait_for(self._scan_off(), self.command_timeout_s)
            if self.transport is not None:
                await self._close_quietly(self.transport)
            self.device = self.transport = None
            if self._trace is not None:
                self._trace.close()
                self._trace = self._snooper = None

    # -- advertising (call under the lock, with an open device) --------------------------------
    def _parameters(self) -> AdvertisingParameters:
        return AdvertisingParameters(
            advertising_event_properties=AdvertisingEventProperties(is_connectable=False, is_scannable=False,
                                                                    is_legacy=True),
            primary_advertising_interval_min=ADV_INTERVAL_MS[0], primary_advertising_interval_max=ADV_INTERVAL_MS[1],
            own_address_type=hci.OwnAddressType.RANDOM)

    async def _advertise_on(self) -> None:
        assert self.device is not None and self.on_air is not None
        data, address = self.on_air
        if self.extended:
            if self.adv_set is None:
                self.adv_set = await self.device.create_advertising_set(
                    advertising_parameters=self._parameters(), random_address=address, advertising_data=data)
            else:
                await self.adv_set.set_random_address(address)
                await self.adv_set.set_advertising_data(data)
                await self.adv_set.start()
        else:
            async with self._scan_paused():  # the controller refuses the address while it scans
                await self.device.send_sync_command(hci.HCI_LE_Set_Random_Address_Command(random_address=address))
            if not self.legacy_parameters_set:  # they stay until a reset
                await self.device.send_sync_command(hci.HCI_LE_Set_Advertising_Parameters_Command(
                    advertising_interval_min=round(ADV_INTERVAL_MS[0] / 0.625),
                    advertising_interval_max=round(ADV_INTERVAL_MS[1] / 0.625),
                    advertising_type=hci.HCI_LE_Set_Advertising_Parameters_Command.AdvertisingType.ADV_NONCONN_IND,
                    own_address_type=hci.OwnAddressType.RANDOM, peer_address_type=0, peer_address=hci.Address.ANY,
                    advertising_channel_map=7, advertising_filter_policy=0))
                self.legacy_parameters_set = True
            await self.device.send_sync_command(hci.HCI_LE_Set_Advertising_Data_Command(advertising_data=data))
            await self.device.send_sync_command(hci.HCI_LE_Set_Advertising_Enable_Command(advertising_enable=1))
            self.legacy_advertising = True
        self.health.advertising = True

    async def _advertise_off(self, *, remove: bool = False) -> None:
        assert self.device is not None
        if self.adv_set is not None:
            if self.adv_set.enabled:
                await self.adv_set.stop()
            if remove:
                await self.adv_set.remove()
                self.adv_set = None
        if self.legacy_advertising:
            await self.device.send_sync_command(hci.HCI_LE_Set_Advertising_Enable_Command(advertising_enable=0))
            self.legacy_advertising = False
        self.health.advertising = False

    async def rotate(self) -> None:
        """New address and data (``on_air``) together, off the air in between."""
        assert self.device is not None
        if not (self.adv_set is not None and self.adv_set.enabled) and not self.legacy_advertising:
            await self._advertise_on()
            return
        t0 = asyncio.get_running_loop().time()
        await self._advertise_off()
        await self._advertise_on()
        self.rotation_gaps = (self.rotation_gaps + [asyncio.get_running_loop().time() - t0])[-100:]

    async def set_data(self, data: bytes) -> None:
        """New data, same address (advertising may stay on: Vol 4 Part E 7.8.7 and 7.8.54)."""
        assert self.device is not None and self.on_air is not None
        self.on_air = (data, self.on_air[1])
        if self.adv_set is not None:
            await self.adv_set.set_advertising_data(data)
        elif self.legacy_advertising:
            await self.device.send_sync_command(hci.HCI_LE_Set_Advertising_Data_Command(advertising_data=data))

    # -- scanning ------------------------------------------------------------------------------
    async def _scan_on(self) -> None:
        assert self.device is not None
        if not self.scanning:
            await self.device.start_scanning(legacy=not self.extended, active=False, scan_interval=SCAN_INTERVAL_MS,
                                             scan_window=SCAN_WINDOW_MS, filter_duplicates=False)
            self.scanning = True
        self.health.scanning = True

    async def _scan_off(self) -> None:
        assert self.device is not None
        if self.scanning:
            await self.device.stop_scanning(legacy=not self.extended)
            self.scanning = False
        self.health.scanning = False

    @contextlib.asynccontextmanager
    async def _scan_paused(self) -> AsyncIterator[None]:
        """For a legacy controller's address change: scanning off around it (the gap is kept)."""
        if not self.scanning:
            yield
            return
        t0 = asyncio.get_running_loop().time()
        await self._scan_off()
        try:
            yield
        finally:
            await self._scan_on()
            self.scan_gaps = (self.scan_gaps + [asyncio.get_running_loop().time() - t0])[-100:]

    def _on_advertisement(self, adv: Any) -> None:
        if self.on_report is not None:
            self.on_report(adv)


class BumbleAdvertiser(Advertiser):
    def __init__(self, session: HciSession) -> None:
        self.session = session

    def health(self) -> RadioHealth:
        return self.session.health

    async def start(self, service_data: bytes, address: str) -> None:
        s = self.session
        data, nrpa = advertising_data(s.uuid16, service_data), _nrpa(address)

        async def step() -> None:
            s.on_air, s.advertise = (data, nrpa), True
            await s.rotate()
            s.health.last_rotation = s.clock.now()

        await s.run(step)

    async def rotate(self, service_data: bytes, address: str) -> None:
        """Payload and address change together (off the air in between, see the module)."""
        s = self.session
        data, nrpa = advertising_data(s.uuid16, service_data), _nrpa(address)
        if s.recovering:
            s.on_air = (data, nrpa)  # the reopened transport advertises it
            return

        async def step() -> None:
            s.on_air = (data, nrpa)
            if s.advertise:
                await s.rotate()
            s.health.last_rotation = s.clock.now()

        await s.run(step)

    async def update(self, service_data: bytes) -> None:
        """Change the payload but keep the address (ROBERT: a fresh HELLO within an epoch)."""
        s = self.session
        data = advertising_data(s.uuid16, service_data)
        if s.on_air is None:
            raise RadioError("bumble.NotAdvertising", "update() before start()")
        if s.device is None:
            s.on_air = (data, s.on_air[1])
            return
        await s.run(lambda: s.set_data(data))

    async def pause(self) -> None:
        s = self.session
        s.advertise = False
        if s.device is not None:
            await s.run(s._advertise_off)

    async def resume(self) -> None:
        s = self.session
        if s.on_air is None:
            return
        s.advertise = True
        if not s.recovering:  # else the reopened transport resumes it
            await s.run(s._advertise_on)

    async def stop(self) -> None:
        s = self.session
        s.advertise = False
        if s.device is not None:
            with contextlib.suppress(RadioError):
                await s.run(lambda: s._advertise_off(remove=True))
        s.health.advertising = False
        await s.release()


class BumbleScanner(Scanner):
    def __init__(self, session: HciSession) -> None:
        self.session = session
        self._queue: asyncio.Queue[RawSighting | None] = asyncio.Queue(maxsize=100_000)
        self._recent: list[float] = []
        self._stopped = False
        self._wake = asyncio.Event()
        self.uuid = uuid128(session.uuid16)
        session.on_report = self._on_report

    def health(self) -> RadioHealth:
        now = self.session.clock.now()
        self._recent = [t for t in self._recent if t > now - 60]
        self.session.health.samples_last_minute = len(self._recent)
        return self.session.health

    def _on_report(self, adv: Any) -> None:
        if adv.rssi == RSSI_NOT_AVAILABLE or adv.is_scan_response:
            return
        try:
            service_data, tx_power = _service_data(adv.data_bytes)
        except PayloadError:
            return  # someone else's malformed advertisement
        if self.uuid not in service_data:
            return
        if tx_power is None and adv.tx_power != adv.TX_POWER_NOT_AVAILABLE:
            tx_power = adv.tx_power
        now = self.session.clock.now()
        self._recent.append(now)
        try:
            self._queue.put_nowait(RawSighting(now, adv.address.to_string(False), adv.rssi, tx_power, service_data))
        except asyncio.QueueFull:
            self.session.health.error("queue full")

    async def _start(self) -> None:
        s = self.session
        s.scan = True
        if not s.recovering:  # else the reopened transport resumes it
            await s.run(s._scan_on)

    async def sightings(self) -> AsyncIterator[RawSighting]:
        await self._start()
        while not self._stopped:
            sighting = await self._queue.get()
            if sighting is None or self._stopped:
                return
            yield sighting

    async def pause(self) -> None:
        s = self.session
        s.scan = False
        if s.device is not None:
            await s.run(s._scan_off)

    async def resume(self) -> None:
        await self._start()

    async def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)  # wakes sightings() to end it
        self.session.scan = False
        if self.session.device is not None:
            with contextlib.suppress(RadioError):
                await self.session.run(self.session._scan_off)
        await self.session.release()
