"""``ctagent doctor``: checks a real device's Bluetooth (kernel, adapter, BlueZ, D-Bus),
and through BlueZ whether the advertisement stays registered while scanning. Each check
says what to fix."""

from __future__ import annotations

import asyncio
import configparser
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
MAIN_CONF = Path("/etc/bluetooth/main.conf")


def bluez_privacy(main_conf: Path = MAIN_CONF) -> str:
    """``[General] Privacy`` of bluetoothd's main.conf ("off", BlueZ's default, when unset)."""
    parser = configparser.ConfigParser(strict=False, inline_comment_prefixes=("#",))
    try:
        parser.read_string(main_conf.read_text())
    except (OSError, configparser.Error):
        return "off"
    return parser.get("General", "Privacy", fallback="off").strip().lower() or "off"


def doctor(adapter: str = "hci0", main_conf: Path = MAIN_CONF) -> tuple[bool, list[Check]]:
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
        checks.extend(asyncio.run(_check_rotation_while_scanning(adapter, bluez_privacy(main_conf))))
    return all(c.ok for c in checks), checks


async def _check_rotation_while_scanning(adapter: str, privacy: str) -> list[Check]:
    """Advertise, scan, then rotate as a plain re-registration would (what fails on a legacy
    controller: it refuses a new random address while scanning) and, where that fails, as
    the agent does there (scanning paused around it); then whether BlueZ still counts the
    advertisement active, and whether addresses can rotate at all with this Privacy."""
    path = defs.adapter_path(adapter)
    adv = BluezAdvertiser(adapter, clock=RealClock(), service_uuid16=EN_SERVICE_UUID16, retries=0)
    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), 5)
    except (TimeoutError, OSError) as e:
        return [Check("rotation while scanning", False, f"cannot reach the system bus ({type(e).__name__})")]
    checks: list[Check] = []
    try:
        async def call(iface: str, member: str, sig: str = "", body: tuple[object, ...] = ()) -> list[object]:
            r = await bus.call(Message(destination=defs.BLUEZ, path=path, interface=iface, member=member,
                                       signature=sig, body=list(body)))
            if r.message_type == MessageType.ERROR:
                raise RadioError(r.error_name or "org.bluez.Error", str(r.body[0] if r.body else ""))
            return list(r.body)

        await adv.start(bytes(20), "")
        legacy = adv.extended is False
        checks.append(Check("controller", True, "legacy advertising (Bluetooth 4.x): the agent pauses scanning "
                            "around each rotation" if legacy else "extended advertising (Bluetooth 5)"))
        await call(defs.ADAPTER, "SetDiscoveryFilter", "a{sv}", ({},))
        await call(defs.ADAPTER, "StartDiscovery")
        try:
            await adv.rotate(bytes([1]) * 20, "")
            detail = "BlueZ rotates the advertisement while this adapter scans"
        except RadioError as e:
            if not legacy:
                raise
            await call(defs.ADAPTER, "StopDiscovery")  # what the agent does on a legacy controller
            t0 = asyncio.get_running_loop().time()
            await adv.rotate(bytes([2]) * 20, "")
            await call(defs.ADAPTER, "StartDiscovery")
            detail = (f"the controller refuses a rotation while it scans ({e.name}: {e.text}); with scanning "
                      f"paused it works ({asyncio.get_running_loop().time() - t0:.2f} s without scanning)")
        await asyncio.sleep(1)
        (active,) = await call(defs.PROPERTIES, "Get", "ss", (defs.ADVERTISING_MANAGER, "ActiveInstances"))
        await call(defs.ADAPTER, "StopDiscovery")
        if active.value < 1:  # type: ignore[attr-defined]
            checks.append(Check("rotation while scanning", False, "BlueZ dropped the advertisement when scanning "
                                "started: set [radio] duty_cycle = \"20,10\""))
        else:
            checks.append(Check("rotation while scanning", True, detail + "; some Pi kernels still go silent on "
                                "air: confirm with `btmon` or a second device, else set [radio] duty_cycle"))
        if legacy and privacy != "off":
            checks.append(Check("address rotates with the payload", False,
                                f"bluetoothd has Privacy = {privacy}: a legacy controller then keeps one resolvable "
                                "address across rotations (until the kernel's 15-minute timer), so payload and "
                                "address do not change together; set Privacy = off in /etc/bluetooth/main.conf"))
        return checks
    except RadioError as e:
        hint = " (another program holds the advertising sets?)" if "Maximum" in e.text else ""
        return [*checks, Check("rotation while scanning", False, f"{e.name}: {e.text}{hint}")]
    except OSError as e:
        return [*checks, Check("rotation while scanning", False,
                               f"BlueZ is not reachable on the system bus ({type(e).__name__})")]
    finally:
        try:
            await adv.stop()
        except Exception:  # best effort clean-up of a diagnostic
            pass
        bus.disconnect()
