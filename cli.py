"""ctagent command line: a thin click front over the ``agent`` package (parse -> call ->
render). A :class:`~agent.errors.UserError` is printed as one sentence (exit 1); any
other exception is a bug: a short message and how to see the traceback (exit 2)."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from agent import __version__
from agent.ble import RADIO_KINDS
from agent.config import DEFAULT_PROTOCOL
from agent.errors import UserError
from agent.modes import MODES

DEFAULT_CONFIG = Path("~/.config/ctagent/ctagent.toml").expanduser()
#: exit status of a bug (a user error exits 1, as click's own errors do)
EXIT_BUG = 2
#: the reader of stdout went away (128 + SIGPIPE, as a shell reports it)
EXIT_BROKEN_PIPE = 141

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """A :class:`UserError` is one sentence (exit 1), anything else a bug (exit 2); with
    ``--json`` the error is a JSON object on stdout instead: ``{"error": {"kind": "user" |
    "bug", "message": ...}}``, so that a script reads one document whatever happens."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # `ctagent status | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
            sys.exit(EXIT_BROKEN_PIPE)
        except UserError as e:
            if debug:
                raise
            if as_json:
                _echo_json({"error": {"kind": "user", "message": str(e)}})
                sys.exit(1)
            raise click.ClickException(str(e)) from None
        except Exception as e:  # anything else is a bug: say so, briefly
            if debug:
                raise
            message = f"internal error ({type(e).__name__}: {e}); this is a bug in ctagent"
            if as_json:
                _echo_json({"error": {"kind": "bug", "message": message}})
            else:
                click.echo(f"Error: {message}. Run with --debug for the traceback.", err=True)
            sys.exit(EXIT_BUG)
    return wrapper  # type: ignore[return-value]


class CtagentGroup(click.Group):
    """``--debug`` anywhere on the line (``ctagent status --debug`` as ``ctagent --debug
    status``), but not after ``--``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--debug" in args:
            end = args.index("--") if "--" in args else len(args)
            if "--debug" in args[:end]:
                args = ["--debug", *(a for i, a in enumerate(args) if not (a == "--debug" and i < end))]
        return super().parse_args(ctx, args)


@click.group(cls=CtagentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctagent")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_CONFIG,
              envvar="CTAGENT_CONFIG", show_default=True, help="The TOML configuration file.")
@click.pass_context
def main(ctx: click.Context, debug: bool, config_path: Path) -> None:
    """ctagent: a Bluetooth LE contact-tracing device agent."""
    ctx.obj = {"config_path": config_path}
    if sys.stdin.isatty():  # a person is there: a passphrase store asks for its passphrase
        from agent.app import PASSPHRASE_PROMPT

        PASSPHRASE_PROMPT["prompt"] = _ask_passphrase


def _config_path() -> Path:
    path: Path = click.get_current_context().find_root().obj["config_path"]
    return path


def _cfg() -> Any:
    from agent.config import load_config

    return load_config(_config_path())


def _now() -> float:
    from agent.clock import RealClock

    return RealClock().now()


#: keys whose numbers are times (Unix seconds inside): printed as ISO 8601 UTC
TIME_KEYS = frozenset({"now", "at", "since", "last_sync", "last_rotation", "start", "end", "first_seen",
                       "last_seen"})


def json_ready(value: Any, key: str = "") -> Any:
    """One JSON style for every command: times as ISO 8601 UTC strings (``TIME_KEYS`` and
    keys ending in ``_at``), NaN and infinities as null (valid JSON)."""
    from agent.clock import iso_time

    if isinstance(value, dict):
        return {k: json_ready(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v, key) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if (isinstance(value, int | float) and not isinstance(value, bool)
            and (key in TIME_KEYS or key.endswith("_at"))):
        return iso_time(value)
    return value


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(json_ready(obj), indent=1, default=str, allow_nan=False))


def _say(data: dict[str, Any], sentence: str, as_json: bool) -> None:
    """A command's outcome: ``data`` as JSON with --json, else the sentence."""
    if as_json:
        _echo_json(data)
    else:
        click.echo(sentence)


def _progress(*columns: Any, disable: bool = False) -> Any:
    """A transient progress bar on stderr, only when a person watches it: stdout keeps
    only the data (no stray blank line when it is a pipe or a file)."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=disable or not console.is_terminal)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console(width=max(100, Console().width)).print(t)


# -- the device ------------------------------------------------------------------------

def _ask_passphrase(confirm: bool = False) -> str:
    return str(click.prompt("store passphrase", hide_input=True, confirmation_prompt=confirm))


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the store goes [default: kept, else ~/.local/share/ctagent].")
@click.option("--key", type=click.Choice(["keyfile", "passphrase"]), default=None,
              help="Master key from a 0600 key file, or a passphrase (scrypt) [default: kept, else keyfile].")
@click.option("--radio", type=click.Choice(list(RADIO_KINDS)), default=None, help="[default: kept, else bluez]")
@click.option("--protocol", type=click.Choice(sorted(MODES)), default=None, help="[default: kept, else gaen]")
@click.option("--backend-url", default=None, metavar="URL",
              help="The backend to sync with; GAEN: its export signing key is fetched, shown and trusted.")
@click.option("--trust-key", default=None, metavar="SHA256:...",
              help="Trust the backend's key without asking when its fingerprint is this one (scripts).")
@click.option("--set", "assignments", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Any other setting (repeat), e.g. --set sync.interval_s=600; VALUE is TOML, else a string.")
@click.option("--force", is_flag=True, help="Rewrite an existing configuration; its other settings are kept.")
@click.option("--device-model", default=None, help="This device's model [default: kept, else as the machine says].")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def init(data_dir: Path | None, key: str | None, radio: str | None, protocol: str | None, backend_url: str | None,
         trust_key: str | None, assignments: tuple[str, ...], force: bool, device_model: str | None,
         as_json: bool) -> None:
    """Write a commented configuration and create the encrypted store (or nothing, on error)."""
    from agent.app import calibration, calibration_warning, fetch_backend_key, init_device
    from agent.protocol.export import key_fingerprint

    path = _config_path()
    if path.exists() and not force:
        raise UserError(f"{path} already exists (`--force` rewrites it and keeps its settings)")
    from agent.config import parse_assignment

    settings: dict[str, dict[str, Any]] = {}
    for text in assignments:
        section, key_name, value = parse_assignment(text)
        settings.setdefault(section, {})[key_name] = value
    if protocol:
        settings.setdefault("agent", {})["protocol"] = protocol
    if backend_url:
        settings.setdefault("sync", {})["backend_url"] = backend_url
        if (protocol or DEFAULT_PROTOCOL) == "gaen":
            key_b64 = fetch_backend_key(backend_url)
            fingerprint = key_fingerprint(key_b64)
            if trust_key is not None:
                if trust_key != fingerprint:
                    raise UserError(f"{backend_url} signs with the key {fingerprint}, not {trust_key}: nothing "
                                    "written (check the backend's `ctagent backend public-key`)")
            else:
                click.echo(f"{backend_url} signs its export files with the key\n  {key_b64}\n  fingerprint "
                           f"{fingerprint}\nCompare it with what the backend prints (`ctagent backend public-key`).",
                           err=as_json)
                if not sys.stdin.isatty():
                    raise UserError("not trusted: nothing written (pass --trust-key FINGERPRINT in scripts)")
                click.confirm("trust this key?", abort=True)
            settings["sync"]["trusted_keys"] = [key_b64]
    prompt = (lambda: _ask_passphrase(confirm=True)) if sys.stdin.isatty() else None
    cfg = init_device(path, data_dir=data_dir, key=key, radio=radio, force=force, device_model=device_model,
                      settings=settings, prompt=prompt)
    cal = calibration(cfg)
    warning = calibration_warning(cfg)
    if as_json:
        _echo_json({"configuration": str(path), "store": str(cfg.db_path), "master_key": cfg.agent.key,
                    "device_model": cfg.agent.device_model, "calibration_confidence": cal.confidence,
                    "calibration_warning": warning, "backend_url": cfg.sync.backend_url or None,
                    "trusted_keys": len(cfg.sync.trusted_keys)})
        return
    click.echo(f"configuration: {path}\nstore: {cfg.db_path} (master key: "
               f"{cfg.key_file if cfg.agent.key == 'keyfile' else 'a passphrase'})\n"
               f"device model: {cfg.agent.device_model} (calibration confidence {cal.confidence})")
    if cfg.sync.backend_url:
        click.echo(f"backend: {cfg.sync.backend_url} ({len(cfg.sync.trusted_keys)} trusted key(s))")
    if warning:
        click.echo(f"warning: {warning}", err=True)


@main.group("config")
def config_group() -> None:
    """The configuration file: what it says, and whether it works."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def config_show(as_json: bool) -> None:
    """Every setting as the agent uses it (file, environment and defaults; secrets hidden)."""
    from agent.config import effective_settings

    cfg = _cfg()
    settings = effective_settings(cfg)
    if as_json:
        _echo_json({"source": cfg.source, **settings})
        return
    click.echo(f"# {cfg.source}, with the environment's overrides and the defaults")
    for name, values in settings.items():
        click.echo(f"\n[{name}]")
        for k, v in values.items():
            click.echo(f"{k} = {json.dumps(v)}")


