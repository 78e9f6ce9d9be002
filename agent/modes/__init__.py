"""Protocol families behind one face (``base.ProtocolMode``).

Adding a family (say DP-3T low-cost) is one module implementing ``ProtocolMode`` and one
line in :data:`MODES`; nothing else names a family.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import ProtocolMode

#: name in configuration -> implementation (imported when used)
MODES = {
    "gaen": "agent.modes.gaen:GaenMode",
    "robert": "agent.modes.robert:RobertMode",
}


def mode_class(name: str) -> type[ProtocolMode[Any]]:
    try:
        module, cls = MODES[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(MODES)}") from None
    found: type[ProtocolMode[Any]] = getattr(importlib.import_module(module), cls)
    return found


__all__ = ["MODES", "mode_class"]
