"""The checks run inside the real-stack VM (guest.sh starts one process per Privacy mode):
each operation is done once on the legacy pair (hci0 advertises, hci1 listens) and once on
the extended pair (hci2, hci3), and recorded as an observation: what BlueZ answered, and
the wall-clock window in which it happened, so that the host can read what went on air
from the btmon trace (``btsnoop.py``) of that window. Python is 15-20x slower in the VM:
few, short steps; the host does the analysis.

Run: ``python -m tests.realstack.checks --privacy off --out DIR`` (inside the VM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import tomllib
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from agent.ble.bluez import defs
from agent.ble.bluez.advertisement import Advertisement, broadcast_properties

#: kind -> (advertiser, listener), found by find_pairs()
PAIRS: dict[str, tuple[str, str]] = {}
EN = "FD6F"
#: scales the waits of raw_checks: 1 in the VM (btvirt, the kernel and the trace need
#: them), less against the fake bluetoothd in the contract test
PACE = 1.0


async def wait(seconds: float) -> None:
    await asyncio.sleep(seconds * PACE)


def en_data(i: int) -> bytes:
    """A recognisable 20-byte payload: RPI of byte i, AEM 40 i 00 00."""
    return bytes([i]) * 16 + bytes([0x40, i, 0, 0])


class Stack:
    """Raw D-Bus calls to bluetoothd, and our advertisement objects."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.seq = 0
        self.objects: dict[str, Advertisement] = {}
        bus.add_message_handler(self._handle)

    def _handle(self, msg: Message) -> Message | bool | None:
        obj = self.objects.get(msg.path or "")
        return obj.handle(msg) if obj is not None else None

    async def call(self, path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None) -> Any:
        r = await self.bus.call(Message(destination=defs.BLUEZ, path=path, interface=iface, member=member,
                                        signature=sig, body=body or []))
        if r.message_type == MessageType.ERROR:
            raise BluezError(r.error_name or "", str(r.body[0]) if r.body else "")
        return r.body

    async def register(self, hci: str, props: dict[str, Variant]) -> str:
        self.seq += 1
        path = f"/realstack/adv{self.seq}"
        self.objects[path] = Advertisement(path, props)
        try:
            await self.call(defs.adapter_path(hci), defs.ADVERTISING_MANAGER, "RegisterAdvertisement", "oa{sv}",
                            [path, {}])
        except BluezError:
            del self.objects[path]
            raise
        return path

    async def unregister(self, hci: str, path: str) -> None:
        try:
            await self.call(defs.adapter_path(hci), defs.ADVERTISING_MANAGER, "UnregisterAdvertisement", "o", [path])
        finally:
            self.objects.pop(path, None)

    def update(self, path: str, service_data: bytes) -> None:
        self.bus.send(self.objects[path].changed("ServiceData", Variant("a{sv}", {EN: Variant("ay", service_data)})))

    async def prop(self, hci: str, iface: str, name: str) -> Any:
        (v,) = await self.call(defs.adapter_path(hci), defs.PROPERTIES, "Get", "ss", [iface, name])
        return v.value

    async def active(self, hci: str) -> int:
        return int(await self.prop(hci, defs.ADVERTISING_MANAGER, "ActiveInstances"))

    async def discovery(self, hci: str, on: bool) -> None:
        if on:
            await self.call(defs.adapter_path(hci), defs.ADAPTER, "SetDiscoveryFilter", "a{sv}",
                            [{"Transport": Variant("s", "le"), "DuplicateData": Variant("b", True)}])
        for _ in range(20):  # bluetoothd answers InProgress while the previous change completes
            try:
                await self.call(defs.adapter_path(hci), defs.ADAPTER, "StartDiscovery" if on else "StopDiscovery")
                return
            except BluezError as e:
                if e.name != "org.bluez.Error.InProgress":
                    raise
                await asyncio.sleep(0.2)


class BluezError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name, self.text = name, text


