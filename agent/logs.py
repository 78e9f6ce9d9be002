"""Logging for the daemon: one line per event, key=value, UTC time. Callers never pass
identifiers or keys."""

from __future__ import annotations

import datetime as dt
import logging


class LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"ts={ts} level={record.levelname} logger={record.name} msg=\"{record.getMessage()}\""


def setup_logging(level: str = "INFO") -> None:
    h = logging.StreamHandler()
    h.setFormatter(LogFormatter())
    root = logging.getLogger("ctagent")
    root.handlers[:] = [h]
    root.setLevel(level)
