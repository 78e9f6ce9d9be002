"""Backend load test, on 127.0.0.1 only and bounded: N clients, each running the whole
declaration (lab API issue -> verify -> certificate -> publish) over real HTTP against a
server process, while two export jobs run at once, again and again; on SQLite and on a
throw-away PostgreSQL (skipped, with the reason, when it cannot start).

Some flows race on purpose: a publish sent twice at once (a client's retry), a code
verified twice at once. They must be answered as they are one after the other (the
same 200, ``code_used``) or 409, never 5xx.

Each client first runs ``--warmup`` declarations that are checked but not timed (the
server's pooled connections opened, its statements prepared, as in a server that has
been running), then ``--flows`` timed ones. The clients speak HTTP with the standard
library, whose CPU (~0.2 ms a request) takes less of the two cores the server shares
with them than httpx's (~0.6 ms).

It prints, per database: the keys the server acknowledged against the keys in the
export files index.txt lists (equal, each once), the 5xx count (0), p50/p99 latency per
step, and the server's peak memory (VmHWM). Exit status 1 if an invariant broke.

Run from the repository root:
    .venv/bin/python -m benchmarks.bench_load [--clients 16] [--flows 40] [--warmup 2] [--db sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from benchmarks import throwaway_postgres

from agent.clock import RealClock
from agent.protocol import export, gaen
from agent.protocol.gaen import TemporaryExposureKey
from agent.protocol.verification import tek_hmac

#: the whole run of one database stops here, whatever is left
RUN_TIMEOUT_S = 300
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
#: export windows of one second: keys are exported while the load goes on
EXPORT_PERIOD_S = 1
#: every k-th flow sends its publish twice at once; every m-th verifies its code twice at once
PUBLISH_RACE_EVERY = 5
VERIFY_RACE_EVERY = 7
KEYS_PER_PUBLISH = 14
ROOT = Path(__file__).resolve().parent.parent


def backend_config(data_dir: Path, database_url: str | None):
    """The server's and the export jobs' settings: no rate limit (every client is
    127.0.0.1), one-second export windows, no padding (every exported key is real)."""
    from backend import BackendConfig
    return BackendConfig(data_dir, database_url=database_url, rate_issue_per_min=10**9,
                         rate_verify_per_min=10**9, export_period_s=EXPORT_PERIOD_S, export_min_keys=0)


def serve(data_dir: Path, database_url: str | None, port: int, workers: int) -> None:
    """The server process (this module run with --serve): as ``backend serve --workers``."""
    import uvicorn

    from backend import Backend
    from backend.server import UVICORN_OPTIONS, serve_workers, server_app
    backend = Backend(backend_config(data_dir, database_url), clock=RealClock())
    if workers > 1:
        serve_workers(backend.config, workers=workers, host="127.0.0.1", port=port, log_level="warning")
    else:
        uvicorn.run(server_app(backend), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                    **UVICORN_OPTIONS)


@dataclass
class Answer:
    status_code: int
    text: str

    def json(self):
        return json.loads(self.text)


class LeanClient:
    """The clients' HTTP: one kept-alive ``http.client`` connection per thread. The load
    generator shares the server's two cores; httpx took ~0.6 ms of CPU per request, a
    third of the machine at this load (the phones of a real deployment are elsewhere),
    the standard library ~0.2 ms."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.local = threading.local()
        self.lock = threading.Lock()
        self.opened: list[http.client.HTTPConnection] = []

    def close(self) -> None:
        with self.lock:
            for conn in self.opened:
                conn.close()
            self.opened.clear()

    def post(self, path: str, json_body: dict, headers: dict | None = None) -> Answer:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            with self.lock:
                self.opened.append(conn)
        try:
            conn.request("POST", path, body=json.dumps(json_body).encode(),
                         headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return Answer(r.status, r.read().decode())
        except BaseException:  # never sent twice (a POST is not idempotent): the next call reconnects
            conn.close()
            self.local.conn = None
            raise


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    statuses: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)
    acked: set[bytes] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, http: LeanClient, step: str, path: str, body: dict, headers: dict | None = None) -> Answer:
        t = time.perf_counter()
        r = http.post(path, body, headers)
        dt = time.perf_counter() - t
        with self.lock:
            self.latencies[step].append(dt)
            self.statuses[(step, r.status_code)] += 1
            if r.status_code >= 500:
                self.server_errors.append(f"{step}: {r.status_code} {r.text[:200]}")
        return r


