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

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, TypeVar, overload

import numpy as np

from ..clock import DAY_SECONDS, utc_day
from ..errors import ConfigError
from .encounter import Encounter
from .hmm import RANK_BINS, HmmModel, bundled_model, posterior_near
from .minutes import HeardMinute, recent_medians, stronger_counts
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


@dataclass(frozen=True, slots=True)
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
    #: minute by minute, why (built when first read: most decisions are never explained)
    windows: Sequence[WindowDecision] = ()


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
      as measured). Windows are ``duration_s`` long (1 minute in the daemon); two
      windows of a peer with the same start count once (the stronger); up to
      ``gap_fill_windows`` missing windows between two are filled with the weaker one
      (here: a window's own ``filled`` flag is not read, every window given was heard).
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
    keys = list(peers)
    w = _Windows(peers, keys, config)
    out: dict[K, list[DayDecision]] = {k: [] for k in keys}
    if not len(w.start):
        return out
    ev = None
    if config.rule == "hmm":
        model = model or bundled_model()
        ev = _Evidence(w, config, heard or {}, model)
        counted = ev.posterior * w.dur / 60.0
    elif config.rule == "distance":
        counted = np.where(w.distance <= config.distance_threshold_m, w.dur / 60.0, 0.0)
    else:
        counted = np.asarray(config.bucket_weights)[w.bucket] * w.dur / 60.0
    totals = np.add.reduceat(counted, w.group_start)
    ends = np.append(w.group_start[1:], len(w.start))
    for g, (lo, hi) in enumerate(zip(w.group_start.tolist(), ends.tolist())):
        total = round(float(totals[g]), 6)
        out[keys[w.peer[lo]]].append(DayDecision(
            int(w.day[lo]), total >= config.duration_threshold_min, total, config.duration_threshold_min,
            config.rule, _LazyWindows(w, counted, ev, lo, hi, config)))
    return out


class _Windows:
    """Every window of every peer as arrays: de-duplicated, gaps filled, sorted by peer
    and time, grouped by (peer, UTC day). Only the columns the rule needs are read from
    the records (reading is most of the cost); explanations read the rest when asked."""

    def __init__(self, peers: Mapping[Any, Sequence[WindowObservation]], keys: list[Any],
                 config: ProximityConfig, *, every_column: bool = False) -> None:
        self.windows = windows = [o for k in keys for o in peers[k]]
        n = len(windows)
        a = np.full((n, 7), math.nan)  # peer, start, duration, source index, mean, min attenuation, RSSI

        def column(name: str) -> np.ndarray:
            return np.fromiter(map(attrgetter(name), windows), dtype=float, count=n)
        a[:, 0] = np.repeat(np.arange(len(keys)), [len(peers[k]) for k in keys])
        a[:, 1], a[:, 2], a[:, 3], a[:, 4] = column("start"), column("duration_s"), np.arange(n), \
            column("mean_attenuation_db")
        if every_column or config.window_attenuation == "min":
            a[:, 5] = column("min_attenuation_db")
        if every_column or config.rule == "hmm":
            a[:, 6] = np.array([o.rssi_dbm for o in windows], dtype=float)  # None -> NaN
        a = _sorted_unique(a)
        a = _fill_gaps(a, config.gap_fill_windows)
        self.peer = a[:, 0].astype(np.int64)
        self.start, self.dur = a[:, 1], a[:, 2]
        #: index of the record in ``windows``; -1: a filled gap
        self.source = a[:, 3].astype(np.int64)
        self.filled = self.source < 0
        self.mean_att, self.min_att, self.rssi = a[:, 4], a[:, 5], a[:, 6]
        self.day = np.floor_divide(self.start, DAY_SECONDS).astype(np.int64)
        new = np.ones(len(a), dtype=bool)
        new[1:] = (self.peer[1:] != self.peer[:-1]) | (self.day[1:] != self.day[:-1])
        self.group_start = np.flatnonzero(new)
        self.att = self.mean_att if config.window_attenuation == "mean" else self.min_att
        pl = config.path_loss
        self.distance = 10.0 ** ((self.att - pl.attenuation_at_1m_db) / (10.0 * pl.exponent))
        self.bucket = np.searchsorted(np.asarray(config.bucket_thresholds_db, dtype=float), self.att, side="left")

    def samples(self, i: int) -> int:
        s = int(self.source[i])
        return 0 if s < 0 else self.windows[s].samples


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Rows sorted by peer and start; of two with the same peer and start, the stronger
    (lower mean attenuation) only. Records usually come in order: then nothing moves."""
    if len(a) < 2:
        return a
    dp, ds = np.diff(a[:, 0]), np.diff(a[:, 1])
    if np.all((dp > 0) | ((dp == 0) & (ds > 0))):
        return a
    a = a[np.lexsort((a[:, 4], a[:, 1], a[:, 0]))]
    keep = np.ones(len(a), dtype=bool)
    keep[1:] = (a[1:, 0] != a[:-1, 0]) | (a[1:, 1] != a[:-1, 1])
    return a[keep]


def _fill_gaps(a: np.ndarray, max_gap: int) -> np.ndarray:
    """Rows (sorted, de-duplicated) plus up to ``max_gap`` filled windows between two of
    the same peer: ``missing = round(gap / duration) - 1``; a filled window takes the
    weaker neighbour's attenuation (conservative), no source record, no RSSI."""
    if len(a) < 2 or max_gap <= 0:
        return a
    same = a[1:, 0] == a[:-1, 0]
    missing = np.rint((a[1:, 1] - a[:-1, 1]) / a[:-1, 2]).astype(np.int64) - 1
    k = np.where(same & (missing > 0) & (missing <= max_gap), missing, 0)
    if not k.any():
        return a
    src = np.repeat(np.arange(len(k)), k)  # the window before each filled one
    step = np.arange(len(src)) - np.repeat(np.cumsum(k) - k, k) + 1
    f = np.empty((len(src), a.shape[1]))
    f[:, 0] = a[src, 0]
    f[:, 1] = a[src, 1] + step * a[src, 2]
    f[:, 2] = a[src, 2]
    f[:, 3] = -1
    f[:, 4] = np.maximum(a[src, 4], a[src + 1, 4])
    f[:, 5] = np.maximum(a[src, 5], a[src + 1, 5])
    f[:, 6] = math.nan
    out = np.concatenate([a, f])
    return out[np.lexsort((out[:, 1], out[:, 0]))]


class _Evidence:
    """The "hmm" rule on a batch: each window's feature bins, likelihoods and posterior."""

    def __init__(self, w: _Windows, config: ProximityConfig, heard: Mapping[int, HeardMinute],
                 model: HmmModel) -> None:
        n = len(w.start)
        observed = ~w.filled
        has_rssi = observed & ~np.isnan(w.rssi)
        minute = np.floor_divide(w.start, 60).astype(np.int64)
        self.att_bin = np.searchsorted(np.asarray(model.attenuation_edges_db), w.att - config.attenuation_at_1m_db,
                                       side="left")
        self.heard = np.full(n, -1, dtype=np.int64)
        self.stronger = np.full(n, -1, dtype=np.int64)
        self.relative = np.full(n, math.nan)
        if heard and has_rssi.any():
            idx = np.flatnonzero(has_rssi)
            count, stronger = stronger_counts(heard, minute[idx], w.rssi[idx])
            ranked = count >= 2
            self.heard[idx[ranked]] = count[ranked]
            self.stronger[idx[ranked]] = stronger[ranked]
            med = recent_medians(heard, minute[idx], model.span_minutes, model.min_values)
            self.relative[idx] = w.rssi[idx] - med
        self.rank_bin = np.minimum(self.stronger, len(RANK_BINS) - 1)
        self.rel_bin = np.searchsorted(np.asarray(model.relative_edges_db), self.relative, side="left")
        has_rank, has_rel = self.stronger >= 0, ~np.isnan(self.relative)
        em = model.emissions
        e_near, e_far = np.ones(n), np.ones(n)
        for name, bins, used in (("attenuation", self.att_bin, observed), ("rank", self.rank_bin, has_rank),
                                 ("relative", self.rel_bin, has_rel)):
            near, far = np.asarray(em[name].near), np.asarray(em[name].far)
            safe = np.where(used, bins, 0)
            e_near *= np.where(used, near[safe], 1.0)
            e_far *= np.where(used, far[safe], 1.0)
        self.e_near, self.e_far = e_near, e_far
        self.observed = observed
        # per (peer, day) group: steps of (gap in windows, likelihoods), padded into a matrix
        gap = np.ones(n)
        gap[1:] = np.maximum(1.0, np.rint((w.start[1:] - w.start[:-1]) / w.dur[:-1]))
        starts = w.group_start
        lengths = np.diff(np.append(starts, n))
        row = np.repeat(np.arange(len(starts)), lengths)
        col = np.arange(n) - np.repeat(starts, lengths)
        shape = (len(starts), int(lengths.max()))
        g, en, ef = np.zeros(shape), np.ones(shape), np.ones(shape)  # padding: no time passes, no evidence
        g[row, col], en[row, col], ef[row, col] = gap, e_near, e_far
        self.posterior = posterior_near(g, en, ef, model.near_to_far, model.far_to_near)[row, col]


class _LazyWindows(Sequence[WindowDecision]):
    """A decision's windows, made into :class:`WindowDecision` records when first read."""

    def __init__(self, w: _Windows, counted: np.ndarray, ev: _Evidence | None, lo: int, hi: int,
                 config: ProximityConfig) -> None:
        self._args: tuple[Any, ...] | None = (w, counted, ev, lo, hi, config)
        self._items: tuple[WindowDecision, ...] = ()

    def _get(self) -> tuple[WindowDecision, ...]:
        if self._args is not None:
            w, counted, ev, lo, hi, config = self._args
            items = []
            for i in range(lo, hi):
                d: dict[str, Any] = {
                    "start": float(w.start[i]), "samples": w.samples(i), "filled": bool(w.filled[i]),
                    "attenuation_db": round(float(w.att[i]), 1), "distance_m": round(float(w.distance[i]), 2),
                    "minutes": round(float(counted[i]), 3)}
                if config.rule == "buckets":
                    b = int(w.bucket[i])
                    d.update(bucket=b, weight=config.bucket_weights[b])
                if ev is not None:
                    d["posterior_near"] = round(float(ev.posterior[i]), 3)
                    if ev.stronger[i] >= 0:
                        d.update(heard=int(ev.heard[i]), stronger=int(ev.stronger[i]))
                    if not math.isnan(ev.relative[i]):
                        d["relative_db"] = round(float(ev.relative[i]), 1)
                items.append(WindowDecision(**d))
            self._items, self._args = tuple(items), None
        return self._items

    @overload
    def __getitem__(self, i: int) -> WindowDecision: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[WindowDecision]: ...

    def __getitem__(self, i: int | slice) -> WindowDecision | Sequence[WindowDecision]:
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


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
                 heard: Mapping[int, HeardMinute] | None = None,
                 model: HmmModel | None = None) -> list[MinuteEvidence]:
    """The "hmm" rule's evidence for one peer, window by window (after de-duplication and
    gap filling, in time order): what :func:`decide_peers` feeds the model, and what the
    model is fitted on."""
    model = model or bundled_model()
    w = _Windows({0: observations}, [0], config, every_column=True)
    if not len(w.start):
        return []
    ev = _Evidence(w, config, heard or {}, model)
    out = []
    for i in range(len(w.start)):
        o = WindowObservation(float(w.start[i]), float(w.dur[i]), w.samples(i), float(w.mean_att[i]),
                              float(w.min_att[i]), bool(w.filled[i]),
                              None if math.isnan(w.rssi[i]) else float(w.rssi[i]))
        if o.filled:
            out.append(MinuteEvidence(o, float(w.att[i]), {}))
            continue
        ranked, rel = ev.stronger[i] >= 0, not math.isnan(ev.relative[i])
        bins: dict[str, int | None] = {"attenuation": int(ev.att_bin[i]),
                                       "rank": int(ev.rank_bin[i]) if ranked else None,
                                       "relative": int(ev.rel_bin[i]) if rel else None}
        out.append(MinuteEvidence(o, float(w.att[i]), bins, int(ev.heard[i]) if ranked else None,
                                  int(ev.stronger[i]) if ranked else None, float(ev.relative[i]) if rel else None))
    return out
