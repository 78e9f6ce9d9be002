"""The proximity rule, sans-I/O: scan windows -> attenuation -> distance -> minutes ->
a decision per peer per UTC day, with an explanation.

Three rules share one configuration (``[proximity] rule``):
- ``distance`` (default): a window counts when its estimated distance is within
  ``distance_threshold_m``; exposure when the counted minutes of a peer on a day reach
  ``duration_threshold_min``.
- ``buckets``: Exposure Notification v2 style: each window's minutes are weighted by
  the attenuation bucket it falls in; exposure when the weighted minutes reach the
  duration threshold.
- ``hmm``: a two-state (near / far) hidden Markov model over the peer's minutes of the
  day (:mod:`.hmm`), with evidence from the attenuation, the peer's rank among all
  identifiers heard that minute and its signal relative to the receiver's recent
  median (:mod:`.minutes`); exposure when the expected near minutes reach the duration
  threshold.

The one entry point for a receiver's day is :func:`decide_peers` (the daemon's
exposure check and field-experiment analysis both call it); :func:`decide` is the same
for one peer.

Distance from attenuation: log-distance path loss referenced at 1 m,
``d = 10 ** ((A - A_1m) / (10 * n))``. Defaults and their justification (evaluation
on real measurements) are in docs/proximity.md.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ..clock import utc_day
from ..errors import ConfigError
from .encounter import Encounter
from .hmm import HmmModel, bundled_model, posterior_near
from .minutes import HeardMinute, RecentMedian
from .pathloss import LogDistancePathLoss

RULES = ("distance", "buckets", "hmm")
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class ProximityConfig:
    #: "distance", "buckets" or "hmm"
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
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {', '.join(map(repr, RULES))}, not {self.rule!r}")
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
    #: The receiver's mean RSSI as measured (no correction): what the ``hmm`` rule
    #: compares with the rest of the minute (:class:`~.minutes.HeardMinute`).
    rssi_dbm: float | None = None

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
        out.append(WindowObservation(w.index * enc.window_s, enc.window_s, w.count, mean, mn,
                                     rssi_dbm=w.rssi_mean))
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
    #: the "hmm" rule only: P(near) of this minute given the whole day's evidence ...
    posterior_near: float | None = None
    #: ... identifiers heard that minute, how many of them stronger than this peer ...
    heard: int | None = None
    stronger: int | None = None
    #: ... and the peer's RSSI minus the receiver's recent median (dB)
    relative_db: float | None = None

    _OPTIONAL = ("bucket", "weight", "posterior_near", "heard", "stronger", "relative_db")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "samples": self.samples, "filled": self.filled,
                             "attenuation_db": self.attenuation_db, "distance_m": self.distance_m,
                             "minutes": self.minutes}
        for k in self._OPTIONAL:
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WindowDecision:
        return cls(float(d["start"]), int(d["samples"]), bool(d["filled"]), float(d["attenuation_db"]),
                   float(d["distance_m"]), float(d["minutes"]), *(d.get(k) for k in cls._OPTIONAL))


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


def decide(observations: Sequence[WindowObservation], config: ProximityConfig, *,
           heard: Mapping[int, HeardMinute] | None = None, model: HmmModel | None = None) -> list[DayDecision]:
    """Decisions per UTC day for one peer (all windows of one diagnosis key, say); the
    arguments are those of :func:`decide_peers`."""
    return decide_peers({0: observations}, config, heard=heard, model=model)[0]


def decide_peers(peers: Mapping[K, Sequence[WindowObservation]], config: ProximityConfig, *,
                 heard: Mapping[int, HeardMinute] | None = None,
                 model: HmmModel | None = None) -> dict[K, list[DayDecision]]:
    """The proximity rule over what one receiver heard: a decision per peer per UTC day.

    This is the one API of the rule, for the daemon's exposure check and for
    field-experiment analysis (the "on-device rule" column) alike; it is pure (numbers
    in, records out) and deterministic.

    - ``peers``: per peer (any hashable key: a diagnosis key, a transmitter's name), the
      windows the receiver heard of it, in any order, any number of days
      (:func:`observations_from_encounter` makes them from an encounter; attenuation =
      the peer's TX power - (RSSI + the receiver's correction); ``rssi_dbm`` = the RSSI
      as measured). Windows are ``duration_s`` long (1 minute in the daemon).
    - ``config``: ``config.rule`` selects the rule ("distance", "buckets", "hmm"); every
      other figure of the rule is a setting of :class:`ProximityConfig`.
    - ``heard``: for the "hmm" rule, the receiver's minutes of everything it heard, by
      Unix minute (:class:`~.minutes.HeardMinute`; the store's ``heard_minutes`` table,
      or :func:`~.minutes.summarise` over the encounters of all identifiers). Without
      it (or for a minute missing from it) the rank and relative evidence is left out
      and the model decides on attenuation alone. The other rules ignore it.
    - ``model``: the "hmm" rule's tables (default: the bundled ``hmm_model.json``).

    Returns per peer its :class:`DayDecision` list, one per UTC day it was heard, in day
    order; ``DayDecision.windows`` explain it minute by minute (``WindowDecision``; for
    "hmm" with ``posterior_near``, ``heard``, ``stronger``, ``relative_db``).
    """
    if config.rule == "hmm":
        model = model or bundled_model()
        recent = RecentMedian(heard or {}, span_minutes=model.span_minutes, min_values=model.min_values)
        return {k: _decide_hmm(obs, config, heard or {}, model, recent) for k, obs in peers.items()}
    return {k: _decide_weighted(obs, config) for k, obs in peers.items()}


def _attenuation(o: WindowObservation, config: ProximityConfig) -> float:
    return o.mean_attenuation_db if config.window_attenuation == "mean" else o.min_attenuation_db


def _decide_weighted(observations: Sequence[WindowObservation], config: ProximityConfig) -> list[DayDecision]:
    """The "distance" and "buckets" rules: each window counts, weighted, on its own."""
    obs = _fill_gaps(list(observations), config.gap_fill_windows)
    minutes_by_day: dict[int, float] = {}
    windows_by_day: dict[int, list[WindowDecision]] = {}
    for o in obs:
        att = _attenuation(o, config)
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
    return _day_decisions(minutes_by_day, windows_by_day, config)


def _day_decisions(minutes_by_day: dict[int, float], windows_by_day: dict[int, list[WindowDecision]],
                   config: ProximityConfig) -> list[DayDecision]:
    out = []
    for day in sorted(minutes_by_day):
        total = round(minutes_by_day[day], 6)
        out.append(DayDecision(day, total >= config.duration_threshold_min, total, config.duration_threshold_min,
                               config.rule, tuple(windows_by_day[day])))
    return out


@dataclass(frozen=True, slots=True)
class MinuteEvidence:
    """What the "hmm" rule read of one window: its feature bins (None: not computable that
    minute, or a filled gap with no evidence at all) and the raw figures behind them."""

    window: WindowObservation
    attenuation_db: float
    bins: Mapping[str, int | None]
    heard: int | None = None
    stronger: int | None = None
    relative_db: float | None = None


def hmm_evidence(observations: Sequence[WindowObservation], config: ProximityConfig, *,
                 heard: Mapping[int, HeardMinute] | None = None, model: HmmModel | None = None,
                 recent: RecentMedian | None = None) -> list[MinuteEvidence]:
    """The "hmm" rule's evidence, window by window (after gap filling, in time order):
    what :func:`decide_peers` feeds the model, and what the model is fitted on."""
    model = model or bundled_model()
    heard = heard or {}
    recent = recent or RecentMedian(heard, span_minutes=model.span_minutes, min_values=model.min_values)
    out = []
    for o in _fill_gaps(list(observations), config.gap_fill_windows):
        att = _attenuation(o, config)
        if o.filled:
            out.append(MinuteEvidence(o, att, {}))
            continue
        minute = int(o.start // 60)
        bins: dict[str, int | None] = {"attenuation": model.attenuation_bin(att, config.attenuation_at_1m_db),
                                       "rank": None, "relative": None}
        n_heard = stronger = None
        rel = None
        if o.rssi_dbm is not None:
            h = heard.get(minute)
            if h is not None and h.heard >= 2:
                n_heard, stronger = h.heard, h.stronger_than(o.rssi_dbm)
                bins["rank"] = model.rank_bin(stronger)
            med = recent.at(minute)
            if med is not None:
                rel = o.rssi_dbm - med
                bins["relative"] = model.relative_bin(rel)
        out.append(MinuteEvidence(o, att, bins, n_heard, stronger, rel))
    return out


def _decide_hmm(observations: Sequence[WindowObservation], config: ProximityConfig, heard: Mapping[int, HeardMinute],
                model: HmmModel, recent: RecentMedian) -> list[DayDecision]:
    """The "hmm" rule: per UTC day, the forward-backward posterior of each minute; the
    counted minutes are the expected near minutes. Filled gaps (up to
    ``gap_fill_windows``) are minutes without evidence that count with their posterior;
    longer gaps are transitions only, not counted."""
    by_day: dict[int, list[MinuteEvidence]] = {}
    for ev in hmm_evidence(observations, config, heard=heard, model=model, recent=recent):
        by_day.setdefault(ev.window.day, []).append(ev)
    minutes_by_day: dict[int, float] = {}
    windows_by_day: dict[int, list[WindowDecision]] = {}
    for day, seq in by_day.items():
        steps: list[tuple[int, float, float]] = []
        prev: WindowObservation | None = None
        for ev in seq:
            o = ev.window
            gap = 1 if prev is None else max(1, round((o.start - prev.start) / prev.duration_s))
            prev = o
            steps.append((gap, *model.likelihoods(ev.bins)))
        post = posterior_near(steps, model.near_to_far, model.far_to_near)
        total = 0.0
        wins = []
        for ev, p in zip(seq, post):
            o = ev.window
            counted = p * o.duration_s / 60.0
            total += counted
            wins.append(WindowDecision(o.start, o.samples, o.filled, round(ev.attenuation_db, 1),
                                       round(config.distance_m(ev.attenuation_db), 2), round(counted, 3),
                                       posterior_near=round(p, 3), heard=ev.heard, stronger=ev.stronger,
                                       relative_db=None if ev.relative_db is None else round(ev.relative_db, 1)))
        minutes_by_day[day] = total
        windows_by_day[day] = wins
    return _day_decisions(minutes_by_day, windows_by_day, config)
