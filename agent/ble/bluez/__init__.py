"""Real radios on Linux/BlueZ: ``advertiser`` (our LEAdvertisement1 over D-Bus),
``scanner`` (bleak), ``gatt`` (the status characteristic through bless), ``doctor``
(checks of a real adapter), ``defs`` (D-Bus names)."""

from __future__ import annotations

from ..base import Radio, RadioRequest
from .advertiser import BluezAdvertiser
from .scanner import BluezScanner

#: Linux's default advertising interval when an advertisement does not set one (ours does
#: not): hdev->le_adv_min_interval = le_adv_max_interval = 0x0800 slots of 0.625 ms
#: (net/bluetooth/hci_core.c, hci_alloc_dev). The scan duty BlueZ's discovery gives the
#: controller is not exposed: unknown.
KERNEL_ADVERTISING_INTERVAL_S = 0x0800 * 0.000625


def open_radio(request: RadioRequest) -> Radio:
    status = None
    if request.gatt_status:
        from .gatt import GattStatusService

        status = GattStatusService(request.adapter)
    return Radio(BluezAdvertiser(request.adapter, clock=request.clock, service_uuid16=request.service_uuid16),
                 BluezScanner(request.adapter, clock=request.clock, service_uuid16=request.service_uuid16), status,
                 advertising_interval_s=KERNEL_ADVERTISING_INTERVAL_S)


__all__ = ["BluezAdvertiser", "BluezScanner", "open_radio"]
