"""A fake bluetoothd for tests: the org.bluez objects that bleak and our advertiser use,
on whatever bus ``DBUS_SYSTEM_BUS_ADDRESS`` names (a private dbus-daemon in tests).

Implements: the ObjectManager at ``/`` (GetManagedObjects, InterfacesAdded/Removed);
per adapter ``/org/bluez/hciN``: Adapter1 (SetDiscoveryFilter, StartDiscovery,
StopDiscovery, Discovering, Powered ...) and LEAdvertisingManager1
(Register/UnregisterAdvertisement with BlueZ's limits and errors); Device1 objects for
what an adapter hears, with RSSI/ServiceData property changes, following BlueZ's
reporting rules (without DuplicateData a device is reported again only when its RSSI
moved by >= 8 dB or its data changed). Registered advertisements are relayed between
adapters through the simulated medium (log-distance path loss from the adapters'
positions, Rayleigh fading).

A control object ``/ctagent_fake`` (interface ``ctagent.FakeBluez1``) lets tests move
adapters (SetPosition), restart the daemon (Restart: registrations dropped, the
org.bluez name released and taken again) and read counters (Stats).

Compared with the real stack (tests/realstack runs the same scenario against both): each
adapter is a "legacy" (Bluetooth 4.x: 5 instances cycled by the kernel, no secondary
channels) or an "extended" controller (3 sets, like btvirt's); Privacy "off" gives every
registration a fresh non-resolvable address, and a payload change a fresh one too;
"device" gives a legacy adapter one resolvable address for all its registrations and an
extended one a fresh address per registration, kept on a payload change. Over-long
advertisements fail with org.bluez.Error.Failed, a broadcast with Discoverable fails to
parse. A legacy controller refuses a new random address while it scans (as real chips do,
Core v5.3 Vol 4 Part E 7.8.4): a registration then fails, a payload change leaves the
advertisement registered but silent. Not modelled: what goes on air (Flags, intervals: the
real-stack tests read those off the HCI trace) and the controller's duplicate filter,
which Linux turns on for discovery (the fake reports every packet with DuplicateData).

RSSI follows the project's one radio model (``agent.ble.sim.medium.packet_rssi``: the
shared log-distance path loss and Rayleigh fading), with a Raspberry Pi 3's calibration.

Run: ``python -m tests.fakes.fakebluez --adapters 2`` (from the repository's root)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from agent.ble.sim.medium import packet_rssi

#: the simulated adapters' calibrated TX power: -45.5 dBm at 1 m, the NIST Pi 3 pair's median
TX_POWER_DBM = 4.5

BLUEZ = "org.bluez"
OM = "org.freedesktop.DBus.ObjectManager"
PROPS = "org.freedesktop.DBus.Properties"
ADAPTER = "org.bluez.Adapter1"
ADVMGR = "org.bluez.LEAdvertisingManager1"
DEVICE = "org.bluez.Device1"
ADV = "org.bluez.LEAdvertisement1"
GATTMGR = "org.bluez.GattManager1"
INTROSPECT = "org.freedesktop.DBus.Introspectable"
ROOT_XML = """<node><interface name="org.freedesktop.DBus.ObjectManager">
<method name="GetManagedObjects"><arg type="a{oa{sa{sv}}}" direction="out"/></method>
<signal name="InterfacesAdded"><arg type="o"/><arg type="a{sa{sv}}"/></signal>
<signal name="InterfacesRemoved"><arg type="o"/><arg type="as"/></signal></interface><node name="org"/></node>"""
ADAPTER_XML = """<node><interface name="org.freedesktop.DBus.Properties">
<method name="Get"><arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="v" direction="out"/></method>
<method name="GetAll"><arg type="s" direction="in"/><arg type="a{sv}" direction="out"/></method>
<method name="Set"><arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="v" direction="in"/></method>
<signal name="PropertiesChanged"><arg type="s"/><arg type="a{sv}"/><arg type="as"/></signal></interface>
<interface name="org.bluez.Adapter1"><method name="StartDiscovery"/><method name="StopDiscovery"/>
<method name="SetDiscoveryFilter"><arg type="a{sv}" direction="in"/></method>
<property name="Address" type="s" access="read"/><property name="Powered" type="b" access="readwrite"/>
<property name="Alias" type="s" access="readwrite"/><property name="Discovering" type="b" access="read"/></interface>
<interface name="org.bluez.GattManager1">
<method name="RegisterApplication"><arg type="o" direction="in"/><arg type="a{sv}" direction="in"/></method>
<method name="UnregisterApplication"><arg type="o" direction="in"/></method></interface>
<interface name="org.bluez.LEAdvertisingManager1">
<method name="RegisterAdvertisement"><arg type="o" direction="in"/><arg type="a{sv}" direction="in"/></method>
<method name="UnregisterAdvertisement"><arg type="o" direction="in"/></method>
<property name="ActiveInstances" type="y" access="read"/><property name="SupportedInstances" type="y" access="read"/>
</interface></node>"""
CONTROL = "ctagent.FakeBluez1"
CONTROL_PATH = "/ctagent_fake"
LEGACY_MAX = 31


def uuid128(u: str) -> str:
    u = u.lower()
    return f"0000{u}-0000-1000-8000-00805f9b34fb" if len(u) == 4 else u


def legacy_length(props: dict) -> int:
    """Bytes the advertisement needs in a legacy PDU, as BlueZ builds it (flags added)."""
    n = 3  # Flags
    uuids = props.get("ServiceUUIDs", [])
    short = [u for u in uuids if len(u) == 4]
    long = [u for u in uuids if len(u) != 4]
    if short:
        n += 2 + 2 * len(short)
    if long:
        n += 2 + 16 * len(long)
    for u, data in props.get("ServiceData", {}).items():
        n += 2 + (2 if len(u) == 4 else 16) + len(data)
    for _, data in props.get("ManufacturerData", {}).items():
        n += 2 + 2 + len(data)
    if props.get("LocalName"):
        n += 2 + len(props["LocalName"])
    return n


class Adapter:
    def __init__(self, index: int, rng: random.Random, kind: str = "legacy", privacy: str = "off") -> None:
        self.index = index
        self.kind, self.privacy = kind, privacy
        self.rng = rng
        self.rpa = self.new_address(resolvable=True)
        self.path = f"/org/bluez/hci{index}"
        self.address = ":".join(f"{rng.randrange(256):02X}" for _ in range(6))
        self.position = (float(index), 0.0)
        self.discovering = False
        self.filter: dict = {}
        self.ads: dict[tuple[str, str], dict] = {}  # (sender, path) -> {"props", "address"}
        self.devices: dict[str, dict] = {}  # address -> {"path", "rssi_reported", "data"}
        # a legacy controller: the kernel's 5 instances (cycled every 2 s); btvirt's 5.x: 3 sets
        self.max_ads = 5 if kind == "legacy" else 3
        self.apps: dict[tuple[str, str], dict] = {}  # GATT applications: (sender, path) -> managed objects

    def props(self) -> dict[str, Variant]:
        return {
            "Address": Variant("s", self.address), "AddressType": Variant("s", "public"),
            "Name": Variant("s", f"fake{self.index}"), "Alias": Variant("s", f"fake{self.index}"),
            "Powered": Variant("b", True), "Discoverable": Variant("b", False), "Pairable": Variant("b", False),
            "Discovering": Variant("b", self.discovering), "UUIDs": Variant("as", []),
            "Roles": Variant("as", ["central", "peripheral"]), "Modalias": Variant("s", "usb:v1D6Bp0246d0540"),
        }

    def advmgr_props(self) -> dict[str, Variant]:
        props = {"ActiveInstances": Variant("y", len(self.ads)),
                 "SupportedInstances": Variant("y", max(0, self.max_ads - len(self.ads))),
                 "SupportedIncludes": Variant("as", ["tx-power", "appearance", "local-name"])}
        if self.kind == "extended":
            props["SupportedSecondaryChannels"] = Variant("as", ["1M", "2M", "Coded"])
        return props

    def new_address(self, resolvable: bool = False) -> str:
        """A random address: resolvable (top bits 01) or non-resolvable (00)."""
        v = (self.rng.getrandbits(46) or 1) | ((1 << 46) if resolvable else 0)
        return ":".join(f"{b:02X}" for b in v.to_bytes(6, "big"))

    def registration_address(self) -> str:
        if self.privacy == "device" and self.kind == "legacy":
            return self.rpa  # one RPA until the kernel's 15-minute timer
        return self.new_address(resolvable=self.privacy == "device")

    def refuses_address_change(self) -> bool:
        """A legacy controller cannot take a new random address while it scans."""
        return self.kind == "legacy" and self.privacy == "off" and self.discovering


class FakeBluez:
    def __init__(self, n_adapters: int, seed: int = 0, tick_s: float = 0.1, kinds: tuple[str, ...] = (),
                 privacy: str = "off") -> None:
        self.rng = random.Random(seed)
        kinds = kinds or ("legacy",) * n_adapters
        self.adapters = {a.path: a for a in (Adapter(i, self.rng, kinds[i], privacy) for i in range(n_adapters))}
        self.tick_s = tick_s
        self.bus: MessageBus | None = None
        self.stats = {"registered": 0, "unregistered": 0, "rejected": 0, "reports": 0, "signals": 0}
        self.online = True
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> bool:
        """Handle a call asynchronously (the reply is sent later); keep the task alive."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    # -- plumbing -----------------------------------------------------------------------
    def _signal(self, path: str, iface: str, member: str, sig: str, body: list) -> None:
        self.stats["signals"] += 1
        self.bus.send(Message.new_signal(path, iface, member, sig, body))

    def _managed(self) -> dict:
        out = {}
        for a in self.adapters.values():
            out[a.path] = {ADAPTER: a.props(), ADVMGR: a.advmgr_props(), GATTMGR: {}}
            for d in a.devices.values():
                out[d["path"]] = {DEVICE: d["props"]}
        return out

    def _changed(self, path: str, iface: str, changed: dict) -> None:
        self._signal(path, PROPS, "PropertiesChanged", "sa{sv}as", [iface, changed, []])

    def handle(self, msg: Message):
        if msg.message_type == MessageType.SIGNAL and msg.member == "PropertiesChanged" and msg.body \
                and msg.body[0] == ADV:
            for a in self.adapters.values():
                ad = a.ads.get((msg.sender, msg.path))
                if ad is not None and "ServiceData" in msg.body[1]:
                    ad["props"]["ServiceData"] = {u: bytes(v.value if isinstance(v, Variant) else v)
                                                  for u, v in msg.body[1]["ServiceData"].value.items()}
                    self.stats["updates"] = self.stats.get("updates", 0) + 1
                    # BlueZ re-adds the instance: the kernel sets its address again
                    if a.refuses_address_change():
                        ad["silent"] = True  # disabled, the re-enable refused: still registered
                    elif a.privacy == "off":
                        ad["address"] = a.new_address()
            return None
        if msg.message_type != MessageType.METHOD_CALL or not self.online:
            return None
        path, iface, member = msg.path, msg.interface, msg.member
        if path == CONTROL_PATH and iface == CONTROL:
            return self._control(msg)
        if path == "/" and iface == OM and member == "GetManagedObjects":
            return Message.new_method_return(msg, "a{oa{sa{sv}}}", [self._managed()])
        a = self.adapters.get(path)
        if iface == INTROSPECT and member == "Introspect":
            if path == "/":
                return Message.new_method_return(msg, "s", [ROOT_XML])
            if path in ("/org", "/org/bluez"):
                kids = "".join(f'<node name="{p.rsplit("/", 1)[1]}"/>' for p in self.adapters) if path == "/org/bluez" \
                    else '<node name="bluez"/>'
                return Message.new_method_return(msg, "s", [f"<node>{kids}</node>"])
            if a is not None:
                return Message.new_method_return(msg, "s", [ADAPTER_XML])
        if iface == PROPS and member == "Set" and a is not None:
            return Message.new_method_return(msg)
        if iface == PROPS and member in ("Get", "GetAll"):
            props = None
            if a is not None:
                props = {ADAPTER: a.props(), ADVMGR: a.advmgr_props()}.get(msg.body[0])
            else:
                for ad in self.adapters.values():
                    for d in ad.devices.values():
                        if d["path"] == path and msg.body[0] == DEVICE:
                            props = d["props"]
            if props is None:
                return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownInterface", "no such interface")
            if member == "GetAll":
                return Message.new_method_return(msg, "a{sv}", [props])
            if msg.body[1] not in props:
                return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "no such property")
            return Message.new_method_return(msg, "v", [props[msg.body[1]]])
        if a is None:
            return None
        if iface == ADAPTER:
            if member == "SetDiscoveryFilter":
                a.filter = {k: v.value for k, v in msg.body[0].items()}
                return Message.new_method_return(msg)
            if member == "StartDiscovery":
                if not a.discovering:
                    a.discovering = True
                    self._changed(a.path, ADAPTER, {"Discovering": Variant("b", True)})
                return Message.new_method_return(msg)
            if member == "StopDiscovery":
                if not a.discovering:
                    return Message.new_error(msg, "org.bluez.Error.Failed", "No discovery started")
                a.discovering = False
                self._changed(a.path, ADAPTER, {"Discovering": Variant("b", False)})
                return Message.new_method_return(msg)
            if member == "GetDiscoveryFilters":
                return Message.new_method_return(msg, "as", [["UUIDs", "RSSI", "Pathloss", "Transport",
                                                              "DuplicateData", "Discoverable", "Pattern"]])
            if member == "RemoveDevice":
                return Message.new_method_return(msg)
        if iface == GATTMGR:
            if member == "RegisterApplication":
                return self._spawn(self._register_app(a, msg))
            if member == "UnregisterApplication":
                if a.apps.pop((msg.sender, msg.body[0]), None) is None:
                    return Message.new_error(msg, "org.bluez.Error.DoesNotExist", "Does Not Exist")
                return Message.new_method_return(msg)
        if iface == ADVMGR:
            if member == "RegisterAdvertisement":
                return self._spawn(self._register(a, msg))
            if member == "UnregisterAdvertisement":
                key = (msg.sender, msg.body[0])
                if key not in a.ads:
                    return Message.new_error(msg, "org.bluez.Error.DoesNotExist", "Does Not Exist")
                del a.ads[key]
                self.stats["unregistered"] += 1
                self._changed(a.path, ADVMGR, a.advmgr_props())
                return Message.new_method_return(msg)
        return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", f"{iface}.{member} not implemented")

    async def _register(self, a: Adapter, msg: Message) -> None:
        key = (msg.sender, msg.body[0])

        def reply_error(name: str, text: str) -> None:
            self.stats["rejected"] += 1
            self.bus.send(Message.new_error(msg, name, text))

        if key in a.ads:
            return reply_error("org.bluez.Error.AlreadyExists", "Already Exists")
        if len(a.ads) >= a.max_ads:
            return reply_error("org.bluez.Error.NotPermitted", "Maximum advertisements reached")
        r = await self.bus.call(Message(destination=msg.sender, path=msg.body[0], interface=PROPS, member="GetAll",
                                        signature="s", body=[ADV]))
        if r.message_type == MessageType.ERROR:
            return reply_error("org.bluez.Error.Failed", "Failed to parse advertisement.")
        props = {k: v.value for k, v in r.body[0].items()}
        props["ServiceData"] = {u: bytes(v.value if isinstance(v, Variant) else v)
                                for u, v in props.get("ServiceData", {}).items()}
        if props.get("Type") not in ("broadcast", "peripheral"):
            return reply_error("org.bluez.Error.Failed", "Failed to parse advertisement.")
        if props.get("Type") == "broadcast" and "Discoverable" in props:
            return reply_error("org.bluez.Error.Failed", "Failed to parse advertisement.")  # "cannot set flags"
        if legacy_length(props) - 3 > LEGACY_MAX:  # BlueZ counts without the kernel's Flags
            return reply_error("org.bluez.Error.Failed", "Failed to register advertisement")
        if a.refuses_address_change():
            return reply_error("org.bluez.Error.Failed", "Failed to register advertisement")
        a.ads[key] = {"props": props, "address": a.registration_address()}
        await self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                    interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                                    body=[f"type='signal',sender='{msg.sender}',path='{msg.body[0]}',"
                                          f"interface='{PROPS}',member='PropertiesChanged'"]))
        self.stats["registered"] += 1
        self.bus.send(Message.new_method_return(msg))
        self._changed(a.path, ADVMGR, a.advmgr_props())

    async def _register_app(self, a: Adapter, msg: Message) -> None:
        """BlueZ reads the application's objects (services, characteristics) at registration."""
        r = await self.bus.call(Message(destination=msg.sender, path=msg.body[0], interface=OM,
                                        member="GetManagedObjects"))
        if r.message_type == MessageType.ERROR or not any(
                "org.bluez.GattService1" in ifs for ifs in r.body[0].values()):
            self.stats["rejected"] += 1
            self.bus.send(Message.new_error(msg, "org.bluez.Error.Failed", "No object received"))
            return
        a.apps[(msg.sender, msg.body[0])] = r.body[0]
        self.stats["gatt_apps"] = self.stats.get("gatt_apps", 0) + 1
        self.bus.send(Message.new_method_return(msg))

    async def _read_characteristic(self, msg: Message) -> None:
        """What a phone's read does: ReadValue on the characteristic with that UUID."""
        uuid = msg.body[0].lower()
        for a in self.adapters.values():
            for (sender, _), objs in a.apps.items():
                for path, ifs in objs.items():
                    ch = ifs.get("org.bluez.GattCharacteristic1")
                    if ch and ch["UUID"].value.lower() == uuid:
                        r = await self.bus.call(Message(destination=sender, path=path,
                                                        interface="org.bluez.GattCharacteristic1",
                                                        member="ReadValue", signature="a{sv}", body=[{}]))
                        if r.message_type == MessageType.ERROR:
                            self.bus.send(Message.new_error(msg, r.error_name, str(r.body)))
                        else:
                            self.bus.send(Message.new_method_return(msg, "ay", [bytes(r.body[0])]))
                        return
        self.bus.send(Message.new_error(msg, "org.bluez.Error.DoesNotExist", "no such characteristic"))

    def _control(self, msg: Message):
        if msg.member == "ReadCharacteristic":
            return self._spawn(self._read_characteristic(msg))
        if msg.member == "SetPosition":
            idx, x, y = msg.body
            self.adapters[f"/org/bluez/hci{idx}"].position = (x, y)
            return Message.new_method_return(msg)
        if msg.member == "SetMaxAdvertisements":
            idx, n = msg.body
            self.adapters[f"/org/bluez/hci{idx}"].max_ads = n
            return Message.new_method_return(msg)
        if msg.member == "Stats":
            return Message.new_method_return(msg, "a{su}", [{k: int(v) for k, v in self.stats.items()}])
        if msg.member == "Restart":
            self._spawn(self._restart())
            return Message.new_method_return(msg)
        return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", msg.member)

    async def _restart(self) -> None:
        """bluetoothd restarting: registrations and devices are lost, the name goes away."""
        self.online = False
        for a in self.adapters.values():
            a.ads.clear()
            a.apps.clear()
            for d in list(a.devices.values()):
                self._signal("/", OM, "InterfacesRemoved", "oas", [d["path"], [DEVICE]])
            a.devices.clear()
            a.discovering = False
        await self.bus.release_name(BLUEZ)
        await asyncio.sleep(0.5)
        await self.bus.request_name(BLUEZ)
        self.online = True
        for a in self.adapters.values():
            self._signal("/", OM, "InterfacesAdded", "oa{sa{sv}}",
                         [a.path, {ADAPTER: a.props(), ADVMGR: a.advmgr_props(), GATTMGR: {}}])

    # -- the radio ------------------------------------------------------------------------
    def _rssi(self, rx: Adapter, tx: Adapter) -> int | None:
        return packet_rssi(self.rng, math.dist(rx.position, tx.position), tx_power_dbm=TX_POWER_DBM)

    def _report(self, rx: Adapter, ad: dict, rssi: int) -> None:
        self.stats["reports"] += 1
        addr = ad["address"]
        sd = {uuid128(u): Variant("ay", v) for u, v in ad["props"].get("ServiceData", {}).items()}
        uuids = [uuid128(u) for u in ad["props"].get("ServiceUUIDs", [])]
        dev = rx.devices.get(addr)
        if dev is None:
            path = f"{rx.path}/dev_{addr.replace(':', '_')}"
            props = {"Address": Variant("s", addr), "AddressType": Variant("s", "random"),
                     "Alias": Variant("s", addr.replace(":", "-")), "Paired": Variant("b", False),
                     "Trusted": Variant("b", False), "Blocked": Variant("b", False), "Connected": Variant("b", False),
                     "LegacyPairing": Variant("b", False), "Adapter": Variant("o", rx.path),
                     "RSSI": Variant("n", rssi), "ServiceData": Variant("a{sv}", sd), "UUIDs": Variant("as", uuids),
                     "ServicesResolved": Variant("b", False)}
            rx.devices[addr] = {"path": path, "props": props, "rssi_reported": rssi, "data": sd}
            self._signal("/", OM, "InterfacesAdded", "oa{sa{sv}}", [path, {DEVICE: props}])
            return
        dup = bool(rx.filter.get("DuplicateData", False))
        changed = {}
        data_changed = {k: bytes(v.value) for k, v in dev["data"].items()} != {k: bytes(v.value) for k, v in sd.items()}
        if data_changed or dup:
            changed["ServiceData"] = Variant("a{sv}", sd)
            dev["data"] = sd
        if dup or data_changed or abs(rssi - dev["rssi_reported"]) >= 8:
            changed["RSSI"] = Variant("n", rssi)
            dev["rssi_reported"] = rssi
        dev["props"].update(changed)
        if changed:
            self._changed(dev["path"], DEVICE, changed)

    async def relay(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if not self.online:
                continue
            for rx in self.adapters.values():
                if not rx.discovering:
                    continue
                floor = rx.filter.get("RSSI", -127)
                for tx in self.adapters.values():
                    if tx is rx:
                        continue
                    for ad in [ad for ad in tx.ads.values() if not ad.get("silent")]:
                        # advertising every ~250 ms: about tick/0.25 packets, half caught by the scan duty
                        for _ in range(max(1, round(self.tick_s / 0.25 * 0.5))):
                            rssi = self._rssi(rx, tx)
                            if rssi is not None and rssi >= floor:
                                self._report(rx, ad, rssi)

    async def run(self) -> None:
        self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.bus.add_message_handler(self.handle)
        await self.bus.request_name(BLUEZ)
        print("fakebluez ready", flush=True)
        await self.relay()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="fake bluetoothd for tests")
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="", help="legacy|extended per adapter, comma-separated (default: legacy)")
    ap.add_argument("--privacy", default="off", choices=("off", "device"))
    a = ap.parse_args(argv)
    kinds = tuple(k for k in a.kinds.split(",") if k)
    try:
        asyncio.run(FakeBluez(a.adapters, a.seed, kinds=kinds, privacy=a.privacy).run())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
