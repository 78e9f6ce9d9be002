"""``ctagent doctor``: checks a real device's Bluetooth (kernel, adapter, BlueZ, D-Bus),
and through BlueZ whether the advertisement stays registered while scanning. Each check
says what to fix."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from ...clock import RealClock
from ...errors import RadioError
from ...protocol.payload import EN_SERVICE_UUID16
from ..base import Check
from . import defs
from .advertiser import BluezAdvertiser

MIN_BLUEZ = (5, 50)


def doctor(adapter: str = "hci0") -> tuple[bool, list[Check]]:
    """(all ok, the checks)."""
    checks: list[Check] = []
    sysfs = Path("/sys/class/bluetooth")
    adapters = sorted(p.name for p in sysfs.iterdir()) if sysfs.exists() else []
    checks.append(Check("kernel Bluetooth", sysfs.exists(),
                        "present" if sysfs.exists() else "this machine has no Bluetooth in its kernel "
                        "(no /sys/class/bluetooth): use `ctagent run --radio sim` or a real device"))
    checks.append(Check(f"adapter {adapter}", adapter in adapters,
                        f"found {', '.join(adapters)}" if adapter in adapters else
                        f"no adapter {adapter} (found: {', '.join(adapters) or 'none'}); "
                        "check `rfkill list` and dmesg"))
    if adapter in adapters:
        try:
            rfkill = (sysfs / adapter / "rfkill0" / "state").exists()
        except OSError:
            rfkill = False
        checks.append(Check("adapter not blocked", True, "see `bluetoothctl show` for Powered: yes" if rfkill else
                            "rfkill state unknown"))
    places = ("/usr/libexec/bluetooth/bluetoothd", "/usr/lib/bluetooth/bluetoothd")
    bluetoothd = shutil.which("bluetoothd") or next((p for p in places if Path(p).exists()), None)
    version = ""
    if bluetoothd:
        try:
            run = subprocess.run([bluetoothd, "--version"], capture_output=True, text=True, timeout=5)
            version = run.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            version = ""
    ok_ver = bool(version) and tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) >= MIN_BLUEZ
    checks.append(Check("BlueZ >= 5.50", ok_ver, f"bluetoothd {version}" if version else
                        "bluetoothd not found: `sudo apt install bluez`"))
    bus = Path("/run/dbus/system_bus_socket")
    has_bus = bus.exists() or "DBUS_SYSTEM_BUS_ADDRESS" in os.environ
    checks.append(Check("D-Bus system bus", has_bus,
                        "reachable" if has_bus else "no system bus socket: is dbus running?"))
    if has_bus:
        checks.append(asyncio.run(_check_advertise_while_scanning(adapter)))
    return all(c.ok for c in checks), checks


async def _check_advertise_while_scanning(adapter: str) -> Check:
    """Register our advertisement, start a scan, and check BlueZ still counts it active."""
    name = "advertising while scanning"
    path = defs.adapter_path(adapter)
    adv = BluezAdvertiser(adapter, clock=RealClock(), service_uuid16=EN_SERVICE_UUID16, retries=0)
    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), 5)
    except (TimeoutError, OSError) as e:
        return Check(name, False, f"cannot reach the system bus ({type(e).__name__})")
    try:
        async def call(iface: str, member: str, sig: str = "", body: tuple[object, ...] = ()) -> list[object]:
            r = await bus.call(Message(destination=defs.BLUEZ, path=path, interface=iface, member=member,
                                       signature=sig, body=list(body)))
            if r.message_type == MessageType.ERROR:
                raise RadioError(r.error_name or "org.bluez.Error", str(r.body[0] if r.body else ""))
            return list(r.body)
        await adv.start(bytes(20), "")
        await call(defs.ADAPTER, "SetDiscoveryFilter", "a{sv}", ({},))
        await call(defs.ADAPTER, "StartDiscovery")
        await asyncio.sleep(2)
        (active,) = await call(defs.PROPERTIES, "Get", "ss", (defs.ADVERTISING_MANAGER, "ActiveInstances"))
        await call(defs.ADAPTER, "StopDiscovery")
        if active.value < 1:  # type: ignore[attr-defined]
            return Check(name, False, "BlueZ dropped the advertisement when scanning started: "
                         "set [radio] duty_cycle = \"20,10\"")
        return Check(name, True, "BlueZ keeps advertising while scanning; some Pi kernels still go silent on air: "
                     "confirm with `btmon` or a second device, else set [radio] duty_cycle")
    except RadioError as e:
        hint = " (another program holds the only advertising set?)" if "Maximum" in e.text else ""
        return Check(name, False, f"{e.name}: {e.text}{hint}")
    except OSError as e:
        return Check(name, False, f"BlueZ is not reachable on the system bus ({type(e).__name__})")
    finally:
        try:
            await adv.stop()
        except Exception:  # best effort clean-up of a diagnostic
            pass
        bus.disconnect()
