"""Radios behind one face (``base``): an Advertiser, a Scanner and an optional status
service. One subpackage per backend, each with an ``open_radio(request)``:

- ``sim``: the simulated medium (``sim.medium``) with virtual peers, for tests, the demo
  and ``ctagent run --radio sim``;
- ``bluez``: BlueZ over D-Bus (our LEAdvertisement1) and a bleak scanner, for Linux
  devices; ``bluez.doctor`` checks a real adapter;
- ``bumble``: our own host (bumble) on a dedicated USB/UART HCI controller, without
  BlueZ; ``bumble.controller`` has virtual controllers with the radio model.

``duty_cycle`` alternates advertising and scanning on any backend.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Advertiser, Radio, RadioHealth, RadioRequest, RawSighting, Scanner, StatusService

#: radio kind in configuration -> backend module (imported when used: bluez needs D-Bus, bumble its extra)
RADIO_KINDS = {"sim": "agent.ble.sim", "bluez": "agent.ble.bluez", "bumble": "agent.ble.bumble"}


def open_radio(kind: str, request: RadioRequest) -> Radio:
    try:
        module = RADIO_KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown radio kind {kind!r}; choose one of {', '.join(RADIO_KINDS)}") from None
    radio: Radio = importlib.import_module(module).open_radio(request)
    return radio


__all__ = ["RADIO_KINDS", "Advertiser", "Radio", "RadioHealth", "RadioRequest", "RawSighting", "Scanner",
           "StatusService", "open_radio"]
