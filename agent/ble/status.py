"""The status a screenless device serves to a companion (phone or laptop), as 8 bytes
with no identifier in them:

    version (1) | flags (1): bit0 exposed, bit1 advertising, bit2 scanning |
    last exposure day (u16 LE, days since 2020-01-01; 0xFFFF none) |
    hours since the last successful server call (u16 LE; 0xFFFF never) | reserved (2)

Pure; ``bluez.gatt`` serves it as a GATT characteristic (bless).
"""

from __future__ import annotations

import struct
from typing import Any

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


def parse_status(data: bytes) -> dict[str, Any]:
    version, flags, last, hours = struct.unpack("<BBHHxx", bytes(data))
    return {"version": version, "exposed": bool(flags & 1), "advertising": bool(flags & 2),
            "scanning": bool(flags & 4), "last_exposure_day": None if last == 0xFFFF else last + EPOCH_DAY_2020,
            "hours_since_sync": None if hours == 0xFFFF else hours}


class MemoryStatusService:
    """Holds the status for radios without a GATT server (the simulated one)."""

    def __init__(self) -> None:
        self.value = status_bytes(exposed_days=[], advertising=False, scanning=False, last_sync=None, now=0)

    async def start(self) -> None:
        pass

    def update(self, value: bytes) -> None:
        self.value = bytes(value)

    async def stop(self) -> None:
        pass
