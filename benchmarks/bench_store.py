"""Store benchmark: a crowded day (200 peers in range all day), and reading 14 such days
for matching.

Ingest: sustained sightings/s through the aggregator, encrypted and written to the store,
flushed every simulated minute, and storage bytes per device-day, next to a naive
reference measured in the same run (one encrypted row per raw sighting).

Read for matching: what matching needs of 14 days of ``--read-rpis-per-day`` encounters
(RPI, first and last interval, row id), from the per-day index decrypted in bulk, next to
the naive reference (every encounter row decrypted and decoded into an object) and the
limit (decrypting the index's bytes at ``openssl speed``'s AES-256-GCM rate).

Run:  .venv/bin/python -m benchmarks.bench_store [--peers 200] [--hz 0.5] [--hours 24]
          [--read-rpis-per-day 22000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import secrets
import sqlite3
import statistics
import subprocess
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
        changed, closed = agg.flush_closing(T0 + (minute + 1) * 60)  # as the daemon: closed ones indexed
        store.encounters.write(changed, closed=closed)
        if recorder is not None:
            recorder.flush(T0 + (minute + 1) * 60, clock_state)
        ingest_s += time.perf_counter() - t
        n += len(batch)
    t = time.perf_counter()
    changed, closed = agg.flush_closing(T0 + hours * 3600 + 1, final=True)
    store.encounters.write(changed, closed=closed)
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


def crowded_store(path: Path, per_day: int, today: int, seed: int, planted: list[bytes] = ()) -> None:
    """14 days of ``per_day`` encounters (an RPI heard for 1-15 minutes, written as the
    daemon writes them: flush by flush, indexed as they close, each day's index merged
    once the day is over), and the ``planted`` peers' RPIs heard close for 10 minutes."""
    from agent.clock import ManualClock
    from agent.exposure.encounter import Encounter, ScanWindow
    from agent.protocol import gaen
    from agent.store import KeyFile, create_key_file

    rng = random.Random(seed)
    create_key_file(path.parent / "master.key")
    clock = ManualClock(today * DAY_SECONDS + 3600)
    with Store.create(path, KeyFile(path.parent / "master.key"), clock=clock) as store:
        for d in range(14):
            day = today - 13 + d
            batch: list[Encounter] = []
            for i in range(per_day):
                t = day * DAY_SECONDS + i * DAY_SECONDS / per_day
                minutes = rng.randint(1, 15)
                e = Encounter(rng.randbytes(16), rng.randbytes(4), t, t + 60 * minutes - 1)
                base = int(t // 60)
                e.windows = [ScanWindow(base + m, 30, 30 * 10 ** (rng.randint(-95, -60) / 10), -60)
                             for m in range(minutes)]
                batch.append(e)
                if len(batch) == 200:  # a crowded minute's flush
                    store.encounters.write(batch, closed=batch)
                    batch = []
            store.encounters.write(batch, closed=batch)
        for i, tek in enumerate(planted):
            rs = (today - 13 + i % 14) * 144
            encs = []
            for j in (60, 61, 62):
                rpi = gaen.rpi(gaen.derive_rpik(tek), rs + j)
                aem = gaen.encrypt_aem(gaen.derive_aemk(tek), rpi, gaen.metadata(-10))
                t = (rs + j) * 600.0
                e = Encounter(rpi, aem, t, t + 599)
                e.windows = [ScanWindow(int(t // 60) + m, 30, 30 * 10 ** (-55 / 10), -52) for m in range(10)]
                encs.append(e)
            store.encounters.write(encs, closed=encs)
        store.encounters.compact_index(before_day=today + 1)  # the days are over: one index row each


def gcm_limit_mb_s() -> float:
    """AES-256-GCM at ``openssl speed``'s rate (16 KiB buffers), MB/s on one core."""
    out = subprocess.run(["openssl", "speed", "-seconds", "1", "-bytes", "16384", "-evp", "aes-256-gcm"],
                         capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.lower().startswith("aes-256-gcm")][-1]
    return float(re.findall(r"([\d.]+)k", line)[-1]) / 1000


def run_read(path: Path, per_day: int, repeat: int, seed: int) -> dict:
    """Reading 14 crowded days for matching: ours (bulk index), the naive reference."""
    from agent.clock import RealClock, utc_day
    from agent.store import KeyFile

    today = utc_day(time.time())
    t = time.perf_counter()
    crowded_store(path, per_day, today, seed)
    build_s = time.perf_counter() - t
    with Store.open(path, KeyFile(path.parent / "master.key"), clock=RealClock()) as store:
        ours = []
        for _ in range(repeat):
            t = time.perf_counter()
            arrays = store.encounters.matching_arrays(since_day=today - 13)
            ours.append(time.perf_counter() - t)
        index_bytes = store.conn.execute("SELECT SUM(LENGTH(blob)) FROM encounter_index").fetchone()[0]
        t = time.perf_counter()
        naive_n = sum(1 for _ in store.encounters.read(since_day=today - 13))
        naive_s = time.perf_counter() - t
    if naive_n != len(arrays):
        raise SystemExit(f"read {len(arrays)} encounters for matching, {naive_n} rows")
    return {"encounters": len(arrays), "build_s": build_s, "ours_s": ours, "naive_s": naive_s,
            "index_mb": index_bytes / 1e6, "limit_s": index_bytes / 1e6 / gcm_limit_mb_s()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=200)
    ap.add_argument("--hz", type=float, default=0.5, help="sightings per second per peer")
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--naive-minutes", type=int, default=30)
    ap.add_argument("--read-rpis-per-day", type=int, default=22_000, help="0: skip reading for matching")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        n, secs, bytes_day, rows = run_ctagent(Path(d) / "agent.db", a.peers, a.hz, a.hours, a.seed)
        rn, rsecs, rbytes_day, rrows = run_ctagent(Path(d) / "research.db", a.peers, a.hz, a.hours, a.seed,
                                                   research=True)
        nn, nsecs, nbytes_day = run_naive(Path(d) / "naive.db", a.peers, a.hz, a.naive_minutes, a.seed)
        if a.read_rpis_per_day:
            (Path(d) / "read").mkdir()
            read = run_read(Path(d) / "read" / "agent.db", a.read_rpis_per_day, a.repeat, a.seed)
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
    if a.read_rpis_per_day:
        res["read"] = read
        rt = Table(title=f"Reading the store for matching: {read['encounters']:,} encounters (14 days x "
                         f"{a.read_rpis_per_day:,}), index {read['index_mb']:.1f} MB; median (min-max) of {a.repeat}")
        for c in ("method", "seconds"):
            rt.add_column(c, justify="right")
        ours = read["ours_s"]
        rt.add_row("limit: the index's bytes at openssl speed's AES-256-GCM rate", f"{read['limit_s']:.3f}")
        rt.add_row("ctagent: per-day index rows decrypted in bulk",
                   f"{statistics.median(ours):.3f} ({min(ours):.3f}-{max(ours):.3f})")
        rt.add_row("naive: every encounter row decrypted and decoded", f"{read['naive_s']:.2f}")
        Console().print(rt)
    return res


if __name__ == "__main__":
    main()