def flow(i: int, http: LeanClient, api_key: str, tally: Tally) -> None:
    """One declaration; races on purpose on some flows."""
    code = tally.call(http, "issue", "/api/issue", {"testType": "confirmed"}, {"X-API-Key": api_key}).json()["code"]
    if i % VERIFY_RACE_EVERY == 0:
        with ThreadPoolExecutor(2) as two:
            answers = list(two.map(lambda _: tally.call(http, "verify", "/api/verify", {"code": code}), range(2)))
        ok = [r for r in answers if r.status_code == 200]
        assert len(ok) == 1 and {r.status_code for r in answers} <= {200, 400, 409}, [r.text for r in answers]
        token = ok[0].json()["token"]
    else:
        token = tally.call(http, "verify", "/api/verify", {"code": code}).json()["token"]
    today = gaen.rolling_start_for_day(time.time())
    keys = [TemporaryExposureKey(secrets.token_bytes(16), today - gaen.TEK_ROLLING_PERIOD * (k + 1))
            for k in range(KEYS_PER_PUBLISH)]
    hmac_key = secrets.token_bytes(32)
    cert = tally.call(http, "certificate", "/api/certificate",
                      {"token": token, "ekeyhmac": tek_hmac(hmac_key, keys)}).json()["certificate"]
    body = {"temporaryExposureKeys": [{"key": base64.b64encode(k.key_data).decode(),
                                       "rollingStartNumber": k.rolling_start_interval_number,
                                       "rollingPeriod": k.rolling_period, "transmissionRisk": 0} for k in keys],
            "healthAuthorityID": "load", "verificationPayload": cert, "hmacKey": base64.b64encode(hmac_key).decode()}
    sends = 2 if i % PUBLISH_RACE_EVERY == 0 else 1
    with ThreadPoolExecutor(sends) as pool:
        answers = list(pool.map(lambda _: tally.call(http, "publish", "/v1/publish", body), range(sends)))
    # a retry gets the first answer (its padding aside: random in every answer, as the key server pads)
    ok = [{k: v for k, v in r.json().items() if k != "padding"} for r in answers if r.status_code == 200]
    if ok:
        assert all(a == ok[0] for a in ok), ok
        assert ok[0]["insertedExposures"] == KEYS_PER_PUBLISH, ok[0]
        with tally.lock:
            tally.acked.update(k.key_data for k in keys)


def exported(data_dir: Path, public_key: str) -> tuple[list[str], collections.Counter]:
    index = (data_dir / "exports" / "index.txt").read_text().split()
    seen: collections.Counter = collections.Counter()
    for name in index:
        exp = export.parse_export((data_dir / "exports" / name).read_bytes(), trusted_keys=[public_key])
        seen.update(k.key_data for k in exp.keys)
    return index, seen


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants still running: the
    server and its workers."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for p, (ppid, _) in stats.items():
            if ppid == parent and p not in tree:
                tree.add(p)
                frontier.append(p)
    return sum(stats[p][1] for p in tree if p in stats)


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop_server(server: subprocess.Popen) -> float:
    """SIGTERM (uvicorn's supervisor stops its workers), then, past STOP_TIMEOUT_S, SIGKILL
    to the server's whole process group: a benchmark never leaves a server behind. The
    seconds SIGTERM took (inf: it did not stop)."""
    started = time.monotonic()
    server.terminate()
    try:
        server.wait(STOP_TIMEOUT_S)
        return time.monotonic() - started
    except subprocess.TimeoutExpired:
        print(f"the server did not stop within {STOP_TIMEOUT_S} s of SIGTERM: killed", file=sys.stderr)
        return float("inf")
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)  # workers too, whatever their parent did
        except ProcessLookupError:
            pass
        server.wait()


