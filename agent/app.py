"""The composition root: configuration -> store, protocol mode, radio, daemon.

The only place that turns settings into objects; the CLI calls it, the rest of the
package is handed what it needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ble import open_radio
from .ble.base import RadioRequest
from .ble.duty_cycle import parse_duty_cycle
from .clock import Clock, RealClock
from .config import Config, load_config, render_config, settings_of
from .daemon import Daemon
from .device import detect_device_model
from .errors import BackendRejected, ConfigError, StoreError, StoreKeyError, UserError
from .exposure.calibration import CalibrationTable, DeviceCalibration, bundled_calibration_path
from .files import write_private_file
from .modes import mode_class
from .modes.base import DeviceContext, ProtocolMode
from .store import KeyFile, MasterKeySource, Passphrase, Store, create_key_file
from .timesync import ClockGuard
from .timesync import probe as probe_clock

log = logging.getLogger("ctagent.app")


#: the systemd credential (``LoadCredential=ctagent-passphrase:/etc/...``) with the passphrase
PASSPHRASE_CREDENTIAL = "ctagent-passphrase"
#: asks a person for the passphrase; the CLI sets it when it runs in a terminal
PassphrasePrompt = Callable[[], str]


def _read_secret_file(path: Path, what: str) -> str:
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"the {what} {path} is readable by others; `chmod 600 {path}`")
    line = text.splitlines()[0] if text else ""
    if not line:
        raise ConfigError(f"the {what} {path} is empty")
    return line


def passphrase(cfg: Config, prompt: PassphrasePrompt | None = None,
               env: Mapping[str, str] | None = None) -> str:
    """The store's passphrase, from the first of: ``$CTAGENT_PASSPHRASE``, ``[agent]
    passphrase_file`` (or ``$CTAGENT_PASSPHRASE_FILE``), the systemd credential
    ``ctagent-passphrase`` (``$CREDENTIALS_DIRECTORY``), ``prompt``."""
    env = os.environ if env is None else env
    if env.get("CTAGENT_PASSPHRASE"):
        return env["CTAGENT_PASSPHRASE"]
    file = cfg.agent.passphrase_file or env.get("CTAGENT_PASSPHRASE_FILE", "")
    if file:
        return _read_secret_file(Path(file).expanduser(), "passphrase file")
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / PASSPHRASE_CREDENTIAL).exists():
        return _read_secret_file(Path(credentials) / PASSPHRASE_CREDENTIAL, "systemd credential")
    if prompt is not None:
        return prompt()
    raise ConfigError("the store is protected by a passphrase: set CTAGENT_PASSPHRASE, [agent] passphrase_file, "
                      f"or the systemd credential {PASSPHRASE_CREDENTIAL}, or run the command in a terminal")


def key_source(cfg: Config, prompt: PassphrasePrompt | None = None) -> MasterKeySource:
    if cfg.agent.key == "keyfile":
        return KeyFile(cfg.key_file)
    return Passphrase(passphrase(cfg, prompt))


def init_device(cfg_path: Path, *, data_dir: Path | None, key: str | None, radio: str | None, force: bool = False,
                device_model: str | None = None, settings: dict[str, dict[str, Any]] | None = None,
                prompt: PassphrasePrompt | None = None) -> Config:
    """Write a commented configuration and create the encrypted store, or nothing at all.
    ``None`` arguments keep what an existing configuration says (``force``), else take
    the default; ``settings`` (section -> key -> value) are written too. ``device_model``:
    as given, else kept, else as the machine says (:func:`agent.device.detect_device_model`).
    The store is created first and the configuration written last, so a failure leaves
    neither behind (an existing store is never touched)."""
    if cfg_path.exists() and not force:
        raise ConfigError(f"{cfg_path} already exists (`--force` rewrites it and keeps its settings)")
    kept: dict[str, dict[str, Any]] = {}
    if cfg_path.exists():
        try:
            kept = settings_of(cfg_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{cfg_path}: cannot keep its settings ({e}); move it away first") from None
    old = kept.get("agent", {})
    chosen = {
        "data_dir": str(data_dir) if data_dir is not None else str(old.get("data_dir", "~/.local/share/ctagent")),
        "key": key or str(old.get("key", "keyfile")),
        "radio": radio or str(kept.get("radio", {}).get("kind", "bluez")),
        "device_model": device_model or str(old.get("device_model") or detect_device_model() or "unknown"),
    }
    merged = {name: dict(values) for name, values in kept.items()}
    for name, values in (settings or {}).items():
        merged.setdefault(name, {}).update(values)
    merged.setdefault("agent", {}).update(data_dir=chosen["data_dir"], key=chosen["key"],
                                          device_model=chosen["device_model"].replace('"', "'"))
    merged.setdefault("radio", {})["kind"] = chosen["radio"]
    text = render_config(merged, **chosen)
    cfg = parse_config(text, cfg_path)
    created: list[Path] = []
    try:
        if not cfg.data_dir.exists():
            cfg.data_dir.mkdir(parents=True, mode=0o700)
            created.append(cfg.data_dir)
        os.chmod(cfg.data_dir, 0o700)
        if not cfg.db_path.exists():
            if cfg.agent.key == "keyfile" and not cfg.key_file.exists():
                create_key_file(cfg.key_file)
                created.append(cfg.key_file)
            created.append(cfg.db_path)
            Store.create(cfg.db_path, key_source(cfg, prompt), retention_days=cfg.agent.retention_days).close()
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(cfg_path, text.encode())
    except BaseException as e:
        for path in reversed(created):  # what this init made, nothing else
            _remove_new(path)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {e.filename or cfg_path}: {e.strerror}") from None
        raise
    return cfg


def _remove_new(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
              path.with_name(path.name + "-journal")):
        p.unlink(missing_ok=True)


def parse_config(text: str, path: Path) -> Config:
    """A configuration's text, validated as :func:`load_config` does, before it is written."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / path.name
        tmp.write_text(text, encoding="utf-8")
        try:
            cfg = load_config(tmp, env={})
        except ConfigError as e:
            raise ConfigError(str(e).replace(str(tmp), str(path))) from None
    cfg.source = str(path)
    return cfg