class Recorder:
    def __init__(self, privacy: str, only: set[str] | None = None) -> None:
        self.privacy = privacy
        self.only = only  # the operations to do (None: all)
        self.observations: list[dict[str, Any]] = []

    async def run(self, kind: str, op: str, fn: Callable[[], Awaitable[dict[str, Any]]],
                  timeout_s: float = 60) -> None:
        if self.only is not None and op not in self.only:
            return
        t0 = time.time()
        try:
            details = await asyncio.wait_for(fn(), timeout_s)
            error = None
        except BluezError as e:
            details, error = {}, e.name + ": " + e.text
        except Exception as e:  # recorded, the host test says what failed
            details, error = {"traceback": traceback.format_exc()[-1500:]}, f"{type(e).__name__}: {e}"
        self.observations.append({"kind": kind, "privacy": self.privacy, "op": op, "t0": t0, "t1": time.time(),
                                  "error": error, **details})
        print(f"{time.time():.1f} {kind} {op} error={error}", flush=True)


async def raw_checks(st: Stack, rec: Recorder, kind: str) -> None:
    """What BlueZ does with plain registrations: the table's rows."""
    adv, rx = PAIRS[kind]

    async def caps() -> dict[str, Any]:
        out = {}
        for name in ("SupportedInstances", "SupportedSecondaryChannels", "SupportedIncludes", "SupportedFeatures"):
            try:
                out[name] = await st.prop(adv, defs.ADVERTISING_MANAGER, name)
            except BluezError as e:
                out[name] = e.name
        try:
            cap = await st.prop(adv, defs.ADVERTISING_MANAGER, "SupportedCapabilities")
            out["SupportedCapabilities"] = {k: v.value for k, v in cap.items()}
        except BluezError as e:
            out["SupportedCapabilities"] = e.name
        return {"caps": out}

    async def register_once(props: dict[str, Variant], hold_s: float = 0.5) -> dict[str, Any]:
        path = await st.register(adv, props)
        await wait(hold_s)
        active = await st.active(adv)
        await st.unregister(adv, path)
        return {"active": active}

    # btvirt's 4.0 controllers do not report each other and a scanning legacy listener has
    # crashed btvirt: only the extended listener scans
    listen = kind != "legacy"
    await rec.run(kind, "caps", caps)
    if listen:
        await st.discovery(rx, True)  # the listener hears the plain frame (btvirt: one report per enable)
    await rec.run(kind, "register", lambda: register_once(broadcast_properties(EN, en_data(1))))
    if listen:
        await st.discovery(rx, False)  # btvirt's listener dies on some long reports: the rest is read off the sender
    await rec.run(kind, "register-discoverable",
                  lambda: register_once(broadcast_properties(EN, en_data(2), discoverable=True)))
    await rec.run(kind, "register-peripheral-discoverable",
                  lambda: register_once(broadcast_properties(EN, en_data(3), discoverable=True, kind="peripheral")))
    await rec.run(kind, "interval-200-270",
                  lambda: register_once(broadcast_properties(EN, en_data(4), interval_ms=(200, 270))))
    for n in (21, 23, 24):
        await rec.run(kind, f"service-data-{n}",
                      lambda n=n: register_once(broadcast_properties(EN, bytes([n]) * n), 0.3))

    async def instances() -> dict[str, Any]:
        paths, errors = [], []
        for i in range(7):
            try:
                paths.append(await st.register(adv, broadcast_properties(EN, en_data(10 + i))))
            except BluezError as e:
                errors.append({"n": i + 1, "error": f"{e.name}: {e.text}"})
                break
        await wait(2.1)  # the kernel cycles instances (2 s each)
        active = await st.active(adv)
        for p in paths:
            await st.unregister(adv, p)
        return {"registered": len(paths), "active": active, "errors": errors}

    await rec.run(kind, "instances", instances)

    async def rotate_while_scanning(discoverable: bool) -> dict[str, Any]:
        await st.discovery(adv, True)
        steps = []
        path = None
        try:
            for i in range(3):
                t = time.time()
                try:
                    if path:
                        await st.unregister(adv, path)
                        path = None
                    path = await st.register(adv, broadcast_properties(EN, en_data(20 + i), discoverable=discoverable))
                    steps.append({"t": t, "payload": 20 + i, "error": None})
                except BluezError as e:
                    steps.append({"t": t, "payload": 20 + i, "error": f"{e.name}: {e.text}"})
                await wait(0.6)
            active = await st.active(adv)
        finally:
            if path:
                await st.unregister(adv, path)
            await st.discovery(adv, False)
        return {"steps": steps, "active": active}

    if listen:
        await st.discovery(rx, True)
    await rec.run(kind, "rotate-while-scanning", lambda: rotate_while_scanning(False))

    async def update(scanning: bool) -> dict[str, Any]:
        path = await st.register(adv, broadcast_properties(EN, en_data(30)))
        if scanning:
            await st.discovery(adv, True)
        try:
            await wait(0.8)
            steps = []
            for i in (31, 32):
                steps.append({"t": time.time(), "payload": i})
                st.update(path, en_data(i))
                await wait(0.8)
            active = await st.active(adv)
        finally:
            if scanning:
                await st.discovery(adv, False)
            await st.unregister(adv, path)
        return {"steps": steps, "active": active}

    await rec.run(kind, "update-while-scanning", lambda: update(True))
    if listen:
        await st.discovery(rx, False)


