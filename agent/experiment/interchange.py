"""Interchange with published experiments, so that ``analyze`` runs unchanged on them.

DP-3T bt-measurements: one SQLite table ``results`` as its
``exp05-epfl-soldiers/process_raw_data.py`` (DP-3T/bt-measurements) creates it::

    CREATE TABLE results(db_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
        receiver_id INT NOT NULL, receiver_model TEXT NOT NULL,
        transmitter_id INT NOT NULL, transmitter_model TEXT NOT NULL,
        timestamp REAL NOT NULL, rssi INTEGER NOT NULL, tx_power INTEGER NOT NULL,
        ground_truth_distance REAL)

``timestamp`` in milliseconds of Unix time (the experiment's README: Android
``System.currentTimeMillis()``), ``ground_truth_distance`` in metres (NULL or -1: none).
Imported, every receiver becomes a bundle whose adverts name their transmitter; the
per-sample distances become pair intervals in ``truth/pairs.csv``.

The plain sightings CSV of ``ctagent eval`` (``agent.exposure.evaluate``) imports the same
way: a pair ``A>B`` is receiver A hearing transmitter B.
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputFileError
from ..exposure.calibration import CalibrationTable, bundled_calibration_path
from ..exposure.evaluate import read_sightings_csv
from .bundle import Manifest, safe_name, write_bundle
from .collect import utc_iso

RESULTS_COLUMNS = ("receiver_id", "receiver_model", "transmitter_id", "transmitter_model", "timestamp", "rssi",
                   "tx_power", "ground_truth_distance")
RESULTS_TABLE = ("CREATE TABLE results(db_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, receiver_id INT NOT NULL, "
                 "receiver_model TEXT NOT NULL, transmitter_id INT NOT NULL, transmitter_model TEXT NOT NULL, "
                 "timestamp REAL NOT NULL, rssi INTEGER NOT NULL, tx_power INTEGER NOT NULL, "
                 "ground_truth_distance REAL)")
#: a per-sample distance holds until the pair's next sample, at most this long
TRUTH_HOLD_S = 30.0


def _write_experiment(out: Path, samples: dict[str, dict[str, list[Any]]], models: dict[str, str], *, source: str,
                      now: float, truth: list[tuple[str, str, float, float, float]]) -> int:
    """``samples``: receiver -> {"t", "tx" (labels), "rssi", "tx_power"}; every label in
    ``models`` gets a bundle (transmit-only devices too)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputFileError(f"{out} is not empty: import into a new folder")
    table = CalibrationTable.load(bundled_calibration_path())
    total = 0
    for label, model in sorted(models.items()):
        got = samples.get(label, {"t": [], "tx": [], "rssi": [], "tx_power": []})
        senders = sorted(set(got["tx"]))
        index = {s: i for i, s in enumerate(senders)}
        t = np.asarray(got["t"], dtype=float)
        order = np.argsort(t, kind="stable")
        tables = {
            "sightings": {"t": t[order], "advert": np.array([index[x] for x in got["tx"]], dtype=np.int32)[order],
                          "rssi": np.asarray(got["rssi"], dtype=np.int32)[order],
                          "tx_power": [got["tx_power"][i] for i in order.tolist()]},
            "adverts": {"advert": np.arange(len(senders), dtype=np.int32), "address": [""] * len(senders),
                        "payload": [b""] * len(senders), "transmitter": senders},
        }
        cal = table.lookup(model)
        manifest = Manifest(experiment_id=Path(source).stem, device_label=label, device_model=model,
                            protocol="imported", consent_at="", collected_at=utc_iso(now), host="",
                            software_version=__version__, first_t=float(t.min()) if len(t) else None,
                            last_t=float(t.max()) if len(t) else None, source=source,
                            calibration={"model": cal.model, "rssi_correction": cal.rssi_correction,
                                         "tx_power": cal.tx_power, "confidence": cal.confidence})
        write_bundle(out / safe_name(label), manifest, tables)
        total += len(t)
    if truth:
        (out / "truth").mkdir(exist_ok=True)
        lines = ["a,b,start,end,distance_m"] + [f"{a},{b},{s!r},{e!r},{d!r}" for a, b, s, e, d in truth]
        (out / "truth" / "pairs.csv").write_text("\n".join(lines) + "\n")
    return total