def run_one(db_name: str, database_url: str | None, clients: int, flows: int, console: Console,
            workers: int = 1, warmup: int = 2) -> dict:
    from backend import Backend
    with tempfile.TemporaryDirectory(prefix=f"ctagent-load-{db_name}-") as d:
        data_dir = Path(d) / "backend"
        setup = Backend(backend_config(data_dir, database_url), clock=RealClock())
        if database_url:  # a fresh schema
            from backend import db
            db.metadata.drop_all(setup.engine)
            db.metadata.create_all(setup.engine)
        api_key = setup.verification.add_api_key("load")
        database_pid = None  # PostgreSQL's postmaster (its backends are its children): CPU of the database
        if database_url:
            import sqlalchemy as sa
            with setup.engine.connect() as c:
                database_pid = parent_pid(c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        public_key = setup.public_key_b64
        setup.engine.dispose()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(Path(d) / "server.log", "w+")
        server = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_load", "--serve", str(data_dir),
                                   "--database", database_url or "", "--port", str(port), "--workers", str(workers)],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    stop_server(server)
                    log.seek(0)
                    raise RuntimeError(f"the server did not start:\n{log.read()[-2000:]}") from None
                time.sleep(0.05)
        tally = Tally()
        # two export jobs at once, over and over, each with a backend (a database engine) of its own
        jobs = [Backend(backend_config(data_dir, database_url), clock=RealClock()) for _ in range(2)]
        runs, job_errors = collections.Counter(), []
        load_done = threading.Event()

        def export_loop(job) -> None:
            while not load_done.is_set():
                try:
                    runs[len(job.exports.run()) > 0] += 1
                except Exception as e:
                    job_errors.append(f"{type(e).__name__}: {e}")
                load_done.wait(0.2)

        exporters = [threading.Thread(target=export_loop, args=(j,)) for j in jobs]
        deadline = time.perf_counter() + RUN_TIMEOUT_S
        failures: list[str] = []

        def run_flows(pool: ThreadPoolExecutor, first: int, count: int) -> None:
            futures = [pool.submit(flow, i, http, api_key, tally) for i in range(first, first + count)]
            for f in futures:
                try:
                    f.result(timeout=max(1.0, deadline - time.perf_counter()))
                except Exception as e:
                    failures.append(f"{type(e).__name__}: {e}"[:300])

        http = LeanClient("127.0.0.1", port, timeout=60)
        try:
            for t in exporters:
                t.start()
            with ThreadPoolExecutor(clients) as pool:
                # a long-running server's state first (its pooled connections open, its
                # statements prepared): the warm-up's answers are checked, not timed
                run_flows(pool, 0, clients * warmup)
                with tally.lock:
                    tally.latencies.clear()
                started = time.perf_counter()
                cpu_before, own_cpu_before = tree_cpu_s(server.pid), time.process_time()
                db_cpu_before = tree_cpu_s(database_pid) if database_pid else 0.0
                run_flows(pool, clients * warmup, clients * flows)
            load_s = time.perf_counter() - started
            server_cpu_s = tree_cpu_s(server.pid) - cpu_before
            generator_cpu_s = time.process_time() - own_cpu_before  # the clients and the two export jobs
            # SQLite's work is in the processes that use it
            database_cpu_s = tree_cpu_s(database_pid) - db_cpu_before if database_pid else 0.0
            load_done.set()
            for t in exporters:
                t.join(RUN_TIMEOUT_S)
            # the last keys: once the clock passed their window's end
            boundary = (time.time() // EXPORT_PERIOD_S + 1) * EXPORT_PERIOD_S
            while time.time() < boundary + 0.05:
                time.sleep(0.05)
            jobs[0].exports.run()
            peak = peak_rss_mb(server.pid)
        finally:
            load_done.set()
            http.close()
            stop_s = stop_server(server)
            for j in jobs:
                j.engine.dispose()
        index, seen = exported(data_dir, public_key)
        log.seek(0)
        server_log = log.read()
        log.close()
    in_files = sum(seen.values())
    ok = (tally.acked == set(seen) and in_files == len(tally.acked) and len(index) == len(set(index))
          and not tally.server_errors and not failures and not job_errors and stop_s < STOP_TIMEOUT_S)
    all_lat = sorted(x for v in tally.latencies.values() for x in v)
    res = {
        "db": db_name, "workers": workers, "clients": clients, "flows": clients * flows, "load_s": round(load_s, 1),
        "requests": len(all_lat), "requests_per_s": round(len(all_lat) / load_s),
        "acked_keys": len(tally.acked), "keys_in_files": in_files, "distinct_keys_in_files": len(seen),
        "index_files": len(index), "index_unique": len(set(index)) == len(index),
        "export_runs": runs[True] + runs[False], "export_runs_with_files": runs[True],
        "status_5xx": len(tally.server_errors),
        "status_409": sum(n for (_, status), n in tally.statuses.items() if status == 409),
        "latency_ms": {step: {"p50": round(pct(v, 50) * 1000, 1), "p99": round(pct(v, 99) * 1000, 1)}
                       for step, v in tally.latencies.items()},
        "all_p50_ms": round(pct(all_lat, 50) * 1000, 1), "all_p99_ms": round(pct(all_lat, 99) * 1000, 1),
        "server_peak_mb": round(peak, 1), "server_cpu_s": round(server_cpu_s, 2),
        "generator_cpu_s": round(generator_cpu_s, 2), "database_cpu_s": round(database_cpu_s, 2),
        "server_stop_s": round(stop_s, 2), "ok": ok,
        "statuses": {f"{step} {status}": n for (step, status), n in sorted(tally.statuses.items())},
        "failures": failures[:5], "job_errors": job_errors[:5], "server_errors": tally.server_errors[:5],
    }
    if not ok and ("Traceback" in server_log or "ERROR" in server_log):
        console.print(f"[red]server log ({db_name}), last lines:[/]\n" + server_log[-3000:])
    return res


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (threads)")
    ap.add_argument("--flows", type=int, default=40, help="declarations per client, timed")
    ap.add_argument("--warmup", type=int, default=2, help="declarations per client before the timed ones")
    ap.add_argument("--db", default="sqlite,postgresql", help="databases to run on, comma-separated")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="server worker processes (backend serve --workers); each count is a run")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--database", default="", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        serve(a.serve, a.database or None, a.port, a.workers[0])
        return []
    console = Console(stderr=a.json, width=max(150, Console().width))
    results = []
    for name in a.db.split(","):
        for workers in a.workers:
            if name == "sqlite":
                results.append(run_one("SQLite", None, a.clients, a.flows, console, workers, a.warmup))
            elif name == "postgresql":
                with throwaway_postgres(console) as url:
                    if url is not None:
                        results.append(run_one("PostgreSQL", url, a.clients, a.flows, console, workers, a.warmup))
            else:
                ap.error(f"unknown database {name!r}")
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        t = Table(title=f"Backend under load on 127.0.0.1 (server process; {a.clients} clients, "
                        "two export jobs at once, 1-s export windows)")
        for c in ("database", "workers", "flows (requests/s)", "requests/s per server core",
                  "CPU ms per request: server / database / load generator", "acked keys", "keys in files",
                  "5xx", "409", "p50 / p99 ms", "publish p50 / p99 ms", "server peak", "invariant"):
            t.add_column(c)
        for r in results:
            pub = r["latency_ms"].get("publish", {})
            t.add_row(r["db"], str(r["workers"]), f"{r['flows']} ({r['requests_per_s']}/s)",
                      f"{r['requests'] / r['server_cpu_s']:.0f}" if r.get("server_cpu_s") else "",
                      f"{r['server_cpu_s'] / r['requests'] * 1e3:.2f} / "
                      f"{r['database_cpu_s'] / r['requests'] * 1e3:.2f} / "
                      f"{r['generator_cpu_s'] / r['requests'] * 1e3:.2f}",
                      str(r["acked_keys"]),
                      f"{r['keys_in_files']} ({r['distinct_keys_in_files']} distinct, {r['index_files']} files)",
                      str(r["status_5xx"]), str(r["status_409"]), f"{r['all_p50_ms']} / {r['all_p99_ms']}",
                      f"{pub.get('p50')} / {pub.get('p99')}", f"{r['server_peak_mb']} MB",
                      "[green]holds[/]" if r["ok"] else "[red]BROKEN[/]")
        console.print(t)
        for r in results:
            if not r["ok"]:
                what = {k: r[k] for k in ("statuses", "failures", "job_errors", "server_errors")}
                console.print(f"[red]{r['db']}:[/] {json.dumps(what, indent=1)}")
    if any(not r["ok"] for r in results):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
