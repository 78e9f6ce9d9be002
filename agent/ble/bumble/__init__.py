"""The bumble radio and virtual controllers (``pip install 'ctagent[bumble]'``):

- ``radio``: ``[radio] kind = "bumble"``, our own host (bumble) on a dedicated HCI
  controller named by a transport moniker (``usb:0``, ``serial:/dev/ttyACM0,1000000``,
  ``tcp-client:HOST:PORT``), see hardware/bumble.md;
- ``controller``: virtual controllers with the project's radio model on one link
  (tests, and Linux's real stack through ``vhci``: ``python -m agent.ble.bumble.vhci``).
"""

from __future__ import annotations

import re

from ...errors import ConfigError
from ..base import Radio, RadioRequest

#: bumble's transport schemes (bumble.transport.open_transport) -> whether a spec must follow
TRANSPORT_SCHEMES = {"usb": True, "pyusb": True, "serial": True, "tcp-client": True, "tcp-server": True,
                     "udp": True, "ws-client": True, "ws-server": True, "unix": True, "unix-client": True,
                     "unix-server": True, "file": True, "pty": False, "vhci": False, "hci-socket": False,
                     "android-emulator": False, "android-netsim": False}
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[\w.-]+):(\d{1,5})$")


def transport_problem(moniker: str) -> str | None:
    """Why ``moniker`` is not a bumble transport this radio can open, or None. Pure:
    checks the form, not whether the controller is there."""
    scheme, sep, spec = moniker.partition(":")
    spec = re.sub(r"^\[[^\]]*\]", "", spec)  # bumble's [key=value,...] metadata prefix
    if scheme not in TRANSPORT_SCHEMES:
        return (f"{moniker!r}: unknown transport {scheme!r}; write e.g. \"usb:0\", "
                "\"serial:/dev/ttyACM0,1000000\" or \"tcp-client:127.0.0.1:9001\"")
    if TRANSPORT_SCHEMES[scheme] and not (sep and spec):
        example = _EXAMPLES.get(scheme, f"{scheme}:...")
        return f"{moniker!r}: {scheme} needs a parameter after the colon (e.g. \"{example}\")"
    if scheme in ("tcp-client", "tcp-server"):
        m = _HOST_PORT.match(spec)
        if not m or not 0 < int(m[2]) < 65536:
            return f"{moniker!r}: write {scheme}:HOST:PORT with a port from 1 to 65535"
    if scheme == "serial":
        device, _, speed = spec.partition(",")
        if not device or (speed and not speed.split(",")[0].isdigit()):
            return f"{moniker!r}: write serial:DEVICE[,BAUD], e.g. serial:/dev/ttyACM0,1000000"
    return None


_EXAMPLES = {"usb": "usb:0", "serial": "serial:/dev/ttyACM0,1000000", "tcp-client": "tcp-client:127.0.0.1:9001"}


def open_radio(request: RadioRequest) -> Radio:
    from ...extras import require

    require("bumble", what="the bumble radio")
    from .radio import BumbleAdvertiser, BumbleScanner, HciSession

    if not request.bumble_transport:
        raise ConfigError("[radio] bumble_transport: the bumble radio needs a transport moniker, e.g. \"usb:0\"")
    if problem := transport_problem(request.bumble_transport):
        raise ConfigError(f"[radio] bumble_transport: {problem}")
    session = HciSession(request.bumble_transport, clock=request.clock, uuid16=request.service_uuid16,
                         snoop=request.bumble_snoop)
    return Radio(BumbleAdvertiser(session), BumbleScanner(session))