@config_group.command("check")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def config_check(as_json: bool) -> None:
    """Check the configuration end to end: settings, store and key, calibration, backend."""
    from agent.app import check_configuration

    checks = check_configuration(_config_path())
    if as_json:
        _echo_json([{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks])
    else:
        for c in checks:
            click.echo(f"[{'ok' if c.ok else '!!'}] {c.name}: {c.detail}")
    if not all(c.ok for c in checks):
        sys.exit(1)


@main.command("rotate-master-key")
@friendly_errors
def rotate_master_key() -> None:
    """Re-wrap the store's keys under a new master key (a new key file, or a new
    passphrase asked for twice). Stop the daemon first."""
    from agent.app import rotate_master_key as rotate

    cfg = _cfg()
    new = None
    if cfg.agent.key == "passphrase":
        if not sys.stdin.isatty():
            raise UserError("a new passphrase is asked for in a terminal; run this command in one")
        new = str(click.prompt("new store passphrase", hide_input=True, confirmation_prompt=True))
    rotate(cfg, new_passphrase=new)
    click.echo("master key rotated" + (f"; the new key file is {cfg.key_file}" if new is None else ""))


@main.command()
@click.option("--radio", type=click.Choice(list(RADIO_KINDS)), default=None, help="Override [radio] kind.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING"], case_sensitive=False), default="INFO",
              show_default=True)
@friendly_errors
def run(radio: str | None, log_level: str) -> None:
    """Run the agent: advertise, scan, store, sync, notify (until SIGTERM). Exits 3 when
    no radio comes up (so that systemd restarts it)."""
    from agent.app import run_daemon
    from agent.logs import setup_logging

    cfg = _cfg()
    setup_logging(log_level)
    sys.exit(run_daemon(cfg, radio_kind=radio or cfg.radio.kind))


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def status(as_json: bool) -> None:
    """Whether the daemon runs, its figures and how old they are, the radio, last sync, exposure."""
    from agent.app import calibration, calibration_warning, open_mode, open_store
    from agent.reports import status_report

    cfg = _cfg()
    with open_store(cfg, read_only=True) as store:
        out = status_report(store, open_mode(cfg, store), cfg.data_dir / "status.json", _now())
    cal = calibration(cfg)
    out["calibration"] = {"model": cal.model, "confidence": cal.confidence, "rssi_correction": cal.rssi_correction,
                          "tx_power": cal.tx_power, "warning": calibration_warning(cfg)}
    from agent.timesync import probe

    out["clock"] = probe(_now()).to_json()
    if as_json:
        _echo_json(out)
        return
    _render_status(out)


def _render_status(out: dict[str, Any]) -> None:
    from agent.reports import ago

    exposure = "EXPOSED on " + ", ".join(out["exposed_days"]) if out["exposed_days"] else "no exposure found"
    from agent.clock import iso_time

    last = f"{ago(_now() - out['last_sync'])}" if out["last_sync"] else "never"
    click.echo(f"store        {out['store']}\nprotocol     {out['protocol']}\n"
               f"heard        {out['identifiers_heard']} identifier(s) over {out['days_stored']} day(s)\n"
               + (f"own keys     {out['own_keys']}\n" if "own_keys" in out else "")
               + (f"registered   {'yes' if out['registered'] else 'NO'}"
                  + (f" (left the server {iso_time(out['left_at'])}: `ctagent register` joins again)"
                     if out.get("left_at") else "" if out["registered"] else ": `ctagent register`") + "\n"
                  if "registered" in out else "")
               + f"last {out['server_call']:<8}{last}\n"
               f"exposure     {exposure}")
    cal = out["calibration"]
    click.echo(f"calibration  {cal['model']} (confidence {cal['confidence']})" if not cal["warning"] else
               f"calibration  default calibration: {cal['warning']}")
    from agent.timesync import ClockState

    click.echo(f"clock        {ClockState.from_json(out['clock']).describe()}")
    d = out["daemon"]
    f = d["figures"]
    if d["running"]:
        click.echo(f"daemon       running (pid {d['pid']}); figures of {ago(d['figures_age_s'])}: mode={f['mode']} "
                   f"rotations={f['rotations']} sightings={f['sightings']}")
        r = d["radio"]
        click.echo(f"radio        advertising {'yes' if r['advertising'] else 'NO'}, scanning "
                   f"{'yes' if r['scanning'] else 'NO'}, {r['samples_last_minute']} sample(s) in the last minute")
        if f.get("clock_problem"):
            click.echo(f"clock        the daemon says: {f['clock_problem']}")
        for task, info in sorted((f.get("failing") or {}).items()):
            click.echo(f"failing      {task}: {info['error']} ({info['failures']} failure(s), since "
                       f"{ago(f['now'] - info['since'])} before these figures)")
    elif f:
        click.echo(f"daemon       stopped; when it last ran ({ago(d['figures_age_s'])}): rotations={f['rotations']} "
                   f"sightings={f['sightings']}")
    else:
        click.echo("daemon       stopped (it has not run yet)")
    if d["store_in_use_by"]:
        click.echo(f"store        in use by a ctagent command (pid {d['store_in_use_by']})")


