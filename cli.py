"""ctagent command line: thin click front over the ``agent`` package."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from agent import __version__

#: Exceptions that are the user's to fix: printed as one sentence, exit 1.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


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
def main(debug: bool) -> None:
    """ctagent: a Bluetooth LE contact-tracing device agent."""


@main.command()
@click.option("--scenario", type=click.Choice(["office", "train"]), default="office", show_default=True)
@click.option("--devices", default=24, show_default=True, help="Number of virtual devices (>= 4).")
@click.option("--days", default=2, show_default=True, help="Simulated days (1-14).")
@click.option("--seed", default=1, show_default=True, help="Same seed, same result.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Where the PNG figure goes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@friendly_errors
def demo(scenario, devices, days, seed, out_dir, as_json):
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

        res = run_demo(devices=devices, days=days, seed=seed, scenario=scenario, out_dir=out_dir,
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
                  "yes" if r["notified"] else "no", f"{r['minutes_counted']:.0f}", r["carriage"],
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
    from backend.core import Backend, BackendConfig

    o = ctx.obj
    return Backend(BackendConfig(o["data_dir"], database_url=o["database"], region=o["region"]))


@backend.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--add-user", nargs=2, metavar="USER PASSWORD", default=None, help="Create a physician account first.")
@click.pass_context
@friendly_errors
def backend_serve(ctx, host, port, add_user):
    """Serve the API, the physicians' page and the export files."""
    from backend.app import serve

    b = _backend(ctx)
    if add_user:
        b.add_user(*add_user)
    click.echo(f"export signing public key (give it to the agents): {b.public_key_b64}")
    serve(b, host, port)


@backend.command("code")
@click.option("--test-type", type=click.Choice(["confirmed", "likely"]), default="confirmed", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@friendly_errors
def backend_code(ctx, test_type, as_json):
    """Issue a verification code (as a lab system would)."""
    c = _backend(ctx).issue_code("cli", test_type=test_type)
    click.echo(json.dumps(c) if as_json else f"code {c['code']} (15 min)   long code {c['longCode']} (24 h)")


@backend.command("export")
@click.pass_context
@friendly_errors
def backend_export(ctx):
    """Write the signed export files of keys whose embargo ended."""
    names = _backend(ctx).run_export()
    click.echo(f"{len(names)} export file(s) written" + ("".join(f"\n  {n}" for n in names)))


@backend.command("public-key")
@click.pass_context
@friendly_errors
def backend_public_key(ctx):
    """Print the export signing public key (base64 SubjectPublicKeyInfo)."""
    click.echo(_backend(ctx).public_key_b64)


if __name__ == "__main__":  # pragma: no cover
    main()
