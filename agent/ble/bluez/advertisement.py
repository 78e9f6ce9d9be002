"""Our ``org.bluez.LEAdvertisement1`` object, and the properties of the Exposure
Notification / ROBERT broadcast as BlueZ needs them (doc/org.bluez.LEAdvertisement.rst,
src/advertising.c).

The object answers D-Bus itself (``handle``) so that it has exactly the properties it is
given: BlueZ refuses a whole registration over one property it cannot parse (a
``MinInterval`` of 0, say), so optional properties must be absent, not empty.

What BlueZ 5.66 and the Linux 6.1 kernel put on air (observed in tests/realstack):
- A ``broadcast`` goes out as ADV_NONCONN_IND without Flags of its own; the kernel adds
  Flags 0x04 (BR/EDR not supported) on an LE-only adapter (``ControllerMode = le`` or a
  Bluetooth LE-only controller): 3 + 4 + 24 = 31 bytes for the Exposure Notification frame.
- BlueZ refuses ``Discoverable`` on a broadcast ("Broadcast cannot set flags": the whole
  registration fails to parse) and refuses Flags in ``Data`` (its AD type reject list).
  Only a connectable ``peripheral`` with ``Discoverable`` gets other Flags: 0x06 (LE
  General Discoverable + BR/EDR not supported), as ADV_IND. So the Exposure Notification
  specification's Flags 0x1A cannot be put on air through BlueZ; we keep the
  non-connectable broadcast with the kernel's 0x04.
- 21-23 bytes of 16-bit service data beside the UUID list are accepted but mangled (legacy
  controllers drop the Flags, extended ones send a 32-34 byte legacy PDU that real chips
  refuse); 24 bytes fail with ``org.bluez.Error.Failed``. :func:`legacy_length` decides
  this before registering.
- ``MinInterval``/``MaxInterval`` are honoured on extended-advertising controllers (the
  default there is 1.28 s) and ignored on legacy ones (100-150 ms, the kernel's default
  for non-connectable advertising).
"""

from __future__ import annotations

from dbus_fast import Message, MessageType, Variant

from . import defs

INTROSPECTION = f"""<node><interface name="{defs.ADVERTISEMENT}"><method name="Release"/></interface>
<interface name="{defs.PROPERTIES}"><method name="Get"><arg type="s" direction="in"/><arg type="s" direction="in"/>
<arg type="v" direction="out"/></method><method name="GetAll"><arg type="s" direction="in"/>
<arg type="a{{sv}}" direction="out"/></method></interface></node>"""


def broadcast_properties(uuid16: str, service_data: bytes, *, discoverable: bool = False,
                         interval_ms: tuple[int, int] | None = None, kind: str = "broadcast") -> dict[str, Variant]:
    """An advertisement of one 16-bit service UUID and its service data: ``kind``
    "broadcast" (non-connectable, what we send) or "peripheral" (connectable).

    ``discoverable``: Flags from BlueZ (refused with "broadcast", see the module's note);
    ``interval_ms``: (MinInterval, MaxInterval), experimental in BlueZ (``-E``)."""
    props = {"Type": Variant("s", kind), "ServiceUUIDs": Variant("as", [uuid16]),
             "ServiceData": Variant("a{sv}", {uuid16: Variant("ay", bytes(service_data))}),
             "Includes": Variant("as", [])}
    if discoverable:
        props["Discoverable"] = Variant("b", True)
    if interval_ms is not None:
        props["MinInterval"] = Variant("u", int(interval_ms[0]))
        props["MaxInterval"] = Variant("u", int(interval_ms[1]))
    return props


def legacy_length(props: dict[str, Variant]) -> int:
    """Bytes of the legacy advertising PDU BlueZ and the kernel build from ``props``
    (31 at most): AD structures in BlueZ's order, Flags included when BlueZ or the
    kernel adds them (an LE-only adapter: always)."""
    n = 3  # Flags: from Discoverable, or added by the kernel on an LE-only adapter
    uuids = props.get("ServiceUUIDs")
    if uuids is not None and uuids.value:
        short = [u for u in uuids.value if len(u) == 4]
        long_ = [u for u in uuids.value if len(u) != 4]
        n += (2 + 2 * len(short) if short else 0) + (2 + 16 * len(long_) if long_ else 0)
    data = props.get("ServiceData")
    for u, v in (data.value.items() if data is not None else ()):
        n += 2 + (2 if len(u) == 4 else 16) + len(v.value if isinstance(v, Variant) else v)
    return n


class Advertisement:
    """One exported advertisement: ``handle`` answers BlueZ's calls for ``path``."""

    def __init__(self, path: str, props: dict[str, Variant]) -> None:
        self.path = path
        self.props = dict(props)
        self.released = False

    def handle(self, msg: Message) -> Message | bool | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.path != self.path:
            return None
        if msg.interface == defs.ADVERTISEMENT and msg.member == "Release":
            self.released = True
            return Message.new_method_return(msg)
        if msg.interface == defs.PROPERTIES and msg.member == "GetAll":
            if msg.body[0] != defs.ADVERTISEMENT:
                return Message.new_method_return(msg, "a{sv}", [{}])
            return Message.new_method_return(msg, "a{sv}", [self.props])
        if msg.interface == defs.PROPERTIES and msg.member == "Get":
            if msg.body[0] == defs.ADVERTISEMENT and msg.body[1] in self.props:
                return Message.new_method_return(msg, "v", [self.props[msg.body[1]]])
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "no such property")
        if msg.interface == defs.OBJECT_MANAGER and msg.member == "GetManagedObjects":
            return Message.new_method_return(msg, "a{oa{sa{sv}}}", [{self.path: {defs.ADVERTISEMENT: self.props}}])
        if msg.interface == defs.INTROSPECTABLE and msg.member == "Introspect":
            return Message.new_method_return(msg, "s", [INTROSPECTION])
        return None

    def changed(self, name: str, value: Variant) -> Message:
        """Set a property; the PropertiesChanged signal to send (BlueZ re-reads it)."""
        self.props[name] = value
        return Message.new_signal(self.path, defs.PROPERTIES, "PropertiesChanged", "sa{sv}as",
                                  [defs.ADVERTISEMENT, {name: value}, []])
