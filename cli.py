"""ctagent command line: thin click front over the ``agent`` package."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from agent import __version__

from agent.store import StoreError, StoreKeyError  # noqa: E402
from agent.sync.client import SyncError  # noqa: E402

#: Exceptions that are the user's to fix: printed as one sentence, exit 1.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, StoreError, StoreKeyError, SyncError)
DEFAULT_CONFIG = Path("~/.config/ctagent/ctagent.toml").expanduser()


def friendly_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except _USER_ERRORS as e:
            if ctx.find_root().params.get("debug"):
                raise
            raise click.ClickException(str(e)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctagent")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_CONFIG,
              envvar="CTAGENT_CONFIG", show_default=True, help="The TOML configuration file.")
@click.pass_context
def main(ctx, debug: bool, config_path: Path) -> None:
    """ctagent: a Bluetooth LE contact-tracing device agent."""
    ctx.obj = {"config_path": config_path}


def _cfg():
    from agent.config import load_config

    return load_config(click.get_current_context().find_root().obj["config_path"])


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console(width=max(100, Console().width)).print(t)


def _date(day: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(day * 86400, dt.timezone.utc).date().isoformat()


# -- the device ------------------------------------------------------------------------

@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("~/.local/share/ctagent").expanduser(), show_default=True)
@click.option("--key", type=click.Choice(["keyfile", "passphrase"]), default="keyfile", show_default=True,
              help="Master key from a 0600 key file, or from $CTAGENT_PASSPHRASE (scrypt).")
@click.option("--radio", type=click.Choice(["bluez", "sim"]), default="bluez", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing configuration file.")
@friendly_errors
def init(data_dir, key, radio, force):
    """Write a commented configuration and create the encrypted store."""
    from agent import ops

    path = click.get_current_context().find_root().obj["config_path"]
    cfg = ops.init(path, data_dir=data_dir, key=key, radio=radio, force=force)
    click.echo(f"configuration: {path}\nstore: {cfg.db_path} (master key: "
               f"{cfg.key_file if key == 'keyfile' else '$CTAGENT_PASSPHRASE'})")


@main.command()
@click.option("--radio", type=click.Choice(["bluez", "sim"]), default=None, help="Override [radio] kind.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING"]), default="INFO", show_default=True)
@friendly_errors
def run(radio, log_level):
    """Run the agent: advertise, scan, store, sync, notify (until SIGTERM)."""
    from agent import ops

    cfg = _cfg()
    ops.setup_logging(log_level)
    sys.exit(ops.run_daemon(cfg, radio=radio or cfg.radio.kind))


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def status(as_json):
    """Health, counts, last sync and exposure state."""
    from agent import ops
    from agent.sync.client import STATE_LAST_SUCCESS

    cfg = _cfg()
    daemon = None
    sp = cfg.data_dir / "status.json"
    if sp.exists():
        daemon = json.loads(sp.read_text())
    with ops.open_store(cfg) as store:
        out = {"store": str(cfg.db_path), "days_stored": len(store.encounter_days()),
               "encounters": sum(store.encounter_days().values()), "own_keys": len(store.teks()),
               "exposed_days": [_date(e["day"]) for e in store.exposures()],
               "last_sync": store.get_state(STATE_LAST_SUCCESS), "daemon": daemon}
    if as_json:
        _echo_json(out)
        return
    exposure = "EXPOSED on " + ", ".join(out["exposed_days"]) if out["exposed_days"] else "no exposure found"
    click.echo(f"store        {out['store']}\nencounters   {out['encounters']} over {out['days_stored']} day(s)\n"
               f"own keys     {out['own_keys']}\nlast sync    {out['last_sync'] or 'never'}\nexposure     {exposure}")
    if daemon:
        click.echo(f"daemon       mode={daemon['mode']} rotations={daemon['rotations']} sightings={daemon['sightings']}")
    else:
        click.echo("daemon       no status file (not running?)")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def encounters(as_json):
    """Per-day summary of what was heard (nothing identifying)."""
    from agent import ops

    with ops.open_store(_cfg()) as store:
        rows = ops.encounter_summary(store)
    if as_json:
        _echo_json([{**r, "date": _date(r["day"])} for r in rows])
        return
    _table("Encounters per day", ["date", "identifiers heard", "samples", "minutes observed"],
           [[_date(r["day"]), r["encounters"], r["samples"], r["windows"]] for r in rows])


@main.command()
@click.option("--explain", is_flag=True, help="Windows, distances and minutes behind each decision.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def exposures(explain, as_json):
    """Exposures found."""
    from agent import ops

    with ops.open_store(_cfg()) as store:
        exps = store.exposures()
    if as_json:
        _echo_json([e if explain else {k: v for k, v in e.items() if k != "explain"} for e in exps])
        return
    if not exps:
        click.echo("no exposure found")
        return
    _table("Exposures", ["date", "minutes", "rule"], [[_date(e["day"]), e["minutes"], e["rule"]] for e in exps])
    if explain:
        for e in exps:
            click.echo(f"\n{_date(e['day'])}:")
            for w in e["explain"]["windows"]:
                click.echo(f"  window {w['start']:.0f}: attenuation {w['attenuation_db']} dB, "
                           f"~{w['distance_m']} m, counted {w['minutes']} min{' (gap filled)' if w['filled'] else ''}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def sync(as_json):
    """Download new export files, verify them and check for exposure now."""
    import time

    from agent import ops

    cfg = _cfg()
    client = ops.sync_client(cfg)
    if client is None:
        raise click.ClickException("no backend configured: set [sync] backend_url in " + cfg.source)
    from rich.progress import Progress

    with ops.open_store(cfg) as store, Progress(transient=True, disable=as_json) as bar:
        task = bar.add_task("downloading and verifying export files", total=None)
        agent = ops.make_agent(cfg, store)
        res, decisions = agent.sync(client, time.time(),
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    out = {"offline": res.offline, "files": res.files_new, "failed_files": res.files_failed, "keys": len(res.keys),
           "exposed": any(d.exposed for d in decisions)}
    if as_json:
        _echo_json(out)
    elif res.offline:
        click.echo("backend unreachable: nothing downloaded (the daemon retries by itself)")
    else:
        click.echo(f"{res.files_new} new export file(s), {len(res.keys)} key(s) checked; "
                   + ("EXPOSURE FOUND: see `ctagent exposures`" if out["exposed"] else "no exposure found"))


@main.command()
@click.option("--code", required=True, help="The verification code from the health authority.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def declare(code, yes):
    """Upload your keys of the last 14 days (you tested positive)."""
    import time

    from agent import ops
    from agent.sync.client import teks_to_upload

    cfg = _cfg()
    if cfg.agent.protocol == "robert":
        with ops.open_store(cfg) as store:
            dev = ops.robert_device(cfg, store)
            n = len(store.hellos())
            if not yes:
                click.confirm(f"Upload the {n} HELLO(s) your device heard in the last 14 days to the server? "
                              "It will tell the people concerned they are at risk.", abort=True)
            resp = dev.report(code, time.time())
        click.echo(f"reported: {resp['accepted']} HELLO(s) accepted, {resp['dropped']} dropped by the server")
        return
    client = ops.sync_client(cfg)
    if client is None:
        raise click.ClickException("no backend configured: set [sync] backend_url in " + cfg.source)
    with ops.open_store(cfg) as store:
        teks = teks_to_upload(store, time.time())
        if not yes:
            click.confirm(f"Upload your {len(teks)} key(s) of the last 14 days? People you met will be notified "
                          "without learning who you are.", abort=True)
        resp = client.declare(code, teks, store, now=time.time())
    click.echo(f"published: {resp['insertedExposures']} key(s)")


@main.command()
@click.option("--yes", is_flag=True)
@friendly_errors
def unregister(yes):
    """ROBERT mode: leave the server (it forgets this device and its exposures)."""
    import time

    from agent import ops

    cfg = _cfg()
    if cfg.agent.protocol != "robert":
        raise click.ClickException("unregister is for ROBERT mode ([agent] protocol = \"robert\")")
    if not yes:
        click.confirm("Unregister this device from the ROBERT server?", abort=True)
    with ops.open_store(cfg) as store:
        ops.robert_device(cfg, store).unregister(time.time())
    click.echo("unregistered")


@main.command("delete-history")
@friendly_errors
def delete_history():
    """ROBERT mode: ask the server to delete this device's exposure history."""
    import time

    from agent import ops

    cfg = _cfg()
    if cfg.agent.protocol != "robert":
        raise click.ClickException("delete-history is for ROBERT mode ([agent] protocol = \"robert\")")
    with ops.open_store(cfg) as store:
        ops.robert_device(cfg, store).delete_history(time.time())
    click.echo("exposure history deleted on the server")


