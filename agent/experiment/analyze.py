"""``ctagent experiment analyze``: research bundles (+ ground truth) -> per pair and day:
minutes heard, the on-device rule's minutes and decision (the agent's own rule code with
each receiver's own settings), an offline fusion of both directions, the crowd context,
the truth; precision, recall and F1; loss and clock offsets. ``report.py`` renders it.

The engine is DuckDB: the sightings (tens of millions) are only ever touched by SQL
(read from Parquet, joined with the small table of resolved adverts, aggregated to one
row per receiver, transmitter, identity and minute), under a memory limit and spilling
to disk past it. Python sees minutes, never sightings. Why DuckDB rather than Polars:
one dependency-free wheel that reads Parquet itself, SQL that states each step, a hard
``memory_limit`` with out-of-core aggregation (the 4 GB goal holds by construction), and
``fetchnumpy`` without pandas or pyarrow.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputFileError, UserError
from ..exposure.calibration import DEFAULT_CALIBRATION
from ..exposure.evaluate import Confusion
from ..exposure.minutes import MAX_KEPT, HeardMinute
from ..exposure.rule import DayDecision, ProximityConfig, WindowObservation, decide, decide_peers
from .bundle import Manifest, bundle_folders, verify_bundle
from .parquet import Column, write_table
from .resolve import beacon_offsets, identifier_map, marker_offsets, resolve_advert
from .truth import Marker, PairTruth, load_truth, truth_files

#: a minute counts in the crowd-context rule only when the transmitter is among this many
#: strongest heard by the receiver that minute
DEFAULT_CROWD_RANK = 4
#: the agent's Aggregator keeps only these RSSI values (agent.exposure.encounter.valid_rssi)
RSSI_VALID = (-126, 20)


def duckdb_module() -> Any:
    from ..extras import require

    require("experiment", "plots", what="the analysis of field experiments", install="experiment")
    import duckdb

    return duckdb


@dataclass
class Device:
    index: int
    label: str
    folder: Path
    manifest: Manifest
    proximity: ProximityConfig
    rx_correction: float
    tx_power: float
    offset_s: float = 0.0
    offset_source: str = "none"
    sightings: int = 0
    resolved: int = 0

    @property
    def model(self) -> str:
        return self.manifest.device_model or "unknown"


@dataclass
class Minutes:
    """One row per receiver, transmitter and minute of the receiver's clock (identities
    merged the agent's way: the stronger window wins)."""

    rx: np.ndarray
    tx: np.ndarray
    minute: np.ndarray
    samples: np.ndarray
    att: np.ndarray
    att_min: np.ndarray
    rssi: np.ndarray
    #: the arithmetic mean of the minute's RSSI in dBm (calibration fits on it: unbiased
    #: for noise in dB, where the power mean leans to the strongest packets)
    rssi_db: np.ndarray
    true_start: np.ndarray  # the minute's start on true time
    #: the transmitter's rank among all the receiver heard that minute (1: strongest)
    rank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Analysis:
    devices: list[Device]
    pair_days: list[dict[str, Any]]
    fused_days: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    by_model: dict[str, dict[str, Any]]
    by_carriage: dict[str, dict[str, Any]]
    minutes: Minutes
    truth: PairTruth
    loss: list[dict[str, Any]]
    scanning: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
    radio_down: dict[int, list[tuple[str, float, float]]]
    crowd_rank: int
    timings: dict[str, float] = field(default_factory=dict)
    has_truth: bool = False

    def label(self, i: int) -> str:
        return self.devices[i].label


def _proximity(doc: dict[str, Any]) -> ProximityConfig:
    known = {f.name for f in fields(ProximityConfig)}
    try:
        return ProximityConfig.from_mapping({k: v for k, v in doc.items() if k in known})
    except (UserError, TypeError, ValueError):
        return ProximityConfig()


