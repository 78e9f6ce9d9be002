"""End-to-end sync benchmark: a device downloads a 1M-key export from our backend over
HTTP (127.0.0.1), verifies it, reads it and matches it against its 14-day store.

The backend (SQLite) holds ``--keys`` uploaded keys, among them 20 whose RPIs the device
heard (3 each); its export job writes the files (timed: the export of a million keys);
the backend serves them. Each sync runs in a process of its own, on a fresh copy of the
store, so that its wall time and peak memory (the kernel's high-water mark of its
resident set) are its own. Per store size (``--rpis-per-day``, 14 days), it prints:

- the limit: the matching's cryptography at ``openssl speed``'s rate on the cores used
  (bench_matching), the floor under any sync;
- ``ctagent sync`` (the command, its start included) and the sync in a process (C
  extensions: parse into arrays, bulk store read, matching kernel), with its phases;
- the pure-Python fallback (no C extension: the protobuf runtime reads the files, the
  Python matcher on processes);
- a naive reference: every key an object (the protobuf runtime), every encounter read
  and decoded, and one AES call per RPI (timed on a sample, the rest extrapolated).

Run:  .venv/bin/python -m benchmarks.bench_sync [--keys 1000000] [--rpis-per-day 2000 22000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANTED = 20


# -- the backend ----------------------------------------------------------------------------

def fill_backend(data_dir: Path, n: int, planted: list[bytes], today: int):
    import sqlalchemy as sa

    from agent.clock import RealClock
    from backend import Backend, BackendConfig, db

    backend = Backend(BackendConfig(data_dir), clock=RealClock())
    rows = n - len(planted)
    with backend.engine.begin() as c:
        c.execute(sa.text(
            "INSERT INTO exposures (key_data, rolling_start, rolling_period, transmission_risk, report_type, "
            "health_authority, received_at, export_after) "
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n) "
            "SELECT randomblob(16), (:today - 13 + abs(random()) % 14) * 144, 144, 0, 1, 'bench', 0, 0 FROM s"),
            {"n": rows, "today": today})
        if planted:
            c.execute(sa.insert(db.exposures), [
                {"key_data": tek, "rolling_start": (today - 13 + i % 14) * 144, "rolling_period": 144,
                 "transmission_risk": 0, "report_type": 1, "days_since_onset": None, "health_authority": "bench",
                 "received_at": 0, "export_after": 0} for i, tek in enumerate(planted)])
    return backend


# -- one sync, in its own process ------------------------------------------------------------

def child(a: argparse.Namespace) -> None:
    """One sync of the store at ``a.store`` (``--child``): prints its figures as JSON."""
    from agent.clock import RealClock
    from agent.exposure import matching
    from agent.protocol import export
    from agent.store import KeyFile, Store

    if a.python:
        matching._fastmatch = None
        export._fastexport = None
    import agent.modes.gaen as gaen_mode
    import agent.sync.http as http
    from agent.modes.base import DeviceContext
    from agent.store.tables import EncounterTable

    phases: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, name, wrapper)

    timed(http.JsonHttp, "fetch", "download")
    timed(export, "unzip_export", "unzip")
    timed(export, "verify_signature", "verify")
    timed(export, "parse_export_bin_packed", "parse")
    timed(EncounterTable, "matching_arrays", "read store")
    timed(gaen_mode, "find_candidates", "match")
    timed(gaen_mode, "confirm", "confirm")
    path = Path(a.store)
    t0 = time.perf_counter()
    with Store.open(path, KeyFile(path.parent / "master.key"), clock=RealClock()) as store:
        t_open = time.perf_counter() - t0
        mode = gaen_mode.GaenMode(DeviceContext(store=store, clock=RealClock(), backend_url=a.url,
                                                trusted_keys=(a.public_key,), match_workers=a.workers))
        t = time.perf_counter()
        res, decisions = mode.sync(time.time())
        wall = time.perf_counter() - t
    vm = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in Path("/proc/self/status").read_text()
                                             .splitlines() if ln.startswith(("VmHWM", "VmRSS")))}
    print(json.dumps({"wall_s": wall, "open_s": t_open, "phases": phases, "keys": res.key_count,
                      "files": res.files_new, "failed": len(res.files_failed), "matched_keys": len(decisions),
                      "exposed": sum(d.exposed for d in decisions), "peak_mb": vm["VmHWM"] / 1024}))


#: runs a Python program and prints its process's peak resident set (VmHWM) on stderr at
#: exit: the rusage of a child forked from this large process would count the pages it
#: shared with it before its exec
_PEAK = ("import atexit, runpy, sys\n"
         "atexit.register(lambda: print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0],"
         " file=sys.stderr))\n"
         "sys.argv = sys.argv[1:]\n"
         "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def run_child(module: str, args: list[str]) -> tuple[float, float, str]:
    """(wall s, peak resident MB, stdout) of ``python -m module args`` in a process of its own."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _PEAK, module, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{module} {args[:3]} failed ({p.returncode}): {p.stderr[-2000:]}")
    peak_kb = int(p.stderr.rsplit("VmHWM", 1)[1].split()[0])
    return wall, peak_kb / 1024, p.stdout


