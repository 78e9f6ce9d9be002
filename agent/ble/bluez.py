"""Real radios on Linux/BlueZ: an Exposure Notification advertiser registered with
BlueZ over D-Bus (dbus-fast), and a bleak-based scanner.

Advertiser (bless cannot send service data; see issue 5): our own
``org.bluez.LEAdvertisement1`` object, Type ``broadcast``, ServiceUUIDs ``["FD6F"]``,
ServiceData ``{"FD6F": RPI ‖ AEM}``; a legacy advertisement, so no name. A rotation
unregisters the old object and registers a fresh path (with adapter Privacy off BlueZ
then uses a fresh non-resolvable random address, so address and payload change
together). Rotations are serialised, failed registrations retried with back-off, and
the advertisement is registered again when bluetoothd comes back after a restart. Our
objects live under ``/ctagent``, outside ``/org/bluez`` that bleak watches.

Scanner: bleak with discovery filters ``DuplicateData=True`` (otherwise BlueZ reports a
peer again only when its RSSI moves by 8 dB or its data changes), ``RSSI=-127`` and
``Transport=le``; restarted with back-off when it stops delivering.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

from ..protocol.payload import EN_SERVICE_UUID
from .base import Advertiser, RadioHealth, RawSighting, Scanner

log = logging.getLogger("ctagent.ble")

BLUEZ = "org.bluez"
ADVMGR = "org.bluez.LEAdvertisingManager1"


class BluezError(Exception):
    """BlueZ refused a request; ``name`` is its D-Bus error name."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name, self.text = name, text


class _ENAdvertisement(ServiceInterface):
    def __init__(self, service_data: bytes, uuid16: str = "FD6F") -> None:
        super().__init__("org.bluez.LEAdvertisement1")
        self._data = bytes(service_data)
        self.uuid16 = uuid16
        self.released = False

    @method()
    def Release(self):  # noqa: N802 - D-Bus name
        self.released = True

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> "s":  # noqa: N802,F821
        return "broadcast"

    @dbus_property(access=PropertyAccess.READ)
    def ServiceUUIDs(self) -> "as":  # noqa: N802,F821,F722
        return [self.uuid16]

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> "a{sv}":  # noqa: N802,F821,F722
        return {self.uuid16: Variant("ay", self._data)}

    def set_data(self, data: bytes) -> None:
        """New payload, same registration (and address): BlueZ >= 5.51 re-reads it."""
        self._data = bytes(data)
        self.emit_properties_changed({"ServiceData": {self.uuid16: Variant("ay", self._data)}})

    @dbus_property(access=PropertyAccess.READ)
    def Includes(self) -> "as":  # noqa: N802,F821,F722
        return []


