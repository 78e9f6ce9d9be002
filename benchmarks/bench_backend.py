"""Backend load test, loopback only and bounded: publish requests/s over real HTTP, and
the export job's time for 100,000 uploaded keys.

Run:  .venv/bin/python -m benchmarks.bench_backend [--publishes 300] [--export-keys 100000]
"""

from __future__ import annotations

import argparse
import base64
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from agent.clock import RealClock
from agent.protocol import gaen
from agent.protocol.gaen import TemporaryExposureKey
from agent.protocol.verification import tek_hmac
from backend import Backend, BackendConfig, db
from backend.server import BackgroundServer


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--publishes", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--export-keys", type=int, default=100_000)
    a = ap.parse_args(argv)
    clock = RealClock()  # a benchmark runs on wall time: it is an edge
    now = clock.now()
    with tempfile.TemporaryDirectory() as d:
        backend = Backend(BackendConfig(Path(d), rate_issue_per_min=10**9, rate_verify_per_min=10**9), clock=clock)
        bodies = [prepared_publish(backend, now) for _ in range(a.publishes)]
        with BackgroundServer(backend) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            def post(body):
                r = http.post("/v1/publish", json=body)
                assert r.status_code == 200, r.text
            t = time.perf_counter()
            with ThreadPoolExecutor(a.concurrency) as ex:
                list(ex.map(post, bodies))
            publish_s = time.perf_counter() - t
        # 100,000 uploaded keys past their embargo, then one export run
        yesterday = gaen.rolling_start_for_day(now) - gaen.TEK_ROLLING_PERIOD
        rows = [{"key_data": secrets.token_bytes(16), "rolling_start": yesterday,
                 "rolling_period": gaen.TEK_ROLLING_PERIOD, "transmission_risk": 0, "report_type": 1,
                 "days_since_onset": None, "health_authority": "bench", "received_at": now, "export_after": 0.0}
                for _ in range(a.export_keys)]
        with backend.engine.begin() as c:
            c.execute(sa.insert(db.exposures), rows)
        t = time.perf_counter()
        files = backend.exports.run()
        export_s = time.perf_counter() - t
        size = sum((backend.config.exports_dir / f).stat().st_size for f in files)
    res = {"publish_per_s": a.publishes / publish_s, "publishes": a.publishes,
           "export_keys": a.export_keys + a.publishes * 14, "export_s": export_s, "export_mb": size / 1e6}
    t = Table(title="Backend on loopback (uvicorn, SQLite, 1 process)")
    for c in ("measure", "value"):
        t.add_column(c)
    t.add_row(f"publish requests/s (14 keys each, {a.concurrency} clients, {a.publishes} requests)",
              f"{res['publish_per_s']:.0f}")
    t.add_row(f"export of {res['export_keys']:,} keys (sign + zip + index)", f"{export_s:.2f} s, {size / 1e6:.1f} MB")
    Console().print(t)
    return res


if __name__ == "__main__":
    main()
