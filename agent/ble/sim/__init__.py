"""The simulated radio: ``medium`` (path loss, body and wall loss, shadowing, fading,
many devices in one process), ``radio`` (advertiser and scanner of one device among
virtual peers) and ``shared`` (one medium for several processes on one machine)."""

from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError
from ..base import Radio, RadioRequest
from ..status import MemoryStatusService
from .medium import MediumConfig
from .radio import SimAdvertiser, SimScanner


def _nominal() -> dict[str, float]:
    """The simulated medium's advertising interval and scan duty (research recording)."""
    c = MediumConfig()
    return {"advertising_interval_s": sum(c.adv_interval_s) / 2, "scan_duty": c.duty}


def open_radio(request: RadioRequest) -> Radio:
    if request.sim_medium:
        from ...protocol.payload import uuid128
        from .shared import MediumLink, SharedMediumAdvertiser, SharedMediumScanner

        link = MediumLink(Path(request.sim_medium).expanduser(), request.sim_name, tx_power=request.tx_power_dbm,
                          rx_correction=request.rx_correction_db)
        return Radio(SharedMediumAdvertiser(link, request.clock, uuid128(request.service_uuid16)),
                     SharedMediumScanner(link, request.clock), MemoryStatusService() if request.gatt_status else None,
                     **_nominal())
    if request.simulated_peer is None:
        raise ConfigError("the simulated radio needs the protocol family's simulated peers")
    scanner = SimScanner(request.clock, peer_factory=request.simulated_peer, peers=request.sim_peers,
                         seed=request.sim_seed, tx_cal=request.tx_power_dbm, rx_corr=request.rx_correction_db)
    return Radio(SimAdvertiser(request.clock), scanner, MemoryStatusService() if request.gatt_status else None,
                 **_nominal())


__all__ = ["SimAdvertiser", "SimScanner", "open_radio"]