@main.command()
@click.option("--timeout", "timeout_s", default=30.0, show_default=True, help="Seconds to wait for it to stop.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def stop(timeout_s: float, as_json: bool) -> None:
    """Stop the running daemon (SIGTERM: it flushes and closes its store)."""
    import os
    import signal
    import time

    from agent.reports import daemon_state

    cfg = _cfg()
    d = daemon_state(cfg.db_path, cfg.data_dir / "status.json", _now())
    if not d["running"]:
        if d["store_in_use_by"]:
            raise UserError(f"the store is in use by a ctagent command (pid {d['store_in_use_by']}), not by the "
                            "daemon; let it finish")
        _say({"stopped": None, "was_running": False}, "the daemon is not running", as_json)
        return
    pid = d["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _say({"stopped": None, "was_running": False}, "the daemon is not running", as_json)
        return
    except PermissionError:
        raise UserError(f"not allowed to stop pid {pid}: run as its user (or `systemctl stop ctagent`)") from None
    deadline = time.monotonic() + timeout_s
    while daemon_state(cfg.db_path, cfg.data_dir / "status.json", _now())["running"]:
        if time.monotonic() > deadline:
            raise UserError(f"the daemon (pid {pid}) did not stop within {timeout_s:g} s")
        time.sleep(0.1)
    _say({"stopped": pid, "was_running": True}, f"stopped (pid {pid})", as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def encounters(as_json: bool) -> None:
    """Per-day summary of what was heard (nothing identifying)."""
    from agent.app import open_mode, open_store

    cfg = _cfg()
    with open_store(cfg, read_only=True) as store:
        rows = open_mode(cfg, store).heard_by_day()
    if as_json:
        _echo_json([r.to_json() for r in rows])
        return
    _table("Heard per day (a peer counts once per identifier it had; identifiers rotate every 10-20 min)",
           ["date", "identifiers", "samples", "identifier-minutes"],
           [[r.to_json()["date"], r.identifiers, r.samples, r.identifier_minutes] for r in rows])


@main.command()
@click.option("--explain", is_flag=True, help="Windows, distances and minutes behind each decision (with the hmm "
              "rule: each minute's posterior P(near) and the evidence behind it).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def exposures(explain: bool, as_json: bool) -> None:
    """Exposures found."""
    from agent.app import open_store
    from agent.clock import iso_date, iso_time

    with open_store(_cfg(), read_only=True) as store:
        found = store.exposures.all()
    if as_json:
        _echo_json([{**e.to_json(windows=explain), "date": iso_date(e.day)} for e in found])
        return
    if not found:
        click.echo("no exposure found")
        return
    _table("Exposures", ["date", "decided by", "minutes", "risk"],
           [[iso_date(e.day), e.decided_by, "" if e.minutes is None else e.minutes,
             "" if e.risk is None else e.risk] for e in found])
    if explain:
        for e in found:
            click.echo(f"\n{iso_date(e.day)}:")
            if not e.windows:
                risk = "" if e.risk is None else f" (risk score {e.risk})"
                click.echo(f"  decided by the {e.protocol} server{risk}; the device keeps no per-window detail")
            for w in e.windows:
                click.echo(f"  window {iso_time(w.start)}: attenuation {w.attenuation_db} dB, ~{w.distance_m} m, "
                           + (_hmm_evidence(w) if w.posterior_near is not None else "")
                           + f"counted {w.minutes} min{' (gap filled)' if w.filled else ''}")


def _hmm_evidence(w: Any) -> str:
    """What the hmm rule saw in a window and the posterior it gave it."""
    seen = []
    if w.stronger is not None:
        seen.append(f"{w.stronger} of {w.heard} heard stronger")
    if w.relative_db is not None:
        seen.append(f"{w.relative_db:+.1f} dB vs recent median")
    return f"P(near) {w.posterior_near:.2f}" + (f" ({', '.join(seen)})" if seen else "") + ", "


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def sync(as_json: bool) -> None:
    """Call the server now: download and verify new export files and check for exposure
    (GAEN), or ask for the risk status (ROBERT)."""
    from agent.app import open_mode, open_store

    cfg = _cfg()
    with open_store(cfg) as store, _progress(disable=as_json) as bar:
        mode = open_mode(cfg, store)
        if mode.server_schedule is None:
            raise UserError(f"no backend configured: set [sync] backend_url in {cfg.source}")
        task = bar.add_task("calling the server", total=None)
        res = mode.check(_now(), progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:  # one document: the problem, if any, is in it
        _echo_json({"offline": res.offline, "exposed": res.exposed, **res.details, "problem": res.problem})
        if res.problem:
            sys.exit(1)
        return
    if not res.offline:
        click.echo(res.message)
    if res.problem:  # a sync that did not do its whole job is not a success
        raise UserError(res.problem)


@main.command()
@click.option("--code", required=True, help="The verification code from the health authority.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def declare(code: str, yes: bool, as_json: bool) -> None:
    """You tested positive: upload what your protocol uploads (GAEN: your keys of the
    last 14 days; ROBERT: the HELLOs your device heard)."""
    from agent.app import open_mode, open_store

    cfg = _cfg()
    with open_store(cfg) as store:
        mode = open_mode(cfg, store)
        if not yes:
            click.confirm(mode.declare_prompt(_now()), abort=True)
        result = mode.declare(code, _now())
    _say({"sent": result.sent, "accepted": result.accepted, "dropped": result.dropped, "summary": result.summary,
          "problem": result.problem}, result.summary, as_json)
    if result.problem:  # the code is used up, and the declaration achieved nothing: say why, exit 1
        if as_json:
            sys.exit(1)
        raise UserError(result.problem)


def _account(store: Any, cfg: Any, command: str) -> Any:
    from agent.app import open_mode

    account = open_mode(cfg, store).account
    if account is None:
        raise UserError(f"{command} is for protocols that register with a server "
                        f"(ROBERT mode: [agent] protocol = \"robert\")")
    return account


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def register(as_json: bool) -> None:
    """ROBERT mode: register with the server now (`ctagent run` does it too), also after
    `ctagent unregister`."""
    from agent.app import open_store

    cfg = _cfg()
    with open_store(cfg) as store:
        account = _account(store, cfg, "register")
        account.register()
    _say({"registered": True}, "registered with the ROBERT server; `ctagent run` advertises its identifiers",
         as_json)


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def unregister(yes: bool, as_json: bool) -> None:
    """ROBERT mode: leave the server (it forgets this device and its exposures)."""
    from agent.app import open_store

    cfg = _cfg()
    with open_store(cfg) as store:
        account = _account(store, cfg, "unregister")
        if not yes:
            click.confirm("Unregister this device from the server?", abort=True)
        account.unregister(_now())
    _say({"unregistered": True}, "unregistered: the server forgot this device; the daemon no longer advertises "
         "or registers by itself (`ctagent register` joins again)", as_json)


@main.command("delete-history")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def delete_history(yes: bool, as_json: bool) -> None:
    """ROBERT mode: ask the server to delete this device's exposure history."""
    from agent.app import open_store

    cfg = _cfg()
    with open_store(cfg, read_only=True) as store:
        account = _account(store, cfg, "delete-history")
        if not yes:
            click.confirm("Ask the server to delete this device's exposure history (what it knows of the "
                          "people you met)? It cannot be undone.", abort=True)
        account.delete_history(_now())
    _say({"deleted": True}, "exposure history deleted on the server", as_json)


@main.command("export")
@click.option("--consent", is_flag=True, help="I have the consent of this device's carrier for this export.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@friendly_errors
def export_cmd(consent: bool, fmt: str, output: Path | None) -> None:
    """Research export of encounter summaries, pseudonymised."""
    from agent.app import open_store
    from agent.files import write_private_file
    from agent.reports import research_export

    if not consent:
        raise UserError("a research export needs the carrier's explicit consent: add --consent")
    with open_store(_cfg(), read_only=True) as store:
        text = research_export(store, fmt)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        write_private_file(output, text.encode())
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror}") from None
    click.echo(f"written to {output} (mode 0600)")


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def purge(yes: bool, as_json: bool) -> None:
    """Erase the store: keys, encounters, exposures (cannot be undone)."""
    from agent.files import erase_file
    from agent.store import purge as purge_store

    cfg = _cfg()
    if not yes:
        click.confirm(f"Erase everything in {cfg.data_dir}?", abort=True)
    removed = purge_store(cfg.db_path)
    if erase_file(cfg.data_dir / "status.json"):
        removed.append(cfg.data_dir / "status.json")
    _say({"erased": [str(p) for p in removed]}, f"erased {len(removed)} file(s)", as_json)


@main.command()
@click.option("--adapter", default="hci0", show_default=True, help="The BlueZ adapter (--radio bluez).")
@click.option("--radio", type=click.Choice(["bluez", "bumble"]), default=None,
              help="[default: bumble when the configuration says so, else bluez]")
@click.option("--transport", default=None, help="The controller's bumble transport (--radio bumble) "
              "[default: the configuration's bumble_transport].")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def doctor(adapter: str, radio: str | None, transport: str | None, as_json: bool) -> None:
    """Check the clock, Bluetooth hardware, BlueZ (or a bumble controller) and permissions; say what to fix."""
    from agent.ble.base import Check
    from agent.errors import ConfigError, UserError
    from agent.timesync import doctor_check, probe

    try:
        cfg = _cfg()
    except UserError:
        cfg = None  # doctor also runs before `ctagent init`
    radio = radio or ("bumble" if cfg is not None and cfg.radio.kind == "bumble" else "bluez")
    if radio == "bumble":
        from agent.ble.bumble import transport_problem
        from agent.extras import require

        transport = transport or (cfg.radio.bumble_transport if cfg is not None else "")
        if not transport:
            raise ConfigError("name the controller: ctagent doctor --radio bumble --transport usb:0")
        if problem := transport_problem(transport):
            raise ConfigError(f"--transport {problem}")
        require("bumble", what="the bumble radio")
        from agent.ble.bumble.doctor import doctor as check_radio

        radio_ok, radio_checks = check_radio(transport)
    else:
        from agent.ble.bluez.doctor import doctor as check_bluez

        radio_ok, radio_checks = check_bluez(adapter)
    clock_ok, clock_detail = doctor_check(probe(_now()))
    checks = [Check("clock", clock_ok, clock_detail), *radio_checks]
    if as_json:
        _echo_json({"ok": clock_ok and radio_ok, "checks": [c._asdict() for c in checks]})
    else:
        for c in checks:
            click.echo(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    if not (clock_ok and radio_ok):
        sys.exit(1)


@main.command()
@click.option("--scenario", type=click.Choice(["office", "train"]), default="office", show_default=True)
@click.option("--devices", default=24, show_default=True, help="Number of virtual devices (>= 4).")
@click.option("--days", default=2, show_default=True, help="Simulated days (1-14).")
@click.option("--seed", default=1, show_default=True, help="Same seed, same result.")
@click.option("--protocol", type=click.Choice(list(MODES)), default=DEFAULT_PROTOCOL, show_default=True,
              help="The protocol family: gaen (Exposure Notification, decentralized), robert (centralized).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Where the PNG figure goes.")
@click.option("--research", "research_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Rehearse a field experiment: every device's research bundle and the ground truth go here "
                   "(then `ctagent experiment analyze DIR`).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@friendly_errors
def demo(scenario: str, devices: int, days: int, seed: int, protocol: str, out_dir: Path, research_dir: Path | None,
         as_json: bool) -> None:
    """A simulated field experiment end to end, no Bluetooth needed."""
    from agent.extras import require

    require("backend", "plots", what="`ctagent demo`", install="demo")
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.demo import run_demo

    console = Console(stderr=as_json, width=max(Console().width, 120))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=as_json) as prog:
        tasks: dict[str, Any] = {}

        def progress(stage: str, frac: float) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=1.0)
            prog.update(tasks[stage], completed=frac)

        res = run_demo(devices=devices, days=days, seed=seed, scenario=scenario, protocol=protocol, out_dir=out_dir,
                       log=(lambda m: None) if as_json else console.print, progress=progress,
                       research_dir=research_dir)
    if as_json:
        _echo_json(res.to_json())
        return
    _render_demo(res, console)


def _render_demo(res: Any, console: Any) -> None:
    from rich.table import Table

    t = Table(title="Who was notified, against who truly spent >= 15 min within 1 m of person 0 (on one day)")
    for c in ("device", "true close min (max/day)", "truly exposed", "notified", "minutes counted",
              "phone carried (p0/device)", "outcome"):
        t.add_column(c, justify="right")
    colours = {"TP": "green", "TN": "dim", "FP": "yellow", "FN": "red"}
    shown = [r for r in res.rows if not (r.outcome == "TN" and r.true_close_minutes == 0)]
    for r in shown:
        t.add_row(str(r.device), f"{r.true_close_minutes:.1f}", "yes" if r.truly_exposed else "no",
                  "yes" if r.notified else "no",
                  "(server)" if r.minutes_counted is None else f"{r.minutes_counted:.0f}", r.carriage,
                  f"[{colours[r.outcome]}]{r.outcome}[/]")
    console.print(t)
    console.print(f"({len(res.rows) - len(shown)} devices never within 1 m of person 0 and not notified: "
                  "true negatives, not listed)")
    console.print(f"TP {res.tp}  FP {res.fp}  FN {res.fn}  TN {res.tn}   precision {res.precision:.2f}  "
                  f"recall {res.recall:.2f}   figure: {res.png}   ({res.wall_s:.1f} s)")
    console.print("A phone in a pocket or bag adds 6-10 dB of body loss on each side: contacts then look farther "
                  "than 1 m (see docs/proximity.md).")


@main.group()
def calibration() -> None:
    """The calibration lists: each model's RSSI correction and TX power."""


@calibration.command("list")
@click.option("--search", default="", help="Only models whose name contains this (case-insensitive).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def calibration_list(search: str, as_json: bool) -> None:
    """The known device models (the configured lists, then the bundled one)."""
    from agent.config import load_config
    from agent.exposure.calibration import CalibrationTable, bundled_calibration_path

    path = _config_path()
    files = load_config(path).agent.calibration_files if path.exists() else []
    entries = [e for e in CalibrationTable.load(*files, bundled_calibration_path()).entries()
               if search.lower() in f"{e.oem} {e.model} {e.device}".lower()]
    if as_json:
        _echo_json([{"oem": e.oem, "device": e.device, "model": e.model, "rssi_correction": e.rssi_correction,
                     "tx_power": e.tx_power, "confidence": e.confidence} for e in entries])
        return
    _table("Calibration list", ["model", "oem", "RSSI correction (dB)", "TX power (dBm)", "confidence"],
           [[e.model, e.oem, e.rssi_correction, e.tx_power, e.confidence] for e in entries])


@calibration.command("fit")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--distance", "distance_m", type=click.FloatRange(0.05, 100), default=None,
              help="Every pair was this far apart, in metres (a dedicated session, e.g. 1.0); else --truth.")
@click.option("--truth", "truth_paths", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ground truth CSV giving the distances (pair intervals or position traces).")
@click.option("--reference", default=None, help="The device label that keeps its calibration [default: the one "
              "with the highest calibration confidence].")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the calibration list here (Google's format; load it with [agent] calibration_files).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def calibration_fit(bundle_dir: Path, distance_m: float | None, truth_paths: tuple[Path, ...], reference: str | None,
                    out_file: Path | None, as_json: bool) -> None:
    """Fit each device's RX correction and TX power from research bundles at known distances."""
    from agent.experiment.analyze import analyze
    from agent.experiment.calibrate import fit_calibration

    fit = fit_calibration(analyze(bundle_dir, list(truth_paths)), distance_m=distance_m, reference=reference)
    if out_file is not None:
        out_file.write_text(fit.to_csv())
    if as_json:
        from dataclasses import asdict

        _echo_json({"reference": fit.reference, "residual_db": fit.residual_db, "observations": fit.observations,
                    "devices": [asdict(d) for d in fit.devices], "list": str(out_file) if out_file else None})
        return
    _table(f"Calibration fit: {fit.observations} minutes, reference {fit.reference}, residual {fit.residual_db} dB",
           ["device", "model", "RSSI correction (dB)", "± se", "TX power (dBm)", "± se", "minutes rx/tx"],
           [[d.label, d.model, d.rssi_correction, d.rssi_correction_se, d.tx_power, d.tx_power_se,
             f"{d.minutes_rx}/{d.minutes_tx}"] for d in fit.devices])
    if out_file is not None:
        click.echo(f"calibration list: {out_file} (add it to [agent] calibration_files)")
    else:
        click.echo(fit.to_csv(), nl=False)


@main.command("eval")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="CSV: pair,timestamp,rssi,tx_power[,receiver_model,transmitter_model]")
@click.option("--rule", type=click.Choice(["distance", "buckets", "hmm"]), default="distance", show_default=True,
              help="hmm: without a minute context in the file, on attenuation and each pair's own recent median.")
@click.option("--distance-threshold", type=float, default=1.0, show_default=True, help="metres")
@click.option("--duration-threshold", type=float, default=15.0, show_default=True, help="minutes")
@click.option("--calibration", "calibration_files", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Extra calibration list(s) (Google EN format); the bundled list is always loaded.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def eval_cmd(input_path: Path, rule: str, distance_threshold: float, duration_threshold: float,
             calibration_files: tuple[Path, ...], as_json: bool) -> None:
    """Run the proximity rule on your own recorded sightings."""
    from agent.exposure.calibration import CalibrationTable, bundled_calibration_path
    from agent.exposure.evaluate import evaluate, read_sightings_csv
    from agent.exposure.rule import ProximityConfig

    cfg = ProximityConfig(rule=rule, distance_threshold_m=distance_threshold, duration_threshold_min=duration_threshold)
    cal = CalibrationTable.load(*calibration_files, bundled_calibration_path())
    try:
        text = input_path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {input_path}: {e.strerror}") from None
    results = evaluate(read_sightings_csv(text, source=str(input_path)), cfg, cal)
    if as_json:
        _echo_json({"rule": rule, "distance_threshold_m": distance_threshold,
                    "duration_threshold_min": duration_threshold, "pairs": [r.to_dict() for r in results]})
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{input_path.name}: rule '{rule}', {distance_threshold:g} m / {duration_threshold:g} min")
    for c in ("pair", "decision", "minutes counted", f"est. minutes within {distance_threshold:g} m",
              "minutes observed", "samples", "rx calibration"):
        t.add_column(c, justify="right" if c != "pair" else "left")
    for r in results:
        t.add_row(r.pair, "[bold red]EXPOSED[/]" if r.exposed else "not exposed", f"{r.minutes_counted:.1f}",
                  f"{r.close_minutes_estimated:.1f}", str(r.minutes_observed), str(r.samples),
                  {0: "default", 1: "low", 2: "medium", 3: "high"}.get(r.receiver_confidence, "?"))
    Console(width=max(100, Console().width)).print(t)


@main.group()
def experiment() -> None:
    """Field experiments: join, mark, collect (on a device); analyze, import, export."""


@experiment.command("join")
@click.argument("experiment_id")
@click.option("--label", "device_label", required=True, help="This device's name in the experiment.")
@click.option("--consent", is_flag=True, help="The carrier consents to research recording (its time is recorded).")
@click.option("--carriage", default="", help="How the device is carried (hand, pocket, bag, ...), if fixed.")
@click.option("--retention-days", type=click.IntRange(1, 3650), default=None, help="Days research data is kept.")
@friendly_errors
def experiment_join(experiment_id: str, device_label: str, consent: bool, carriage: str,
                    retention_days: int | None) -> None:
    """Turn research recording on for an experiment (takes effect at the next `ctagent run`)."""
    from agent.app import init_device
    from agent.experiment.collect import utc_iso

    if not consent:
        raise UserError("research recording needs the carrier's consent: add --consent once they have given it")
    settings: dict[str, Any] = {"id": experiment_id, "device_label": device_label, "consent_at": utc_iso(_now()),
                                "carriage": carriage}
    if retention_days is not None:
        settings["retention_days"] = retention_days
    _cfg()  # a configuration must exist (and be valid) first
    cfg = init_device(_config_path(), data_dir=None, key=None, radio=None, force=True,
                      settings={"experiment": settings})
    click.echo(f"experiment {cfg.experiment.id}: this device records as {cfg.experiment.device_label} "
               f"(consent {cfg.experiment.consent_at}); restart `ctagent run` for it to take effect")


@experiment.command("mark")
@click.argument("marker")
@friendly_errors
def experiment_mark(marker: str) -> None:
    """Log a sync marker (a clap, a button press) at this device's time now."""
    from agent.experiment.collect import add_marker

    cfg = _cfg()
    t = _now()
    add_marker(cfg.data_dir, t, marker)
    click.echo(f"marker {marker!r} at {t:.3f}")


@experiment.command("collect")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A new folder for this device's research bundle.")
@click.option("--consent", is_flag=True, help="The carrier consents to handing over its keys and research log.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def experiment_collect(out_dir: Path, consent: bool, as_json: bool) -> None:
    """This device's research bundle: own keys (TEKs / EBIDs) and research log, as Parquet."""
    from agent.experiment.collect import collect_device

    if not consent:
        raise UserError("a research bundle holds this device's keys: add --consent once the carrier agreed")
    m = collect_device(_cfg(), out_dir, _now())
    if as_json:
        _echo_json({"bundle": str(out_dir), **m.to_json()})
        return
    rows = m.tables["sightings.parquet"]["rows"]
    click.echo(f"{out_dir}: {rows:,} sightings, {m.tables['own_ids.parquet']['rows']} own identifier(s), "
               f"experiment {m.experiment_id}, device {m.device_label}")


@experiment.command("verify")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def experiment_verify(bundle_dir: Path, as_json: bool) -> None:
    """Check every bundle's files against its manifest (sizes, SHA-256); no analysis engine needed."""
    from agent.experiment.bundle import bundle_folders, verify_bundle

    found = []
    for folder in bundle_folders(bundle_dir):
        m = verify_bundle(folder)
        found.append({"folder": str(folder), "device_label": m.device_label, "experiment_id": m.experiment_id,
                      "collected_at": m.collected_at, "sightings": m.tables["sightings.parquet"]["rows"]})
    if as_json:
        _echo_json({"ok": True, "bundles": found})
        return
    for b in found:
        click.echo(f"ok {b['device_label']}: {b['sightings']:,} sightings, collected {b['collected_at']} "
                   f"({b['folder']})")


@experiment.command("analyze")
@click.argument("bundle_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--truth", "truth_paths", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ground truth CSV (pair intervals, position traces or sync markers); repeat. Also read: "
                   "BUNDLE_DIR/truth/*.csv.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The report folder [default: BUNDLE_DIR/report].")
@click.option("--crowd-rank", type=click.IntRange(1, 100), default=4, show_default=True,
              help="The crowd-context rule counts a minute only for the N strongest transmitters heard.")
@click.option("--memory-limit", default="3GB", show_default=True, help="The analysis engine's memory limit.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary's metrics as JSON.")
@friendly_errors
def experiment_analyze(bundle_dir: Path, truth_paths: tuple[Path, ...], out_dir: Path | None, crowd_rank: int,
                       memory_limit: str, as_json: bool) -> None:
    """Analyse an experiment folder (or one bundle, or a DP-3T `results` SQLite file, or an
    `eval` sightings CSV): a report folder with HTML and JSON."""
    import tempfile

    from agent.experiment.analyze import analyze
    from agent.experiment.interchange import import_published
    from agent.experiment.report import write_report

    with tempfile.TemporaryDirectory(prefix="ctagent-import-") as tmp:
        source = bundle_dir
        if bundle_dir.is_file():  # a published data set: imported on the fly, analysed unchanged
            source = import_published(bundle_dir, Path(tmp) / "experiment", now=_now())
        a = analyze(source, list(truth_paths), crowd_rank=crowd_rank, memory_limit=memory_limit)
    out = out_dir or (bundle_dir.with_name(bundle_dir.name + ".report") if bundle_dir.is_file()
                      else bundle_dir / "report")
    index = write_report(a, out, source=str(bundle_dir), generated_at=_now())
    if as_json:
        _echo_json({"report": str(index), "metrics": a.metrics, "devices": len(a.devices)})
        return
    click.echo(f"{len(a.devices)} device(s), {sum(d.sightings for d in a.devices):,} sightings; report: {index}")
    for name, mt in a.metrics.items() if a.has_truth else []:
        click.echo(f"  {name:7s} TP {mt['tp']} FP {mt['fp']} FN {mt['fn']} TN {mt['tn']}  precision "
                   f"{mt['precision']}  recall {mt['recall']}  F1 {mt['f1']}")


@experiment.command("import")
@click.argument("data_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@friendly_errors
def experiment_import(data_file: Path, out_dir: Path) -> None:
    """A published data set -> an experiment folder: a DP-3T bt-measurements `results` table
    (SQLite; its distances become the truth) or the plain sightings CSV of `ctagent eval`."""
    from agent.experiment.interchange import import_published

    import_published(data_file, out_dir, now=_now())
    click.echo(f"{out_dir}: imported; `ctagent experiment analyze {out_dir}`")


@experiment.command("export-dp3t")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--truth", "truth_paths", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@friendly_errors
def experiment_export_dp3t(bundle_dir: Path, out_file: Path, truth_paths: tuple[Path, ...]) -> None:
    """An experiment folder -> DP-3T bt-measurements `results` table (SQLite)."""
    from agent.experiment.interchange import export_dp3t

    n = export_dp3t(bundle_dir, out_file, list(truth_paths))
    click.echo(f"{out_file}: {n:,} rows")


@main.command("sim-medium")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The Unix socket the devices' [radio] sim_medium names.")
@click.option("--scenario", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help='JSON: {"devices": {"alice": {"position": [0, 0], "carriage": "hand", "room": 0}, ...}}')
@click.option("--position", "positions", multiple=True, metavar="NAME=X,Y",
              help="A device and where it stands, in metres (repeat; adds to --scenario).")
@click.option("--tick", "tick_s", type=click.FloatRange(0.05, 60), default=1.0, show_default=True,
              help="Seconds between deliveries.")
@click.option("--seed", default=0, show_default=True)
@friendly_errors
def sim_medium(socket_path: Path, scenario: Path | None, positions: tuple[str, ...], tick_s: float, seed: int) -> None:
    """A simulated medium for several `ctagent run --radio sim` on this machine (until Ctrl-C)."""
    import asyncio
    import contextlib

    from agent.ble.sim.shared import MediumService, check_placements, load_scenario, parse_position
    from agent.clock import RealClock
    from agent.logs import setup_logging

    placements = load_scenario(scenario) if scenario else {}
    placements.update(parse_position(p) for p in positions)
    check_placements(placements, "--position")
    if len(placements) < 2:
        raise UserError("a medium needs at least two devices: give --scenario or --position NAME=X,Y twice")
    setup_logging("INFO")
    click.echo(f"simulated medium on {socket_path}: " + ", ".join(
        f"{n} at ({p.x:g}, {p.y:g}) m" for n, p in sorted(placements.items())), err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(MediumService(placements, clock=RealClock(), tick_s=tick_s, seed=seed).serve(socket_path))


# -- backend -------------------------------------------------------------------------

def _backend_location(fn: F) -> F:
    """--data-dir / --database / --region, accepted before the subcommand (on the group)
    and after it (on every subcommand); the one given last wins."""
    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.ensure_object(dict)
            root = ctx.find_root().ensure_object(dict)
            root.setdefault("backend", {})[param.name] = value
        return value

    options = [
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     callback=remember, expose_value=False, is_eager=True,
                     help="Keys, exports and the embedded database [default: $CTAGENT_BACKEND_DIR, else "
                          "$XDG_DATA_HOME/ctagent-backend, i.e. ~/.local/share/ctagent-backend].") ,
        click.option("--database", default=None, envvar="CTAGENT_BACKEND_DATABASE", callback=remember,
                     expose_value=False, help="SQLAlchemy URL (default: SQLite in the data folder; "
                                              "postgresql://... needs the [postgresql] extra)."),
        click.option("--region", default=None, callback=remember, expose_value=False,
                     help="The region the export files name [default: XX]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.group()
@_backend_location
def backend() -> None:
    """The reference backend: codes, publish, signed exports, physicians' page."""
    from agent.extras import require

    try:
        require("backend", what="`ctagent backend`")
    except UserError as e:
        raise click.ClickException(str(e)) from None


def _backend_config(**settings: Any) -> Any:
    from backend import BackendConfig
    from backend.config import default_data_dir

    o = click.get_current_context().find_root().ensure_object(dict).get("backend", {})
    data_dir = Path(o.get("data_dir") or default_data_dir()).expanduser()
    return BackendConfig(data_dir, database_url=o.get("database"), region=o.get("region") or "XX", **settings)


def _backend(*, create: bool = False, **settings: Any) -> Any:
    """The backend in the chosen data folder. Only ``init`` and ``serve`` create one: any
    other command in a folder without a backend says so instead of making new keys."""
    from agent.clock import RealClock
    from backend import Backend

    config = _backend_config(**settings)
    if not create and not config.exists():
        raise UserError(f"there is no backend in {config.data_dir}: start one with `ctagent backend init`, or "
                        "point to yours with --data-dir or CTAGENT_BACKEND_DIR")
    return Backend(config, clock=RealClock())


def _fingerprinted(public_key_b64: str) -> str:
    from agent.protocol.export import key_fingerprint

    return f"{public_key_b64}\n  fingerprint {key_fingerprint(public_key_b64)}"


@backend.command("init")
@_backend_location
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def backend_init(as_json: bool) -> None:
    """Create a backend (keys, database) in the data folder; nothing if one is there."""
    from agent.protocol.export import key_fingerprint

    existed = _backend_config().exists()
    b = _backend(create=True)
    if as_json:
        _echo_json({"data_dir": str(b.config.data_dir), "created": not existed, "public_key": b.public_key_b64,
                    "fingerprint": key_fingerprint(b.public_key_b64)})
        return
    click.echo(f"{'backend already in' if existed else 'new backend in'} {b.config.data_dir}")
    click.echo("export signing public key (give it to the devices): " + _fingerprinted(b.public_key_b64))


@backend.command("serve")
@_backend_location
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--protocol", type=click.Choice(["gaen", "robert", "both"]), default="gaen", show_default=True,
              help="Serve the key server (gaen), the ROBERT server, or both.")
@click.option("--register-api-key", default=None, envvar="CTAGENT_ROBERT_REGISTER_KEY",
              help="ROBERT: require this X-API-Key to register (replaces the deployed captcha).")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="ADDRESS[/BITS]",
              envvar="CTAGENT_BACKEND_TRUSTED_PROXIES",
              help="A reverse proxy in front of the backend (repeat, or spaces in the variable): only its "
                   "X-Forwarded-For / X-Forwarded-Proto are believed. Default: none, the peer's address counts.")
@click.option("--secure-cookies", is_flag=True, envvar="CTAGENT_BACKEND_SECURE_COOKIES",
              help="Mark the page's cookies Secure on every request (TLS ends before the backend and no trusted "
                   "proxy sends X-Forwarded-Proto); they are Secure on HTTPS requests anyway.")
@click.option("--export-period", "export_period_s", type=click.IntRange(1, 86400), default=3600,
              show_default=True, help="Seconds between runs of the export job, which the server runs itself.")
@click.option("--rehearsal-embargo", "rehearsal_embargo_s", type=click.FloatRange(0, 86400), default=None,
              envvar="CTAGENT_BACKEND_REHEARSAL_EMBARGO",
              help="REHEARSALS ONLY: export a key this many seconds after its upload, even while it is still "
                   "broadcast (default: not before its day ended, as the key server does).")
@click.option("--trust-verifier", "outside_verifiers", type=(str, str, click.Path(dir_okay=False, exists=True)),
              multiple=True, metavar="ISSUER AUDIENCE PUBLIC_KEY.pem",
              help="Also publish keys with the certificates of this outside verification server (e.g. Google's "
                   "exposure-notifications-verification-server): its issuer (iss), the audience (aud) it writes "
                   "for this key server, and its ECDSA P-256 public key. Repeat for several.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, envvar="CTAGENT_BACKEND_WORKERS",
              help="Worker processes serving requests (production: one per core, hardware/backend.md); the export "
                   "job runs once, in the parent. Per-client request limits are shared out among them.")
@click.pass_context
@friendly_errors
def backend_serve(ctx, host, port, protocol, register_api_key, trusted_proxies, secure_cookies, export_period_s,
                  rehearsal_embargo_s, outside_verifiers, workers):
    """Serve the API, the physicians' page and the export files; run the export job."""
    import uvicorn

    from backend.schedule import ExportScheduler
    from backend.server import UVICORN_OPTIONS, serve_workers, server_app

    b = _backend(create=True, trusted_proxies=tuple(trusted_proxies), secure_cookies=secure_cookies,
                 export_period_s=export_period_s, rehearsal_embargo_s=rehearsal_embargo_s,
                 outside_verifiers=tuple(outside_verifiers))
    click.echo(f"backend in {b.config.data_dir}")
    if rehearsal_embargo_s is not None:
        click.echo(f"REHEARSAL: keys are exported {rehearsal_embargo_s:g} s after their upload, while still "
                   "broadcast; never run this with real users", err=True)
    rs = None
    if protocol in ("robert", "both"):
        from backend.robert import RobertConfig, RobertServer

        rs = RobertServer(b, RobertConfig(register_api_key=register_api_key))
        click.echo(f"ROBERT server public key: {rs.server_public_key}")
    click.echo("export signing public key (give it to the devices): " + _fingerprinted(b.public_key_b64))
    if not b.verification.users():
        click.echo("no physician account yet: add one with `ctagent backend user add NAME`", err=True)
    with ExportScheduler(b):
        if workers > 1:
            serve_workers(b.config, workers=workers, host=host, port=port, robert=rs.cfg if rs else None)
        else:
            uvicorn.run(server_app(b, rs), host=host, port=port, log_level="info", **UVICORN_OPTIONS)


@backend.command("code")
@_backend_location
@click.option("--test-type", type=click.Choice(["confirmed", "likely"]), default="confirmed", show_default=True)
@click.option("--format", "code_format", type=click.Choice(["digits", "robert"]), default="digits", show_default=True,
              help="digits: 8 digits and a 16-character long code; robert: 6 characters and a UUID, the formats "
                   "the TousAntiCovid app accepts.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def backend_code(test_type, code_format, as_json):
    """Issue a verification code (as a lab system would)."""
    c = _backend().verification.issue_code("cli", test_type=test_type, code_format=code_format)
    if as_json:
        _echo_json(c)
    else:
        click.echo(f"code {c['code']} (15 min)   long code {c['longCode']} (24 h)")


@backend.command("export")
@_backend_location
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def backend_export(as_json):
    """Write the signed export files of keys whose embargo ended (serve does it on its period)."""
    from agent.clock import iso_time

    b = _backend()
    with _progress(disable=as_json) as bar:
        task = bar.add_task("signing export files", total=None)
        names = b.exports.run(progress=lambda done, total: bar.update(task, completed=done, total=total))
    backlog = b.exports.backlog()
    first = None if backlog.first_export_at is None else iso_time(backlog.first_export_at)
    if as_json:
        _echo_json({"files_written": names, "keys_waiting": backlog.waiting, "first_export_at": first})
        return
    click.echo(f"{len(names)} export file(s) written" + "".join(f"\n  {n}" for n in names))
    if backlog.waiting:
        click.echo(f"{backlog.waiting} key(s) wait for their embargo (the end of the day they were broadcast); "
                   f"the first can go into a file at {first}")


@backend.command("public-key")
@_backend_location
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def backend_public_key(as_json):
    """Print the export signing public key (base64 SubjectPublicKeyInfo; its fingerprint on stderr)."""
    from agent.protocol.export import key_fingerprint

    key = _backend().public_key_b64
    if as_json:
        _echo_json({"public_key": key, "fingerprint": key_fingerprint(key)})
        return
    click.echo(key)  # alone on stdout: scripts capture it
    click.echo(f"fingerprint {key_fingerprint(key)}", err=True)


def _new_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("password", hide_input=True, confirmation_prompt=True)


@backend.group("user")
def backend_user() -> None:
    """Physicians' accounts on the page that issues codes."""


@backend_user.command("add")
@_backend_location
@click.argument("username")
@click.option("--health-authority", default="default", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin (scripts).")
@friendly_errors
def backend_user_add(username, health_authority, password_stdin):
    """Create an account; the password is asked for (never on the command line)."""
    b = _backend()
    b.verification.add_user(username, _new_password(password_stdin), health_authority)
    click.echo(f"user {username} added")


@backend_user.command("list")
@_backend_location
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def backend_user_list(as_json):
    """The accounts and their health authorities."""
    users = _backend().verification.users()
    if as_json:
        _echo_json([{"user": u, "health_authority": ha} for u, ha in users])
    elif not users:
        click.echo("no user (add one with `ctagent backend user add NAME`)")
    else:
        for u, ha in users:
            click.echo(f"{u}\t{ha}")


@backend_user.command("passwd")
@_backend_location
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin (scripts).")
@friendly_errors
def backend_user_passwd(username, password_stdin):
    """Set a new password; the account's open sessions end."""
    b = _backend()
    b.verification.set_password(username, _new_password(password_stdin))
    click.echo(f"password of {username} changed; its sessions ended")


@backend_user.command("remove")
@_backend_location
@click.argument("username")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def backend_user_remove(username, yes):
    """Delete an account and end its sessions."""
    b = _backend()
    if not yes:
        click.confirm(f"remove the account {username}?", abort=True)
    b.verification.remove_user(username)
    click.echo(f"user {username} removed")


@backend.group("api-key")
def backend_api_key() -> None:
    """API keys of lab systems that issue codes (``X-API-Key`` on /api/issue)."""


@backend_api_key.command("add")
@_backend_location
@click.argument("name")
@click.option("--health-authority", default="default", show_default=True)
@friendly_errors
def backend_api_key_add(name, health_authority):
    """Create a key; it is printed once (only its HMAC is kept)."""
    key = _backend().verification.add_api_key(name, health_authority)
    click.echo(f"API key {name} (shown once, keep it secret):", err=True)
    click.echo(key)


@backend_api_key.command("list")
@_backend_location
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def backend_api_key_list(as_json):
    """The keys' names and health authorities (the keys themselves are not kept)."""
    keys = _backend().verification.api_keys()
    if as_json:
        _echo_json([{"name": n, "health_authority": ha} for n, ha in keys])
    elif not keys:
        click.echo("no API key (add one with `ctagent backend api-key add NAME`)")
    else:
        for n, ha in keys:
            click.echo(f"{n}\t{ha}")


@backend_api_key.command("remove")
@_backend_location
@click.argument("name")
@friendly_errors
def backend_api_key_remove(name):
    """Revoke a key at once."""
    _backend().verification.remove_api_key(name)
    click.echo(f"API key {name} removed")


if __name__ == "__main__":  # pragma: no cover
    main()
