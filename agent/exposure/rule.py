"""The proximity rule, sans-I/O: scan windows -> attenuation -> distance -> minutes ->
a decision per peer per UTC day, with an explanation.

Two rules share one configuration:
- ``distance`` (default): a window counts when its estimated distance is within
  ``distance_threshold_m``; exposure when the counted minutes of a peer on a day reach
  ``duration_threshold_min``.
- ``buckets``: Exposure Notification v2 style: each window's minutes are weighted by
  the attenuation bucket it falls in; exposure when the weighted minutes reach the
  duration threshold.

Distance from attenuation: log-distance path loss referenced at 1 m,
``d = 10 ** ((A - A_1m) / (10 * n))``. Defaults and their justification (evaluation
on real measurements) are in docs/proximity.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..clock import utc_day
from ..errors import ConfigError
from .encounter import Encounter
from .pathloss import LogDistancePathLoss


@dataclass(frozen=True)
class ProximityConfig:
    #: "distance" or "buckets"
    rule: str = "distance"
    #: A window counts when its estimated distance is at most this (metres).
    distance_threshold_m: float = 1.0
    #: Exposure when the counted (or weighted) minutes of one peer on one day reach this.
    duration_threshold_min: float = 15.0
    #: Attenuation (dB) at 1 m between calibrated devices.
    attenuation_at_1m_db: float = 50.0
    #: Path-loss exponent n of the log-distance model (2 = free space; indoors 2-4).
    path_loss_exponent: float = 2.5
    #: Which attenuation of a window decides: "mean" (power-domain mean) or "min".
    window_attenuation: str = "mean"
    #: Missing windows between two seen windows of the same peer are filled (counted
    #: with the neighbours' attenuation) up to this many: scanners miss samples.
    gap_fill_windows: int = 2
    #: TX power assumed before a match gives the real one (dBm; from the calibration default).
    default_tx_power_dbm: float = -26.0
    #: EN v2 style attenuation buckets: upper bounds (dB) of immediate, near, medium: ~1, 2, 3 m
    #: under the default model (EN apps used 55/63/73 dB on Google's own attenuation scale) ...
    bucket_thresholds_db: tuple[float, ...] = (50.0, 57.5, 62.0)
    #: ... and the weight of each bucket (the last one is "other", beyond the last bound).
    bucket_weights: tuple[float, ...] = (1.0, 0.5, 0.25, 0.0)

    def __post_init__(self) -> None:
        if self.rule not in ("distance", "buckets"):
            raise ConfigError(f"rule must be 'distance' or 'buckets', not {self.rule!r}")
        if self.window_attenuation not in ("mean", "min"):
            raise ConfigError("window_attenuation must be 'mean' or 'min'")
        for name in ("distance_threshold_m", "duration_threshold_min", "path_loss_exponent"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.gap_fill_windows < 0:
            raise ConfigError("gap_fill_windows must be >= 0")
        if list(self.bucket_thresholds_db) != sorted(self.bucket_thresholds_db):
            raise ConfigError("bucket_thresholds_db must be increasing")
        if len(self.bucket_weights) != len(self.bucket_thresholds_db) + 1:
            raise ConfigError("bucket_weights needs one weight more than bucket_thresholds_db")

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> ProximityConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown proximity setting(s): {', '.join(sorted(unknown))}")
        d = dict(data)
        for k in ("bucket_thresholds_db", "bucket_weights"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)

    @property
    def path_loss(self) -> LogDistancePathLoss:
        return LogDistancePathLoss(self.attenuation_at_1m_db, self.path_loss_exponent)

    def distance_m(self, attenuation_db: float) -> float:
        return self.path_loss.distance_m(attenuation_db)

    def attenuation_at(self, distance_m: float) -> float:
        return self.path_loss.attenuation_db(distance_m)

    def bucket_of(self, attenuation_db: float) -> int:
        for i, bound in enumerate(self.bucket_thresholds_db):
            if attenuation_db <= bound:
                return i
        return len(self.bucket_thresholds_db)


@dataclass(frozen=True)
class WindowObservation:
    """One scan window of a peer, with attenuation already computed."""

    start: float
    duration_s: float
    samples: int
    mean_attenuation_db: float
    min_attenuation_db: float
    filled: bool = False  # a gap filled between two seen windows

    @property
    def day(self) -> int:
        return utc_day(self.start)


def observations_from_encounter(enc: Encounter, *, tx_power_dbm: float,
                                rx_correction_db: float) -> list[WindowObservation]:
    """attenuation = TX power - (RSSI + receiver correction), per window."""
    out = []
    for w in enc.windows:
        mean = tx_power_dbm - (w.rssi_mean + rx_correction_db)
        mn = tx_power_dbm - (w.rssi_max + rx_correction_db)
        out.append(WindowObservation(w.index * enc.window_s, enc.window_s, w.count, mean, mn))
    return out


@dataclass(frozen=True, slots=True)
class WindowDecision:
    """How the rule saw one window of one peer: what ``exposures --explain`` shows."""

    start: float
    samples: int
    filled: bool
    attenuation_db: float
    distance_m: float
    minutes: float
    #: the "buckets" rule only
    bucket: int | None = None
    weight: float | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "samples": self.samples, "filled": self.filled,
                             "attenuation_db": self.attenuation_db, "distance_m": self.distance_m,
                             "minutes": self.minutes}
        if self.bucket is not None:
            d["bucket"], d["weight"] = self.bucket, self.weight
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WindowDecision:
        return cls(float(d["start"]), int(d["samples"]), bool(d["filled"]), float(d["attenuation_db"]),
                   float(d["distance_m"]), float(d["minutes"]), d.get("bucket"), d.get("weight"))


@dataclass(frozen=True)
class DayDecision:
    """The rule's decision for one peer on one UTC day."""

    day: int
    exposed: bool
    minutes: float
    threshold_min: float
    rule: str
    windows: tuple[WindowDecision, ...] = ()


