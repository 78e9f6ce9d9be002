"""Run the backend's HTTP server in a background thread (the demo's embedded backend
and the tests' live server): real uvicorn on 127.0.0.1, an ephemeral port."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Self

import uvicorn

from .app import create_app
from .robert import RobertServer
from .service import Backend

START_TIMEOUT_S = 15
#: every server of the backend runs with these: uvicorn believes ``X-Forwarded-*`` from
#: 127.0.0.1 by default, which would let any local client (or a proxy's clients) pick
#: its own address; the backend reads them itself, from configured proxies only
#: (:func:`backend.httputil.client_host`)
UVICORN_OPTIONS: dict[str, Any] = {"proxy_headers": False}


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
