"""Configuration: one TOML file, overridable by environment variables
(``CTAGENT_<SECTION>_<KEY>``, e.g. ``CTAGENT_SYNC_BACKEND_URL``) and by CLI flags.
Invalid settings are rejected at start with the file, the key and the reason."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .ble import RADIO_KINDS
from .ble.duty_cycle import parse_duty_cycle
from .errors import ConfigError
from .exposure.rule import ProximityConfig


#: the protocol family when none is configured
DEFAULT_PROTOCOL = "gaen"


@dataclass
class AgentSection:
    #: a protocol family of agent.modes: "gaen" (Exposure Notification, decentralized)
    #: or "robert" (centralized, StopCovid)
    protocol: str = DEFAULT_PROTOCOL
    data_dir: str = "~/.local/share/ctagent"
    #: master key: "keyfile" (a 0600 file in data_dir) or "passphrase" (see agent.app.passphrase)
    key: str = "keyfile"
    #: key = "passphrase": a 0600 file whose first line is the passphrase (else
    #: $CTAGENT_PASSPHRASE, a systemd credential or a prompt)
    passphrase_file: str = ""
    retention_days: int = 14
    #: this device's model, looked up in the calibration list (agent/exposure/calibration.csv);
    #: `ctagent init` writes the detected one
    device_model: str = "unknown"
    #: extra calibration lists (Google EN format)
    calibration_files: list[str] = field(default_factory=list)
    flush_interval_s: float = 60.0
    #: advertise only with a right clock (agent.timesync): "auto" (never with a clock
    #: before the build date; wait for a running time service up to clock_sync_wait_s),
    #: "strict" (only synchronised, error within max_clock_error_s) or "off"
    clock_check: str = "auto"
    clock_sync_wait_s: float = 300.0
    max_clock_error_s: float = 60.0


@dataclass
class RadioSection:
    #: "bluez" (a real adapter through BlueZ), "bumble" (a dedicated HCI controller,
    #: bumble_transport) or "sim" (the simulated medium with virtual peers)
    kind: str = "sim"
    adapter: str = "hci0"
    #: peers around this device when kind = "sim"
    sim_peers: int = 5
    sim_seed: int = 0
    #: serve the exposure status as a GATT characteristic (bless) for a companion device
    gatt_status: bool = False
    #: "ADVERTISE_S,SCAN_S" to alternate phases on controllers that stop advertising
    #: while scanning (some Raspberry Pi kernels); empty: both at once
    duty_cycle: str = ""
    #: attempts to start the radio (with back-off 1, 2, 4, ... s) before `run` gives up
    #: with exit status 3 so that systemd restarts it
    start_attempts: int = 5
    #: kind = "sim" on a medium shared with other processes (`ctagent sim-medium --socket
    #: PATH`): its socket, and this device's name in the medium's scenario
    sim_medium: str = ""
    sim_name: str = ""
    #: kind = "bumble": the controller's bumble transport moniker ("usb:0",
    #: "serial:/dev/ttyACM0,1000000", "tcp-client:127.0.0.1:9001"), and a btsnoop file
    #: of its HCI traffic (empty: none; it holds identifiers: written 0600)
    bumble_transport: str = ""
    bumble_snoop: str = ""


@dataclass
class SyncSection:
    backend_url: str = ""
    #: base64 SubjectPublicKeyInfo of the export signing key(s) to trust
    trusted_keys: list[str] = field(default_factory=list)
    interval_s: float = 4 * 3600.0
    jitter_s: float = 1800.0
    #: ROBERT: the X-API-Key the server requires for registration, if any
    robert_api_key: str = ""
    #: ROBERT: the server's ECDH public key (base64); robert-server does not send it
    #: (ctagent's server does, and is trusted when this is empty)
    robert_server_public_key: str = ""
    #: ROBERT: a captcha solved for robert-server's /register (solution and id)
    robert_captcha: str = ""
    robert_captcha_id: str = ""
    #: GAEN: on average, seconds between two chaff declarations (X-Chaff requests shaped
    #: like a declaration's, at random times); 0, the default: none. The Android app sends
    #: about one in two days (172800)
    chaff_interval_s: float = 0.0
    #: the largest export file downloaded (a real 500,000-key file is about 15 MB);
    #: agent.sync.keyserver.DEFAULT_MAX_EXPORT_BYTES (a test keeps them equal)
    max_export_bytes: int = 32 * 2**20
    #: the key server's index and the base of its export files, when they are elsewhere
    #: than <backend_url>/exports/ (a CDN, a region folder)
    index_url: str = ""
    export_base_url: str = ""
    #: seconds a server call may take, retries included, before the backend counts as
    #: unreachable (each read waits at most this long too; a slow download that keeps
    #: receiving goes on)
    timeout_s: float = 10.0


@dataclass
class NotifySection:
    #: a command run on exposure; receives CTAGENT_EXPOSURE_DATE and CTAGENT_EXPOSURE_MINUTES
    #: in its environment (never identifiers). Empty: no command.
    on_exposure: str = ""


@dataclass
class ExperimentSection:
    """Research recording for a field experiment (``agent.experiment``): off while ``id``
    is empty. ``ctagent experiment join`` fills it in, with the time of consent."""

    #: the experiment's id (letters, digits, "-", "_", "."); empty: no research recording
    id: str = ""
    #: this device's name in the experiment (the analysis' rows and columns)
    device_label: str = ""
    #: when the carrier consented to research recording (ISO 8601, UTC)
    consent_at: str = ""
    #: days of research recording kept in the store (its own retention, crypto-erased)
    retention_days: int = 14
    #: how the device is carried, when the protocol fixes it ("hand", "pocket", "bag", ...)
    carriage: str = ""


@dataclass
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    radio: RadioSection = field(default_factory=RadioSection)
    sync: SyncSection = field(default_factory=SyncSection)
    notify: NotifySection = field(default_factory=NotifySection)
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    proximity: ProximityConfig = field(default_factory=ProximityConfig)
    source: str = "<defaults>"

    @property
    def data_dir(self) -> Path:
        return Path(os.path.expanduser(self.agent.data_dir))

    @property
    def db_path(self) -> Path:
        return self.data_dir / "agent.db"

    @property
    def key_file(self) -> Path:
        return self.data_dir / "master.key"


_SECTIONS = {"agent": AgentSection, "radio": RadioSection, "sync": SyncSection, "notify": NotifySection,
             "experiment": ExperimentSection}


def _coerce(src: str, section: str, key: str, value: Any, typ: Any) -> Any:
    """``value`` as the setting's type (by its annotation), or a ConfigError naming the
    source, the section, the key and what was expected. Numbers must be finite."""
    where = f"{src}: [{section}] {key}"
    typ = str(getattr(typ, "__name__", typ))
    try:
        if typ == "bool":
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typ == "float":
            return _finite(value)
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            number = int(value)
            if abs(number) > MAX_INT_SETTING:
                raise ValueError
            return number
        if typ == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if typ.startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return value
        if typ.startswith("tuple"):
            if not isinstance(value, list):
                raise TypeError
            return tuple(_finite(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        expected = "a finite number" if typ == "float" else typ
        raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None
    return value


#: integers in settings are counts, days and seeds: anything larger is a typo
MAX_INT_SETTING = 2**53


def _finite(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _validate(cfg: Config) -> None:
    from .modes import MODES
    from .protocol.export import ExportError, load_public_key

    src = cfg.source
    if cfg.agent.protocol not in MODES:
        raise ConfigError(f"{src}: [agent] protocol: must be one of {', '.join(map(repr, MODES))}, "
                          f"not {cfg.agent.protocol!r}")
    if cfg.radio.kind not in RADIO_KINDS:
        raise ConfigError(f"{src}: [radio] kind: must be one of {', '.join(map(repr, RADIO_KINDS))}, "
                          f"not {cfg.radio.kind!r}")
    try:
        parse_duty_cycle(cfg.radio.duty_cycle)
    except ValueError:
        raise ConfigError(f"{src}: [radio] duty_cycle: must be 'ADVERTISE_S,SCAN_S', e.g. \"20,10\"") from None
    from .timesync import CLOCK_POLICIES

    if cfg.agent.clock_check not in CLOCK_POLICIES:
        raise ConfigError(f"{src}: [agent] clock_check: must be one of {', '.join(map(repr, CLOCK_POLICIES))}, "
                          f"not {cfg.agent.clock_check!r}")
    if cfg.agent.key not in ("keyfile", "passphrase"):
        raise ConfigError(f"{src}: [agent] key: must be 'keyfile' or 'passphrase'")
    for section, key, value, low, high in (
            ("agent", "retention_days", cfg.agent.retention_days, 1, 3650),
            ("agent", "flush_interval_s", cfg.agent.flush_interval_s, 1e-3, 7 * 86400),
            ("agent", "clock_sync_wait_s", cfg.agent.clock_sync_wait_s, 0, 7 * 86400),
            ("agent", "max_clock_error_s", cfg.agent.max_clock_error_s, 1e-3, 86400),
            ("sync", "interval_s", cfg.sync.interval_s, 1e-3, 30 * 86400),
            ("sync", "jitter_s", cfg.sync.jitter_s, 0, 30 * 86400),
            ("sync", "max_export_bytes", cfg.sync.max_export_bytes, 1, 2**40),
            ("sync", "chaff_interval_s", cfg.sync.chaff_interval_s, 0, 365 * 86400),
            ("sync", "timeout_s", cfg.sync.timeout_s, 0.1, 600),
            ("radio", "sim_peers", cfg.radio.sim_peers, 0, 1000),
            ("radio", "start_attempts", cfg.radio.start_attempts, 1, 100),
            ("experiment", "retention_days", cfg.experiment.retention_days, 1, 3650)):
        if not low <= value <= high:
            raise ConfigError(f"{src}: [{section}] {key}: must be between {low:g} and {high:g}, not {value!r}")
    if cfg.radio.kind == "bumble":
        from .ble.bumble import transport_problem

        if not cfg.radio.bumble_transport:
            raise ConfigError(f"{src}: [radio] bumble_transport: the bumble radio needs its controller's transport, "
                              "e.g. \"usb:0\" or \"serial:/dev/ttyACM0,1000000\" (see hardware/bumble.md)")
        problem = transport_problem(cfg.radio.bumble_transport)
        if problem:
            raise ConfigError(f"{src}: [radio] bumble_transport: {problem}")
        if cfg.radio.gatt_status:
            raise ConfigError(f"{src}: [radio] gatt_status: the bumble radio has no GATT status service; "
                              "set gatt_status = false or use kind = \"bluez\"")
    if cfg.radio.sim_medium and not cfg.radio.sim_name:
        raise ConfigError(f"{src}: [radio] sim_name: a device on a shared medium (sim_medium) needs its name "
                          "in the medium's scenario")
    _validate_experiment(cfg)
    for key in ("backend_url", "index_url", "export_base_url"):
        url = getattr(cfg.sync, key)
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{src}: [sync] {key}: must start with http:// or https://")
    for k in cfg.sync.trusted_keys:
        try:
            load_public_key(k)
        except ExportError as e:
            raise ConfigError(f"{src}: [sync] trusted_keys: {e}") from None


#: an experiment id or device label: what a file name may hold
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _validate_experiment(cfg: Config) -> None:
    import datetime as dt

    ex, src = cfg.experiment, cfg.source
    if not ex.id:
        return
    for key in ("id", "device_label"):
        if not EXPERIMENT_NAME.fullmatch(getattr(ex, key)):
            raise ConfigError(f"{src}: [experiment] {key}: 1-64 letters, digits, '.', '-' or '_' are needed "
                              f"for research recording, not {getattr(ex, key)!r}")
    try:
        dt.datetime.fromisoformat(ex.consent_at.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{src}: [experiment] consent_at: research recording needs the time the carrier "
                          "consented (ISO 8601; `ctagent experiment join --consent` records it)") from None


def load_config(path: Path | None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    doc: dict[str, Any] = {}
    src = "<defaults>"
    if path is not None:
        src = str(path)
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{src}: no such configuration file; create one with `ctagent init`") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{src}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{src}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{src}: cannot read the configuration file: {e.strerror}") from None
    cfg = Config(source=src)
    for name in doc:
        if name not in _SECTIONS and name != "proximity":
            raise ConfigError(f"{src}: unknown section [{name}]")
        if not isinstance(doc[name], dict):
            raise ConfigError(f"{src}: [{name}] must be a section of settings, not a value")
    for name, cls in _SECTIONS.items():
        section = getattr(cfg, name)
        values = doc.get(name, {})
        known = {f.name: f.type for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{src}: [{name}] {key}: unknown setting")
        for key, typ in known.items():
            env_key = f"CTAGENT_{name.upper()}_{key.upper()}"
            if env_key in env:
                setattr(section, key, _coerce(f"${env_key}", name, key, env[env_key], typ))
            elif key in values:
                setattr(section, key, _coerce(src, name, key, values[key], typ))
    proximity = doc.get("proximity", {})
    types = {f.name: f.type for f in fields(ProximityConfig)}
    for key in proximity:
        if key not in types:
            raise ConfigError(f"{src}: [proximity] {key}: unknown setting")
    values = {k: _coerce(src, "proximity", k, v, types[k]) for k, v in proximity.items()}
    try:
        cfg.proximity = ProximityConfig.from_mapping(values)
    except ConfigError as e:
        raise ConfigError(f"{src}: [proximity] {e}") from None
    _validate(cfg)
    return cfg


TEMPLATE = '''# ctagent configuration. Every setting can be overridden by an environment variable
# CTAGENT_<SECTION>_<KEY> (e.g. CTAGENT_SYNC_BACKEND_URL) and some by command-line flags.

[agent]
# "gaen" (Exposure Notification: decentralized, matching on the device) or "robert"
# (StopCovid/TousAntiCovid: the server issues identifiers and computes the risk).
protocol = "gaen"
# Where the encrypted store, its keyring and the master key file live.
data_dir = "{data_dir}"
# Master key: "keyfile" (a random key in data_dir/master.key, mode 0600) or
# "passphrase" (scrypt), read from, in this order: $CTAGENT_PASSPHRASE, passphrase_file
# (a 0600 file, its first line), the systemd credential "ctagent-passphrase"
# (LoadCredential=), or asked for when a person runs the command in a terminal.
key = "{key}"
passphrase_file = ""
# Days of encounters and own keys kept; older days are erased (crypto-erasure).
retention_days = 14
# This device's model, for its RSSI correction and TX power (agent/exposure/calibration.csv).
device_model = "{device_model}"
# Extra calibration lists in Google's EN format.
calibration_files = []
# Seconds between writes of aggregated sightings to the store (a power cut loses at most this).
flush_interval_s = 60
# A Raspberry Pi has no real-time clock: advertise only with a right one. "auto": never
# with a clock before this version's build date; while a time service (systemd-timesyncd,
# chrony) has not synchronised it, wait up to clock_sync_wait_s seconds, then go on with
# a warning. "strict": only once synchronised with an error within max_clock_error_s
# seconds. "off": no check. The clock's state is recorded either way (`ctagent status`).
clock_check = "auto"
clock_sync_wait_s = 300
max_clock_error_s = 60

[radio]
# "bluez" for a real adapter, "bumble" for a dedicated USB/UART controller (below),
# "sim" for the simulated medium with virtual peers.
kind = "{radio}"
adapter = "hci0"
sim_peers = 5
sim_seed = 0
# Serve the exposure status (no identifiers) as a GATT characteristic for a companion device.
gatt_status = false
# "20,10": advertise 20 s then scan 10 s, for controllers that stop advertising while
# scanning (see `ctagent doctor` and hardware/raspberry-pi.md). Empty: both at once.
duty_cycle = ""
# Attempts to start the radio (back-off 1, 2, 4, ... s) before `ctagent run` exits with
# status 3, so that systemd (Restart=on-failure) tries again.
start_attempts = 5
# kind = "sim" only: hear other `ctagent run` processes of this machine instead of virtual
# peers, on the medium that `ctagent sim-medium --socket PATH` runs; sim_name is this
# device's name in the medium's scenario.
sim_medium = ""
sim_name = ""
# kind = "bumble" only: a dedicated HCI controller driven by our own host instead of BlueZ
# (hardware/bumble.md): its transport ("usb:0", "serial:/dev/ttyACM0,1000000"), and a
# btsnoop file of its HCI traffic for debugging (empty: none).
bumble_transport = ""
bumble_snoop = ""

[sync]
# The backend (empty: no sync). Its export signing public key must be trusted below
# (print it with `ctagent backend public-key`).
backend_url = ""
trusted_keys = []
# Seconds between syncs, plus a random jitter up to jitter_s.
interval_s = 14400
jitter_s = 1800
# ROBERT only: the key the server requires to register (its replacement for a captcha).
robert_api_key = ""
# ROBERT only: the server's public key (base64), which robert-server does not send at
# registration (ctagent's server does: empty trusts it), and for robert-server a captcha
# solved out of band (its /captcha service) for /register.
robert_server_public_key = ""
robert_captcha = ""
robert_captcha_id = ""
# GAEN only: cover traffic. On average every chaff_interval_s seconds, at random times, the
# daemon sends the requests of a declaration marked as chaff (X-Chaff: 1), so that a real
# declaration cannot be told on the wire. 0 (the default): none; the Android reference
# app sends about one in two days (172800).
chaff_interval_s = 0
# The largest export file downloaded (bytes); a real 500,000-key file is about 15 MB.
max_export_bytes = 33554432
# Where the key server's index.txt and export files are, when not under backend_url/exports/
# (a CDN: index_url = "https://cdn.example.org/XX/index.txt", export_base_url = "https://cdn.example.org/").
index_url = ""
export_base_url = ""
# Seconds a call to the server may take, retries included, before it counts as unreachable.
timeout_s = 10

[notify]
# Command run on exposure (e.g. light an LED). It receives CTAGENT_EXPOSURE_DATE and
# CTAGENT_EXPOSURE_MINUTES in its environment, never an identifier.
on_exposure = ""

[experiment]
# Research recording for a field experiment: every advertisement heard, this device's
# broadcasts, radio outages and clock state, encrypted, under their own retention. Off
# while id is empty; `ctagent experiment join ID --label NAME --consent` sets it up.
id = ""
device_label = ""
consent_at = ""
retention_days = 14
carriage = ""

[proximity]
# The 15-minute / 1-metre rule; see docs/proximity.md for the defaults and why.
# rule: "distance", "buckets" or "hmm" (a near/far model over the day's minutes).
rule = "distance"
distance_threshold_m = 1.0
duration_threshold_min = 15.0
attenuation_at_1m_db = 50.0
path_loss_exponent = 2.5
'''


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string is a JSON string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def render_config(settings: dict[str, dict[str, Any]], *, data_dir: str, key: str, radio: str,
                  device_model: str) -> str:
    """The commented template with ``settings`` (section -> key -> value) written into it:
    a setting of the template is replaced where it stands, any other is added at the end
    of its section, so the comments stay next to the values."""
    text = TEMPLATE.format(data_dir=data_dir, key=key, radio=radio, device_model=device_model.replace('"', "'"))
    sections = re.split(r"(?m)^(?=\[\w+\]\n)", text)
    out = []
    for part in sections:
        m = re.match(r"\[(\w+)\]\n", part)
        values = settings.get(m.group(1), {}) if m else {}
        for k, v in values.items():
            line = f"{k} = {_toml_value(v)}"
            part, n = re.subn(rf"(?m)^{re.escape(k)} = .*$", lambda _m, line=line: line, part, count=1)
            if n == 0:
                part = part.rstrip("\n") + f"\n{line}\n" + ("\n" if part.endswith("\n\n") else "")
        out.append(part)
    seen = set(re.findall(r"(?m)^\[(\w+)\]$", text))
    for name, values in settings.items():  # a section the template does not have
        if name not in seen and values:
            out.append(f"\n[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return "".join(out)


def settings_of(path: Path) -> dict[str, dict[str, Any]]:
    """The settings a configuration file sets itself (no defaults, no environment)."""
    doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    return {name: dict(values) for name, values in doc.items() if isinstance(values, dict)}


def effective_settings(cfg: Config) -> dict[str, dict[str, Any]]:
    """Every setting as the agent uses it (file, environment and defaults), secrets hidden."""
    out: dict[str, dict[str, Any]] = {}
    for name in _SECTIONS:
        section = getattr(cfg, name)
        out[name] = {f.name: getattr(section, f.name) for f in fields(section)}
    out["proximity"] = {f.name: (list(v) if isinstance(v := getattr(cfg.proximity, f.name), tuple) else v)
                        for f in fields(cfg.proximity)}
    if out["sync"]["robert_api_key"]:
        out["sync"]["robert_api_key"] = "(set, hidden)"
    return out


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """``sync.interval_s=600`` -> ("sync", "interval_s", 600): the value is read as TOML
    (numbers, booleans, quoted strings, lists), else taken as a plain string. The
    setting's name and type are checked when the configuration is loaded."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {text!r}: write SECTION.KEY=VALUE, e.g. sync.interval_s=600")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value
