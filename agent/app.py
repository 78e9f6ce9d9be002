"""The composition root: configuration -> store, protocol mode, radio, daemon.

The only place that turns settings into objects; the CLI calls it, the rest of the
package is handed what it needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path
from typing import Any

from .ble import open_radio
from .ble.base import RadioRequest
from .ble.duty_cycle import parse_duty_cycle
from .clock import Clock, RealClock
from .config import TEMPLATE, Config, load_config
from .daemon import Daemon
from .device import detect_device_model
from .errors import ConfigError, StoreError, UserError
from .exposure.calibration import CalibrationTable, DeviceCalibration, bundled_calibration_path
from .files import write_private_file
from .modes import mode_class
from .modes.base import DeviceContext, ProtocolMode
from .store import KeyFile, MasterKeySource, Passphrase, Store, create_key_file

log = logging.getLogger("ctagent.app")


def key_source(cfg: Config) -> MasterKeySource:
    if cfg.agent.key == "keyfile":
        return KeyFile(cfg.key_file)
    pw = os.environ.get("CTAGENT_PASSPHRASE")
    if not pw:
        raise ConfigError("the store is protected by a passphrase: set CTAGENT_PASSPHRASE")
    return Passphrase(pw)


def init_device(cfg_path: Path, *, data_dir: Path, key: str, radio: str, force: bool = False,
                device_model: str | None = None) -> Config:
    """Write a commented configuration and create the encrypted store. ``device_model``:
    as given, else as the machine says (:func:`agent.device.detect_device_model`)."""
    if cfg_path.exists() and not force:
        raise ConfigError(f"{cfg_path} already exists (use --force to overwrite it)")
    model = (device_model or detect_device_model() or "unknown").replace('"', "'")
    try:
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(cfg_path, TEMPLATE.format(data_dir=str(data_dir), key=key, radio=radio,
                                                     device_model=model).encode())
        cfg = load_config(cfg_path, env={})
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.data_dir, 0o700)
        if not cfg.db_path.exists():
            if key == "keyfile" and not cfg.key_file.exists():
                create_key_file(cfg.key_file)
            Store.create(cfg.db_path, key_source(cfg), retention_days=cfg.agent.retention_days).close()
    except OSError as e:
        raise UserError(f"cannot write {e.filename or cfg_path}: {e.strerror}") from None
    return cfg


def open_store(cfg: Config, clock: Clock | None = None, *, read_only: bool = False) -> Store:
    """The device's store: for writing (one process at a time), or ``read_only`` beside it."""
    if not cfg.db_path.exists():
        raise StoreError(f"no store at {cfg.db_path}; run `ctagent init` first")
    return Store.open(cfg.db_path, key_source(cfg), clock=clock or RealClock(), retention_days=cfg.agent.retention_days,
                      read_only=read_only)


def calibration_table(cfg: Config) -> CalibrationTable:
    """The configured lists (they win) and the bundled one."""
    return CalibrationTable.load(*cfg.agent.calibration_files, bundled_calibration_path())


def calibration(cfg: Config) -> DeviceCalibration:
    return calibration_table(cfg).lookup(cfg.agent.device_model)


def calibration_warning(cfg: Config) -> str | None:
    """One sentence when the configured model is not in the lists (default calibration)."""
    warning = calibration_table(cfg).warning(cfg.agent.device_model)
    return None if warning is None else f"{cfg.source}: {warning}"


def open_mode(cfg: Config, store: Store, clock: Clock | None = None, *, rng: random.Random | None = None
              ) -> ProtocolMode[Any]:
    """The configured protocol family on this store; its setting errors name the file."""
    ctx = DeviceContext(
        store=store, clock=clock or RealClock(), calibration=calibration(cfg), proximity=cfg.proximity,
        backend_url=cfg.sync.backend_url, trusted_keys=tuple(cfg.sync.trusted_keys), api_key=cfg.sync.robert_api_key,
        rng=rng or random.SystemRandom(), sync_interval_s=cfg.sync.interval_s, sync_jitter_s=cfg.sync.jitter_s,
        max_export_bytes=cfg.sync.max_export_bytes, index_url=cfg.sync.index_url,
        export_base_url=cfg.sync.export_base_url)
    try:
        return mode_class(cfg.agent.protocol)(ctx)
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def build_daemon(cfg: Config, *, radio_kind: str, clock: Clock) -> Daemon:
    store = open_store(cfg, clock)
    try:
        mode = open_mode(cfg, store, clock)
        cal = mode.ctx.calibration
        radio = open_radio(radio_kind, RadioRequest(
            clock=clock, service_uuid16=mode.service_uuid16, adapter=cfg.radio.adapter,
            gatt_status=cfg.radio.gatt_status, tx_power_dbm=cal.tx_power, rx_correction_db=cal.rssi_correction,
            sim_peers=cfg.radio.sim_peers, sim_seed=cfg.radio.sim_seed, simulated_peer=mode.simulated_peer))
    except BaseException:
        store.close()
        raise
    return Daemon(mode, radio, clock=clock, status_path=cfg.data_dir / "status.json",
                  flush_interval_s=cfg.agent.flush_interval_s, on_exposure=cfg.notify.on_exposure,
                  duty_cycle=parse_duty_cycle(cfg.radio.duty_cycle), rng=random.SystemRandom(),
                  radio_start_attempts=cfg.radio.start_attempts)


def run_daemon(cfg: Config, *, radio_kind: str) -> int:
    warning = calibration_warning(cfg)
    if warning:
        log.warning("%s", warning)
    clock = RealClock()
    return asyncio.run(build_daemon(cfg, radio_kind=radio_kind, clock=clock).run())
