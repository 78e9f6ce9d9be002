"""Protocol families behind one face (``base.ProtocolMode``).

Adding a family (say DP-3T low-cost) is one module implementing ``ProtocolMode`` and one
line in :data:`MODES`; nothing else names a family.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Broadcast, CheckResult, DeviceContext, ProtocolMode, ServerAccount, ServerSchedule, SimPeer
from .gaen import GaenMode
from .robert import RobertMode

#: name in configuration -> implementation
MODES: dict[str, type[ProtocolMode]] = {  # type: ignore[type-arg]
    GaenMode.name: GaenMode,
    RobertMode.name: RobertMode,
}


def mode_class(name: str) -> type[ProtocolMode]:  # type: ignore[type-arg]
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(MODES)}") from None


__all__ = ["MODES", "Broadcast", "CheckResult", "DeviceContext", "GaenMode", "ProtocolMode", "RobertMode",
           "ServerAccount", "ServerSchedule", "SimPeer", "mode_class"]
