"""What the CLI commands do, behind the thin click layer: open the store from the
configuration, build the agent and daemon, research export, purge, doctor."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import logging
import os
import random
import secrets
import shutil
import subprocess
from pathlib import Path

from .agent import Agent
from .config import TEMPLATE, Config, ConfigError
from .exposure.calibration import CalibrationTable, bundled_calibration_path
from .store import KeyFile, Passphrase, Store, StoreError, create_key_file, keyring_path
from .store.keys import write_private_file


class LogFormatter(logging.Formatter):
    """One line per event, key=value, UTC time. Callers never pass identifiers or keys."""

    def format(self, record: logging.LogRecord) -> str:
        import datetime as dt
        ts = dt.datetime.fromtimestamp(record.created, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"ts={ts} level={record.levelname} logger={record.name} msg=\"{record.getMessage()}\""


def setup_logging(level: str = "INFO") -> None:
    h = logging.StreamHandler()
    h.setFormatter(LogFormatter())
    root = logging.getLogger("ctagent")
    root.handlers[:] = [h]
    root.setLevel(level)


def key_source(cfg: Config):
    if cfg.agent.key == "keyfile":
        return KeyFile(cfg.key_file)
    pw = os.environ.get("CTAGENT_PASSPHRASE")
    if not pw:
        raise ConfigError("the store is protected by a passphrase: set CTAGENT_PASSPHRASE")
    return Passphrase(pw)


def init(cfg_path: Path, *, data_dir: Path, key: str, radio: str, force: bool = False) -> Config:
    from .config import load_config
    if cfg_path.exists() and not force:
        raise ConfigError(f"{cfg_path} already exists (use --force to overwrite it)")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(cfg_path, TEMPLATE.format(data_dir=str(data_dir), key=key, radio=radio).encode())
    cfg = load_config(cfg_path, env={})
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.data_dir, 0o700)
    if not cfg.db_path.exists():
        if key == "keyfile" and not cfg.key_file.exists():
            create_key_file(cfg.key_file)
        Store.create(cfg.db_path, key_source(cfg), retention_days=cfg.agent.retention_days).close()
    return cfg


def open_store(cfg: Config, clock=None) -> Store:
    import time
    if not cfg.db_path.exists():
        raise StoreError(f"no store at {cfg.db_path}; run `ctagent init` first")
    return Store.open(cfg.db_path, key_source(cfg), clock=clock or time.time, retention_days=cfg.agent.retention_days)


def calibration(cfg: Config):
    table = CalibrationTable.load(*cfg.agent.calibration_files, bundled_calibration_path())
    return table.lookup(cfg.agent.device_model)


def make_agent(cfg: Config, store: Store) -> Agent:
    return Agent(store, calibration=calibration(cfg), config=cfg.proximity)


def sync_client(cfg: Config):
    if not cfg.sync.backend_url:
        return None
    from .sync import SyncClient
    return SyncClient(cfg.sync.backend_url, trusted_keys=cfg.sync.trusted_keys)


def robert_device(cfg: Config, store: Store):
    from .robert_agent import RobertDevice
    if not cfg.sync.backend_url:
        raise ConfigError(f"{cfg.source}: [sync] backend_url: ROBERT mode needs its server")
    return RobertDevice(store, cfg.sync.backend_url, tx_power=int(round(calibration(cfg).tx_power)),
                        api_key=cfg.sync.robert_api_key or None)


def run_daemon(cfg: Config, *, radio: str) -> int:
    from .clock import RealClock
    from .daemon import Daemon
    clock = RealClock()
    store = open_store(cfg)
    agent = make_agent(cfg, store)
    robert_mode = cfg.agent.protocol == "robert"
    rdev = robert_device(cfg, store) if robert_mode else None
    if radio == "sim":
        from .ble.simradio import SimAdvertiser, SimScanner
        cal = agent.calibration
        adv, scan = SimAdvertiser(clock), SimScanner(clock, peers=cfg.radio.sim_peers, seed=cfg.radio.sim_seed,
                                                     tx_cal=cal.tx_power, rx_corr=cal.rssi_correction,
                                                     protocol=cfg.agent.protocol)
    else:
        from .ble.bluez import BluezAdvertiser, BluezScanner
        from .ble.simradio import ROBERT_SERVICE_UUID
        from .protocol.payload import EN_SERVICE_UUID
        adv = BluezAdvertiser(cfg.radio.adapter, service_uuid16="FD64" if robert_mode else "FD6F")
        scan = BluezScanner(cfg.radio.adapter, service_uuid=ROBERT_SERVICE_UUID if robert_mode else EN_SERVICE_UUID)
    gatt = None
    if cfg.radio.gatt_status:
        from .ble.gatt import GattStatusService
        gatt = GattStatusService(cfg.radio.adapter)
    duty = None
    if cfg.radio.duty_cycle and radio == "bluez":
        duty = tuple(float(x) for x in cfg.radio.duty_cycle.split(","))
    d = Daemon(agent, clock=clock, advertiser=adv, scanner=scan,
               sync_client=None if robert_mode else sync_client(cfg), robert=rdev,
               status_path=cfg.data_dir / "status.json", flush_interval_s=cfg.agent.flush_interval_s,
               sync_interval_s=cfg.sync.interval_s, sync_jitter_s=cfg.sync.jitter_s,
               on_exposure=cfg.notify.on_exposure, gatt=gatt, duty_cycle=duty, rng=random.SystemRandom())
    return asyncio.run(d.run())


def encounter_summary(store: Store) -> list[dict]:
    """Per day: encounters (distinct RPIs heard), samples, minutes observed. Nothing identifying."""
    days: dict[int, dict] = {}
    for e in store.encounters():
        d = days.setdefault(e.day, {"day": e.day, "encounters": 0, "samples": 0, "windows": 0})
        d["encounters"] += 1
        d["samples"] += e.sample_count
        d["windows"] += len(e.windows)
    return [days[k] for k in sorted(days)]


def research_export(store: Store, fmt: str) -> str:
    """Pseudonymised encounter summaries: a fresh random salt per export, so pseudonyms
    cannot be linked across exports or back to RPIs; times rounded to the minute."""
    salt = secrets.token_bytes(32)
    rows = []
    for e in store.encounters():
        rows.append({
            "pseudonym": hmac.new(salt, e.rpi, hashlib.sha256).hexdigest()[:12],
            "day": e.day, "first_minute": int(e.first_seen // 60) * 60, "last_minute": int(e.last_seen // 60) * 60,
            "windows": len(e.windows), "samples": e.sample_count,
            "rssi_mean_dbm": round(sum(w.rssi_mean for w in e.windows) / max(1, len(e.windows)), 1),
            "rssi_max_dbm": max((w.rssi_max for w in e.windows), default=None),
        })
    if fmt == "json":
        return json.dumps(rows, indent=1)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["pseudonym"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def purge(cfg: Config) -> list[str]:
    """Erase everything: the keyring first (crypto-erasure), then the database files."""
    removed = []
    for p in [keyring_path(cfg.db_path), cfg.db_path, Path(str(cfg.db_path) + "-wal"), Path(str(cfg.db_path) + "-shm"),
              cfg.data_dir / "status.json"]:
        if p.exists():
            size = p.stat().st_size
            with open(p, "r+b") as f:  # overwrite before unlinking (best effort on flash)
                f.write(b"\0" * size)
                f.flush()
                os.fsync(f.fileno())
            p.unlink()
            removed.append(str(p))
    return removed


def doctor(adapter: str = "hci0") -> tuple[bool, list[tuple[str, bool, str]]]:
    """Checks for a real device. Returns (ok, [(check, ok, detail or what to fix)])."""
    checks: list[tuple[str, bool, str]] = []
    sysfs = Path("/sys/class/bluetooth")
    adapters = sorted(p.name for p in sysfs.iterdir()) if sysfs.exists() else []
    checks.append(("kernel Bluetooth", sysfs.exists(),
                   "present" if sysfs.exists() else "this machine has no Bluetooth in its kernel "
                   "(no /sys/class/bluetooth): use `ctagent run --radio sim` or a real device"))
    checks.append((f"adapter {adapter}", adapter in adapters,
                   f"found {', '.join(adapters)}" if adapter in adapters else
                   f"no adapter {adapter} (found: {', '.join(adapters) or 'none'}); check `rfkill list` and dmesg"))
    if adapter in adapters:
        try:
            powered = (sysfs / adapter / "rfkill0" / "state").exists()
        except OSError:
            powered = False
        checks.append(("adapter not blocked", True, "see `bluetoothctl show` for Powered: yes" if powered else
                       "rfkill state unknown"))
    bluetoothd = shutil.which("bluetoothd") or next((p for p in ("/usr/libexec/bluetooth/bluetoothd",
                                                                  "/usr/lib/bluetooth/bluetoothd") if Path(p).exists()), None)
    version = ""
    if bluetoothd:
        try:
            version = subprocess.run([bluetoothd, "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            version = ""
    ok_ver = bool(version) and tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) >= (5, 50)
    checks.append(("BlueZ >= 5.50", ok_ver, f"bluetoothd {version}" if version else
                   "bluetoothd not found: `sudo apt install bluez`"))
    bus = Path("/run/dbus/system_bus_socket")
    has_bus = bus.exists() or "DBUS_SYSTEM_BUS_ADDRESS" in os.environ
    checks.append(("D-Bus system bus", has_bus, "reachable" if has_bus else "no system bus socket: is dbus running?"))
    if has_bus:
        checks.append(asyncio.run(_check_advertise_while_scanning(adapter)))
    return all(ok for _, ok, _ in checks), checks


async def _check_advertise_while_scanning(adapter: str) -> tuple[str, bool, str]:
    """Register our advertisement, start a scan, and check BlueZ still counts it active."""
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    from .ble.bluez import BluezAdvertiser, BluezError
    name = "advertising while scanning"
    path = f"/org/bluez/{adapter}"
    adv = BluezAdvertiser(adapter, retries=0)
    try:
        bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), 5)
    except (OSError, asyncio.TimeoutError) as e:
        return name, False, f"cannot reach the system bus ({type(e).__name__})"
    try:
        async def call(iface, member, sig="", body=()):
            r = await bus.call(Message(destination="org.bluez", path=path, interface=iface, member=member,
                                       signature=sig, body=list(body)))
            if r.message_type == MessageType.ERROR:
                raise BluezError(r.error_name, str(r.body[0] if r.body else ""))
            return r.body
        await adv.start(bytes(20), "")
        await call("org.bluez.Adapter1", "SetDiscoveryFilter", "a{sv}", [{}])
        await call("org.bluez.Adapter1", "StartDiscovery")
        await asyncio.sleep(2)
        (active,) = await call("org.freedesktop.DBus.Properties", "Get", "ss",
                               ["org.bluez.LEAdvertisingManager1", "ActiveInstances"])
        await call("org.bluez.Adapter1", "StopDiscovery")
        if active.value < 1:
            return name, False, "BlueZ dropped the advertisement when scanning started: set [radio] duty_cycle = \"20,10\""
        return name, True, ("BlueZ keeps advertising while scanning; some Pi kernels still go silent on air: "
                            "confirm with `btmon` or a second device, else set [radio] duty_cycle")
    except BluezError as e:
        hint = " (another program holds the only advertising set?)" if "Maximum" in e.text else ""
        return name, False, f"{e.name}: {e.text}{hint}"
    except OSError as e:
        return name, False, f"BlueZ is not reachable on the system bus ({type(e).__name__})"
    finally:
        try:
            await adv.stop()
        except Exception:  # noqa: BLE001
            pass
        bus.disconnect()
