"""Backend benchmark, loopback only and bounded: publish requests/s over real HTTP, and the
export job at scale.

The export job: ``--export-keys`` uploaded keys past their embargo (made by the database
itself), one run in a process of its own (its wall time and its peak resident set), on
SQLite and on a throw-away PostgreSQL. In the same run:
- the limit: what no export of those keys can skip, deflating and hashing the bytes the
  files hold (zlib at the job's level, SHA-256 for the signature), at this machine's speed;
- a naive reference: the files built with the protobuf runtime (a message object per key)
  from the keys as records, timed on ``--naive-keys`` keys and scaled (the job's database
  work aside).

Run:  .venv/bin/python -m benchmarks.bench_backend [--publishes 300] [--export-keys 1000000]
          [--db sqlite,postgresql] [--repeat 3]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from benchmarks import throwaway_postgres

from agent.clock import RealClock
from agent.protocol import export, gaen
from agent.protocol.gaen import TemporaryExposureKey
from agent.protocol.verification import tek_hmac
from backend import Backend, BackendConfig
from backend.server import BackgroundServer

ROOT = Path(__file__).resolve().parent.parent


def prepared_publish(backend: Backend, now: float, n_keys: int = 14) -> dict:
    """A valid v1 publish body (code -> token -> certificate done in-process)."""
    v = backend.verification
    token = v.verify_code(v.issue_code("bench")["code"], "bench")["token"]
    today = gaen.rolling_start_for_day(now)
    keys = [TemporaryExposureKey(secrets.token_bytes(16), today - gaen.TEK_ROLLING_PERIOD * (i + 1))
            for i in range(n_keys)]
    hk = secrets.token_bytes(32)
    cert = v.certificate(token, tek_hmac(hk, keys))["certificate"]
    return {"temporaryExposureKeys": [{"key": base64.b64encode(k.key_data).decode(),
                                       "rollingStartNumber": k.rolling_start_interval_number,
                                       "rollingPeriod": k.rolling_period, "transmissionRisk": 0} for k in keys],
            "verificationPayload": cert, "hmacKey": base64.b64encode(hk).decode(), "healthAuthorityID": "bench"}


def fill_keys(backend: Backend, n: int, today: int) -> None:
    """``n`` uploaded keys of the last 14 days past their embargo, made by the database."""
    rows = ("SELECT decode(md5(random()::text || i::text), 'hex') AS k, (:today - 13 + (random() * 13)::int) * 144 "
            "AS rs FROM generate_series(1, :n) AS i" if backend.engine.dialect.name == "postgresql" else
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n) "
            "SELECT randomblob(16) AS k, (:today - 13 + abs(random()) % 14) * 144 AS rs FROM s")
    with backend.engine.begin() as c:
        c.execute(sa.text("INSERT INTO exposures (key_data, rolling_start, rolling_period, transmission_risk, "
                          "report_type, health_authority, received_at, export_after) "
                          f"SELECT k, rs, 144, 0, 1, 'bench', 0, 0 FROM ({rows}) AS keys"), {"n": n, "today": today})


def export_child(data_dir: str, database_url: str) -> None:
    """One export run (``--export-child``): prints its figures as JSON."""
    backend = Backend(BackendConfig(Path(data_dir), database_url=database_url or None), clock=RealClock())
    t = time.perf_counter()
    names = backend.exports.run()
    wall = time.perf_counter() - t
    status = Path("/proc/self/status").read_text()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
    print(json.dumps({"wall_s": wall, "files": len(names), "peak_mb": peak_kb / 1024,
                      "bytes": sum((backend.config.exports_dir / n).stat().st_size for n in names)}))


def reset_exports(backend: Backend) -> None:
    """The keys unexported again, their files gone: the next run exports them all."""
    from backend import db
    with backend.engine.begin() as c:
        c.execute(sa.delete(db.batches))
        c.execute(sa.text("INSERT INTO export_pending (id, export_after) SELECT id, export_after FROM exposures "
                          "WHERE id NOT IN (SELECT id FROM export_pending)"))
    for p in backend.config.exports_dir.glob("*.zip"):
        p.unlink()


def limit_s(keys: export.PackedKeys) -> float:
    """Deflating and hashing the export.bin bytes of ``keys`` (the floor under any export)."""
    body = export.encode_keys(keys)
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # the job builds files side by side too
        half = len(body) // 2
        list(pool.map(lambda b: (zipfile.ZipFile(io.BytesIO(), "w", zipfile.ZIP_DEFLATED).writestr("x", b),
                                 hashlib.sha256(b).digest()), [body[:half], body[half:]]))
    return time.perf_counter() - t


def naive_s(keys: export.PackedKeys, sample: int) -> float:
    """The files as the protobuf runtime builds them from records, scaled from ``sample``."""
    some = keys.span(0, sample).keys()
    signing = export.ec.generate_private_key(export.ec.SECP256R1())
    t = time.perf_counter()
    msg = export.pb.TemporaryExposureKeyExport(start_timestamp=0, end_timestamp=1, region="XX")
    for k in some:
        o = msg.keys.add()
        o.key_data, o.rolling_start_interval_number = k.key_data, k.rolling_start_interval_number
        o.rolling_period, o.transmission_risk_level = k.rolling_period, k.transmission_risk_level
        o.report_type = int(k.report_type)
    body = export.HEADER + msg.SerializeToString()
    signing.sign(body, export.ec.ECDSA(export.hashes.SHA256()))
    zipfile.ZipFile(io.BytesIO(), "w", zipfile.ZIP_DEFLATED).writestr("export.bin", body)
    objects_s = time.perf_counter() - t
    t = time.perf_counter()
    _ = keys.span(0, sample).keys()  # the records themselves
    return (objects_s + (time.perf_counter() - t)) * len(keys) / sample


def run_export(name: str, database_url: str | None, n: int, repeat: int, naive_keys: int) -> dict:
    from agent.clock import utc_day
    with tempfile.TemporaryDirectory(prefix=f"bench-export-{name}-") as d:
        backend = Backend(BackendConfig(Path(d) / "backend", database_url=database_url), clock=RealClock())
        if database_url:
            from backend import db
            db.metadata.drop_all(backend.engine)
            db.metadata.create_all(backend.engine)
        fill_keys(backend, n, utc_day(time.time()))
        runs = []
        for _ in range(repeat):
            reset_exports(backend)
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_backend", "--export-child",
                                  str(backend.config.data_dir), database_url or ""], capture_output=True, text=True,
                                 cwd=ROOT)
            if out.returncode != 0:
                raise SystemExit(f"export run failed: {out.stderr[-2000:]}")
            runs.append(json.loads(out.stdout))
        files = sorted(backend.config.exports_dir.glob("*.zip"))
        keys = export.PackedKeys.concat([export.parse_export_packed(f.read_bytes(), trusted_keys=[
            backend.public_key_b64]).keys for f in files])
        if len(keys) != n:
            raise SystemExit(f"{name}: {len(keys)} keys in the files, expected {n}")
        backend.engine.dispose()
        return {"db": name, "runs": runs, "limit_s": limit_s(keys), "naive_s": naive_s(keys, naive_keys)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--publishes", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--export-keys", type=int, default=1_000_000)
    ap.add_argument("--db", default="sqlite,postgresql")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-keys", type=int, default=50_000)
    ap.add_argument("--export-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.export_child:
        export_child(*a.export_child)
        return {}
    console = Console(width=150)
    clock = RealClock()  # a benchmark runs on wall time: it is an edge
    now = clock.now()
    res: dict = {}
    if a.publishes:
        with tempfile.TemporaryDirectory() as d:
            backend = Backend(BackendConfig(Path(d), rate_issue_per_min=10**9, rate_verify_per_min=10**9),
                              clock=clock)
            bodies = [prepared_publish(backend, now) for _ in range(a.publishes)]
            with BackgroundServer(backend) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
                def post(body):
                    r = http.post("/v1/publish", json=body)
                    assert r.status_code == 200, r.text
                t = time.perf_counter()
                with ThreadPoolExecutor(a.concurrency) as ex:
                    list(ex.map(post, bodies))
                res["publish_per_s"] = a.publishes / (time.perf_counter() - t)
            backend.engine.dispose()
        console.print(f"publish over HTTP (SQLite, one process, {a.concurrency} clients, 14 keys each): "
                      f"{res['publish_per_s']:.0f} requests/s")
    exports = []
    for name in a.db.split(","):
        if name == "sqlite":
            exports.append(run_export("SQLite", None, a.export_keys, a.repeat, a.naive_keys))
        elif name == "postgresql":
            with throwaway_postgres(console) as url:
                if url is not None:
                    exports.append(run_export("PostgreSQL", url, a.export_keys, a.repeat, a.naive_keys))
        else:
            ap.error(f"unknown database {name!r}")
    res["exports"] = exports
    t = Table(title=f"Export job, {a.export_keys:,} keys: one run in a process of its own; medians (min-max) of "
                    f"{a.repeat}; goal <= 10 s and <= 300 MB")
    for c in ("database", "files, MB", "limit: deflate + SHA-256 s", "ctagent s", "peak MB",
              f"naive (protobuf objects, timed on {a.naive_keys:,}) s"):
        t.add_column(c, justify="right")
    for e in exports:
        walls, peaks = [r["wall_s"] for r in e["runs"]], [r["peak_mb"] for r in e["runs"]]
        t.add_row(e["db"], f"{e['runs'][0]['files']}, {e['runs'][0]['bytes'] / 1e6:.1f}", f"{e['limit_s']:.2f}",
                  f"{statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})",
                  f"{statistics.median(peaks):.0f} ({min(peaks):.0f}-{max(peaks):.0f})", f"{e['naive_s']:.1f}")
    console.print(t)
    return res


if __name__ == "__main__":
    main()
