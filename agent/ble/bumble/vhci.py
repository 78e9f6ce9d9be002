"""Attach virtual controllers with the project's radio model to Linux through ``vhci``
(or serve them on any other bumble transport), all on one :class:`RadioLink`:

    python -m agent.ble.bumble.vhci alice=0,0 bob=1.5,0:legacy [--seed 0] [--duration S]
        [--transport NAME=MONIKER] [--tx-power NAME=DBM] [--rx-correction NAME=DB]
        [--scenario FILE] [--snoop DIR] [--duplicate-filter data|address|off]

- ``NAME=X,Y`` is one controller at (X, Y) metres; ``:legacy`` makes it a Raspberry Pi
  3's legacy-only controller (Bluetooth 4.1, no extended advertising), otherwise it is a
  Bluetooth 5.0 controller with extended advertising. ``--scenario FILE`` gives the
  placements (position, carriage, room) as ``ctagent sim-medium`` reads them; a name
  given on the command line must be in it.
- Each controller opens ``vhci`` (``/dev/vhci``: the kernel adds one ``hciN`` per
  controller, in the order given; root, module ``hci_vhci``) unless
  ``--transport NAME=MONIKER`` says otherwise, e.g. ``tcp-server:127.0.0.1:9001`` for a
  bumble host (``ctagent run`` with ``[radio] kind = "bumble"``, ``bumble_transport =
  "tcp-client:127.0.0.1:9001"``).
- Its public address is derived from its name (``controller.public_address_for``), so
  a harness finds ``alice`` by address in ``btmgmt info`` / ``busctl``.
- It prints one JSON line per controller once attached, ``{"name", "kind",
  "public_address", "transport", "hci_index"}`` (``hci_index`` as the kernel announced
  it over vhci, else null), then ``{"ready": true}``; at exit ``{"transmitted",
  "delivered"}``. It runs until SIGTERM/SIGINT or ``--duration`` seconds.
- ``--snoop DIR`` writes each controller's HCI traffic to ``DIR/NAME.btsnoop``.
- ``--duplicate-filter`` says what the controllers' duplicate filter compares when the
  host turns it on (Linux does for discovery): ``data`` (address and data, the default:
  a report again when the payload changes), ``address`` (the spec's minimum: one report
  per address until scanning restarts) or ``off`` (every packet reported).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...errors import InputFileError, UserError
from ..sim.shared import Placement, check_placements, load_scenario

_SPEC = re.compile(r"^(?P<name>[\w.-]+)(=(?P<x>[-+0-9.eE]+),(?P<y>[-+0-9.eE]+))?(?P<legacy>:legacy)?$")


@dataclass(frozen=True)
class ControllerSpec:
    name: str
    placement: Placement
    legacy: bool = False
    transport: str = "vhci"
    tx_power_dbm: float = 4.0
    rx_correction_db: float = 0.0


def parse_specs(args: argparse.Namespace) -> list[ControllerSpec]:
    """The controllers the command line asks for; an InputFileError says what is wrong."""
    scenario = load_scenario(Path(args.scenario)) if args.scenario else {}
    specs: list[ControllerSpec] = []
    for text in args.controllers:
        m = _SPEC.match(text)
        if m is None:
            raise InputFileError(f"{text!r}: write NAME=X,Y (metres), optionally followed by :legacy")
        name = m["name"]
        if m["x"] is not None:
            try:
                placement = Placement(float(m["x"]), float(m["y"]), *(
                    (scenario[name].carriage, scenario[name].room) if name in scenario else ()))
            except ValueError:
                raise InputFileError(f"{text!r}: the position must be two numbers") from None
        elif name in scenario:
            placement = scenario[name]
        else:
            raise InputFileError(f"{text!r}: no position (NAME=X,Y) and no such device in the scenario")
        check_placements({name: placement}, text)
        specs.append(ControllerSpec(name, placement, legacy=bool(m["legacy"])))
    if not specs:
        raise InputFileError("name at least one controller (NAME=X,Y)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputFileError("each controller needs its own name")
    by_name = {s.name: s for s in specs}
    for option, field_, convert in (("--transport", "transport", str), ("--tx-power", "tx_power_dbm", float),
                                    ("--rx-correction", "rx_correction_db", float)):
        for item in getattr(args, field_):
            name, sep, value = item.partition("=")
            if not sep or name not in by_name:
                raise InputFileError(f"{option} {item!r}: write NAME=VALUE for one of {', '.join(names)}")
            try:
                changes: dict[str, Any] = {field_: convert(value)}
                by_name[name] = replace(by_name[name], **changes)
            except ValueError:
                raise InputFileError(f"{option} {item!r}: {value!r} is not a number") from None
    return [by_name[n] for n in names]


class _HciIndex(logging.Handler):
    """Catches the index that the kernel gives a new vhci controller (bumble logs it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.index: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"HCI index (\d+)", record.getMessage())
        if m:
            self.index = int(m[1])