def fetch_backend_key(backend_url: str, *, timeout_s: float = 10.0) -> str:
    """The export signing public key a backend publishes (``/v1/public-key``), checked to
    be a usable P-256 key; the caller shows its fingerprint before trusting it."""
    from .protocol.export import ExportError, load_public_key
    from .sync.http import JsonHttp

    client = JsonHttp(backend_url, what="the backend", clock=RealClock(), timeout_s=timeout_s)
    try:
        r = client.request("GET", "/v1/public-key")
    finally:
        client.close()
    try:
        key = r.json().get("publicKey") if r.status_code == 200 else None
    except (ValueError, AttributeError):
        key = None
    if not isinstance(key, str):
        raise BackendRejected(f"{backend_url}/v1/public-key did not answer a public key (HTTP {r.status_code}); "
                              "is this a ctagent backend?", status=r.status_code)
    try:
        load_public_key(key)
    except ExportError as e:
        raise BackendRejected(f"{backend_url}/v1/public-key: {e}", status=r.status_code) from None
    return key


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_configuration(cfg_path: Path) -> list[Check]:
    """``ctagent config check``: each thing the agent needs from its configuration, tried."""
    from .protocol.export import key_fingerprint

    try:
        cfg = load_config(cfg_path)
    except UserError as e:
        return [Check("settings", False, str(e))]
    checks = [Check("settings", True, f"{cfg.source} is valid ({cfg.agent.protocol}, radio {cfg.radio.kind})")]
    try:
        with open_store(cfg, read_only=True) as store:
            checks.append(Check("store", True, f"{cfg.db_path} opens with its master key ({cfg.agent.key}), "
                                               f"{len(store.keyring.days())} day key(s)"))
    except UserError as e:
        checks.append(Check("store", False, str(e)))
    warning = calibration_warning(cfg)
    checks.append(Check("calibration", True, f"warning: {warning}" if warning else
                        f"{cfg.agent.device_model} is in the calibration list"))
    if not cfg.sync.backend_url:
        checks.append(Check("backend", True, "none configured: no sync (set [sync] backend_url)"))
    elif cfg.agent.protocol == "gaen":
        try:
            key = fetch_backend_key(cfg.sync.backend_url)
        except UserError as e:
            checks.append(Check("backend", False, str(e)))
        else:
            trusted = key in cfg.sync.trusted_keys
            checks.append(Check("backend", trusted, f"{cfg.sync.backend_url} signs with {key_fingerprint(key)}, "
                                + ("a trusted key" if trusted else "which is not in [sync] trusted_keys: every "
                                   "sync would fail (`ctagent init --force --backend-url URL` trusts it)")))
    else:
        checks.append(Check("backend", True, f"{cfg.sync.backend_url} (not contacted for {cfg.agent.protocol})"))
    return checks


def rotate_master_key(cfg: Config, *, prompt: PassphrasePrompt | None = None,
                      new_passphrase: str | None = None) -> None:
    """Re-wrap the store's day keys under a new master key (a new key file, or
    ``new_passphrase``). Key file: the new file is written beside the old one first and
    renamed over it after the re-wrap; :func:`open_store` finishes a rotation that a
    power cut interrupted between the two."""
    with open_store(cfg, prompt=prompt) as store:
        if cfg.agent.key == "passphrase":
            if not new_passphrase:
                raise ConfigError("a new passphrase is needed to rotate the master key")
            store.rotate_master_key(Passphrase(new_passphrase))
            return
        pending = _pending_key_file(cfg)
        pending.unlink(missing_ok=True)
        create_key_file(pending)
        store.rotate_master_key(KeyFile(pending))
        os.replace(pending, cfg.key_file)