class BluezAdvertiser(Advertiser):
    def __init__(self, adapter: str = "hci0", *, retries: int = 5, backoff_s: float = 0.5,
                 service_uuid16: str = "FD6F") -> None:
        """``service_uuid16``: "FD6F" (Exposure Notification) or "FD64" (ROBERT HELLOs)."""
        self.adapter_path = f"/org/bluez/{adapter}"
        self.service_uuid16 = service_uuid16
        self.retries, self.backoff_s = retries, backoff_s
        self.bus: MessageBus | None = None
        self._lock = asyncio.Lock()
        self._seq = 0
        self._path: str | None = None
        self._obj: _ENAdvertisement | None = None
        self._data: bytes | None = None
        self._health = RadioHealth()
        self.registrations = 0
        self.recoveries = 0

    def health(self) -> RadioHealth:
        return self._health

    async def _connect(self) -> None:
        if self.bus is None:
            self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            self.bus.add_message_handler(self._on_signal)
            await self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                                        body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                                              f"arg0='{BLUEZ}'"]))

    def _on_signal(self, msg: Message):
        if msg.message_type == MessageType.SIGNAL and msg.member == "NameOwnerChanged" and msg.body[0] == BLUEZ:
            if msg.body[2]:  # bluetoothd is back: our registration was lost with it
                log.warning("bluetoothd restarted: registering the advertisement again")
                self._health.advertising = False
                self.recoveries += 1
                asyncio.ensure_future(self._reregister())
            else:
                self._health.advertising = False
        return None

    async def _reregister(self) -> None:
        async with self._lock:
            if self._data is not None:
                self._unexport()
                await self._register(self._data)

    async def _call(self, member: str, sig: str, body: list) -> None:
        r = await self.bus.call(Message(destination=BLUEZ, path=self.adapter_path, interface=ADVMGR, member=member,
                                        signature=sig, body=body))
        if r.message_type == MessageType.ERROR:
            raise BluezError(r.error_name, r.body[0] if r.body else "")

    def _unexport(self) -> None:
        if self._path is not None:
            self.bus.unexport(self._path)
            self._path, self._obj = None, None

    async def _register(self, service_data: bytes) -> None:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            self._seq += 1
            path = f"/ctagent/advertisement{self._seq}"
            obj = _ENAdvertisement(service_data, self.service_uuid16)
            self.bus.export(path, obj)
            try:
                await self._call("RegisterAdvertisement", "oa{sv}", [path, {}])
            except BluezError as e:
                self.bus.unexport(path)
                self._health.errors = (self._health.errors + [e.name])[-10:]
                # too long / invalid: retrying cannot help
                if e.name in ("org.bluez.Error.InvalidLength", "org.bluez.Error.InvalidArguments") \
                        or attempt == self.retries:
                    raise
                log.warning("advertisement registration failed error=%s retry_in=%.1fs", e.name, delay)
                await asyncio.sleep(delay)
                delay *= 2
                continue
            self._path, self._obj, self._data = path, obj, bytes(service_data)
            self.registrations += 1
            self._health.advertising = True
            self._health.last_rotation = time.time()
            return

    async def start(self, service_data: bytes, address: str) -> None:
        await self._connect()
        async with self._lock:
            await self._register(service_data)

    async def rotate(self, service_data: bytes, address: str) -> None:
        """Payload and address change together: BlueZ gives the new registration a new address."""
        async with self._lock:
            if self._path is not None:
                try:
                    await self._call("UnregisterAdvertisement", "o", [self._path])
                except BluezError as e:
                    if e.name != "org.bluez.Error.DoesNotExist":
                        raise
                self._unexport()
            await self._register(service_data)

    async def update(self, service_data: bytes) -> None:
        """Change the payload but keep the address (ROBERT: a fresh HELLO within an epoch)."""
        async with self._lock:
            self._data = bytes(service_data)
            if self._obj is not None:
                self._obj.set_data(service_data)

    async def pause(self) -> None:
        """Stop advertising but keep the payload (duty-cycle fallback)."""
        async with self._lock:
            if self._path is not None:
                try:
                    await self._call("UnregisterAdvertisement", "o", [self._path])
                except BluezError:
                    pass
                self._unexport()
            self._health.advertising = False

    async def resume(self) -> None:
        async with self._lock:
            if self._path is None and self._data is not None:
                await self._register(self._data)

    async def stop(self) -> None:
        async with self._lock:
            if self.bus is not None and self._path is not None:
                try:
                    await self._call("UnregisterAdvertisement", "o", [self._path])
                except BluezError:
                    pass
                self._unexport()
            self._health.advertising = False
            if self.bus is not None:
                self.bus.disconnect()
                self.bus = None


