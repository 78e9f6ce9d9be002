"""The export job on its period inside ``backend serve``: a thread that runs
:meth:`~backend.exports.ExportJob.run` just after every period boundary (the window a
run covers ends at a boundary). Runs in other processes (a second server, a person's
``backend export``) are serialised by the job's database lock; a run that fails is
logged in one line and the next boundary tries again."""

from __future__ import annotations

import logging
import threading
from typing import Self

from .exports import first_run_at
from .service import Backend

log = logging.getLogger("ctagent.backend")

#: after a boundary, so that a publish finishing at the boundary is in the database
GRACE_S = 2.0


class ExportScheduler:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ctagent-export", daemon=True)
        self.runs = 0

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def seconds_to_next_run(self) -> float:
        now = self.backend.clock.now()
        period = self.backend.config.export_period_s
        return max(0.0, first_run_at(now + 1e-6, period) + GRACE_S - now)

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds_to_next_run()):
            try:
                names = self.backend.exports.run()
            except Exception as e:  # the server keeps serving; the next boundary retries
                log.error("export: the scheduled run failed (%s: %s); the next period retries", type(e).__name__, e)
                continue
            self.runs += 1
            if names:
                log.info("export: scheduled run wrote %d file(s)", len(names))
