"""The advertiser on BlueZ: our own ``org.bluez.LEAdvertisement1`` object over D-Bus
(dbus-fast, ``advertisement``): a non-connectable ``broadcast`` of ServiceUUIDs
``[uuid16]`` and ServiceData ``{uuid16: payload}``, MinInterval/MaxInterval 200-270 ms
(the Exposure Notification specification's interval, honoured on extended-advertising
controllers).

A rotation unregisters the old object and registers a fresh path: BlueZ gives the new
registration a new address (Privacy off: a fresh non-resolvable address; Privacy device:
a fresh resolvable one on extended-advertising controllers), so address and payload
change together. Legacy (Bluetooth 4.x) controllers refuse a new random address while
they scan, so there the scanner is paused around each re-registration (``pause_scanning``,
the gap is measured), and a payload update is a re-registration too; with Privacy =
device a legacy controller keeps one address across registrations, which ``doctor``
reports. Frames BlueZ would refuse or mangle are refused before registering. Rotations are
serialised, failed registrations retried with back-off, and the advertisement registered
again when bluetoothd comes back after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from ...clock import Clock
from ...errors import RadioError
from ...protocol.payload import LEGACY_ADV_MAX
from ..base import Advertiser, RadioHealth
from . import defs
from .advertisement import Advertisement, broadcast_properties, legacy_length

log = logging.getLogger("ctagent.ble")

#: Exposure Notification Bluetooth Specification v1.2, "Advertising interval": 200-270 ms
ADVERTISING_INTERVAL_MS = (200, 270)


class BluezAdvertiser(Advertiser):
    def __init__(self, adapter: str = "hci0", *, clock: Clock, service_uuid16: int, retries: int = 5,
                 backoff_s: float = 0.5,
                 pause_scanning: Callable[[], AbstractAsyncContextManager[None]] | None = None) -> None:
        self.adapter_path = defs.adapter_path(adapter)
        self.pause_scanning = pause_scanning
        #: whether the controller has extended advertising (None: not asked yet)
        self.extended: bool | None = None
        self.clock = clock
        self.uuid16 = f"{service_uuid16:04X}"
        self.retries, self.backoff_s = retries, backoff_s
        self.bus: MessageBus | None = None
        self._lock = asyncio.Lock()
        self._seq = 0
        self._path: str | None = None
        self._obj: Advertisement | None = None
        self._data: bytes | None = None
        self._health = RadioHealth()
        self.registrations = 0
        self.recoveries = 0
        self._tasks: set[asyncio.Task[None]] = set()  # re-registrations in flight

    def health(self) -> RadioHealth:
        return self._health

    async def _connect(self) -> MessageBus:
        if self.bus is None:
            try:
                self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            except OSError as e:
                raise defs.bus_unreachable(e) from None
            self.bus.add_message_handler(self._on_signal)
            self.bus.add_message_handler(self._on_call)
            await self.bus.call(Message(destination=defs.DBUS, path=defs.DBUS_PATH, interface=defs.DBUS,
                                        member="AddMatch", signature="s",
                                        body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                                              f"arg0='{defs.BLUEZ}'"]))
        return self.bus

    def _on_call(self, msg: Message) -> Message | bool | None:
        return self._obj.handle(msg) if self._obj is not None else None

    async def _controller_kind(self) -> bool:
        """Whether the adapter advertises with extended advertising: BlueZ offers secondary
        channels (1M, 2M, Coded) only then; a legacy controller lacks the property."""
        if self.extended is None:
            assert self.bus is not None
            r = await self.bus.call(Message(destination=defs.BLUEZ, path=self.adapter_path, interface=defs.PROPERTIES,
                                            member="Get", signature="ss",
                                            body=[defs.ADVERTISING_MANAGER, "SupportedSecondaryChannels"]))
            self.extended = r.message_type != MessageType.ERROR and bool(r.body[0].value)
            log.info("adapter advertising: %s", "extended" if self.extended else "legacy (scan paused on rotation)")
        return self.extended

    def _address_change(self) -> AbstractAsyncContextManager[None]:
        """Around a registration: scanning paused where the controller needs it."""
        if self.extended is False and self.pause_scanning is not None:
            return self.pause_scanning()
        return contextlib.nullcontext()

    def _properties(self, service_data: bytes) -> dict[str, Variant]:
        """Our broadcast; refused here when BlueZ would refuse or mangle it (``advertisement``)."""
        props = broadcast_properties(self.uuid16, service_data, interval_ms=ADVERTISING_INTERVAL_MS)
        n = legacy_length(props)
        if n > LEGACY_ADV_MAX:
            raise RadioError(defs.ERROR_TOO_LONG, f"the advertisement needs {n} bytes with its Flags, a legacy "
                             f"advertisement holds {LEGACY_ADV_MAX}: {len(service_data)} bytes of service data is "
                             f"too long (at most {len(service_data) - n + LEGACY_ADV_MAX})")
        return props

    def _on_signal(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL and msg.member == "NameOwnerChanged" and msg.body[0] == defs.BLUEZ:
            self._health.advertising = False
            if msg.body[2]:  # bluetoothd is back: our registration was lost with it
                log.warning("bluetoothd restarted: registering the advertisement again")
                self.recoveries += 1
                task = asyncio.ensure_future(self._reregister())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _reregister(self) -> None:
        async with self._lock:
            if self._data is not None:
                self._unexport()
                self.extended = None  # the adapter may have changed with bluetoothd
                await self._controller_kind()
                async with self._address_change():
                    await self._register(self._data)

    async def _call(self, member: str, sig: str, body: list[object]) -> None:
        assert self.bus is not None
        r = await self.bus.call(Message(destination=defs.BLUEZ, path=self.adapter_path,
                                        interface=defs.ADVERTISING_MANAGER, member=member, signature=sig, body=body))
        if r.message_type == MessageType.ERROR:
            raise RadioError(r.error_name or "org.bluez.Error", r.body[0] if r.body else "")

    def _unexport(self) -> None:
        self._path, self._obj = None, None

    async def _unregister(self, *, ignore_errors: bool) -> None:
        if self._path is None:
            return
        try:
            await self._call("UnregisterAdvertisement", "o", [self._path])
        except RadioError as e:
            if not ignore_errors and e.name != defs.ERROR_DOES_NOT_EXIST:
                raise
        self._unexport()

    async def _register(self, service_data: bytes) -> None:
        props = self._properties(service_data)  # before anything: a refusal no retry can fix
        await self._connect()
        await self._controller_kind()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            self._seq += 1
            path = f"{defs.OBJECT_ROOT}/advertisement{self._seq}"
            self._path, self._obj = path, Advertisement(path, props)
            try:
                await self._call("RegisterAdvertisement", "oa{sv}", [path, {}])
            except RadioError as e:
                self._unexport()
                self._health.error(e.name)
                if e.name in defs.PERMANENT_ERRORS or attempt == self.retries:
                    raise
                log.warning("advertisement registration failed error=%s retry_in=%.1fs", e.name, delay)
                await self.clock.sleep(delay)
                delay *= 2
                continue
            self._data = bytes(service_data)
            self.registrations += 1
            self._health.advertising = True
            self._health.last_rotation = self.clock.now()
            return

    async def start(self, service_data: bytes, address: str) -> None:
        """Advertise ``service_data``; a restarted caller's earlier registration goes first."""
        async with self._lock:
            await self._connect()
            await self._controller_kind()
            async with self._address_change():
                if self._path is not None:
                    await self._unregister(ignore_errors=True)
                await self._register(service_data)

    async def rotate(self, service_data: bytes, address: str) -> None:
        """Payload and address change together: BlueZ gives the new registration a new address."""
        self._properties(service_data)
        async with self._lock:
            await self._connect()
            await self._controller_kind()
            async with self._address_change():
                await self._unregister(ignore_errors=False)
                await self._register(service_data)

    async def update(self, service_data: bytes) -> None:
        """Change the payload within an identity (ROBERT: a fresh HELLO within an epoch).

        Extended controllers change it in place (the address is kept with Privacy = device;
        with Privacy off the kernel gives the set a new non-resolvable address). A legacy
        controller would have to set an address while scanning, which it refuses (and
        BlueZ then leaves it silent), so there it is a re-registration with scanning
        paused. Either way the EBID, not the address, links a ROBERT epoch's HELLOs."""
        props = self._properties(service_data)
        async with self._lock:
            self._data = bytes(service_data)
            if self._obj is None or self.bus is None:
                return
            if self.extended:
                self.bus.send(self._obj.changed("ServiceData", props["ServiceData"]))
                return
            async with self._address_change():
                await self._unregister(ignore_errors=True)
                await self._register(service_data)

    async def pause(self) -> None:
        async with self._lock:
            await self._unregister(ignore_errors=True)
            self._health.advertising = False

    async def resume(self) -> None:
        async with self._lock:
            if self._path is None and self._data is not None:
                await self._connect()
                await self._controller_kind()
                async with self._address_change():
                    await self._register(self._data)

    async def stop(self) -> None:
        async with self._lock:
            if self.bus is not None:
                await self._unregister(ignore_errors=True)
            self._health.advertising = False
            if self.bus is not None:
                self.bus.disconnect()
                self.bus = None
