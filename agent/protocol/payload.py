"""The Exposure Notification BLE advertisement (Exposure Notification - Bluetooth
Specification v1.2, "Advertising payload").

A legacy advertisement of three AD structures:
  Flags (type 0x01, value 0x1A)                          3 bytes
  Complete List of 16-bit Service UUIDs (0x03): 0xFD6F   4 bytes
  Service Data - 16-bit UUID (0x16): 0xFD6F ‖ RPI ‖ AEM  24 bytes
= 31 bytes, the legacy maximum. Receivers must not require Flags (several phones and
BlueZ's own advertisements omit them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ..errors import ProtocolError
from .gaen import AEM_LEN, RPI_LEN

EN_SERVICE_UUID16 = 0xFD6F
#: The 128-bit form bleak and BlueZ use as service-data keys.
EN_SERVICE_UUID = "0000fd6f-0000-1000-8000-00805f9b34fb"  # == uuid128(EN_SERVICE_UUID16)
SERVICE_DATA_LEN = RPI_LEN + AEM_LEN  # 20
LEGACY_ADV_MAX = 31

AD_FLAGS = 0x01
AD_INCOMPLETE_UUID16 = 0x02
AD_COMPLETE_UUID16 = 0x03
AD_SERVICE_DATA16 = 0x16
#: The specification's Flags: bit 1 LE General Discoverable Mode, bit 3 and bit 4
#: Simultaneous LE and BR/EDR to Same Device Capable (Controller, Host); bit 2 (BR/EDR Not
#: Supported) clear (Core Specification Supplement, Part A, 1.3). BlueZ cannot send it on
#: a broadcast: the kernel adds 0x04 instead (hardware/raspberry-pi.md).
EN_FLAGS = 0x1A


class PayloadError(ProtocolError):
    """An advertisement is not a valid Exposure Notification frame."""


class NotExposureNotification(PayloadError):
    """The advertisement carries no 0xFD6F service data at all (someone else's beacon)."""


@dataclass(frozen=True, slots=True)
class ENPayload:
    rpi: bytes
    aem: bytes

    def __post_init__(self) -> None:
        if len(self.rpi) != RPI_LEN or len(self.aem) != AEM_LEN:
            raise PayloadError(f"RPI must be {RPI_LEN} bytes and AEM {AEM_LEN} bytes")

    @property
    def service_data(self) -> bytes:
        return self.rpi + self.aem


def build_advertisement(rpi: bytes, aem: bytes, *, include_flags: bool = True) -> bytes:
    """Raw AD bytes of the EN advertisement; at most 31 bytes."""
    p = ENPayload(bytes(rpi), bytes(aem))
    uuid = struct.pack("<H", EN_SERVICE_UUID16)
    out = b""
    if include_flags:
        out += bytes([2, AD_FLAGS, EN_FLAGS])
    out += bytes([3, AD_COMPLETE_UUID16]) + uuid
    out += bytes([1 + 2 + SERVICE_DATA_LEN, AD_SERVICE_DATA16]) + uuid + p.service_data
    assert len(out) <= LEGACY_ADV_MAX
    return out


def iter_ad_structures(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (ad_type, value) for each AD structure; stop at a zero-length field (padding)."""
    raw = bytes(raw)
    i = 0
    while i < len(raw):
        length = raw[i]
        if length == 0:  # the rest is padding (Core spec Vol 3 Part C 11)
            return
        if i + 1 + length > len(raw):
            raise PayloadError(f"AD structure at offset {i} claims {length} bytes, only {len(raw) - i - 1} left")
        yield raw[i + 1], raw[i + 2 : i + 1 + length]
        i += 1 + length


def _check_service_data(value: bytes) -> ENPayload:
    if len(value) != SERVICE_DATA_LEN:
        raise PayloadError(f"0xFD6F service data must be {SERVICE_DATA_LEN} bytes, got {len(value)}")
    return ENPayload(value[:RPI_LEN], value[RPI_LEN:])


def parse_advertisement(raw: bytes) -> ENPayload:
    """Parse raw AD bytes (advertising data or scan response) into an :class:`ENPayload`.

    Unrelated AD structures are ignored; Flags is optional. Raises
    :class:`NotExposureNotification` when no 0xFD6F service data is present and
    :class:`PayloadError` for malformed frames.
    """
    if len(raw) > 255:
        raise PayloadError(f"advertising data of {len(raw)} bytes exceeds the extended maximum")
    found: ENPayload | None = None
    for ad_type, value in iter_ad_structures(raw):
        if ad_type == AD_SERVICE_DATA16 and len(value) >= 2:
            (uuid,) = struct.unpack_from("<H", value)
            if uuid == EN_SERVICE_UUID16:
                if found is not None:
                    raise PayloadError("two 0xFD6F service data structures in one advertisement")
                found = _check_service_data(value[2:])
    if found is None:
        raise NotExposureNotification("no 0xFD6F service data")
    return found


def uuid128(uuid16: int) -> str:
    """The 128-bit string form of a 16-bit SIG UUID (how bleak and BlueZ key service data)."""
    return f"0000{uuid16:04x}-0000-1000-8000-00805f9b34fb"


def _normalise_uuid(key: object) -> str | None:
    if isinstance(key, int):
        return uuid128(key) if 0 <= key <= 0xFFFF else None
    if not isinstance(key, str):
        return None
    k = key.strip().lower()
    if len(k) == 4:
        return f"0000{k}-0000-1000-8000-00805f9b34fb"
    return k


def find_service_data(service_data: Mapping[object, object], uuid16: int) -> bytes | None:
    """The value bleak delivers for one service UUID (``AdvertisementData.service_data``:
    128-bit UUID string -> bytes; short forms "fd6f" and 0xFD6F accepted too), or None.
    Raises :class:`PayloadError` when the value is not bytes."""
    want = uuid128(uuid16)
    for key, value in service_data.items():
        if _normalise_uuid(key) == want:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise PayloadError(f"0x{uuid16:04X} service data is not bytes")
            return bytes(value)
    return None


def parse_service_data(service_data: Mapping[object, object]) -> ENPayload:
    """Parse the already-split service-data dict bleak delivers."""
    value = find_service_data(service_data, EN_SERVICE_UUID16)
    if value is None:
        raise NotExposureNotification("no 0xFD6F service data")
    return _check_service_data(value)