@main.command("export")
@click.option("--consent", is_flag=True, help="I have the consent of this device's carrier for this export.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@friendly_errors
def export_cmd(consent, fmt, output):
    """Research export of encounter summaries, pseudonymised."""
    from agent import ops

    if not consent:
        raise click.ClickException("a research export needs the carrier's explicit consent: add --consent")
    with ops.open_store(_cfg()) as store:
        text = ops.research_export(store, fmt)
    if output:
        from agent.store.keys import write_private_file

        write_private_file(output, text.encode())
        click.echo(f"written to {output} (mode 0600)")
    else:
        click.echo(text, nl=False)


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def purge(yes):
    """Erase the store: keys, encounters, exposures (cannot be undone)."""
    from agent import ops

    cfg = _cfg()
    if not yes:
        click.confirm(f"Erase everything in {cfg.data_dir}?", abort=True)
    removed = ops.purge(cfg)
    click.echo(f"erased {len(removed)} file(s)")


@main.command()
@click.option("--adapter", default="hci0", show_default=True)
def doctor(adapter):
    """Check Bluetooth hardware, BlueZ and permissions; say what to fix."""
    from agent import ops

    ok, checks = ops.doctor(adapter)
    for name, good, detail in checks:
        click.echo(f"[{'ok' if good else 'FAIL'}] {name}: {detail}")
    if not ok:
        sys.exit(1)


@main.command()
@click.option("--scenario", type=click.Choice(["office", "train"]), default="office", show_default=True)
@click.option("--devices", default=24, show_default=True, help="Number of virtual devices (>= 4).")
@click.option("--days", default=2, show_default=True, help="Simulated days (1-14).")
@click.option("--seed", default=1, show_default=True, help="Same seed, same result.")
@click.option("--protocol", type=click.Choice(["gaen", "robert"]), default="gaen", show_default=True,
              help="Exposure Notification (decentralized) or ROBERT (centralized).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Where the PNG figure goes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@friendly_errors
def demo(scenario, devices, days, seed, protocol, out_dir, as_json):
    """A simulated field experiment end to end, no Bluetooth needed."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.demo import result_json, run_demo

    console = Console(stderr=as_json, width=max(Console().width, 120))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=as_json) as prog:
        tasks = {}

        def progress(stage: str, frac: float) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=1.0)
            prog.update(tasks[stage], completed=frac)

        res = run_demo(devices=devices, days=days, seed=seed, scenario=scenario, protocol=protocol, out_dir=out_dir,
                       log=(lambda m: None) if as_json else console.print, progress=progress)
    if as_json:
        click.echo(result_json(res))
        return
    from rich.table import Table

    t = Table(title="Who was notified, against who truly spent >= 15 min within 1 m of person 0 (on one day)")
    for c in ("device", "true close min (max/day)", "truly exposed", "notified", "minutes counted",
              "phone carried (p0/device)", "outcome"):
        t.add_column(c, justify="right")
    colours = {"TP": "green", "TN": "dim", "FP": "yellow", "FN": "red"}
    for r in res.rows:
        if r["outcome"] == "TN" and r["true_close_minutes"] == 0:
            continue
        t.add_row(str(r["device"]), f"{r['true_close_minutes']:.1f}", "yes" if r["truly_exposed"] else "no",
                  "yes" if r["notified"] else "no",
                  f"{r['minutes_counted']:.0f}" if protocol == "gaen" else "(server)", r["carriage"],
                  f"[{colours[r['outcome']]}]{r['outcome']}[/]")
    console.print(t)
    hidden = sum(1 for r in res.rows if r["outcome"] == "TN" and r["true_close_minutes"] == 0)
    console.print(f"({hidden} devices never within 1 m of person 0 and not notified: true negatives, not listed)")
    console.print(f"TP {res.tp}  FP {res.fp}  FN {res.fn}  TN {res.tn}   precision {res.precision:.2f}  "
                  f"recall {res.recall:.2f}   figure: {res.png}   ({res.wall_s:.1f} s)")
    console.print("A phone in a pocket or bag adds 6-10 dB of body loss on each side: contacts then look farther "
                  "than 1 m (see docs/proximity.md).")


@main.command("eval")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="CSV: pair,timestamp,rssi,tx_power[,receiver_model,transmitter_model]")
@click.option("--rule", type=click.Choice(["distance", "buckets"]), default="distance", show_default=True)
@click.option("--distance-threshold", type=float, default=1.0, show_default=True, help="metres")
@click.option("--duration-threshold", type=float, default=15.0, show_default=True, help="minutes")
@click.option("--calibration", "calibration_files", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Extra calibration list(s) (Google EN format); hardware/calibration.csv is always loaded.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def eval_cmd(input_path, rule, distance_threshold, duration_threshold, calibration_files, as_json):
    """Run the proximity rule on your own recorded sightings."""
    from agent.exposure.calibration import CalibrationTable, bundled_calibration_path
    from agent.exposure.evaluate import evaluate, read_sightings_csv
    from agent.exposure.rule import ProximityConfig

    cfg = ProximityConfig(rule=rule, distance_threshold_m=distance_threshold, duration_threshold_min=duration_threshold)
    cal = CalibrationTable.load(*calibration_files, bundled_calibration_path())
    pairs = read_sightings_csv(input_path.read_text(encoding="utf-8", errors="replace"), source=str(input_path))
    results = evaluate(pairs, cfg, cal)
    if as_json:
        click.echo(json.dumps({"rule": rule, "distance_threshold_m": distance_threshold,
                               "duration_threshold_min": duration_threshold,
                               "pairs": [r.to_dict() for r in results]}, indent=1))
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


# -- backend -------------------------------------------------------------------------

@main.group()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("backend-data"),
              show_default=True, envvar="CTAGENT_BACKEND_DIR", help="Keys, exports and the embedded database.")
@click.option("--database", default=None, envvar="CTAGENT_BACKEND_DATABASE",
              help="SQLAlchemy URL (default: SQLite in --data-dir; postgresql://... works too).")
@click.option("--region", default="XX", show_default=True)
@click.pass_context
def backend(ctx, data_dir, database, region):
    """The reference backend: codes, publish, signed exports."""
    ctx.obj = {"data_dir": data_dir, "database": database, "region": region}


def _backend(ctx):
    from agent.clock import RealClock
    from backend import Backend, BackendConfig

    o = ctx.obj
    return Backend(BackendConfig(o["data_dir"], database_url=o["database"], region=o["region"]), clock=RealClock())


def _backend_refusals(fn):
    """The backend's refusals (a weak password, an unknown test type) as one sentence."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from backend.errors import ApiError

        try:
            return fn(*args, **kwargs)
        except ApiError as e:
            raise click.ClickException(e.message) from None
    return wrapper


@backend.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--add-user", nargs=2, metavar="USER PASSWORD", default=None, help="Create a physician account first.")
@click.option("--protocol", type=click.Choice(["gaen", "robert", "both"]), default="gaen", show_default=True,
              help="Serve the key server (gaen), the ROBERT server, or both.")
@click.option("--register-api-key", default=None, envvar="CTAGENT_ROBERT_REGISTER_KEY",
              help="ROBERT: require this X-API-Key to register (replaces the deployed captcha).")
@click.pass_context
@friendly_errors
@_backend_refusals
def backend_serve(ctx, host, port, add_user, protocol, register_api_key):
    """Serve the API, the physicians' page and the export files."""
    import uvicorn

    from backend.app import create_app

    b = _backend(ctx)
    if add_user:
        b.verification.add_user(*add_user)
    rs = None
    if protocol in ("robert", "both"):
        from backend.robert import RobertConfig, RobertServer

        rs = RobertServer(b, RobertConfig(register_api_key=register_api_key))
        click.echo(f"ROBERT server public key: {rs.server_public_key}")
    click.echo(f"export signing public key (give it to the agents): {b.public_key_b64}")
    uvicorn.run(create_app(b, rs), host=host, port=port, log_level="info")


@backend.command("code")
@click.option("--test-type", type=click.Choice(["confirmed", "likely"]), default="confirmed", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly_errors
@_backend_refusals
def backend_code(ctx, test_type, as_json):
    """Issue a verification code (as a lab system would)."""
    c = _backend(ctx).verification.issue_code("cli", test_type=test_type)
    click.echo(json.dumps(c) if as_json else f"code {c['code']} (15 min)   long code {c['longCode']} (24 h)")


@backend.command("export")
@click.pass_context
@friendly_errors
def backend_export(ctx):
    """Write the signed export files of keys whose embargo ended."""
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("signing export files", total=None)
        names = _backend(ctx).exports.run(progress=lambda done, total: bar.update(task, completed=done, total=total))
    click.echo(f"{len(names)} export file(s) written" + ("".join(f"\n  {n}" for n in names)))


@backend.command("public-key")
@click.pass_context
@friendly_errors
def backend_public_key(ctx):
    """Print the export signing public key (base64 SubjectPublicKeyInfo)."""
    click.echo(_backend(ctx).public_key_b64)


if __name__ == "__main__":  # pragma: no cover
    main()
