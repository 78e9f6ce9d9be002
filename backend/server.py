"""Run the backend's HTTP server: in a background thread (the demo's embedded backend
and the tests' live server: real uvicorn on 127.0.0.1, an ephemeral port), or in several
worker processes (``backend serve --workers N``, the production set-up: one event loop
per core, hardware/backend.md)."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import socket
import threading
import time
from typing import Any, Self

import uvicorn
from fastapi import FastAPI

from agent.clock import RealClock

from .app import create_app
from .config import BackendConfig
from .robert import RobertConfig, RobertServer
from .service import Backend

#: how ``serve_workers`` hands its settings to the worker processes it starts
WORKER_SETTINGS_ENV = "CTAGENT_BACKEND_WORKER_SETTINGS"

START_TIMEOUT_S = 15
#: a stop (SIGTERM) lets the requests in flight finish for this long, then cancels them
#: (a transaction cancelled is rolled back): uvicorn's default waits for ever, and one
#: client that stalls in the middle of its body kept the server from stopping
SHUTDOWN_GRACE_S = 5
#: every server of the backend runs with these: uvicorn believes ``X-Forwarded-*`` from
#: 127.0.0.1 by default, which would let any local client (or a proxy's clients) pick
#: its own address; the backend reads them itself, from configured proxies only
#: (:func:`backend.httputil.client_host`)
UVICORN_OPTIONS: dict[str, Any] = {"proxy_headers": False, "timeout_graceful_shutdown": SHUTDOWN_GRACE_S}


class BackgroundServer:
    def __init__(self, backend: Backend, robert_server: RobertServer | None = None, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(create_app(backend, robert_server), host=host, port=port, log_level="warning",
                                lifespan="off", access_log=False, **UVICORN_OPTIONS)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="ctagent-backend", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        # waits on the real thread, whatever clock the backend runs on
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the embedded backend did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def worker_settings(config: BackendConfig, workers: int, robert: RobertConfig | None) -> str:
    """What each of ``workers`` processes builds its backend from. The per-client request
    limits are counted in each process (in memory): each gets its share of them, so that
    all together allow about what one process would."""
    share = dataclasses.replace(config, rate_issue_per_min=math.ceil(config.rate_issue_per_min / workers),
                                rate_verify_per_min=math.ceil(config.rate_verify_per_min / workers))
    robert_doc = None if robert is None else dataclasses.asdict(
        dataclasses.replace(robert, register_per_min=math.ceil(robert.register_per_min / workers)))
    return json.dumps({"config": share.to_json(), "robert": robert_doc})


def server_app(backend: Backend, robert_server: RobertServer | None = None) -> FastAPI:
    """The application of a serving process (``backend serve``, each of its workers): as
    :func:`~backend.app.create_app`, then everything alive at that point (the modules, the
    app, its routes and models) moved out of the garbage collector's reach
    (``gc.freeze``). Each full collection walked them all: 90-220 ms with the GIL held,
    a stall of every request in flight in that process (most of the publish p99 in
    ``benchmarks.bench_load``); it now walks what requests make."""
    app = create_app(backend, robert_server)
    gc.collect()
    gc.freeze()
    return app


def worker_app() -> FastAPI:
    """The application of one worker process (uvicorn's factory), from the settings
    :func:`serve_workers` put in the environment; the export job runs in the parent."""
    doc = json.loads(os.environ[WORKER_SETTINGS_ENV])
    backend = Backend(BackendConfig.from_json(doc["config"]), clock=RealClock())
    robert = None if doc["robert"] is None else RobertServer(backend, RobertConfig(**doc["robert"]))
    return server_app(backend, robert)


def serve_workers(config: BackendConfig, *, workers: int, host: str, port: int, robert: RobertConfig | None = None,
                  log_level: str = "info") -> None:
    """Serve with ``workers`` processes on one listening socket (uvicorn's supervisor
    restarts one that dies); each has its own event loop and database connections."""
    os.environ[WORKER_SETTINGS_ENV] = worker_settings(config, workers, robert)
    uvicorn.run("backend.server:worker_app", factory=True, workers=workers, host=host, port=port,
                log_level=log_level, access_log=False, **UVICORN_OPTIONS)
