"""Store ingest benchmark: a crowded day (200 peers in range all day).

Measures sustained ingest (sightings/s through the aggregator, encrypted and written to
the store, flushed every simulated minute) and storage bytes per device-day, next to a
naive reference measured in the same run (one encrypted row per raw sighting).

Run:  .venv/bin/python -m benchmarks.bench_store [--peers 200] [--hz 0.5] [--hours 24]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sqlite3
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rich.console import Console
from rich.table import Table

from agent.clock import DAY_SECONDS, ManualClock
from agent.exposure.aggregate import Aggregator
from agent.protocol.gaen import INTERVAL_SECONDS
from agent.experiment.recording import ResearchRecorder
from agent.store import Passphrase, Store
from agent.timesync import ClockState

T0 = 20_000 * DAY_SECONDS


def minute_of_sightings(rng: random.Random, peers, minute: int, hz: float):
    """Pre-generated (t, rpi, aem, rssi) for one minute; peers rotate RPI every ~10-15 min."""
    out = []
    n = max(1, int(60 * hz))
    t_min = T0 + minute * 60
    for p in peers:
        if t_min >= p["next_rot"]:
            p["rpi"], p["aem"] = rng.randbytes(16), rng.randbytes(4)
            p["next_rot"] = t_min + rng.uniform(INTERVAL_SECONDS, 1.5 * INTERVAL_SECONDS)
        for k in range(n):
            out.append((t_min + k * 60 / n + p["phase"], p["rpi"], p["aem"], p["rssi"] + rng.randint(-6, 6)))
    out.sort()
    return out


def db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def run_ctagent(path: Path, peers_n: int, hz: float, hours: float, seed: int, *, research: bool = False):
    """``research``: also an experiment's research recording (every sighting kept, with
    its address and payload, packed per flush), as the daemon does both."""
    rng = random.Random(seed)
    peers = [{"next_rot": 0, "phase": rng.random(), "rssi": rng.randint(-95, -45)} for _ in range(peers_n)]
    store = Store.create(path, Passphrase("bench", scrypt={"n": 2**14, "r": 8, "p": 1}), clock=ManualClock(T0))
    agg = Aggregator()
    recorder = ResearchRecorder(store, started_at=T0) if research else None
    clock_state = ClockState(T0, True, True, "chrony", 0.01, 0.001, "chrony")
    ingest_s, n = 0.0, 0
    for minute in range(int(hours * 60)):
        batch = minute_of_sightings(rng, peers, minute, hz)
        t = time.perf_counter()
        add = agg.add_raw
        if recorder is None:
            for s in batch:
                add(*s)
        else:
            heard = recorder.heard
            for ts, rpi, aem, rssi in batch:
                add(ts, rpi, aem, rssi)
                heard(ts, "", rssi, None, rpi + aem)
        store.encounters.write(agg.flush(T0 + (minute + 1) * 60))
        if recorder is not None:
            recorder.flush(T0 + (minute + 1) * 60, clock_state)
        ingest_s += time.perf_counter() - t
        n += len(batch)
    t = time.perf_counter()
    store.encounters.write(agg.flush(T0 + hours * 3600 + 1, final=True))
    store.close()  # checkpoint: the WAL is folded into the file
    ingest_s += time.perf_counter() - t
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM encounters").fetchone()[0]
    return n, ingest_s, db_bytes(path) * 24 / hours, rows


def run_naive(path: Path, peers_n: int, hz: float, minutes: int, seed: int):
    """Reference: every sighting its own AES-GCM row, committed once per minute."""
    rng = random.Random(seed)
    peers = [{"next_rot": 0, "phase": rng.random(), "rssi": rng.randint(-95, -45)} for _ in range(peers_n)]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE s (id INTEGER PRIMARY KEY, day INT, blob BLOB)")
    aead = AESGCM(secrets.token_bytes(32))
    ingest_s, n, i = 0.0, 0, 0
    for minute in range(minutes):
        batch = minute_of_sightings(rng, peers, minute, hz)
        t = time.perf_counter()
        rows = []
        for ts, rpi, aem, rssi in batch:
            i += 1
            nonce = os.urandom(12)
            plain = rpi + aem + int(ts * 1000).to_bytes(8, "little") + rssi.to_bytes(1, "little", signed=True)
            rows.append((i, 0, nonce + aead.encrypt(nonce, plain, b"s|%d" % i)))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO s VALUES (?,?,?)", rows)
        conn.execute("COMMIT")
        ingest_s += time.perf_counter() - t
        n += len(batch)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return n, ingest_s, db_bytes(path) * 24 * 60 / minutes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=200)
    ap.add_argument("--hz", type=float, default=0.5, help="sightings per second per peer")
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--naive-minutes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        n, secs, bytes_day, rows = run_ctagent(Path(d) / "agent.db", a.peers, a.hz, a.hours, a.seed)
        rn, rsecs, rbytes_day, rrows = run_ctagent(Path(d) / "research.db", a.peers, a.hz, a.hours, a.seed,
                                                   research=True)
        nn, nsecs, nbytes_day = run_naive(Path(d) / "naive.db", a.peers, a.hz, a.naive_minutes, a.seed)
    res = {
        "sightings": n, "ingest_per_s": n / secs, "mb_per_day": bytes_day / 1e6, "rows": rows,
        "naive_per_s": nn / nsecs, "naive_mb_per_day": nbytes_day / 1e6,
        "research_per_s": rn / rsecs, "research_mb_per_day": rbytes_day / 1e6,
    }
    t = Table(title=f"Store ingest: {a.peers} peers in range, {a.hz} sightings/s each, {a.hours:g} h simulated")
    for c in ("method", "sightings", "sightings/s (1 core)", "MB per device-day", "rows"):
        t.add_column(c, justify="right")
    t.add_row("ctagent", f"{n:,}", f"{res['ingest_per_s']:,.0f}",
              f"{res['mb_per_day']:.2f}", f"{rows:,}")
    t.add_row("ctagent + research recording", f"{rn:,}", f"{res['research_per_s']:,.0f}",
              f"{res['research_mb_per_day']:.2f}", f"{rrows:,} + research")
    t.add_row(f"naive ({a.naive_minutes} min, scaled)", f"{nn:,}",
              f"{res['naive_per_s']:,.0f}", f"{res['naive_mb_per_day']:.1f}", "1 per sighting")
    Console().print(t)
    return res


if __name__ == "__main__":
    main()
