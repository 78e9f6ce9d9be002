"""Matching benchmark: N diagnosis keys against a 14-day store of a busy device.

The store holds >= 2,000 distinct RPIs a day for 14 days (plus 20 planted matching keys).
Prints keys/s for ctagent's matcher (batched AES per key, numpy prefix filter, all cores)
next to a naive reference measured in the same run (one AES call per RPI, dict look-up).

Run:  .venv/bin/python -m benchmarks.bench_matching [--keys 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import os
import random
import time

from rich.console import Console
from rich.table import Table

from agent.clock import DAY_SECONDS as DAY
from agent.exposure.encounter import Encounter
from agent.exposure.matching import EncounterIndex, MatchStats, match_keys
from agent.protocol import gaen
from agent.protocol.export import DiagnosisKey

TODAY = 20_400
#: RPIs of each planted key stored (intervals 30, 31, 32 of its day)
PLANTED_RPIS = (30, 31, 32)


def busy_store(rng: random.Random, rpis_per_day: int, planted: list[bytes]) -> list[Encounter]:
    encs = []
    for d in range(14):
        day = TODAY - 13 + d
        for _ in range(rpis_per_day):
            t = day * DAY + rng.uniform(0, DAY - gaen.INTERVAL_SECONDS)
            encs.append(Encounter(rng.randbytes(16), rng.randbytes(4), t, t + 300))
    for i, tek in enumerate(planted):  # 20 infected peers met on various days
        rs = (TODAY - 13 + i % 14) * gaen.TEK_ROLLING_PERIOD
        for j in PLANTED_RPIS:
            r = gaen.rpi(gaen.derive_rpik(tek), rs + j)
            aem = gaen.encrypt_aem(gaen.derive_aemk(tek), r, gaen.metadata(-8))
            t = (rs + j) * gaen.INTERVAL_SECONDS + 60
            encs.append(Encounter(r, aem, t, t + 300))
    return encs


def diagnosis_keys(rng: random.Random, n: int, planted: list[bytes]) -> list[DiagnosisKey]:
    keys = [DiagnosisKey(rng.randbytes(16), (TODAY - 13 + rng.randrange(14)) * gaen.TEK_ROLLING_PERIOD)
            for _ in range(n - len(planted))]
    keys += [DiagnosisKey(t, (TODAY - 13 + i % 14) * gaen.TEK_ROLLING_PERIOD) for i, t in enumerate(planted)]
    rng.shuffle(keys)
    return keys


def naive_match(keys: list[DiagnosisKey], stored: set[bytes]) -> int:
    """Reference: one AES call per RPI (gaen.rpi), look-up in a set."""
    hits = 0
    for k in keys:
        rpik = gaen.derive_rpik(k.key_data)
        for j in range(k.rolling_period):
            if gaen.rpi(rpik, k.rolling_start_interval_number + j) in stored:
                hits += 1
    return hits


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--rpis-per-day", type=int, default=2_000)
    ap.add_argument("--naive-keys", type=int, default=2_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    planted = [rng.randbytes(16) for _ in range(20)]
    encs = busy_store(rng, a.rpis_per_day, planted)
    t = time.perf_counter()
    index = EncounterIndex(encs)
    index_s = time.perf_counter() - t

    naive_keys = diagnosis_keys(random.Random(a.seed + 1), a.naive_keys, planted[:2])
    t = time.perf_counter()
    naive_hits = naive_match(naive_keys, set(index.by_rpi))
    naive_rate = len(naive_keys) / (time.perf_counter() - t)

    from agent.exposure import matching as mm
    kernel = "C kernel, threads" if mm._fastmatch is not None else "pure Python, processes"
    rows = []
    for n in a.keys:
        keys = diagnosis_keys(random.Random(a.seed + n), n, planted)
        st = MatchStats()
        t = time.perf_counter()
        matches = match_keys(keys, index, workers=a.workers, stats=st)
        wall = time.perf_counter() - t
        found = sum(1 for m in matches if m.hits)
        rows.append({"keys": n, "wall_s": wall, "keys_per_s": n / wall, "matched_keys": found,
                     "rpis": st.rpis_computed, "naive_keys_per_s": naive_rate, "naive_est_s": n / naive_rate})
        if found != len(planted):
            raise SystemExit(f"expected {len(planted)} matched keys, found {found}")
    py_n = min(a.keys)
    keys = diagnosis_keys(random.Random(a.seed + py_n), py_n, planted)
    t = time.perf_counter()
    match_keys(keys, index, workers=a.workers, native=False)
    py_rate = py_n / (time.perf_counter() - t)
    tbl = Table(title=f"Key matching ({kernel}): store of {len(index):,} RPIs (14 days x {a.rpis_per_day:,}/day), "
                      f"{a.workers} worker(s); index built in {index_s:.2f} s; pure-Python fallback "
                      f"{py_rate:,.0f} keys/s")
    for c in ("keys", "ctagent wall s", "ctagent keys/s", "naive keys/s", "naive est. s", "speed-up", "matched"):
        tbl.add_column(c, justify="right")
    for r in rows:
        tbl.add_row(f"{r['keys']:,}", f"{r['wall_s']:.2f}", f"{r['keys_per_s']:,.0f}", f"{r['naive_keys_per_s']:,.0f}",
                    f"{r['naive_est_s']:.1f}", f"{r['keys_per_s'] / r['naive_keys_per_s']:.1f}x",
                    str(r["matched_keys"]))
    Console().print(tbl)
    if naive_hits != 2 * len(PLANTED_RPIS):  # the naive run holds two planted keys
        raise SystemExit(f"the naive reference found {naive_hits} RPI hits, expected {2 * len(PLANTED_RPIS)}")
    return rows


if __name__ == "__main__":
    main()