def _fill_gaps(obs: list[WindowObservation], max_gap: int) -> list[WindowObservation]:
    """Sort, merge duplicates (same start: keep the stronger), and fill short gaps."""
    if not obs:
        return []
    by_start: dict[float, WindowObservation] = {}
    for o in obs:
        cur = by_start.get(o.start)
        if cur is None or o.mean_attenuation_db < cur.mean_attenuation_db:
            by_start[o.start] = o
    seq = [by_start[k] for k in sorted(by_start)]
    out = [seq[0]]
    for prev, nxt in zip(seq, seq[1:]):
        step = prev.duration_s
        missing = round((nxt.start - prev.start) / step) - 1
        if 0 < missing <= max_gap:
            att = max(prev.mean_attenuation_db, nxt.mean_attenuation_db)  # the weaker neighbour: conservative
            mn = max(prev.min_attenuation_db, nxt.min_attenuation_db)
            for k in range(1, missing + 1):
                out.append(WindowObservation(prev.start + k * step, step, 0, att, mn, filled=True))
        out.append(nxt)
    return out


def decide(observations: list[WindowObservation], config: ProximityConfig) -> list[DayDecision]:
    """Decisions per UTC day for one peer (all windows of one diagnosis key, say)."""
    obs = _fill_gaps(observations, config.gap_fill_windows)
    minutes_by_day: dict[int, float] = {}
    windows_by_day: dict[int, list[WindowDecision]] = {}
    for o in obs:
        att = o.mean_attenuation_db if config.window_attenuation == "mean" else o.min_attenuation_db
        dist = config.distance_m(att)
        minutes = o.duration_s / 60.0
        bucket = weight = None
        if config.rule == "distance":
            counted = minutes if dist <= config.distance_threshold_m else 0.0
        else:
            bucket = config.bucket_of(att)
            weight = config.bucket_weights[bucket]
            counted = minutes * weight
        minutes_by_day[o.day] = minutes_by_day.get(o.day, 0.0) + counted
        windows_by_day.setdefault(o.day, []).append(WindowDecision(
            o.start, o.samples, o.filled, round(att, 1), round(dist, 2), round(counted, 3), bucket, weight))
    out = []
    for day in sorted(minutes_by_day):
        total = round(minutes_by_day[day], 6)
        out.append(DayDecision(day, total >= config.duration_threshold_min, total, config.duration_threshold_min,
                               config.rule, tuple(windows_by_day[day])))
    return out
