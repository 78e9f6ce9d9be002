"""The status characteristic (``agent.ble.status``) served through bless on a BlueZ
adapter, off by default.

A Raspberry Pi controller has a single advertising set: the connectable advertisement
bless registers for this service competes with the Exposure Notification broadcast, so
enable it only on adapters with several advertising sets, or with the alternating
advertise/scan duty cycle (see hardware/raspberry-pi.md).
"""

from __future__ import annotations

from typing import Any

from ..status import STATUS_CHAR_UUID, STATUS_SERVICE_UUID, status_bytes


class GattStatusService:
    def __init__(self, adapter: str = "hci0", name: str = "ctagent") -> None:
        self.adapter, self.name = adapter, name
        self.value = status_bytes(exposed_days=[], advertising=False, scanning=False, last_sync=None, now=0)
        self.server: Any = None

    async def start(self) -> None:
        from bless import (  # type: ignore[attr-defined]  # bless exports its backend's names at run time
            BlessServer, GATTAttributePermissions, GATTCharacteristicProperties)

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