def import_dp3t(path: Path, out: Path, *, now: float) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        cols = [r[1] for r in con.execute("PRAGMA table_info(results)")]
    except sqlite3.DatabaseError as e:
        raise InputFileError(f"{path}: not an SQLite database ({e})") from None
    missing = [c for c in RESULTS_COLUMNS if c not in cols]
    if missing:
        con.close()
        raise InputFileError(f"{path}: no DP-3T `results` table with {', '.join(missing)}")
    samples: dict[str, dict[str, list[Any]]] = defaultdict(lambda: {"t": [], "tx": [], "rssi": [], "tx_power": []})
    models: dict[str, str] = {}
    by_pair: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    try:
        rows = con.execute(f"SELECT {', '.join(RESULTS_COLUMNS)} FROM results")
        for rx, rx_model, tx, tx_model, ts, rssi, tx_power, gtd in rows:
            rx_l, tx_l, t = str(rx), str(tx), float(ts) / 1000.0
            if not math.isfinite(t) or rx_l == tx_l:
                continue
            models.setdefault(rx_l, str(rx_model))
            models.setdefault(tx_l, str(tx_model))
            s = samples[rx_l]
            s["t"].append(t)
            s["tx"].append(tx_l)
            s["rssi"].append(int(rssi))
            s["tx_power"].append(None if tx_power is None else int(tx_power))
            if gtd is not None and math.isfinite(float(gtd)) and float(gtd) >= 0:
                by_pair[(min(rx_l, tx_l), max(rx_l, tx_l))].append((t, float(gtd)))
    except (sqlite3.DatabaseError, ValueError, TypeError) as e:
        raise InputFileError(f"{path}: unreadable row in `results` ({e})") from None
    finally:
        con.close()
    truth = []
    for (a, b), pts in by_pair.items():
        pts.sort()
        for (t, d), (t_next, _) in zip(pts, pts[1:] + [(pts[-1][0] + TRUTH_HOLD_S, 0.0)]):
            truth.append((a, b, t, t + min(t_next - t, TRUTH_HOLD_S), d))
    return _write_experiment(out, samples, models, source=str(path), now=now, truth=truth)


def import_eval_csv(path: Path, out: Path, *, now: float) -> int:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputFileError(f"cannot read {path}: {e.strerror}") from None
    samples: dict[str, dict[str, list[Any]]] = defaultdict(lambda: {"t": [], "tx": [], "rssi": [], "tx_power": []})
    models: dict[str, str] = {}
    for ps in read_sightings_csv(text, source=str(path)):
        rx, sep, tx = ps.pair.partition(">")
        if not sep or not rx.strip() or not tx.strip():
            rx, tx = f"{ps.pair}:rx", f"{ps.pair}:tx"
        rx, tx = rx.strip(), tx.strip()
        models.setdefault(rx, ps.receiver_model or "unknown")
        models.setdefault(tx, ps.transmitter_model or "unknown")
        s = samples[rx]
        for t, rssi, tx_power in ps.samples:
            s["t"].append(t)
            s["tx"].append(tx)
            s["rssi"].append(rssi)
            s["tx_power"].append(None if tx_power is None else int(round(tx_power)))
    return _write_experiment(out, samples, models, source=str(path), now=now, truth=[])


def import_published(path: Path, out: Path, *, now: float) -> Path:
    """A published data set given as one file, by its content: DP-3T's SQLite ``results``
    or the ``eval`` sightings CSV. Returns the experiment folder written."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        import_dp3t(path, out, now=now)
    else:
        import_eval_csv(path, out, now=now)
    return out


def export_dp3t(experiment: Path, out_file: Path, truth_paths: list[Path]) -> int:
    """Every resolved sighting (true time) with both devices' models and the true
    distance where the truth has one, as DP-3T's ``results`` table."""
    from .analyze import _aggregate, _clock_offsets, _resolve, duckdb_module, load_devices
    from .bundle import bundle_folders
    from .truth import load_truth, truth_files

    duckdb = duckdb_module()
    devices = load_devices(bundle_folders(experiment))
    truth, markers = load_truth(truth_paths + truth_files(experiment))
    if Path(out_file).exists():
        raise InputFileError(f"{out_file} exists: export into a new file")
    import tempfile

    n = 0
    with tempfile.TemporaryDirectory(prefix="ctagent-export-") as work:
        con = duckdb.connect(config={"temp_directory": work})
        _resolve(con, devices, {d.label: d for d in devices}, Path(work))
        _aggregate(con)
        _clock_offsets(con, devices, markers)
        offsets = np.array([d.offset_s for d in devices])
        dev_tx = np.array([d.tx_power for d in devices])
        out = sqlite3.connect(out_file)
        out.execute(RESULTS_TABLE)
        cur = con.execute("SELECT rx, tx, t, rssi, coalesce(tx_power, tx_field) AS p FROM sr WHERE tx IS NOT NULL "
                          "ORDER BY rx, tx, t")
        while True:
            chunk = cur.fetchmany(200_000)
            if not chunk:
                break
            arr = np.array(chunk, dtype=object)
            rx, tx = arr[:, 0].astype(int), arr[:, 1].astype(int)
            t = arr[:, 2].astype(float) - offsets[rx]
            power = np.array([dev_tx[x] if p is None else p for x, p in zip(tx, arr[:, 4])], dtype=float)
            dist = np.full(len(t), np.nan)
            for a, b in {(int(x), int(y)) for x, y in zip(rx, tx)}:
                sel = (rx == a) & (tx == b)
                dist[sel] = truth.distance_at(devices[a].label, devices[b].label, t[sel])
            out.executemany(
                "INSERT INTO results (receiver_id, receiver_model, transmitter_id, transmitter_model, timestamp, "
                "rssi, tx_power, ground_truth_distance) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(int(r) + 1, devices[r].model, int(x) + 1, devices[x].model, float(ts) * 1000.0, int(rs),
                  int(round(p)), None if math.isnan(d) else float(d))
                 for r, x, ts, rs, p, d in zip(rx, tx, t, arr[:, 3], power, dist)])
            n += len(chunk)
        out.commit()
        out.close()
        con.close()
    return n