async def agent_checks(rec: Recorder, kind: str, main_conf: Path) -> None:
    """The agent's own BlueZ radio, as the daemon runs it: scanning all the time on the
    advertising adapter, rotating, updating; then ``ctagent doctor``'s checks."""
    from agent.ble.bluez import open_radio
    from agent.ble.bluez.doctor import doctor
    from agent.ble.base import RadioRequest
    from agent.clock import RealClock
    from agent.protocol.payload import EN_SERVICE_UUID16

    adv, _ = PAIRS[kind]

    async def rotate_and_update() -> dict[str, Any]:
        radio = open_radio(RadioRequest(clock=RealClock(), service_uuid16=EN_SERVICE_UUID16, adapter=adv))
        heard = 0

        async def scan() -> None:
            nonlocal heard
            async for _ in radio.scanner.sightings():
                heard += 1

        task = asyncio.create_task(scan())
        await asyncio.sleep(1.5)  # bleak's scan is on
        steps = []
        try:
            await radio.advertiser.start(en_data(40), "")
            for i in (41, 42, 43):
                await asyncio.sleep(0.8)
                t = time.time()
                await radio.advertiser.rotate(en_data(i), "")
                steps.append({"t": t, "payload": i, "op": "rotate"})
            await asyncio.sleep(0.8)
            steps.append({"t": time.time(), "payload": 50, "op": "update"})
            await radio.advertiser.update(en_data(50))
            await asyncio.sleep(0.8)
            active = await Stack(radio.advertiser.bus).active(adv)  # type: ignore[attr-defined,arg-type]
            return {"steps": steps, "active": active, "registrations": radio.advertiser.registrations,  # type: ignore[attr-defined]
                    "extended": radio.advertiser.extended, "quiet_gaps": radio.scanner.quiet_gaps,  # type: ignore[attr-defined]
                    "scanning": radio.scanner.health().scanning, "errors": radio.advertiser.health().errors}
        finally:
            task.cancel()
            await radio.scanner.stop()
            await radio.advertiser.stop()

    await rec.run(kind, "agent-rotate-update", rotate_and_update)

    async def run_doctor() -> dict[str, Any]:
        ok, checks = await asyncio.to_thread(doctor, adv, main_conf)
        return {"ok": ok, "checks": [list(c) for c in checks]}

    await rec.run(kind, "doctor", run_doctor)

    async def gatt_beside_en() -> dict[str, Any]:
        """bless's status service (its own connectable advertisement) next to our broadcast."""
        from agent.ble.bluez import BluezAdvertiser
        from agent.ble.bluez.gatt import GattStatusService

        en = BluezAdvertiser(adv, clock=RealClock(), service_uuid16=EN_SERVICE_UUID16)
        svc = GattStatusService(adv)
        try:
            await en.start(en_data(60), "")
            await svc.start()
            await asyncio.sleep(2.5)  # a legacy controller cycles its instances every 2 s
            st = Stack(en.bus)  # type: ignore[arg-type]
            return {"active": await st.active(adv), "en_advertising": en.health().advertising}
        finally:
            await svc.stop()
            await en.stop()

    await rec.run(kind, "gatt-beside-en", gatt_beside_en)