class BluezScanner(Scanner):
    def __init__(self, adapter: str = "hci0", *, duplicate_data: bool = True, stall_s: float = 60.0,
                 backoff_s: float = 1.0, service_uuid: str = EN_SERVICE_UUID) -> None:
        self.adapter = adapter
        self.service_uuid = service_uuid
        self.duplicate_data = duplicate_data
        self.stall_s, self.backoff_s = stall_s, backoff_s
        self._queue: "asyncio.Queue[RawSighting]" = asyncio.Queue(maxsize=100_000)
        self._health = RadioHealth()
        self._stopped = False
        self._scanner = None
        self._last_sample = 0.0
        self._recent: list[float] = []
        self._paused = False
        self.restarts = 0

    def health(self) -> RadioHealth:
        now = time.time()
        self._recent = [t for t in self._recent if t > now - 60]
        self._health.samples_last_minute = len(self._recent)
        return self._health

    def _on_advertisement(self, device, adv) -> None:
        now = time.time()
        if adv.rssi in (127, -127):  # "not available"
            return
        self._last_sample = now
        self._recent.append(now)
        try:
            self._queue.put_nowait(RawSighting(now, device.address, adv.rssi, adv.tx_power,
                                               dict(adv.service_data)))
        except asyncio.QueueFull:
            self._health.errors = (self._health.errors + ["queue full"])[-10:]

    async def _start(self) -> None:
        from bleak import BleakScanner
        self._last_sample = time.time()
        filters = {"DuplicateData": self.duplicate_data, "RSSI": -127, "Transport": "le",
                   "UUIDs": [self.service_uuid]}
        self._scanner = BleakScanner(self._on_advertisement, scanning_mode="active",
                                     bluez={"adapter": self.adapter, "filters": filters})
        await self._scanner.start()
        self._health.scanning = True
        self._last_sample = time.time()

    async def _stop_bleak(self) -> None:
        if self._scanner is not None:
            try:
                await self._scanner.stop()
            except Exception:  # noqa: BLE001 - the session may be gone with bluetoothd
                pass
        self._health.scanning = False

    async def pause(self) -> None:
        """Stop scanning without ending :meth:`sightings` (duty-cycle fallback)."""
        self._paused = True
        await self._stop_bleak()

    async def resume(self) -> None:
        if self._paused:
            await self._start()
            self._paused = False

    async def _watch(self) -> None:
        """Scans can stop silently: restart with back-off when nothing arrives for stall_s."""
        delay = self.backoff_s
        while not self._stopped:
            await asyncio.sleep(min(self.stall_s / 4, 5))
            if self._paused or time.time() - self._last_sample < self.stall_s:
                delay = self.backoff_s
                continue
            log.warning("scanner stalled: restarting in %.0fs", delay)
            self._health.scanning = False
            await asyncio.sleep(delay)
            await self._stop_bleak()
            try:
                await self._start()
                self.restarts += 1
            except Exception as e:  # noqa: BLE001
                self._health.errors = (self._health.errors + [type(e).__name__])[-10:]
                delay = min(delay * 2, 300)

    async def sightings(self) -> AsyncIterator[RawSighting]:
        await self._start()
        watcher = asyncio.create_task(self._watch())
        try:
            while not self._stopped:
                yield await self._queue.get()
        finally:
            watcher.cancel()

    async def stop(self) -> None:
        self._stopped = True
        await self._stop_bleak()


async def duty_cycle(advertiser: BluezAdvertiser, scanner: BluezScanner, *, advertise_s: float, scan_s: float,
                     stop: asyncio.Event) -> None:
    """Fallback for controllers that stop advertising while scanning (some Raspberry Pi
    kernels) or have a single advertising set: alternate phases, advertising for
    ``advertise_s`` then scanning for ``scan_s``. With the default 20 s / 10 s, a peer
    is heard for a third of the time and we are heard two thirds of the time; the
    rule's minute windows and gap filling absorb the holes (at most 20 s)."""
    await scanner.pause()
    while not stop.is_set():
        await advertiser.resume()
        try:
            await asyncio.wait_for(stop.wait(), advertise_s)
            break
        except asyncio.TimeoutError:
            pass
        await advertiser.pause()
        await scanner.resume()
        try:
            await asyncio.wait_for(stop.wait(), scan_s)
            break
        except asyncio.TimeoutError:
            pass
        await scanner.pause()
