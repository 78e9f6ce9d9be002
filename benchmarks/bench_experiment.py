"""Field-experiment analysis at scale: a synthetic experiment of 20 devices × 8 h × 19
peers at 5 samples/s (~55 M sightings, real GAEN identifiers resolved from each device's
TEK), written as research bundles (Parquet), then ``ctagent experiment analyze``'s
pipeline (DuckDB, 2 threads, 3 GB memory limit) in a child process: wall time and peak
memory (the child's maximum RSS). Next to it, in the same run, a naive pandas reference
(resolution by a Python dict per sighting, per-group Python aggregation) on a fraction
of the data, extrapolated linearly and marked so in the table.

Goal: analysis under 60 s and 4 GB on 2 cores.

Run:  .venv/bin/python -m benchmarks.bench_experiment [--devices 20] [--hours 8] [--hz 5]
      (needs the bench extra: pip install -e '.[bench]')
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def child_analyze(folder: str, threads: int, memory_limit: str) -> None:
    from agent.experiment.analyze import analyze

    t = time.perf_counter()
    a = analyze(Path(folder), threads=threads, memory_limit=memory_limit)
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "sightings": sum(d.sightings for d in a.devices),
                      "resolved": sum(d.resolved for d in a.devices), "minutes": len(a.minutes.rx),
                      "pair_days": len(a.pair_days), "timings": a.timings, "metrics": a.metrics["rule"]}))


def child_naive(folder: str, receivers: int, hours: float) -> None:
    """The notebook way: pandas, a dict look-up per sighting, a Python function per group."""
    import duckdb
    import numpy as np

    from agent.experiment.analyze import load_devices
    from agent.experiment.bundle import bundle_folders
    from agent.protocol import gaen

    t = time.perf_counter()
    devices = load_devices(bundle_folders(Path(folder)))
    owner = {}
    for d in devices:  # every device's RPIs from its TEK
        for _kind, key, start, period in duckdb.connect().execute(
                f"SELECT kind, id, start, period FROM '{d.folder}/own_ids.parquet'").fetchall():
            for rpi in gaen.rpis_for_key(bytes(key), start, period):
                owner[rpi] = d.index
    n = 0
    for d in devices[:receivers]:
        con = duckdb.connect()
        s = con.execute(f"SELECT * FROM '{d.folder}/sightings.parquet' WHERE t < (SELECT min(t) FROM "
                        f"'{d.folder}/sightings.parquet') + {hours * 3600}").df()
        adverts = con.execute(f"SELECT advert, payload FROM '{d.folder}/adverts.parquet'").df()
        payload = dict(zip(adverts.advert, adverts.payload))
        s["tx"] = [owner.get(bytes(payload[a])[:16], -1) for a in s.advert]  # one look-up per sighting
        s["minute"] = (s.t // 60).astype("int64")
        agg = s[s.tx >= 0].groupby(["tx", "minute"]).agg(
            n=("rssi", "size"), rssi_mean=("rssi", lambda r: 10 * math.log10(np.mean(10 ** (r / 10)))))
        n += len(s)
        assert len(agg)
    print(json.dumps({"wall_s": time.perf_counter() - t, "sightings": n}))


def run_child(*args: str) -> tuple[dict, float]:
    """The child's JSON answer and its own peak RSS (MB), from wait4."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_experiment", *args], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"benchmark child {args[-2]} failed with status {proc.returncode}")
    return json.loads(text.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--hours", type=float, default=8.0)
    ap.add_argument("--hz", type=float, default=5.0, help="samples per second per peer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-limit", default="3GB")
    ap.add_argument("--naive-receivers", type=int, default=1)
    ap.add_argument("--naive-hours", type=float, default=1.0)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        if a.child[0] == "analyze":
            child_analyze(a.child[1], a.threads, a.memory_limit)
        else:
            child_naive(a.child[1], a.naive_receivers, a.naive_hours)
        return {}
    from agent.experiment.synthetic import write_synthetic_experiment

    with tempfile.TemporaryDirectory(prefix="ctagent-bench-experiment-") as d:
        t = time.perf_counter()
        truth = write_synthetic_experiment(Path(d), devices=a.devices, hours=a.hours, rate_hz=a.hz, seed=1)
        gen_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in Path(d).rglob("*.parquet"))
        res, peak_mb = run_child("--threads", str(a.threads), "--memory-limit", a.memory_limit,
                                 "--child", "analyze", d)
        naive, naive_peak_mb = run_child("--naive-receivers", str(a.naive_receivers), "--naive-hours",
                                         str(a.naive_hours), "--child", "naive", d)
    scale = truth.sightings / max(1, naive["sightings"])
    out = {"sightings": truth.sightings, "bundle_mb": size / 1e6, "generate_s": gen_s, "analyze_s": res["wall_s"],
           "analyze_peak_mb": peak_mb, "timings": res["timings"], "resolved": res["resolved"],
           "naive_sightings": naive["sightings"], "naive_s": naive["wall_s"],
           "naive_extrapolated_s": naive["wall_s"] * scale, "naive_peak_mb": naive_peak_mb}
    table = Table(title=f"Experiment analysis: {a.devices} devices × {a.hours:g} h × {a.devices - 1} peers at "
                        f"{a.hz:g} samples/s = {truth.sightings:,} sightings ({size / 1e6:,.0f} MB of Parquet, "
                        f"written in {gen_s:.0f} s)")
    for c in ("method", "sightings processed", "wall time (s)", "for all sightings (s)", "peak memory (MB)"):
        table.add_column(c, justify="right")
    table.add_row(f"ctagent (DuckDB, {a.threads} threads, {a.memory_limit})", f"{res['sightings']:,}",
                  f"{res['wall_s']:.1f}", f"{res['wall_s']:.1f}", f"{peak_mb:,.0f}")
    table.add_row(f"naive pandas ({a.naive_receivers} receiver, {a.naive_hours:g} h; extrapolated ×{scale:.0f})",
                  f"{naive['sightings']:,}", f"{naive['wall_s']:.1f}", f"{out['naive_extrapolated_s']:,.0f}",
                  f"{naive_peak_mb:,.0f} (fraction)")
    Console(width=max(120, Console().width)).print(table)
    Console().print("stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["timings"].items())
                    + f"; resolved {res['resolved']:,} of {res['sightings']:,} sightings")
    return out


if __name__ == "__main__":
    main()
