"""Run the proximity rule over recorded sightings: user field data in a plain CSV
format, and the real measurement sets (benchmarks/eval_proximity.py).

Plain sightings format (one row per received advertisement, rows of a pair in any
order, timestamp in Unix seconds)::

    pair,timestamp,rssi,tx_power[,receiver_model,transmitter_model]

``tx_power`` is what the transmitter advertises in its AEM (its calibrated TX power);
empty means unknown (then the transmitter model's calibration, or the default, is used).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import InputFileError
from .calibration import CalibrationTable
from .encounter import Encounter, valid_rssi
from .minutes import merge, summarise
from .rule import DayDecision, ProximityConfig, decide, observations_from_encounter

REQUIRED = ("pair", "timestamp", "rssi", "tx_power")
OPTIONAL = ("receiver_model", "transmitter_model")


class EvalInputError(InputFileError):
    """The sightings file is not in the documented format."""


@dataclass
class PairSeries:
    pair: str
    samples: list[tuple[float, int, float | None]] = field(default_factory=list)  # t, rssi, tx
    receiver_model: str | None = None
    transmitter_model: str | None = None


@dataclass
class PairResult:
    pair: str
    exposed: bool
    minutes_counted: float
    close_minutes_estimated: float
    minutes_observed: int
    samples: int
    receiver_confidence: int
    days: list[DayDecision]

    def to_dict(self) -> dict:
        return {"pair": self.pair, "exposed": self.exposed, "minutes_counted": round(self.minutes_counted, 2),
                "close_minutes_estimated": round(self.close_minutes_estimated, 2),
                "minutes_observed": self.minutes_observed, "samples": self.samples,
                "receiver_calibration_confidence": self.receiver_confidence,
                "days": [{"day": d.day, "exposed": d.exposed, "minutes": d.minutes} for d in self.days]}


def read_sightings_csv(text: str, *, source: str = "<input>") -> list[PairSeries]:
    try:
        return _read_sightings(csv.reader(io.StringIO(text, newline="")), source)
    except csv.Error as e:
        raise EvalInputError(f"{source}: not a CSV file: {e}") from None


def _read_sightings(reader: Iterator[list[str]], source: str) -> list[PairSeries]:
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise EvalInputError(f"{source}: the file is empty") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise EvalInputError(f"{source}: missing column(s) {', '.join(missing)}; expected "
                             f"{','.join(REQUIRED)}[,{','.join(OPTIONAL)}]")
    col = {c: header.index(c) for c in REQUIRED + OPTIONAL if c in header}
    pairs: dict[str, PairSeries] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            pair = row[col["pair"]].strip()
            t = float(row[col["timestamp"]])
            rssi = int(float(row[col["rssi"]]))
            tx_raw = row[col["tx_power"]].strip()
            tx = float(tx_raw) if tx_raw else None
            if not pair or not math.isfinite(t) or (tx is not None and not math.isfinite(tx)):
                raise ValueError("empty pair or non-finite number")
        except (IndexError, ValueError, OverflowError) as e:
            raise EvalInputError(f"{source}, line {lineno}: {e}") from None
        ps = pairs.get(pair)
        if ps is None:
            ps = pairs[pair] = PairSeries(pair)
            if "receiver_model" in col and col["receiver_model"] < len(row):
                ps.receiver_model = row[col["receiver_model"]].strip() or None
            if "transmitter_model" in col and col["transmitter_model"] < len(row):
                ps.transmitter_model = row[col["transmitter_model"]].strip() or None
        ps.samples.append((t, rssi, tx))
    if not pairs:
        raise EvalInputError(f"{source}: no sightings")
    return list(pairs.values())


def pair_encounter(samples: Iterable[tuple[float, int, float | None]], window_s: int = 60) -> Encounter | None:
    enc = None
    for t, rssi, _ in sorted(samples):
        if not valid_rssi(rssi):
            continue
        if enc is None:
            enc = Encounter(b"\0" * 16, b"\0" * 4, t, t, window_s)
        enc.add(t, rssi)
    return enc


def evaluate_pair(ps: PairSeries, config: ProximityConfig, calibration: CalibrationTable) -> PairResult:
    rx = calibration.lookup(ps.receiver_model)
    txs = [tx for _, _, tx in ps.samples if tx is not None]
    tx_power = (sorted(txs)[len(txs) // 2] if txs
                else calibration.lookup(ps.transmitter_model).tx_power if ps.transmitter_model
                else config.default_tx_power_dbm)
    enc = pair_encounter(ps.samples)
    if enc is None:
        return PairResult(ps.pair, False, 0.0, 0.0, 0, 0, rx.confidence, [])
    obs = observations_from_encounter(enc, tx_power_dbm=tx_power, rx_correction_db=rx.rssi_correction)
    # hmm: the file does not say what else the receiver heard; the pair's own minutes are
    # its context (the relative signal then follows the pair's own recent median)
    heard = (merge(summarise([enc], enc.windows[0].index, enc.windows[-1].index + 1))
             if config.rule == "hmm" else None)
    days = decide(obs, config, heard=heard)
    if config.rule in ("distance", "hmm"):
        close = sum(d.minutes for d in days)
    else:  # the buckets rule weighs minutes; report the distance estimate too
        close = float(sum(w.minutes > 0 and w.distance_m <= config.distance_threshold_m
                          for d in days for w in d.windows) * enc.window_s / 60)
    return PairResult(ps.pair, any(d.exposed for d in days), sum(d.minutes for d in days), close,
                      len(enc.windows), enc.sample_count, rx.confidence, days)


def evaluate(pairs: list[PairSeries], config: ProximityConfig, calibration: CalibrationTable) -> list[PairResult]:
    return [evaluate_pair(p, config, calibration) for p in sorted(pairs, key=lambda p: p.pair)]


@dataclass
class Confusion:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, truth: bool, decided: bool) -> None:
        if truth and decided:
            self.tp += 1
        elif truth:
            self.fn += 1
        elif decided:
            self.fp += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")
