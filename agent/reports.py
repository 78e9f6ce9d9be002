"""What the CLI shows, assembled from the store and the daemon's status file: status,
per-day encounters, exposures, the pseudonymised research export. Nothing identifying."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import secrets
from pathlib import Path
from typing import Any

from .clock import iso_date
from .modes.base import ProtocolMode
from .store import Store, holder


def daemon_state(db_path: Path, status_file: Path, now: float) -> dict[str, Any]:
    """Whether the daemon runs (it holds the store's lock, and the status file is its),
    its pid, its last figures and how old they are, its radio's state."""
    try:
        figures = json.loads(status_file.read_text()) if status_file.exists() else None
    except (OSError, ValueError):
        figures = None  # half-written or unreadable: no figures rather than wrong ones
    pid = holder(db_path)
    running = pid is not None and figures is not None and figures.get("pid") == pid
    at = figures.get("now") if figures else None
    return {
        "running": running, "pid": pid if running else None,
        # the store is held by something else than the daemon (a write command)
        "store_in_use_by": pid if pid is not None and not running else None,
        "figures": figures, "figures_at": at, "figures_age_s": None if at is None else round(now - at, 1),
        "radio": None if not figures else {"advertising": (figures.get("advertiser") or {}).get("advertising"),
                                           "scanning": (figures.get("scanner") or {}).get("scanning"),
                                           "samples_last_minute": (figures.get("scanner") or {}).get(
                                               "samples_last_minute")},
    }


def status_report(store: Store, mode: ProtocolMode[Any], status_file: Path, now: float) -> dict[str, Any]:
    by_day = mode.identifiers_by_day()
    return {"store": str(store.path), "protocol": mode.name, "days_stored": len(by_day),
            "identifiers_heard": sum(by_day.values()), "exposed_days": [iso_date(d) for d in store.exposures.days()],
            "server_call": mode.server_call, "last_sync": mode.last_server_success(), **mode.status_fields(),
            "daemon": daemon_state(store.path, status_file, now)}


def ago(seconds: float) -> str:
    """``42 s ago``, ``5 min ago``, ``3 h ago``, ``2 days ago``."""
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 2 * 86400:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} days ago"


def research_export(store: Store, fmt: str) -> str:
    """Pseudonymised encounter summaries: a fresh random salt per export, so pseudonyms
    cannot be linked across exports or back to RPIs; times rounded to the minute."""
    salt = secrets.token_bytes(32)
    rows = []
    for e in store.encounters.read():
        rows.append({
            "pseudonym": hmac.new(salt, e.rpi, hashlib.sha256).hexdigest()[:12],
            "day": e.day, "first_minute": int(e.first_seen // 60) * 60, "last_minute": int(e.last_seen // 60) * 60,
            "windows": len(e.windows), "samples": e.sample_count,
            "rssi_mean_dbm": round(sum(w.rssi_mean for w in e.windows) / max(1, len(e.windows)), 1),
            "rssi_max_dbm": max((w.rssi_max for w in e.windows), default=None),
        })
    if fmt == "json":
        return json.dumps(rows, indent=1)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["pseudonym"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