def _q(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def confusion_json(c: Confusion) -> dict[str, Any]:
    p, r = c.precision, c.recall
    f1 = 2 * p * r / (p + r) if not (math.isnan(p) or math.isnan(r)) and p + r else float("nan")

    def fin(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 4)

    return {"tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn, "precision": fin(p), "recall": fin(r), "f1": fin(f1)}


def load_devices(folders: list[Path]) -> list[Device]:
    devices = []
    for i, f in enumerate(folders):
        m = verify_bundle(f)
        cal = m.calibration or {}
        devices.append(Device(i, m.device_label or f.name, f, m, _proximity(m.proximity or {}),
                              float(cal.get("rssi_correction", DEFAULT_CALIBRATION.rssi_correction)),
                              float(cal.get("tx_power", DEFAULT_CALIBRATION.tx_power))))
    labels = [d.label for d in devices]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise InputFileError(f"two bundles have the device label {sorted(dup)[0]!r}: labels must be unique")
    return devices


def analyze(path: Path, truth_paths: list[Path] | None = None, *, crowd_rank: int = DEFAULT_CROWD_RANK,
            memory_limit: str = "3GB", threads: int | None = None) -> Analysis:
    duckdb = duckdb_module()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    devices = load_devices(bundle_folders(path))
    by_label = {d.label: d for d in devices}
    truth, markers = load_truth(list(truth_paths or []) + truth_files(Path(path)))
    timings["load"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="ctagent-analysis-") as work:
        con = duckdb.connect(config={"memory_limit": memory_limit, "threads": threads or os.cpu_count() or 1,
                                     "temp_directory": work, "preserve_insertion_order": False})
        con.execute("SET enable_progress_bar = false")
        try:
            t = time.perf_counter()
            _resolve(con, devices, by_label, Path(work))
            timings["resolve"] = time.perf_counter() - t
            t = time.perf_counter()
            _aggregate(con)
            timings["aggregate"] = time.perf_counter() - t
            t = time.perf_counter()
            _clock_offsets(con, devices, markers)
            minutes = _minutes(con, devices)
            heard = _heard(con, len(devices))
            timings["clock_offsets"] = time.perf_counter() - t
            scanning, radio_down = _radio(con, devices)
        finally:
            con.close()
    t = time.perf_counter()
    a = _decide(devices, minutes, truth, crowd_rank, heard)
    a.scanning, a.radio_down = scanning, radio_down
    a.loss = _loss(devices, minutes, scanning)
    timings["rule"] = time.perf_counter() - t
    a.timings = timings
    a.has_truth = bool(truth)
    return a


def _resolve(con: Any, devices: list[Device], by_label: dict[str, Device], work: Path) -> None:
    """The small table ``res``: (receiver, advert) -> transmitter, its advertised TX power,
    its identity; and the view ``s`` over every bundle's sightings."""
    owned, adverts = [], []
    for d in devices:
        ids = con.execute(f"SELECT kind, id, start, period FROM read_parquet({_q(d.folder / 'own_ids.parquet')})"
                          ).fetchall()
        sent = [r[0] for r in con.execute(f"SELECT payload FROM read_parquet({_q(d.folder / 'broadcasts.parquet')})"
                                          ).fetchall()]
        owned.append((d.manifest.protocol, [(k, bytes(i), int(s), int(p)) for k, i, s, p in ids], sent))
        adverts.append(con.execute(f"SELECT advert, payload, transmitter FROM "
                                   f"read_parquet({_q(d.folder / 'adverts.parquet')})").fetchall())
    ids_map = identifier_map(owned)
    idents: dict[bytes, int] = {}
    rows: dict[str, list[Any]] = {"rx": [], "advert": [], "tx": [], "tx_power": [], "ident": []}
    for d, advs in zip(devices, adverts):
        for advert, payload, transmitter in advs:
            if transmitter is not None:  # an imported data set names its transmitters
                tx_dev = by_label.get(transmitter)
                if tx_dev is None or tx_dev.index == d.index:
                    continue
                tx, tx_power, ident = tx_dev.index, math.nan, transmitter.encode()
            else:
                r = resolve_advert(d.manifest.protocol, bytes(payload), ids_map)
                if r is None or r.tx == d.index:
                    continue
                tx, tx_power, ident = r.tx, math.nan if r.tx_power is None else r.tx_power, r.ident
            rows["rx"].append(d.index)
            rows["advert"].append(advert)
            rows["tx"].append(tx)
            rows["tx_power"].append(tx_power)
            rows["ident"].append(idents.setdefault(ident, len(idents)))
    schema = [Column("rx", "int32"), Column("advert", "int32"), Column("tx", "int32"),
              Column("tx_power", "double", nullable=True), Column("ident", "int32")]
    write_table(work / "res.parquet", schema, {k: np.asarray(v) if k != "tx_power" else np.asarray(v, dtype=float)
                                               for k, v in rows.items()}, level=1)
    con.execute(f"CREATE TABLE res AS SELECT * FROM read_parquet({_q(work / 'res.parquet')})")
    parts = [f"SELECT {d.index}::INTEGER AS rx, t, advert, rssi, tx_power AS tx_field "
             f"FROM read_parquet({_q(d.folder / 'sightings.parquet')})" for d in devices]
    con.execute("CREATE VIEW s AS " + " UNION ALL ".join(parts))
    # every sighting with a valid RSSI (the agent's Aggregator keeps only those); resolved
    # ones carry their transmitter, the others (nobody's in the experiment) tx NULL and an
    # identity of their own: the hmm rule's minute context counts everything heard
    con.execute("CREATE VIEW sr AS SELECT s.*, res.tx, res.tx_power, coalesce(res.ident, -1 - s.advert) AS ident "
                "FROM s LEFT JOIN res USING (rx, advert) "
                f"WHERE s.rssi BETWEEN {RSSI_VALID[0]} AND {RSSI_VALID[1]}")


def _clock_offsets(con: Any, devices: list[Device], markers: list[Marker]) -> None:
    """Markers first, then rotations heard by several receivers, then the time service's
    own estimate (see docs/experiments.md)."""
    logged = [(m.marker, m.device, m.t) for m in markers]
    for d in devices:
        logged += [(name, d.label, float(t)) for t, name in con.execute(
            f"SELECT t, marker FROM read_parquet({_q(d.folder / 'markers.parquet')})").fetchall()]
    by_marker = marker_offsets(logged)
    rows = con.execute("SELECT rx, tx, ident, min(t_first), max(t_last) FROM mins WHERE tx IS NOT NULL "
                       "GROUP BY rx, tx, ident").fetchall()
    by_beacon = beacon_offsets(((rx, tx, i.to_bytes(4, "little"), lo, hi) for rx, tx, i, lo, hi in rows),
                               len(devices))
    for d in devices:
        if d.label in by_marker:
            d.offset_s, d.offset_source = by_marker[d.label], "markers"
        elif d.index in by_beacon:
            d.offset_s, d.offset_source = by_beacon[d.index], "beacon rotations"
        else:
            est = con.execute(f"SELECT median(clock_offset_s) FROM read_parquet({_q(d.folder / 'windows.parquet')})"
                              ).fetchall()[0][0]
            if est is not None and math.isfinite(est):
                d.offset_s, d.offset_source = float(est), "time service"


def _aggregate(con: Any) -> None:
    """The one pass over the sightings: per receiver, advert and minute (receiver clock),
    as the agent's Encounter windows are: count, power-mean RSSI, strongest RSSI; and the
    first and last time heard (for the clock offsets). Only then joined with the small
    table of resolved adverts (a join of minutes, not of sightings)."""
    con.execute(f"""
        CREATE TABLE mins AS
        WITH per_advert AS (
            SELECT rx, advert, floor(t / 60)::BIGINT AS minute, count(*) AS n,
                   10 * log10(avg(pow(10, rssi / 10))) AS rssi_mean, max(rssi) AS rssi_max, avg(rssi) AS rssi_db,
                   avg(tx_field) AS tx_field, min(t) AS t_first, max(t) AS t_last
            FROM s WHERE rssi BETWEEN {RSSI_VALID[0]} AND {RSSI_VALID[1]}
            GROUP BY rx, advert, minute)
        SELECT p.*, res.tx, res.tx_power, coalesce(res.ident, -1 - p.advert) AS ident
        FROM per_advert p LEFT JOIN res USING (rx, advert)""")


def _heard(con: Any, n: int) -> list[dict[int, HeardMinute]]:
    """Per receiver, what it heard each minute of every identity (resolved or not), as the
    device's ``heard_minutes`` keep it: the count and the rounded mean RSSIs, strongest
    first (the ``hmm`` rule's context)."""
    got = con.execute("SELECT rx, minute, round(rssi_mean)::INTEGER AS r FROM mins ORDER BY rx, minute, r DESC"
                      ).fetchnumpy()
    out: list[dict[int, HeardMinute]] = [{} for _ in range(n)]
    rx, minute, r = (np.asarray(got[k]) for k in ("rx", "minute", "r"))
    if len(rx):
        key = rx.astype(np.int64) * (1 << 40) + minute
        bounds = np.flatnonzero(np.diff(key)) + 1
        for chunk in np.split(np.arange(len(rx)), bounds):
            values = r[chunk].tolist()
            m = int(minute[chunk[0]])
            out[int(rx[chunk[0]])][m] = HeardMinute(m, len(values), tuple(values[:MAX_KEPT]))
    return out


def _minutes(con: Any, devices: list[Device]) -> Minutes:
    got = con.execute("SELECT * FROM mins WHERE tx IS NOT NULL ORDER BY rx, tx, minute").fetchnumpy()
    # sightings per receiver: from each bundle's manifest (no second pass over them)
    for d in devices:
        d.sightings = int(d.manifest.tables.get("sightings.parquet", {}).get("rows", 0))
    for rx, n in con.execute("SELECT rx, sum(n) FROM mins WHERE tx IS NOT NULL GROUP BY rx").fetchall():
        devices[rx].resolved = int(n)
    rx = np.asarray(got["rx"], dtype=np.int64)
    tx = np.asarray(got["tx"], dtype=np.int64)
    minute = np.asarray(got["minute"], dtype=np.int64)
    tx_power = _filled(got["tx_power"])
    tx_field = _filled(got["tx_field"])
    dev_tx = np.array([d.tx_power for d in devices])
    corr = np.array([d.rx_correction for d in devices])
    power = np.where(np.isnan(tx_power), np.where(np.isnan(tx_field), dev_tx[tx] if len(tx) else 0.0, tx_field),
                     tx_power)
    mean = np.round(np.asarray(got["rssi_mean"], dtype=float))  # the store keeps it to 1 dB
    rssi_max = np.asarray(got["rssi_max"], dtype=float)
    att = power - (mean + corr[rx])
    att_min = power - (rssi_max + corr[rx])
    n = np.asarray(got["n"], dtype=np.int64)
    # identities of one transmitter in the same minute (a rotation): the stronger window
    # wins, as the rule's own merge does
    keep = _strongest_per_key(rx, tx, minute, att)
    offsets = np.array([d.offset_s for d in devices])
    true_start = minute[keep] * 60 - offsets[rx[keep]]
    return Minutes(rx[keep], tx[keep], minute[keep], n[keep], att[keep], att_min[keep], mean[keep],
                   np.asarray(got["rssi_db"], dtype=float)[keep], true_start)


def _filled(x: Any) -> np.ndarray:
    arr = np.ma.filled(np.ma.asarray(x, dtype=float), np.nan) if np.ma.isMaskedArray(x) else np.asarray(x, float)
    return np.asarray(arr, dtype=float)


def _strongest_per_key(rx: np.ndarray, tx: np.ndarray, minute: np.ndarray, att: np.ndarray) -> np.ndarray:
    order = np.lexsort((att, minute, tx, rx))
    r, x, m = rx[order], tx[order], minute[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (x[1:] != x[:-1]) | (m[1:] != m[:-1])
    return np.sort(order[first])


def _radio(con: Any, devices: list[Device]) -> tuple[dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
                                                     dict[int, list[tuple[str, float, float]]]]:
    scanning, down = {}, {}
    for d in devices:
        w = con.execute(f"SELECT start, \"end\", scanning_s, advertising_s FROM "
                        f"read_parquet({_q(d.folder / 'windows.parquet')}) ORDER BY start").fetchnumpy()
        start, end = np.asarray(w["start"], float) - d.offset_s, np.asarray(w["end"], float) - d.offset_s
        span = np.maximum(end - start, 1e-9)
        scanning[d.index] = (start, end, np.clip(np.asarray(w["scanning_s"], float) / span, 0, 1))
        down[d.index] = [(k, float(s) - d.offset_s, float(e) - d.offset_s) for k, s, e in con.execute(
            f"SELECT kind, start, \"end\" FROM read_parquet({_q(d.folder / 'radio_down.parquet')}) ORDER BY start"
        ).fetchall()]
    return scanning, down


def _observations(idx: np.ndarray, starts: np.ndarray, m: Minutes) -> list[WindowObservation]:
    """The rule's input: one window per minute (start, 60 s, samples, mean and minimum
    attenuation, the RSSI as measured), as ``observations_from_encounter`` makes them on
    the device."""
    return [WindowObservation(float(s), 60.0, int(n), float(a), float(b), rssi_dbm=float(r)) for s, n, a, b, r in
            zip(starts.tolist(), m.samples[idx].tolist(), m.att[idx].tolist(), m.att_min[idx].tolist(),
                m.rssi[idx].tolist())]


def _by_day(decisions: list[DayDecision]) -> dict[int, DayDecision]:
    return {d.day: d for d in decisions}


def _decide(devices: list[Device], m: Minutes, truth: PairTruth, crowd_rank: int,
            heard: list[dict[int, HeardMinute]] | None = None) -> Analysis:
    n = len(devices)
    groups: dict[tuple[int, int], np.ndarray] = {}
    if len(m.rx):
        key = m.rx * n + m.tx
        order = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[order])) + 1
        for chunk in np.split(order, bounds):
            groups[(int(m.rx[chunk[0]]), int(m.tx[chunk[0]]))] = chunk
    # crowd context: the transmitter's rank among everything the receiver heard that
    # minute (resolved or not), by RSSI as measured: 1 = the strongest
    rank = np.ones(len(m.rx), dtype=np.int64)
    if heard:
        for k, (r, mi, rssi) in enumerate(zip(m.rx.tolist(), m.minute.tolist(), m.rssi.tolist())):
            hm = heard[r].get(mi)
            if hm is not None:
                rank[k] = 1 + hm.stronger_than(rssi)
    m.rank = rank
    device_minutes = m.minute * 60.0
    rule: dict[tuple[int, int], dict[int, DayDecision]] = {}
    crowd: dict[tuple[int, int], dict[int, DayDecision]] = {}
    heard_days: dict[tuple[int, int], dict[int, int]] = {}
    for rx in range(n):
        # the rule's one API over what this receiver heard, its own settings, as the device
        peers = {tx: idx for (r, tx), idx in groups.items() if r == rx}
        cfg, context = devices[rx].proximity, heard[rx] if heard else None
        decided = decide_peers({tx: _observations(idx, device_minutes[idx], m) for tx, idx in peers.items()}, cfg,
                               heard=context)
        near = {tx: idx[rank[idx] <= crowd_rank] for tx, idx in peers.items()}
        decided_crowd = decide_peers({tx: _observations(i, device_minutes[i], m) for tx, i in near.items()}, cfg,
                                     heard=context)
        for tx, idx in peers.items():
            rule[(rx, tx)] = _by_day(decided[tx])
            crowd[(rx, tx)] = _by_day(decided_crowd[tx])
            days = (m.minute[idx] * 60 // 86_400).astype(np.int64)
            heard_days[(rx, tx)] = {int(dd): int(c) for dd, c in zip(*np.unique(days, return_counts=True))}
    all_days = sorted({dd for v in heard_days.values() for dd in v}
                      | {dd for (a, b) in truth.pairs for dd in truth.close_seconds_by_day(a, b, math.inf)})
    labels = [d.label for d in devices]
    pair_days, conf = [], {"rule": Confusion(), "crowd": Confusion()}
    by_model: dict[str, Confusion] = defaultdict(Confusion)
    by_carriage: dict[str, Confusion] = defaultdict(Confusion)
    for rx in range(n):
        cfg = devices[rx].proximity
        for tx in range(n):
            if tx == rx:
                continue
            close = truth.close_seconds_by_day(labels[rx], labels[tx], cfg.distance_threshold_m)
            for day in all_days:
                dr = rule.get((rx, tx), {}).get(day)
                dc = crowd.get((rx, tx), {}).get(day)
                true_min = close.get(day, 0.0) / 60
                truly = true_min >= cfg.duration_threshold_min
                row = {"receiver": labels[rx], "transmitter": labels[tx], "day": day,
                       "minutes_heard": heard_days.get((rx, tx), {}).get(day, 0),
                       "rule_minutes": round(dr.minutes, 2) if dr else 0.0, "rule_exposed": bool(dr and dr.exposed),
                       "crowd_minutes": round(dc.minutes, 2) if dc else 0.0,
                       "crowd_exposed": bool(dc and dc.exposed),
                       "true_close_minutes": round(true_min, 2) if truth else None,
                       "truly_exposed": truly if truth else None}
                pair_days.append(row)
                if truth:
                    rule_exposed = bool(dr and dr.exposed)
                    conf["rule"].add(truly, rule_exposed)
                    conf["crowd"].add(truly, bool(dc and dc.exposed))
                    by_model[f"{devices[rx].model} <- {devices[tx].model}"].add(truly, rule_exposed)
                    carriage = "/".join(x or "?" for x in (devices[rx].manifest.carriage,
                                                           devices[tx].manifest.carriage))
                    if carriage != "?/?":
                        by_carriage[carriage].add(truly, rule_exposed)
    fused_days, conf["fusion"] = _fusion(devices, m, groups, truth, all_days)
    return Analysis(devices, pair_days, fused_days, {k: confusion_json(v) for k, v in conf.items()},
                    {k: confusion_json(v) for k, v in sorted(by_model.items())},
                    {k: confusion_json(v) for k, v in sorted(by_carriage.items())}, m, truth, [], {}, {},
                    crowd_rank)


def _fusion(devices: list[Device], m: Minutes, groups: dict[tuple[int, int], np.ndarray], truth: PairTruth,
            all_days: list[int]) -> tuple[list[dict[str, Any]], Confusion]:
    """Both directions of a pair, one distance: per true minute the smaller attenuation
    of A hearing B and B hearing A, then the same rule (the first device's settings)."""
    n = len(devices)
    cfg = devices[0].proximity if devices else ProximityConfig()
    true_minute = np.round(m.true_start / 60).astype(np.int64)
    rows, conf = [], Confusion()
    for a in range(n):
        for b in range(a + 1, n):
            parts = [groups.get((a, b), np.zeros(0, np.int64)), groups.get((b, a), np.zeros(0, np.int64))]
            idx = np.concatenate(parts)
            decisions: dict[int, DayDecision] = {}
            if len(idx):
                mins = true_minute[idx]
                order = np.lexsort((m.att[idx], mins))
                idx, mins = idx[order], mins[order]
                first = np.ones(len(idx), dtype=bool)
                first[1:] = mins[1:] != mins[:-1]
                decisions = _by_day(decide(_observations(idx[first], mins[first] * 60.0, m), cfg))
            la, lb = devices[a].label, devices[b].label
            close = truth.close_seconds_by_day(la, lb, cfg.distance_threshold_m)
            for day in all_days:
                d = decisions.get(day)
                true_min = close.get(day, 0.0) / 60
                truly = true_min >= cfg.duration_threshold_min
                rows.append({"a": la, "b": lb, "day": day, "fusion_minutes": round(d.minutes, 2) if d else 0.0,
                             "fusion_exposed": bool(d and d.exposed),
                             "true_close_minutes": round(true_min, 2) if truth else None,
                             "truly_exposed": truly if truth else None})
                if truth:
                    conf.add(truly, bool(d and d.exposed))
    return rows, conf


def _loss(devices: list[Device], m: Minutes, scanning: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
          ) -> list[dict[str, Any]]:
    """Per ordered pair: advertising events expected while both were up (the minutes the
    receiver heard the transmitter at least once) against those received."""
    out = []
    n = len(devices)
    for rx in range(n):
        start, end, frac = scanning.get(rx, (np.zeros(0), np.zeros(0), np.zeros(0)))
        duty = devices[rx].manifest.radio.get("scan_duty")
        for tx in range(n):
            sel = (m.rx == rx) & (m.tx == tx)
            if not sel.any():
                continue
            interval = devices[tx].manifest.radio.get("advertising_interval_s")
            t = m.true_start[sel]
            if len(start):
                k = np.clip(np.searchsorted(start, t, side="right") - 1, 0, len(start) - 1)
                listening = np.where((t >= start[k]) & (t < end[k]), frac[k], 1.0)
            else:
                listening = np.ones(len(t))
            received = int(m.samples[sel].sum())
            expected = (float((60 * listening).sum() * (duty or 1.0) / interval) if interval else None)
            out.append({"receiver": devices[rx].label, "transmitter": devices[tx].label,
                        "minutes_heard": int(sel.sum()), "received": received,
                        "expected": None if expected is None else round(expected, 1),
                        "reception_ratio": None if not expected else round(received / expected, 4),
                        "assumed": [] if duty is not None and interval else
                        (["scan duty 1 (unknown)"] if duty is None else []) +
                        (["advertising interval unknown"] if not interval else [])})
    return out
