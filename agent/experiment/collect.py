"""``ctagent experiment collect``: the device's research log and own identifiers, with the
carrier's consent, into a research bundle (``bundle.py``). Reads the store read-only, so
it runs beside the daemon; needs no analysis engine (the Parquet writer is numpy + zlib).
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputFileError, UserError
from ..modes.base import ProtocolMode
from ..store import Store
from .bundle import Manifest, write_bundle
from .recording import NO_TX_POWER, RadioFacts, read_sightings, read_windows

#: sync markers logged by `ctagent experiment mark` (CSV: t,marker), beside the store
MARKERS_FILE = "experiment-markers.csv"


def utc_iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def add_marker(data_dir: Path, t: float, marker: str) -> None:
    """Append one marker (a button press, a clap on camera) to the device's marker log."""
    if not marker or "\n" in marker or len(marker) > 200:
        raise UserError("a marker is one line of at most 200 characters")
    path = Path(data_dir) / MARKERS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        line = f"{t:.3f},{marker.replace(',', ' ')}\n"
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_markers(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / MARKERS_FILE
    t: list[float] = []
    names: list[str] = []
    if path.exists():
        for row in csv.reader(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            try:
                t.append(float(row[0]))
                names.append(row[1])
            except (IndexError, ValueError):
                continue  # a line cut by a power failure
    return {"t": np.array(t, dtype=float), "marker": names}


def research_tables(store: Store, mode: ProtocolMode[Any], data_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every table of the bundle from the store (and the marker log in ``data_dir``)."""
    adverts: dict[tuple[str, bytes], int] = {}
    t_parts, a_parts, r_parts, x_parts = [], [], [], []
    for batch_adverts, recs in read_sightings(store):
        remap = np.array([adverts.setdefault((a.address, a.payload), len(adverts)) for a in batch_adverts],
                         dtype=np.int32)
        t_parts.append(recs["t"])
        a_parts.append(remap[recs["advert"]] if len(remap) else np.zeros(0, np.int32))
        r_parts.append(recs["rssi"].astype(np.int32))
        x_parts.append(recs["tx_power"].astype(np.float64))
    t = np.concatenate(t_parts) if t_parts else np.zeros(0)
    order = np.argsort(t, kind="stable")
    tx = np.concatenate(x_parts)[order] if x_parts else np.zeros(0)
    tx[tx == NO_TX_POWER] = np.nan
    tx_col: list[int | None] = [None if np.isnan(v) else int(v) for v in tx]
    windows = list(read_windows(store))
    broadcasts = sorted(b for w in windows for b in w.broadcasts)
    down = [d for w in windows for d in w.down]
    tables: dict[str, dict[str, Any]] = {
        "sightings": {"t": t[order], "advert": (np.concatenate(a_parts) if a_parts else np.zeros(0, np.int32))[order],
                      "rssi": (np.concatenate(r_parts) if r_parts else np.zeros(0, np.int32))[order],
                      "tx_power": tx_col},
        "adverts": {"advert": np.arange(len(adverts), dtype=np.int32), "address": [a for a, _ in adverts],
                    "payload": [p for _, p in adverts], "transmitter": [None] * len(adverts)},
        "own_ids": _columns(["kind", "id", "start", "period"], mode.own_identifiers()),
        "broadcasts": {"t": np.array([b[0] for b in broadcasts]), "address": [b[1] for b in broadcasts],
                       "payload": [bytes.fromhex(b[2]) for b in broadcasts],
                       "new_identity": [b[3] for b in broadcasts]},
        "windows": {"start": np.array([w.start for w in windows]), "end": np.array([w.end for w in windows]),
                    "scanning_s": np.array([w.scanning_s for w in windows]),
                    "advertising_s": np.array([w.advertising_s for w in windows]),
                    "received": np.array([w.received for w in windows], dtype=np.int64),
                    "clock_synchronized": [w.clock.synchronized for w in windows],
                    "clock_source": [w.clock.service or w.clock.source for w in windows],
                    "clock_offset_s": np.array([np.nan if w.clock.offset_s is None else w.clock.offset_s
                                                for w in windows]),
                    "clock_error_s": np.array([np.nan if w.clock.max_error_s is None else w.clock.max_error_s
                                               for w in windows])},
        "radio_down": {"kind": [d.kind for d in down], "start": np.array([d.start for d in down]),
                       "end": np.array([d.end if d.end is not None else d.start for d in down]),
                       "detail": [d.detail for d in down]},
        "markers": read_markers(data_dir) if data_dir else {"t": np.zeros(0), "marker": []},
    }
    return tables


def _columns(names: list[str], rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    return {n: [r[i] for r in rows] for i, n in enumerate(names)}


def collect(store: Store, mode: ProtocolMode[Any], out: Path, *, experiment_id: str, device_label: str,
            device_model: str, consent_at: str, carriage: str = "", data_dir: Path | None = None,
            now: float, proximity: dict[str, Any] | None = None) -> Manifest:
    """Write the bundle to ``out`` (a new or empty folder)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputFileError(f"{out} is not empty: collect into a new folder")
    tables = research_tables(store, mode, data_dir)
    t = tables["sightings"]["t"]
    facts = store.state.get(RadioFacts)
    cal = mode.ctx.calibration
    manifest = Manifest(
        experiment_id=experiment_id, device_label=device_label, device_model=device_model,
        protocol=mode.name, consent_at=consent_at, collected_at=utc_iso(now), host=socket.gethostname(),
        software_version=__version__, carriage=carriage,
        first_t=float(t.min()) if len(t) else None, last_t=float(t.max()) if len(t) else None,
        radio=facts.to_json() if facts else {},
        calibration={"model": cal.model, "rssi_correction": cal.rssi_correction, "tx_power": cal.tx_power,
                     "confidence": cal.confidence},
        proximity=proximity if proximity is not None else _jsonable(asdict(mode.ctx.proximity)))
    return write_bundle(out, manifest, tables)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def collect_device(cfg: Any, out: Path, now: float) -> Manifest:
    """``ctagent experiment collect``: this device's bundle (the store opened read-only,
    beside a running daemon)."""
    from ..app import open_mode, open_store

    ex = cfg.experiment
    if not ex.id:
        raise UserError(f"{cfg.source}: no experiment configured ([experiment] id); "
                        "`ctagent experiment join ID --label NAME --consent` sets one up")
    with open_store(cfg, read_only=True) as store:
        mode = open_mode(cfg, store)
        return collect(store, mode, out, experiment_id=ex.id, device_label=ex.device_label,
                       device_model=cfg.agent.device_model, consent_at=ex.consent_at, carriage=ex.carriage,
                       data_dir=cfg.data_dir, now=now)
