"""The scanner on BlueZ: bleak with discovery filters ``DuplicateData=True`` (otherwise
BlueZ reports a peer again only when its RSSI moves by 8 dB or its data changes),
``RSSI=-127``, ``Transport=le`` and the family's service UUID; restarted with back-off
when it stops delivering."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from ...clock import Clock
from ...protocol.payload import uuid128
from ..base import RadioHealth, RawSighting, Scanner
from . import defs

log = logging.getLogger("ctagent.ble")

#: RSSI values that mean "not available" (HCI and BlueZ)
RSSI_NOT_AVAILABLE = (127, -127)


class BluezScanner(Scanner):
    def __init__(self, adapter: str = "hci0", *, clock: Clock, service_uuid16: int, duplicate_data: bool = True,
                 stall_s: float = 60.0, backoff_s: float = 1.0) -> None:
        self.adapter = adapter
        self.clock = clock
        self.service_uuid = uuid128(service_uuid16)
        self.duplicate_data = duplicate_data
        self.stall_s, self.backoff_s = stall_s, backoff_s
        self._queue: asyncio.Queue[RawSighting] = asyncio.Queue(maxsize=100_000)
        self._health = RadioHealth()
        self._stopped = False
        self._scanner: Any = None
        self._last_sample = 0.0
        self._recent: list[float] = []
        self._paused = False
        self.restarts = 0
        #: seconds without scanning for each quiet() (a legacy controller's address change)
        self.quiet_gaps: list[float] = []
        self._bus: MessageBus | None = None  # our own, for the adapter's Discovering

    def health(self) -> RadioHealth:
        now = self.clock.now()
        self._recent = [t for t in self._recent if t > now - 60]
        self._health.samples_last_minute = len(self._recent)
        return self._health

    def _on_advertisement(self, device: Any, adv: Any) -> None:
        now = self.clock.now()
        if adv.rssi in RSSI_NOT_AVAILABLE:
            return
        self._last_sample = now
        self._recent.append(now)
        try:
            self._queue.put_nowait(RawSighting(now, device.address, adv.rssi, adv.tx_power, dict(adv.service_data)))
        except asyncio.QueueFull:
            self._health.error("queue full")

    async def _start(self) -> None:
        from bleak import BleakScanner

        self._last_sample = self.clock.now()
        filters: Any = {"DuplicateData": self.duplicate_data, "RSSI": -127, "Transport": "le",
                        "UUIDs": [self.service_uuid]}
        self._scanner = BleakScanner(self._on_advertisement, scanning_mode="active",
                                     bluez={"adapter": self.adapter, "filters": filters})
        try:
            await self._scanner.start()
        except OSError as e:
            raise defs.bus_unreachable(e) from None
        self._health.scanning = True
        self._last_sample = self.clock.now()

    async def _stop_bleak(self) -> None:
        if self._scanner is not None:
            try:
                await self._scanner.stop()
            except Exception:  # the session may be gone with bluetoothd
                pass
        self._health.scanning = False

    async def pause(self) -> None:
        self._paused = True
        await self._stop_bleak()

    async def resume(self) -> None:
        if self._paused:
            await self._start()
            self._paused = False

    @contextlib.asynccontextmanager
    async def quiet(self) -> AsyncIterator[None]:
        """No scanning inside the block: a legacy (Bluetooth 4.x) controller refuses a new
        random address while it scans, so the advertiser re-registers in here. The gap,
        from the stop until the adapter scans again, is measured (``quiet_gaps``). A scan
        another program holds on the adapter stays on (the waits below are bounded)."""
        if self._paused or self._stopped or self._scanner is None:
            yield
            return
        self._paused = True  # the stall watcher leaves us alone meanwhile
        # a start still in flight makes bluetoothd refuse the stop (InProgress) and keep a
        # stale session that refuses every later start: wait for it to complete first
        await self._wait_discovering(True, 5.0)
        t0 = self.clock.now()
        await self._stop_bleak()
        await self._wait_discovering(False, 3.0)  # the controller's scan is off now
        try:
            yield
        finally:
            delay = 0.05
            for attempt in range(6):  # bluetoothd may still answer InProgress for a moment
                try:
                    await self._start()
                    break
                except Exception as e:  # after the last try, the stall watcher tries again
                    if attempt == 5:
                        self._health.error(type(e).__name__)
                        log.warning("scanning did not restart after an address change: %s: %s", type(e).__name__,
                                    str(e)[:120])
                    else:
                        await self._stop_bleak()
                        await self.clock.sleep(delay)
                        delay *= 2
            await self._wait_discovering(True, 5.0)
            self._paused = False
            self.quiet_gaps = (self.quiet_gaps + [self.clock.now() - t0])[-100:]

    async def _wait_discovering(self, value: bool, timeout_s: float) -> bool:
        """Wait (bounded) until the adapter's Discovering property is ``value``."""
        deadline = self.clock.now() + timeout_s
        while True:
            try:
                if await self._discovering() == value:
                    return True
            except Exception:  # no answer: do not hold the rotation up
                return False
            if self.clock.now() >= deadline:
                return False
            await self.clock.sleep(0.05)

    async def _discovering(self) -> bool:
        if self._bus is None:
            self._bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        r = await self._bus.call(Message(destination=defs.BLUEZ, path=defs.adapter_path(self.adapter),
                                         interface=defs.PROPERTIES, member="Get", signature="ss",
                                         body=[defs.ADAPTER, "Discovering"]))
        if r.message_type == MessageType.ERROR:
            raise OSError(r.error_name)
        return bool(r.body[0].value)

    async def _watch(self) -> None:
        """Scans can stop silently: restart with back-off when nothing arrives for stall_s."""
        delay = self.backoff_s
        while not self._stopped:
            await self.clock.sleep(min(self.stall_s / 4, 5))
            if self._paused or self.clock.now() - self._last_sample < self.stall_s:
                delay = self.backoff_s
                continue
            log.warning("scanner stalled: restarting in %.0fs", delay)
            if self.events is not None:
                self.events.down("scanner_stall", self._last_sample, f"nothing heard for {self.stall_s:.0f} s")
            self._health.scanning = False
            await self.clock.sleep(delay)
            await self._stop_bleak()
            try:
                await self._start()
                self.restarts += 1
                if self.events is not None:
                    self.events.up("scanner_stall", self.clock.now())
            except Exception as e:  # bluetoothd may still be away: try again later
                self._health.error(type(e).__name__)
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
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None
