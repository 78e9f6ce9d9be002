"""Demo benchmark: `ctagent demo` end to end as a user runs it (a subprocess; 24 devices,
2 days, seed 1), each protocol family; and its hot path, the simulated devices taking
the medium's samples into their encrypted stores, next to the naive reference measured
in the same run: every sample through ``Aggregator.add_raw`` one by one (the daemon's
path) and a flush every simulated minute (the daemon's cadence), which is how the demo
worked before. Both paths must leave the same encounters (checked).

Run:  .venv/bin/python -m benchmarks.bench_demo [--repeat 3] [--hours 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.ble.sim.medium import Medium, MediumConfig, SimDevice
from agent.clock import DAY_SECONDS, ManualClock
from agent.exposure.aggregate import Aggregator
from agent.store import Store
from agent.store.keys import KeyFile, create_key_file

T0 = 20_000 * DAY_SECONDS + 9 * 3600
DEVICES = 24
TICK_S = 8.0


def run_command(args: list[str]) -> tuple[float, float, float, dict]:
    """(wall s, CPU s, peak RSS MiB, the JSON it printed) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, json.loads(out)


def samples(hours: float, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Ticks of an office: the medium's draws for 24 devices at desks, identifiers
    rotating every ~12 min; per tick (receiver, time, identifier, RSSI) arrays."""
    rng = np.random.default_rng(seed)
    medium = Medium([SimDevice(f"d{i}", 4.0, 0.0) for i in range(DEVICES)], MediumConfig(), seed=seed)  # a Pi's
    pos = rng.uniform(0, 12, (DEVICES, 2))
    room = np.zeros(DEVICES, dtype=int)
    active = np.ones(DEVICES, dtype=bool)
    ident = np.arange(DEVICES)
    rotate_at = T0 + rng.uniform(0, 720, DEVICES)
    out = []
    for k in range(int(hours * 3600 / TICK_S)):
        t = T0 + k * TICK_S
        due = rotate_at <= t
        ident[due] = ident.max() + 1 + np.arange(int(due.sum()))
        rotate_at[due] = t + 720
        dr = medium.draw(t, TICK_S, pos + rng.normal(0, 0.05, pos.shape), room, active)
        out.append((dr.rx, dr.t, ident[dr.tx], dr.rssi))
    return out


def ingest(ticks, folder: Path, *, naive: bool) -> tuple[float, int, list[tuple]]:
    """(seconds, stored rows, every stored window): all devices' samples into their stores.
    Windows, not encounters: with writes every 30 minutes an identifier silent for more
    than 5 minutes and heard again before the next write stays one encounter."""
    clock = ManualClock(T0)
    stores = [Store.create(folder / f"{i}.db", KeyFile(create_key_file(folder / f"{i}.key")), clock=clock,
                           durable=False) for i in range(DEVICES)]
    aggs = [Aggregator() for _ in range(DEVICES)]
    names = {}

    def identifiers(i: int) -> tuple[bytes, bytes]:
        if i not in names:
            names[i] = (int(i).to_bytes(16, "big"), b"\0\0\0\0")
        return names[i]

    flush_every = 60.0 if naive else 1800.0
    block: list = []
    next_flush = T0 + flush_every
    written = 0
    t0 = time.perf_counter()
    for k, tick in enumerate(ticks):
        clock.t = T0 + (k + 1) * TICK_S
        if naive:
            rx, ts, ids, rssi = tick
            for r, t, i, v in zip(rx.tolist(), ts.tolist(), ids.tolist(), rssi.tolist()):
                rpi, aem = identifiers(i)
                aggs[r].add_raw(t, rpi, aem, v)
        else:
            block.append(tick)
        if clock.t >= next_flush or k == len(ticks) - 1:
            final = k == len(ticks) - 1
            if block:
                rx, ts, ids, rssi = (np.concatenate(a) for a in zip(*block))
                block = []
                for r in range(DEVICES):
                    mine = rx == r
                    if mine.any():
                        aggs[r].add_block(ts[mine], ids[mine], rssi[mine],
                                          {i: identifiers(i) for i in np.unique(ids[mine]).tolist()})
            for agg, store in zip(aggs, stores):
                minutes = agg.completed_minutes(clock.t, final=final)
                batch, closed = agg.flush_closing(clock.t, final=final)
                with store.rows.transaction():
                    written += store.encounters.write(batch, closed=closed)
                    store.heard_minutes.add(minutes)
            next_flush = clock.t + flush_every
    took = time.perf_counter() - t0
    windows = sorted((k, e.rpi, w.index, w.count, w.power_sum_mw, w.rssi_max)
                     for k, s in enumerate(stores) for e in s.encounters.read() for w in e.windows)
    for s in stores:
        s.close()
    return took, written, windows


def fmt(values: list[float], unit: str, digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} {unit} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hours", type=float, default=2.0, help="simulated office hours for the hot path")
    args = ap.parse_args()
    console = Console()
    ctagent = str(Path(sys.executable).with_name("ctagent"))

    table = Table(title=f"`ctagent demo --json` ({args.repeat} runs each: median (min–max))")
    for c in ("protocol", "wall", "CPU", "peak RSS", "sightings", "TP/FP/FN/TN"):
        table.add_column(c, justify="right")
    for protocol in ("gaen", "robert"):
        walls, cpus, rss, results = [], [], [], set()
        with tempfile.TemporaryDirectory() as out:
            for _ in range(args.repeat):
                w, c, m, res = run_command([ctagent, "demo", "--json", "--protocol", protocol, "--out", out])
                walls.append(w), cpus.append(c), rss.append(m)
                results.add((res["sightings"], res["tp"], res["fp"], res["fn"], res["tn"]))
        if len(results) != 1:
            raise SystemExit(f"the demo gave different results for one seed: {results}")
        (sightings, *outcome), = results
        table.add_row(protocol, fmt(walls, "s", 1), fmt(cpus, "s", 1), fmt(rss, "MiB", 0), f"{sightings:,}",
                      "/".join(map(str, outcome)))
    console.print(table)

    ticks = samples(args.hours)
    n = sum(len(t[0]) for t in ticks)
    table = Table(title=f"The devices' hot path: {n:,} samples of {DEVICES} devices over {args.hours:g} simulated "
                        f"hours into {DEVICES} encrypted stores ({args.repeat} runs: median (min–max))")
    for c in ("path", "time", "samples/s", "rows written"):
        table.add_column(c, justify="right")
    found = {}
    for label, naive in (("naive: add_raw per sample, flush every minute", True),
                         ("ours: add_block per 30-min block, flush every 30 min", False)):
        times = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as d:
                took, written, found[naive] = ingest(ticks, Path(d), naive=naive)
                times.append(took)
        table.add_row(label, fmt(times, "s"), f"{n / statistics.median(times):,.0f}", f"{written:,}")
    console.print(table)
    if found[True] != found[False]:
        raise SystemExit("the two paths stored different windows")
    console.print(f"both paths stored the same {len(found[True]):,} windows (count, power sum, strongest)")


if __name__ == "__main__":
    main()