def _pending_key_file(cfg: Config) -> Path:
    return cfg.key_file.with_name(cfg.key_file.name + ".new")


def open_store(cfg: Config, clock: Clock | None = None, *, read_only: bool = False,
               prompt: PassphrasePrompt | None = None) -> Store:
    """The device's store: for writing (one process at a time), or ``read_only`` beside it."""
    if not cfg.db_path.exists():
        raise StoreError(f"no store at {cfg.db_path}; run `ctagent init` first")
    prompt = prompt or PASSPHRASE_PROMPT.get("prompt")
    options: dict[str, Any] = {"clock": clock or RealClock(), "retention_days": cfg.agent.retention_days,
                               "read_only": read_only, "research_retention_days": cfg.experiment.retention_days}
    pending = _pending_key_file(cfg)
    if cfg.agent.key == "keyfile" and pending.exists():  # a rotation was cut short: which key opens it?
        try:
            store = Store.open(cfg.db_path, KeyFile(cfg.key_file), **options)
        except StoreKeyError:
            store = Store.open(cfg.db_path, KeyFile(pending), **options)
            os.replace(pending, cfg.key_file)
            log.warning("store: finished a master key rotation that had been interrupted")
            return store
        pending.unlink(missing_ok=True)  # the re-wrap never happened: the old key stays
        return store
    return Store.open(cfg.db_path, key_source(cfg, prompt), **options)


#: ``{"prompt": fn}`` when a person is at a terminal (set by the CLI): passphrase stores ask
PASSPHRASE_PROMPT: dict[str, PassphrasePrompt] = {}


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
        server_public_key=cfg.sync.robert_server_public_key,
        captcha=(cfg.sync.robert_captcha, cfg.sync.robert_captcha_id),
        rng=rng or random.SystemRandom(), sync_interval_s=cfg.sync.interval_s, sync_jitter_s=cfg.sync.jitter_s,
        max_export_bytes=cfg.sync.max_export_bytes, index_url=cfg.sync.index_url,
        export_base_url=cfg.sync.export_base_url, chaff_interval_s=cfg.sync.chaff_interval_s,
        http_timeout_s=cfg.sync.timeout_s)
    try:
        return mode_class(cfg.agent.protocol)(ctx)
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def build_daemon(cfg: Config, *, radio_kind: str, clock: Clock, clock_guard: ClockGuard | None = None) -> Daemon:
    store = open_store(cfg, clock)
    try:
        mode = open_mode(cfg, store, clock)
        refusal = mode.refuse_to_run()
        if refusal:
            raise UserError(refusal)
        cal = mode.ctx.calibration
        radio = open_radio(radio_kind, RadioRequest(
            clock=clock, service_uuid16=mode.service_uuid16, adapter=cfg.radio.adapter,
            gatt_status=cfg.radio.gatt_status, tx_power_dbm=cal.tx_power, rx_correction_db=cal.rssi_correction,
            sim_peers=cfg.radio.sim_peers, sim_seed=cfg.radio.sim_seed, simulated_peer=mode.simulated_peer,
            sim_medium=cfg.radio.sim_medium, sim_name=cfg.radio.sim_name,
            bumble_transport=cfg.radio.bumble_transport, bumble_snoop=cfg.radio.bumble_snoop))
    except BaseException:
        store.close()
        raise
    research = None
    if cfg.experiment.id:
        from .experiment.recording import RadioFacts, ResearchRecorder

        research = ResearchRecorder(store, started_at=clock.now())
        store.state.put(RadioFacts(radio_kind, radio.advertising_interval_s, radio.scan_duty))
    return Daemon(mode, radio, clock=clock, status_path=cfg.data_dir / "status.json",
                  flush_interval_s=cfg.agent.flush_interval_s, on_exposure=cfg.notify.on_exposure,
                  duty_cycle=parse_duty_cycle(cfg.radio.duty_cycle), rng=random.SystemRandom(),
                  radio_start_attempts=cfg.radio.start_attempts, clock_guard=clock_guard, research=research)


def run_daemon(cfg: Config, *, radio_kind: str) -> int:
    warning = calibration_warning(cfg)
    if warning:
        log.warning("%s", warning)
    clock = RealClock()
    guard = ClockGuard(probe_clock, cfg.agent.clock_check, cfg.agent.clock_sync_wait_s,  # type: ignore[arg-type]
                       cfg.agent.max_clock_error_s)
    return asyncio.run(build_daemon(cfg, radio_kind=radio_kind, clock=clock, clock_guard=guard).run())
