"""GATT status service for screenless wearables (bless), off by default.

One service with one read/notify characteristic holding the agent's exposure status, so
that a companion phone or laptop can show it. It carries no identifier: 8 bytes,

    version (1) | flags (1): bit0 exposed, bit1 advertising, bit2 scanning |
    last exposure day (u16 LE, days since 2020-01-01; 0xFFFF none) |
    hours since the last successful sync (u16 LE; 0xFFFF never) | reserved (2)

A Raspberry Pi controller has a single advertising set: the connectable advertisement
bless registers for this service competes with the Exposure Notification broadcast, so
enable it only on adapters with several advertising sets, or with the alternating
advertise/scan duty cycle (see hardware/raspberry-pi.md).
"""

from __future__ import annotations

import struct

STATUS_SERVICE_UUID = "6c7a0001-5f1e-4b9e-9d6a-2f3c1c7a0a01"
STATUS_CHAR_UUID = "6c7a0002-5f1e-4b9e-9d6a-2f3c1c7a0a01"
EPOCH_DAY_2020 = 18262  # 2020-01-01 as a Unix day number
STATUS_VERSION = 1


def status_bytes(*, exposed_days: list[int], advertising: bool, scanning: bool, last_sync: float | None,
                 now: float) -> bytes:
    flags = (1 if exposed_days else 0) | (2 if advertising else 0) | (4 if scanning else 0)
    last = max(exposed_days) - EPOCH_DAY_2020 if exposed_days else 0xFFFF
    hours = 0xFFFF if last_sync is None else max(0, min(0xFFFE, int((now - last_sync) // 3600)))
    return struct.pack("<BBHHxx", STATUS_VERSION, flags, max(0, min(0xFFFF, last)), hours)


def parse_status(data: bytes) -> dict:
    version, flags, last, hours = struct.unpack("<BBHHxx", bytes(data))
    return {"version": version, "exposed": bool(flags & 1), "advertising": bool(flags & 2),
            "scanning": bool(flags & 4), "last_exposure_day": None if last == 0xFFFF else last + EPOCH_DAY_2020,
            "hours_since_sync": None if hours == 0xFFFF else hours}


class GattStatusService:
    """The status characteristic served through bless on a BlueZ adapter."""

    def __init__(self, adapter: str = "hci0", name: str = "ctagent") -> None:
        self.adapter, self.name = adapter, name
        self.value = status_bytes(exposed_days=[], advertising=False, scanning=False, last_sync=None, now=0)
        self.server = None

    async def start(self) -> None:
        from bless import BlessServer, GATTAttributePermissions, GATTCharacteristicProperties

        self.server = BlessServer(name=self.name, adapter=self.adapter)
        self.server.read_request_func = lambda characteristic, **kw: bytearray(self.value)
        await self.server.add_new_service(STATUS_SERVICE_UUID)
        await self.server.add_new_characteristic(
            STATUS_SERVICE_UUID, STATUS_CHAR_UUID,
            GATTCharacteristicProperties.read | GATTCharacteristicProperties.notify,
            bytearray(self.value), GATTAttributePermissions.readable)
        await self.server.start()

    def update(self, value: bytes) -> None:
        self.value = bytes(value)
        if self.server is not None:
            ch = self.server.get_characteristic(STATUS_CHAR_UUID)
            if ch is not None:
                ch.value = bytearray(self.value)
                self.server.update_value(STATUS_SERVICE_UUID, STATUS_CHAR_UUID)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