async def too_long(rec: Recorder) -> None:
    """Over-long service data is refused before BlueZ sees it, without retries."""
    from agent.ble.bluez import BluezAdvertiser
    from agent.clock import RealClock

    async def attempt() -> dict[str, Any]:
        a = BluezAdvertiser(PAIRS["legacy"][0], clock=RealClock(), service_uuid16=0xFD6F, backoff_s=5)
        t0 = time.time()
        try:
            await a.start(bytes(21), "")
            return {"refused": None}
        except Exception as e:
            return {"refused": f"{getattr(e, 'name', '')}: {getattr(e, 'text', e)}", "seconds": time.time() - t0,
                    "registrations": a.registrations}
        finally:
            await a.stop()

    await rec.run("legacy", "agent-too-long", attempt)


async def find_pairs(st: Stack) -> dict[str, tuple[str, str]]:
    """Adapters by kind: extended advertising iff BlueZ offers secondary channels."""
    (objects,) = await st.call("/", defs.OBJECT_MANAGER, "GetManagedObjects")
    kinds: dict[str, list[str]] = {"legacy": [], "extended": []}
    for path in sorted(objects):
        mgr = objects[path].get(defs.ADVERTISING_MANAGER)
        if mgr is not None:
            channels = mgr.get("SupportedSecondaryChannels")
            kinds["extended" if channels is not None and channels.value else "legacy"].append(path.rsplit("/", 1)[1])
    return {k: (v[0], v[1]) for k, v in kinds.items() if len(v) >= 2}


async def find_bumble(st: Stack, vhci_log: Path) -> dict[str, str]:
    """The bumble controllers (agent.ble.bumble.vhci's JSON lines) by name -> adapter."""
    by_address = {}
    (objects,) = await st.call("/", defs.OBJECT_MANAGER, "GetManagedObjects")
    for path, ifaces in objects.items():
        if defs.ADAPTER in ifaces:
            by_address[ifaces[defs.ADAPTER]["Address"].value.upper()] = path.rsplit("/", 1)[1]
    out = {}
    for line in vhci_log.read_text().splitlines():
        if line.startswith("{") and "public_address" in line:
            c = json.loads(line)
            out[c["name"]] = by_address[c["public_address"].upper()]
    return out


