"""The advertiser on BlueZ: our own ``org.bluez.LEAdvertisement1`` object over D-Bus
(dbus-fast), Type ``broadcast``, ServiceUUIDs ``[uuid16]``, ServiceData ``{uuid16:
payload}``; a legacy advertisement, so no name (bless cannot send service data).

A rotation unregisters the old object and registers a fresh path (with adapter Privacy
off BlueZ then uses a fresh non-resolvable random address, so address and payload change
together). Rotations are serialised, failed registrations retried with back-off, and the
advertisement is registered again when bluetoothd comes back after a restart.
"""

from __future__ import annotations

import asyncio
import logging

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

from ...clock import Clock
from ...errors import RadioError
from ..base import Advertiser, RadioHealth
from . import defs

log = logging.getLogger("ctagent.ble")


class _Advertisement(ServiceInterface):
    def __init__(self, service_data: bytes, uuid16: str) -> None:
        super().__init__(defs.ADVERTISEMENT)
        self._data = bytes(service_data)
        self.uuid16 = uuid16
        self.released = False

    @method()
    def Release(self):  # the D-Bus method's name
        self.released = True

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> "s":  # type: ignore[name-defined]  # noqa: F821, UP037 - a D-Bus signature
        return "broadcast"

    @dbus_property(access=PropertyAccess.READ)
    def ServiceUUIDs(self) -> "as":  # type: ignore[valid-type]  # noqa: F722
        return [self.uuid16]

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> "a{sv}":  # type: ignore[valid-type]  # noqa: F722
        return {self.uuid16: Variant("ay", self._data)}

    @dbus_property(access=PropertyAccess.READ)
    def Includes(self) -> "as":  # type: ignore[valid-type]  # noqa: F722
        return []

    def set_data(self, data: bytes) -> None:
        """New payload, same registration (and address): BlueZ >= 5.51 re-reads it."""
        self._data = bytes(data)
        self.emit_properties_changed({"ServiceData": {self.uuid16: Variant("ay", self._data)}})


class BluezAdvertiser(Advertiser):
    def __init__(self, adapter: str = "hci0", *, clock: Clock, service_uuid16: int, retries: int = 5,
                 backoff_s: float = 0.5) -> None:
        self.adapter_path = defs.adapter_path(adapter)
        self.clock = clock
        self.uuid16 = f"{service_uuid16:04X}"
        self.retries, self.backoff_s = retries, backoff_s
        self.bus: MessageBus | None = None
        self._lock = asyncio.Lock()
        self._seq = 0
        self._path: str | None = None
        self._obj: _Advertisement | None = None
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
            await self.bus.call(Message(destination=defs.DBUS, path=defs.DBUS_PATH, interface=defs.DBUS,
                                        member="AddMatch", signature="s",
                                        body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                                              f"arg0='{defs.BLUEZ}'"]))
        return self.bus

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
                await self._register(self._data)

    async def _call(self, member: str, sig: str, body: list[object]) -> None:
        assert self.bus is not None
        r = await self.bus.call(Message(destination=defs.BLUEZ, path=self.adapter_path,
                                        interface=defs.ADVERTISING_MANAGER, member=member, signature=sig, body=body))
        if r.message_type == MessageType.ERROR:
            raise RadioError(r.error_name or "org.bluez.Error", r.body[0] if r.body else "")

    def _unexport(self) -> None:
        if self._path is not None and self.bus is not None:
            self.bus.unexport(self._path)
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
        bus = await self._connect()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            self._seq += 1
            path = f"{defs.OBJECT_ROOT}/advertisement{self._seq}"
            obj = _Advertisement(service_data, self.uuid16)
            bus.export(path, obj)
            try:
                await self._call("RegisterAdvertisement", "oa{sv}", [path, {}])
            except RadioError as e:
                bus.unexport(path)
                self._health.error(e.name)
                if e.name in defs.PERMANENT_ERRORS or attempt == self.retries:
                    raise
                log.warning("advertisement registration failed error=%s retry_in=%.1fs", e.name, delay)
                await self.clock.sleep(delay)
                delay *= 2
                continue
            self._path, self._obj, self._data = path, obj, bytes(service_data)
            self.registrations += 1
            self._health.advertising = True
            self._health.last_rotation = self.clock.now()
            return

    async def start(self, service_data: bytes, address: str) -> None:
        """Advertise ``service_data``; a restarted caller's earlier registration goes first."""
        async with self._lock:
            if self._path is not None:
                await self._unregister(ignore_errors=True)
            await self._register(service_data)

    async def rotate(self, service_data: bytes, address: str) -> None:
        """Payload and address change together: BlueZ gives the new registration a new address."""
        async with self._lock:
            await self._unregister(ignore_errors=False)
            await self._register(service_data)

    async def update(self, service_data: bytes) -> None:
        """Change the payload but keep the address (ROBERT: a fresh HELLO within an epoch)."""
        async with self._lock:
            self._data = bytes(service_data)
            if self._obj is not None:
                self._obj.set_data(service_data)

    async def pause(self) -> None:
        async with self._lock:
            await self._unregister(ignore_errors=True)
            self._health.advertising = False

    async def resume(self) -> None:
        async with self._lock:
            if self._path is None and self._data is not None:
                await self._register(self._data)

    async def stop(self) -> None:
        async with self._lock:
            if self.bus is not None:
                await self._unregister(ignore_errors=True)
            self._health.advertising = False
            if self.bus is not None:
                self.bus.disconnect()
                self.bus = None