def naive(store_path: Path, export_files: list[Path], public_key: str, sample: int) -> dict[str, float]:
    """The reference: objects for every key and every encounter, one AES call per RPI
    (matching timed on ``sample`` keys, extrapolated)."""
    from agent.clock import RealClock
    from agent.protocol import export, gaen
    from agent.store import KeyFile, Store

    t = time.perf_counter()
    keys = []
    saved = export._fastexport
    export._fastexport = None  # the protobuf runtime: an object per key
    try:
        for f in export_files:
            keys += export.parse_export(f.read_bytes(), trusted_keys=[public_key]).keys
    finally:
        export._fastexport = saved
    parse_s = time.perf_counter() - t
    t = time.perf_counter()
    with Store.open(store_path, KeyFile(store_path.parent / "master.key"), clock=RealClock(),
                    read_only=True) as store:
        stored = {e.rpi for e in store.encounters.read()}
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    for k in keys[:sample]:
        rpik = gaen.derive_rpik(k.key_data)
        for j in range(k.rolling_period):
            _ = gaen.rpi(rpik, k.rolling_start_interval_number + j) in stored
    match_s = (time.perf_counter() - t) / sample * len(keys)
    return {"parse_s": parse_s, "read_s": read_s, "match_s": match_s, "total_s": parse_s + read_s + match_s}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--rpis-per-day", type=int, nargs="+", default=[2_000, 22_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--naive-keys", type=int, default=200)
    ap.add_argument("--no-python", dest="python_path", action="store_false", help="skip the pure-Python run")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--python", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--public-key", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return {}

    from rich.console import Console
    from rich.table import Table

    from agent.clock import utc_day
    from backend.server import BackgroundServer
    from benchmarks.bench_matching import openssl_limit
    from benchmarks.bench_store import crowded_store

    console = Console(width=170)
    today = utc_day(time.time())
    rng = random.Random(a.seed)
    planted = [rng.randbytes(16) for _ in range(PLANTED)]
    limit = openssl_limit()
    results: dict = {"limit": limit, "stores": {}}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        tmp_path = Path(tmp)
        t = time.perf_counter()
        backend = fill_backend(tmp_path / "backend", a.keys, planted, today)
        fill_s = time.perf_counter() - t
        t = time.perf_counter()
        names = backend.exports.run()
        export_s = time.perf_counter() - t
        files = [backend.config.exports_dir / n for n in names]
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        console.print(f"backend: {a.keys:,} keys inserted in {fill_s:.1f} s; export job {export_s:.2f} s: "
                      f"{len(names)} file(s), {size_mb:.1f} MB")
        results["export_s"] = export_s
        with BackgroundServer(backend) as srv:
            for per_day in a.rpis_per_day:
                src = tmp_path / f"store-{per_day}" / "agent.db"
                src.parent.mkdir()
                t = time.perf_counter()
                crowded_store(src, per_day, today, a.seed, planted)
                console.print(f"store of {per_day:,} RPIs/day x 14 days built in {time.perf_counter() - t:.1f} s "
                              f"({src.stat().st_size / 1e6:.0f} MB)")
                runs: dict[str, list[dict]] = {"C": [], "Python": [], "ctagent sync": []}
                for r in range(a.repeat):
                    for path in ("C", "Python", "ctagent sync"):
                        if path == "Python" and (not a.python_path or r > 0):
                            continue
                        work = tmp_path / f"run-{per_day}-{r}-{path.replace(' ', '-')}"
                        shutil.copytree(src.parent, work)
                        store = work / "agent.db"
                        if path == "ctagent sync":
                            cfg = work / "ctagent.toml"
                            cfg.write_text(f'[agent]\ndata_dir = "{work}"\nkey = "keyfile"\n'
                                           f'[sync]\nbackend_url = "{srv.url}"\n'
                                           f'trusted_keys = ["{backend.public_key_b64}"]\n')
                            wall, peak, out = run_child("cli", ["--config", str(cfg), "sync", "--json"])
                            doc = json.loads(out)
                            runs[path].append({"wall_s": wall, "peak_mb": peak, "keys": doc["keys"],
                                               "exposed": doc["exposed"]})
                        else:
                            args = ["--child", "--store", str(store), "--url", srv.url, "--public-key",
                                    backend.public_key_b64, "--workers", str(a.workers)]
                            _, peak, out = run_child("benchmarks.bench_sync",
                                                     args + (["--python"] if path == "Python" else []))
                            doc = json.loads(out)
                            doc["process_peak_mb"] = peak
                            runs[path].append(doc)
                        if runs[path][-1]["keys"] != a.keys:
                            raise SystemExit(f"{path}: {runs[path][-1]['keys']} keys checked, expected {a.keys}")
                        shutil.rmtree(work)
                for path in ("C", "Python"):
                    for doc in runs[path]:
                        if doc["matched_keys"] != PLANTED:
                            raise SystemExit(f"{path}: {doc['matched_keys']} keys matched, expected {PLANTED}")
                nv = naive(src, files, backend.public_key_b64, a.naive_keys)
                results["stores"][per_day] = {"runs": runs, "naive": nv}

    lim_s = limit["key_ns"] * a.keys / a.workers / 1e9
    tbl = Table(title=f"Sync of {a.keys:,} keys (2 files) from the backend on 127.0.0.1, {a.workers} cores; medians "
                      f"of {a.repeat} (min-max); the limit: the matching's cryptography at openssl speed "
                      f"({limit['key_ns']:.0f} ns per key per core)")
    for c in ("store", "path", "wall s", "peak MB", "download", "unzip", "verify", "parse", "read store", "match",
              "× limit"):
        tbl.add_column(c, justify="right")

    def med(vals: list[float]) -> str:
        return f"{statistics.median(vals):.2f}" + (f" ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else "")

    for per_day, r in results["stores"].items():
        label = f"{per_day * 14:,} RPIs"
        tbl.add_row(label, "limit", f"{lim_s:.2f}", "", "", "", "", "", "", f"{lim_s:.2f}", "1.0")
        for path in ("ctagent sync", "C", "Python"):
            docs = r["runs"][path]
            if not docs:
                continue
            walls = [d["wall_s"] for d in docs]
            peaks = [d.get("process_peak_mb", d["peak_mb"]) for d in docs]
            ph = [f"{statistics.median([d['phases'].get(k, 0.0) for d in docs]):.2f}" if "phases" in docs[0] else ""
                  for k in ("download", "unzip", "verify", "parse", "read store", "match")]
            tbl.add_row(label, path + (" (command)" if path == "ctagent sync" else ""), med(walls),
                        f"{statistics.median(peaks):.0f}", *ph, f"{statistics.median(walls) / lim_s:.1f}")
        nv = r["naive"]
        tbl.add_row(label, f"naive (match timed on {a.naive_keys} keys)", f"{nv['total_s']:.0f}", "", "", "", "",
                    f"{nv['parse_s']:.2f}", f"{nv['read_s']:.2f}", f"{nv['match_s']:.0f}",
                    f"{nv['total_s'] / lim_s:.0f}")
    console.print(tbl)
    return results


if __name__ == "__main__":
    main()