async def bumble_checks(st: Stack, rec: Recorder, names: dict[str, str], main_conf: Path, out: Path) -> None:
    """On modelled controllers: the legacy chip's refusal, and RSSI from the radio model."""
    PAIRS["bumble"] = (names["near"], names["rx"])
    rec.only = {"caps", "register", "rotate-while-scanning", "update-while-scanning"}
    await raw_checks(st, rec, "bumble")
    rec.only = None
    await st.discovery(names["rx"], True)  # the listener, for what the agent's rotations put on air
    await agent_checks(rec, "bumble", main_conf)
    await st.discovery(names["rx"], False)
    from agent.ble.bluez import BluezAdvertiser, BluezScanner
    from agent.clock import RealClock
    from agent.protocol.payload import EN_SERVICE_UUID16

    async def rssi_by_distance() -> dict[str, Any]:
        """The agent's scanner on rx hears near (1 m) and far (8 m) with the model's RSSI.
        Linux turns the controller's duplicate filter on, so a peer is reported once per
        address and payload: both rotate every 0.6 s to be heard often."""
        clock = RealClock()
        near = BluezAdvertiser(names["near"], clock=clock, service_uuid16=EN_SERVICE_UUID16)
        far = BluezAdvertiser(names["far"], clock=clock, service_uuid16=EN_SERVICE_UUID16)
        scanner = BluezScanner(names["rx"], clock=clock, service_uuid16=EN_SERVICE_UUID16)
        heard: list[tuple[int, int]] = []

        async def scan() -> None:
            async for s in scanner.sightings():
                data = next(iter(s.service_data.values()), b"")
                heard.append((data[16] if len(data) > 16 else -1, s.rssi))  # AEM byte 0: 0x40 near, 0x41 far

        task = asyncio.create_task(scan())
        try:
            await asyncio.sleep(1.5)
            for i in range(12):
                await (near.rotate if i else near.start)(bytes([i]) * 16 + bytes([0x40, 0, 0, 0]), "")
                await (far.rotate if i else far.start)(bytes([i]) * 16 + bytes([0x41, 0, 0, 0]), "")
                await asyncio.sleep(0.6)
        finally:
            task.cancel()
            await scanner.stop()
            await near.stop()
            await far.stop()
        return {"near": [r for p, r in heard if p == 0x40], "far": [r for p, r in heard if p == 0x41]}

    await rec.run("bumble", "rssi-by-distance", rssi_by_distance)

    config = out / "agent" / "ctagent.toml"  # `ctagent init` ran on the host (test_realstack.py)
    if not config.exists():
        return

    async def ctagent_run() -> dict[str, Any]:
        """``ctagent run --radio bluez`` on rx (initialised on the host) while near and far
        broadcast Exposure Notification frames, rotating so that each is reported."""
        import signal
        import subprocess
        import sys

        clock = RealClock()
        near = BluezAdvertiser(names["near"], clock=clock, service_uuid16=EN_SERVICE_UUID16)
        far = BluezAdvertiser(names["far"], clock=clock, service_uuid16=EN_SERVICE_UUID16)
        # SQLite gets "disk I/O error" on the 9p share: the store runs on the VM's tmpfs and
        # is copied back for the host to read
        shared = Path(tomllib.loads(config.read_text())["agent"]["data_dir"])
        local = Path("/tmp/ctagent-data")
        shutil.copytree(shared, local, dirs_exist_ok=True)
        status = local / "status.json"
        env = {**os.environ, "CTAGENT_CONFIG": str(config), "CTAGENT_AGENT_DATA_DIR": str(local),
               "CTAGENT_RADIO_ADAPTER": names["rx"], "CTAGENT_AGENT_FLUSH_INTERVAL_S": "1",
               "CTAGENT_AGENT_CLOCK_CHECK": "off"}
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--radio", "bluez"], env=env,
                                stderr=subprocess.PIPE, text=True)
        figures: dict[str, Any] = {}
        deadline = time.monotonic() + 120  # the daemon's start alone takes 20-40 s in the VM
        try:
            for i in range(1000):
                if time.monotonic() > deadline:
                    break
                if figures.get("sightings", 0) and deadline - time.monotonic() > 12:
                    deadline = time.monotonic() + 12  # it hears: 12 s more, for both peers
                rpi = bytes([i % 256]) * 16
                await (near.rotate if i else near.start)(rpi + bytes([0x40, 0, 0, 0]), "")
                await (far.rotate if i else far.start)(rpi + bytes([0x41, 0, 0, 0]), "")
                await asyncio.sleep(0.5)
                with contextlib.suppress(OSError, ValueError):
                    figures = json.loads(status.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
            await near.stop()
            await far.stop()
            shutil.copytree(local, shared, dirs_exist_ok=True)
        return {"exit": code, "figures": figures, "stderr": proc.stderr.read()[-1500:] if proc.stderr else ""}

    await rec.run("bumble", "ctagent-run", ctagent_run, timeout_s=180)


async def main(privacy: str, phase: str, out: Path, main_conf: Path, vhci_log: Path | None) -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    st = Stack(bus)
    rec = Recorder(privacy)
    t0 = time.time()
    if vhci_log is not None:
        names = await find_bumble(st, vhci_log)
        print("bumble", names, flush=True)
        await bumble_checks(st, rec, names, main_conf, out)
    else:
        PAIRS.update(await find_pairs(st))
        print("pairs", PAIRS, flush=True)
        if privacy != "off":  # frames, errors, limits and intervals do not depend on Privacy
            rec.only = {"caps", "register", "rotate-while-scanning", "update-while-scanning", "agent-rotate-update",
                        "doctor", "gatt-beside-en", "agent-too-long"}
        for kind in list(PAIRS):
            await raw_checks(st, rec, kind)
        for kind in list(PAIRS):
            await agent_checks(rec, kind, main_conf)
        await too_long(rec)
    (out / f"observations-{phase}.json").write_text(json.dumps(
        {"privacy": privacy, "pairs": PAIRS, "seconds": time.time() - t0, "observations": rec.observations},
        indent=1))
    bus.disconnect()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--privacy", required=True)
    ap.add_argument("--phase", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--main-conf", type=Path, default=Path("/run/realstack/main.conf"))
    ap.add_argument("--vhci", type=Path, default=None, help="agent.ble.bumble.vhci's output: the bumble phase")
    a = ap.parse_args()
    asyncio.run(main(a.privacy, a.phase, a.out, a.main_conf, a.vhci))