async def serve(specs: list[ControllerSpec], *, seed: int = 0, duration: float | None = None,
                duplicate_filter: str = "data",
                snoop_dir: Path | None = None, stop: asyncio.Event | None = None,
                announce: bool = True) -> dict[str, int]:
    """Attach the controllers and run until ``stop`` is set or ``duration`` passes;
    ``announce``: print the JSON lines."""
    say = print if announce else (lambda *args, **kw: None)
    from bumble.snoop import BtSnooper
    from bumble.transport import open_transport
    from bumble.transport.common import SnoopingTransport

    from .controller import ModelledController, RadioLink

    stop = stop or asyncio.Event()
    link = RadioLink(seed=seed)
    catcher = _HciIndex()
    vhci_log = logging.getLogger("bumble.transport.vhci")
    vhci_log.addHandler(catcher)
    vhci_log.setLevel(logging.INFO)
    transports: list[Any] = []
    controllers: list[ModelledController] = []
    try:
        for spec in specs:
            catcher.index = None
            try:
                transport = await open_transport(spec.transport)
            except Exception as e:  # bumble raises OSError, TransportSpecError, ValueError, ...
                raise UserError(f"controller {spec.name}: cannot open transport {spec.transport!r} "
                                f"({type(e).__name__}: {e}); for vhci, run as root with the hci_vhci module "
                                "loaded") from None
            if snoop_dir is not None:
                snoop_dir.mkdir(parents=True, exist_ok=True)
                trace = (snoop_dir / f"{spec.name}.btsnoop").open("wb")
                transport = SnoopingTransport(transport, BtSnooper(trace), trace.close)
            transports.append(transport)
            controllers.append(ModelledController(
                spec.name, link=link, placement=spec.placement, legacy=spec.legacy, tx_power_dbm=spec.tx_power_dbm,
                rx_correction_db=spec.rx_correction_db, host_source=transport.source, host_sink=transport.sink,
                duplicate_filter=duplicate_filter))
            if spec.transport.startswith("vhci"):
                for _ in range(50):  # the index arrives with the first packet from the kernel
                    if catcher.index is not None:
                        break
                    await asyncio.sleep(0.02)
            say(json.dumps({"name": spec.name, "kind": "legacy" if spec.legacy else "extended",
                              "public_address": controllers[-1].public_address.to_string(False),
                              "transport": spec.transport, "hci_index": catcher.index}), flush=True)
        say(json.dumps({"ready": True}), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
    finally:
        vhci_log.removeHandler(catcher)
        for c in controllers:
            c.detach()
        for t in transports:
            with contextlib.suppress(Exception):
                await t.close()
    result = {"transmitted": link.transmitted, "delivered": link.delivered}
    say(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.ble.bumble.vhci", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("controllers", nargs="*", metavar="NAME=X,Y[:legacy]")
    parser.add_argument("--scenario", help="placements as `ctagent sim-medium --scenario` reads them")
    parser.add_argument("--transport", action="append", default=[], metavar="NAME=MONIKER",
                        help="a bumble transport instead of vhci (e.g. tcp-server:127.0.0.1:9001)")
    parser.add_argument("--tx-power", dest="tx_power_dbm", action="append", default=[], metavar="NAME=DBM")
    parser.add_argument("--rx-correction", dest="rx_correction_db", action="append", default=[],
                        metavar="NAME=DB")
    parser.add_argument("--seed", type=int, default=0, help="the radio model's seed")
    parser.add_argument("--duration", type=float, default=None, help="seconds, then exit (default: until a signal)")
    parser.add_argument("--snoop", type=Path, default=None, help="a folder for one btsnoop file per controller")
    parser.add_argument("--duplicate-filter", choices=("data", "address", "off"), default="data",
                        help="what the duplicate filter compares when the host turns it on")
    args = parser.parse_args(argv)
    try:
        specs = parse_specs(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(specs, seed=args.seed, duration=args.duration, snoop_dir=args.snoop, stop=stop,
                    duplicate_filter=args.duplicate_filter)

    try:
        asyncio.run(run())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
