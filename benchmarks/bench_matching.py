"""Matching benchmark: N diagnosis keys against 14-day stores of 2,000 to 100,000 RPIs a day.

Prints, in one run and per store size and number of keys:
- the limit: HKDF (six SHA-256 compressions with the pads pre-hashed) and 144 AES-128
  blocks per key at the speed ``openssl speed`` measures for one core, divided over the
  cores used;
- ctagent's C kernel (its own SHA-NI/AES-NI/VAES/AVX2 code where the CPU has it), the
  same kernel on OpenSSL only (``portable``), the pure-Python fallback and a naive
  reference (one AES call per RPI, a set look-up), the last two timed on a sample;
- the Python around the kernel (``find_candidates`` minus the kernel's own call) per key.
And the same limit and kernel with AES-NI, SHA-NI and VAES masked (``OPENSSL_ia32cap``):
software AES, as on a Raspberry Pi 3 or 4 (their Cortex-A53/A72 have no AES instructions).

Wall-clock medians of ``--repeat`` runs; CPU ns per key are the process's CPU time per
key (less sensitive to other processes on the machine than wall time).

Run:  .venv/bin/python -m benchmarks.bench_matching [--keys 10000 100000 1000000]
          [--rpis-per-day 2000 22000 100000] [--repeat 3] [--no-masked]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.exposure import matching as mm
from agent.exposure.matching import EncounterIndex, find_candidates
from agent.protocol import gaen
from agent.protocol.export import PackedKeys

TODAY = 20_400
PLANTED = 20
#: the RPIs of each planted key that are stored (intervals 30, 31, 32 of its day)
PLANTED_RPIS = (30, 31, 32)
MASK_ENV = {"OPENSSL_ia32cap": "~0x200000200000000:~0x20000000"}  # AES-NI, PCLMULQDQ; SHA-NI


def openssl_limit(env: dict[str, str] | None = None) -> dict[str, float]:
    """ns per key on one core: 6 SHA-256 compressions + 144 AES-128 blocks at the rates
    ``openssl speed`` measures (16 KiB buffers)."""
    def rate(alg: str) -> float:
        out = subprocess.run(["openssl", "speed", "-seconds", "1", "-bytes", "16384", "-evp", alg],
                             capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True).stdout
        line = [ln for ln in out.splitlines() if ln.lower().startswith(alg.split("-")[0].lower())][-1]
        return float(re.findall(r"([\d.]+)k", line)[-1]) * 1000  # bytes/s
    aes, sha = rate("aes-128-ecb"), rate("sha256")
    hkdf_ns, aes_ns = 6 * 64 / sha * 1e9, 144 * 16 / aes * 1e9
    return {"aes_mb_s": aes / 1e6, "sha_mb_s": sha / 1e6, "hkdf_ns": hkdf_ns, "aes_ns": aes_ns,
            "key_ns": hkdf_ns + aes_ns}


def store(rng: np.random.Generator, per_day: int, planted: list[bytes]) -> EncounterIndex:
    """14 days of ``per_day`` random RPIs each heard for 1-2 intervals, and the planted ones."""
    n = per_day * 14
    first = (TODAY - 13) * 144 + np.repeat(np.arange(14), per_day) * 144 + rng.integers(0, 143, n)
    rpis = [rng.bytes(16 * n)]
    firsts, lasts = [first], [first + rng.integers(0, 2, n)]
    for i, tek in enumerate(planted):
        rs = (TODAY - 13 + i % 14) * 144
        rpis.append(b"".join(gaen.rpi(gaen.derive_rpik(tek), rs + j) for j in PLANTED_RPIS))
        firsts.append(np.array([rs + j for j in PLANTED_RPIS]))
        lasts.append(np.array([rs + j for j in PLANTED_RPIS]))
    first_all = np.concatenate(firsts)
    return EncounterIndex.from_arrays(b"".join(rpis), first_all, np.concatenate(lasts), np.arange(len(first_all)))


def keys(rng: np.random.Generator, n: int, planted: list[bytes]) -> PackedKeys:
    """``n`` keys of whole days in the last 14 (a real export's shape), planted ones among them."""
    days = TODAY - 13 + rng.integers(0, 14, n)
    data = bytearray(rng.bytes(16 * n))
    for i, tek in enumerate(planted):  # planted key i at position i * n // len(planted)
        pos = i * n // len(planted)
        data[16 * pos : 16 * pos + 16] = tek
        days[pos] = TODAY - 13 + i % 14
    return PackedKeys(bytes(data), (days * 144).astype(np.uint32), np.full(n, 144, np.uint16), np.zeros(n, np.int32),
                      np.ones(n, np.uint8), np.zeros(n, np.int32), np.zeros(n, np.bool_), np.zeros(n, np.uint8))


def naive_rate(k: PackedKeys, stored: set[bytes], n: int) -> float:
    """Keys/s of the reference: one AES call per RPI (gaen.rpi), a set look-up."""
    t = time.perf_counter()
    for i in range(n):
        key = k.key(i)
        rpik = gaen.derive_rpik(key.key_data)
        for j in range(key.rolling_period):
            _ = gaen.rpi(rpik, key.rolling_start_interval_number + j) in stored
    return n / (time.perf_counter() - t)


class _NoKernel:
    """A kernel that finds nothing at once: what find_candidates costs around the kernel."""

    def scan(self, *args: object) -> tuple[bytes, int, int, int]:
        return b"", 0, 0, 0


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """Median wall seconds and median CPU seconds of ``repeat`` calls, and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def kernel_only(a: argparse.Namespace) -> dict:
    """The C kernel's figure for the default store and ``a.keys[-1]`` keys (the masked run)."""
    rng = np.random.default_rng(a.seed)
    planted = [rng.bytes(16) for _ in range(PLANTED)]
    index = store(rng, a.rpis_per_day[0], planted)
    k = keys(rng, a.keys[-1], planted)
    native = index.native(mm.DEFAULT_TOLERANCE_INTERVALS)
    wall, cpu, _ = timed(partial(native.scan, k.key_data, k.rolling_start, k.rolling_period,  # type: ignore
                                 a.workers), a.repeat)
    feats = mm._fastmatch.features() if mm._fastmatch is not None else {}
    return {"keys": len(k), "wall_s": wall, "cpu_ns": cpu / len(k) * 1e9, "features": feats,
            "limit": openssl_limit()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--rpis-per-day", type=int, nargs="+", default=[2_000, 22_000, 100_000])
    ap.add_argument("--python-keys", type=int, default=10_000, help="keys the pure-Python path is timed on")
    ap.add_argument("--naive-keys", type=int, default=300, help="keys the naive reference is timed on")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-masked", dest="masked", action="store_false", help="skip the run with AES-NI masked")
    ap.add_argument("--kernel-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.kernel_only:
        print(json.dumps(kernel_only(a)))
        return {}
    if mm._fastmatch is None:
        raise SystemExit("the C kernel is not built: pip install -e . with a C compiler and libssl-dev")
    console = Console(width=160)
    limit = openssl_limit()
    cores = a.workers
    rng = np.random.default_rng(a.seed)
    planted = [rng.bytes(16) for _ in range(PLANTED)]
    rows, wrapper = [], []
    for per_day in a.rpis_per_day:
        index = store(rng, per_day, planted)
        t = time.perf_counter()
        native = index.native(mm.DEFAULT_TOLERANCE_INTERVALS)
        build_s = time.perf_counter() - t
        for n in a.keys:
            k = keys(rng, n, planted)
            lim_s = limit["key_ns"] * n / cores / 1e9
            for path, portable in (("C", False), ("C, OpenSSL only", True)):
                wall, cpu, res = timed(partial(native.scan, k.key_data, k.rolling_start,  # type: ignore[attr-defined]
                                               k.rolling_period, cores, portable), a.repeat)
                hits = len(res[0]) // 12  # type: ignore[index]
                if hits != PLANTED * len(PLANTED_RPIS):
                    raise SystemExit(f"{path}: {hits} RPI hits, expected {PLANTED * len(PLANTED_RPIS)}")
                rows.append((len(index), n, path, wall, cpu / n * 1e9, wall / lim_s))
            # the wrapper alone: find_candidates with a kernel that returns at once
            tol = mm.DEFAULT_TOLERANCE_INTERVALS
            index._native[tol] = _NoKernel()
            try:
                w_wall, _, _ = timed(partial(find_candidates, k, index, workers=cores), a.repeat)
            finally:
                index._native[tol] = native
            c_wall = [r for r in rows if r[:3] == (len(index), n, "C")][0][3]
            wrapper.append((len(index), n, w_wall / n * 1e9, c_wall / n * 1e9))
        # the pure-Python path and the naive reference, timed on a sample of keys; the
        # Python path's index is built once per sync, whatever the number of keys: timed
        # apart and added once (inside the sample's time, it was multiplied by 100)
        t = time.perf_counter()
        index.python(mm.DEFAULT_TOLERANCE_INTERVALS)
        py_build_s = time.perf_counter() - t
        k = keys(rng, a.python_keys, planted[:2])
        wall, _, _ = timed(partial(find_candidates, k, index, workers=cores, native=False), 1)
        py_rate = a.python_keys / wall
        stored = {index.rpis[i : i + 16] for i in range(0, len(index.rpis), 16)}
        nv_rate = naive_rate(keys(rng, a.naive_keys, []), stored, a.naive_keys)
        for n in a.keys:
            lim_s = limit["key_ns"] * n / cores / 1e9
            rows.append((len(index), n, "pure Python*", py_build_s + n / py_rate, None,
                         (py_build_s + n / py_rate) / lim_s))
            rows.append((len(index), n, "naive**", n / nv_rate, None, n / nv_rate / lim_s))
        console.print(f"store of {len(index):,} RPIs: index built in {build_s:.2f} s (the pure-Python path's in "
                      f"{py_build_s:.2f} s); {native.info()}")  # type: ignore[attr-defined]

    feats = mm._fastmatch.features()
    tbl = Table(title=f"Key matching, {cores} thread(s); the limit: {limit['key_ns']:.0f} ns per key per core "
                      f"(HKDF {limit['hkdf_ns']:.0f} + 144 AES blocks {limit['aes_ns']:.0f}; openssl speed: "
                      f"AES-128-ECB {limit['aes_mb_s']:,.0f} MB/s, SHA-256 {limit['sha_mb_s']:,.0f} MB/s); "
                      f"kernel uses {', '.join(f for f, on in feats.items() if on) or 'OpenSSL only'}")
    for c in ("stored RPIs", "keys", "path", "limit s", "wall s", "CPU ns/key", "× limit"):
        tbl.add_column(c, justify="right")
    for stored_n, n, path, wall, cpu_ns, ratio in rows:
        tbl.add_row(f"{stored_n:,}", f"{n:,}", path, f"{limit['key_ns'] * n / cores / 1e9:.3f}", f"{wall:.3f}",
                    "" if cpu_ns is None else f"{cpu_ns:.0f}", f"{ratio:.1f}")
    console.print(tbl)
    console.print(f"* timed on {a.python_keys:,} keys, {cores} processes; ** timed on {a.naive_keys} keys, one core "
                  "(one AES call per RPI, a set look-up)")
    wt = Table(title="The Python around the kernel (find_candidates with a kernel that returns at once), wall ns "
                     "per key")
    for c in ("stored RPIs", "keys", "wrapper ns/key", "kernel ns/key", "wrapper / kernel"):
        wt.add_column(c, justify="right")
    for stored_n, n, w, kern in wrapper:
        wt.add_row(f"{stored_n:,}", f"{n:,}", f"{w:.0f}", f"{kern:.0f}", f"{w / kern:.1%}")
    console.print(wt)

    out: dict = {"limit": limit, "rows": rows, "wrapper": wrapper}
    if a.masked:
        cmd = [sys.executable, "-m", "benchmarks.bench_matching", "--kernel-only", "--keys", str(a.keys[-1]),
               "--rpis-per-day", str(a.rpis_per_day[0]), "--repeat", str(a.repeat), "--workers", str(cores)]
        masked = json.loads(subprocess.run(cmd, env={**os.environ, **MASK_ENV}, capture_output=True, text=True,
                                           check=True).stdout)
        ml = masked["limit"]
        mt = Table(title="AES-NI, SHA-NI and VAES masked (OPENSSL_ia32cap): software AES, a stand-in for a "
                         "Raspberry Pi 3/4")
        for c in ("", "AES-128-ECB MB/s", "SHA-256 MB/s", "limit ns/key/core", f"kernel, {masked['keys']:,} keys",
                  "CPU ns/key"):
            mt.add_column(c, justify="right")
        mt.add_row("instructions on", f"{limit['aes_mb_s']:,.0f}", f"{limit['sha_mb_s']:,.0f}",
                   f"{limit['key_ns']:.0f}", "", "")
        mt.add_row("masked", f"{ml['aes_mb_s']:,.0f}", f"{ml['sha_mb_s']:,.0f}", f"{ml['key_ns']:.0f}",
                   f"{masked['wall_s']:.2f} s", f"{masked['cpu_ns']:.0f}")
        console.print(mt)
        out["masked"] = masked
    return out


if __name__ == "__main__":
    main()
