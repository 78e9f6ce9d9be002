"""Real radios on Linux/BlueZ: ``advertiser`` (our LEAdvertisement1 over D-Bus),
``scanner`` (bleak), ``gatt`` (the status characteristic through bless), ``doctor``
(checks of a real adapter), ``defs`` (D-Bus names)."""

from __future__ import annotations

from ..base import Radio, RadioRequest
from .advertiser import BluezAdvertiser
from .scanner import BluezScanner


def open_radio(request: RadioRequest) -> Radio:
    status = None
    if request.gatt_status:
        from .gatt import GattStatusService

        status = GattStatusService(request.adapter)
    scanner = BluezScanner(request.adapter, clock=request.clock, service_uuid16=request.service_uuid16)
    advertiser = BluezAdvertiser(request.adapter, clock=request.clock, service_uuid16=request.service_uuid16,
                                 pause_scanning=scanner.quiet)
    return Radio(advertiser, scanner, status)


__all__ = ["BluezAdvertiser", "BluezScanner", "open_radio"]
