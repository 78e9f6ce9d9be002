"""The ``hmm`` proximity rule's model: a two-state (near / far) hidden Markov model over
the minutes of one peer on one UTC day, sans-I/O.

Evidence per minute (each a small categorical feature; a feature that cannot be
computed that minute is left out, which weighs both states alike):

- ``attenuation``: the calibrated power-domain attenuation of the minute (TX power from
  the peer's AEM minus the receiver's corrected mean RSSI), binned relative to
  ``attenuation_at_1m_db`` (so the model follows the calibration reference);
- ``rank``: how the peer ranks among every identifier the receiver heard that minute
  (strongest, second, lower); only when at least two were heard;
- ``relative``: the peer's mean RSSI minus the median RSSI of everything the receiver
  heard in the last ``span_minutes`` (a self-calibration of the receiver's offset,
  carriage included); only when at least ``min_values`` values were heard.

The states follow a Markov chain per minute (``near_to_far``, ``far_to_near``); a gap
of k unheard minutes is k steps of it, with no evidence. The posterior P(near) of each
minute comes from the forward-backward recursion, written for two states in closed form
(:func:`posterior_near`). The rule's figure is the expected number of near minutes.

The tables are data (``hmm_model.json`` beside this module): fitted once on the
measurement sets by ``benchmarks/eval_proximity.py --fit`` (which says on what, in the
file), never tuned at run time. :func:`fit` is that fitting: class-conditional
frequencies of each feature's bins, each data set weighing the same.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

FEATURES = ("attenuation", "rank", "relative")
RANK_BINS = ("strongest", "second", "lower")
MODEL_FORMAT = "ctagent hmm proximity model v1"


@dataclass(frozen=True)
class Emission:
    """P(bin | near) and P(bin | far) of one feature."""

    near: tuple[float, ...]
    far: tuple[float, ...]


@dataclass(frozen=True)
class HmmModel:
    #: Bin edges (dB) of the attenuation relative to ``attenuation_at_1m_db``: a value
    #: equal to an edge falls in the lower bin.
    attenuation_edges_db: tuple[float, ...]
    #: Bin edges (dB) of the peer's RSSI minus the receiver's recent median.
    relative_edges_db: tuple[float, ...]
    emissions: Mapping[str, Emission]
    #: P(far at minute t+1 | near at t) and P(near at t+1 | far at t).
    near_to_far: float
    far_to_near: float
    #: The receiver's recent median covers this many minutes ...
    span_minutes: int = 30
    #: ... and needs at least this many RSSI values.
    min_values: int = 5
    #: How and on what the tables were fitted (kept for ``--explain`` and the docs).
    fitted: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {"attenuation": len(self.attenuation_edges_db) + 1, "rank": len(RANK_BINS),
                 "relative": len(self.relative_edges_db) + 1}
        if set(self.emissions) != set(FEATURES):
            raise ConfigError(f"hmm model: emissions must cover {', '.join(FEATURES)}")
        for name, n in sizes.items():
            e = self.emissions[name]
            for probs in (e.near, e.far):
                if len(probs) != n or any(not p > 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
                    raise ConfigError(f"hmm model: {name} needs {n} positive probabilities summing to 1")
        for edges in (self.attenuation_edges_db, self.relative_edges_db):
            if list(edges) != sorted(edges):
                raise ConfigError("hmm model: bin edges must increase")
        if not (0 < self.near_to_far < 1 and 0 < self.far_to_near < 1 and self.near_to_far + self.far_to_near < 1):
            raise ConfigError("hmm model: transition probabilities must be in (0, 1) and sum below 1")
        if self.span_minutes < 1 or self.min_values < 1:
            raise ConfigError("hmm model: span_minutes and min_values must be positive")

    # -- evidence ---------------------------------------------------------------------
    def attenuation_bin(self, attenuation_db: float, attenuation_at_1m_db: float) -> int:
        return bisect.bisect_left(self.attenuation_edges_db, attenuation_db - attenuation_at_1m_db)

    def relative_bin(self, relative_db: float) -> int:
        return bisect.bisect_left(self.relative_edges_db, relative_db)

    @staticmethod
    def rank_bin(stronger: int) -> int:
        """``stronger``: identifiers heard stronger than the peer that minute."""
        return min(stronger, len(RANK_BINS) - 1)

    def likelihoods(self, bins: Mapping[str, int | None]) -> tuple[float, float]:
        """P(evidence | near), P(evidence | far) of one minute; a feature whose bin is
        None (not computable that minute) is left out."""
        en = ef = 1.0
        for name, b in bins.items():
            if b is not None:
                e = self.emissions[name]
                en *= e.near[b]
                ef *= e.far[b]
        return en, ef

    @property
    def stationary_near(self) -> float:
        """P(near) before any evidence: the chain's stationary share."""
        return self.far_to_near / (self.near_to_far + self.far_to_near)

    # -- the file -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "states": ["near", "far"],
            "attenuation_edges_db": list(self.attenuation_edges_db),
            "rank_bins": list(RANK_BINS),
            "relative_edges_db": list(self.relative_edges_db),
            "emissions": {k: {"near": [round(p, 6) for p in e.near], "far": [round(p, 6) for p in e.far]}
                          for k, e in self.emissions.items()},
            "transitions": {"near_to_far": self.near_to_far, "far_to_near": self.far_to_near},
            "recent_median": {"span_minutes": self.span_minutes, "min_values": self.min_values},
            "fitted": dict(self.fitted),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, source: str = "<model>") -> HmmModel:
        try:
            if doc["format"] != MODEL_FORMAT:
                raise ConfigError(f"{source}: not a {MODEL_FORMAT!r} file")
            em = {k: Emission(_normalised(v["near"]), _normalised(v["far"])) for k, v in doc["emissions"].items()}
            return cls(tuple(float(x) for x in doc["attenuation_edges_db"]),
                       tuple(float(x) for x in doc["relative_edges_db"]), em,
                       float(doc["transitions"]["near_to_far"]), float(doc["transitions"]["far_to_near"]),
                       int(doc["recent_median"]["span_minutes"]), int(doc["recent_median"]["min_values"]),
                       dict(doc.get("fitted", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source}: malformed hmm model ({e!r})") from None

    @classmethod
    def load(cls, path: str | Path) -> HmmModel:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the hmm model {path}: {e}") from None
        return cls.from_json(doc, source=str(path))


def _normalised(values: Sequence[float]) -> tuple[float, ...]:
    """Probabilities as stored (rounded): renormalised so they sum to 1 exactly enough."""
    v = [float(x) for x in values]
    s = sum(v)
    return tuple(x / s for x in v) if s > 0 else tuple(v)


def bundled_model_path() -> Path:
    return Path(__file__).with_name("hmm_model.json")


@lru_cache(maxsize=1)
def bundled_model() -> HmmModel:
    """The model shipped with ctagent (``agent/exposure/hmm_model.json``)."""
    return HmmModel.load(bundled_model_path())


# -- inference ----------------------------------------------------------------------------

def posterior_near(gaps: np.ndarray, e_near: np.ndarray, e_far: np.ndarray, near_to_far: float,
                   far_to_near: float) -> np.ndarray:
    """P(near | all evidence) at each step of each sequence (forward-backward), for many
    sequences at once.

    Arrays of shape (sequences, steps): ``gaps[s, t]`` minutes since the previous step
    (the first step's is ignored: it starts from the stationary share), ``e_near``,
    ``e_far`` the likelihoods P(evidence | near), P(evidence | far). A minute with no
    evidence is a step with likelihoods (1, 1). A gap of k minutes between two steps is k
    transitions, taken at once: for two states the k-step transition is
    P(near | near) = pi + (1 - pi) L, P(near | far) = pi (1 - L), L = (1 - a - b)^k.
    Shorter sequences are padded at the end with gap 0 and likelihoods 1 (no time, no
    evidence), which changes nothing before them.
    """
    # time-major copies: each step's column is contiguous
    gaps, e_near, e_far = (np.ascontiguousarray(np.atleast_2d(np.asarray(x, dtype=float)).T)
                           for x in (gaps, e_near, e_far))
    n, n_seq = gaps.shape
    if n == 0:
        return np.empty((n_seq, 0))
    pi = far_to_near / (near_to_far + far_to_near)
    el = (1.0 - near_to_far - far_to_near) ** gaps  # L per step
    to_near_from_far = pi * (1.0 - el)
    to_far_from_near = (1.0 - pi) * (1.0 - el)
    # forward: filtered P(near_t | evidence up to t)
    filt = np.empty((n, n_seq))
    q = np.full(n_seq, pi)  # the first step starts from the stationary share
    for t in range(n):
        pred = q if t == 0 else pi + (q - pi) * el[t]
        num = pred * e_near[t]
        q = num / (num + (1.0 - pred) * e_far[t])
        filt[t] = q
    # backward: normalised P(evidence after t | state_t)
    bnear = np.empty((n, n_seq))
    bnear[-1] = 0.5
    bn = np.full(n_seq, 0.5)
    for t in range(n - 2, -1, -1):
        un, uf = e_near[t + 1] * bn, e_far[t + 1] * (1.0 - bn)
        d = un - uf
        nbn = un - to_far_from_near[t + 1] * d
        bn = nbn / (nbn + uf + to_near_from_far[t + 1] * d)
        bnear[t] = bn
    a = filt * bnear
    post: np.ndarray = (a / (a + (1.0 - filt) * (1.0 - bnear))).T
    return post


# -- fitting --------------------------------------------------------------------------------

@dataclass
class _Counts:
    near: list[float]
    far: list[float]


def fit(minutes: Iterable[tuple[str, bool, Mapping[str, int | None], Mapping[str, float] | None]], *,
        template: HmmModel, dwell_near_minutes: float, fitted: Mapping[str, Any] | None = None) -> HmmModel:
    """Fit the emission tables and the stationary near share on labelled minutes.

    ``minutes``: (data set, truly near, bins per feature, weight per feature or None for
    1: a value shared by many minutes, such as a rank known only per session, counts
    once, not once per minute). Each feature's table is the
    class-conditional frequency of its bins, with one pseudo-count per bin, computed per
    data set and averaged over the data sets that have that feature (so that hours of one
    set do not drown minutes of another). The stationary near share is the mean over data
    sets of their share of near minutes; ``dwell_near_minutes`` (the expected length of a
    near stretch) sets P(near -> far), and P(far -> near) follows from the share. The bin
    edges, span and minimum come from ``template``.
    """
    sizes = {"attenuation": len(template.attenuation_edges_db) + 1, "rank": len(RANK_BINS),
             "relative": len(template.relative_edges_db) + 1}
    per_set: dict[str, dict[str, _Counts]] = {}
    share: dict[str, list[int]] = {}
    for dataset, near, bins, weights in minutes:
        counts = per_set.setdefault(dataset, {k: _Counts([0.0] * n, [0.0] * n) for k, n in sizes.items()})
        sh = share.setdefault(dataset, [0, 0])
        sh[0 if near else 1] += 1
        for name, b in bins.items():
            if b is not None:
                (counts[name].near if near else counts[name].far)[b] += 1.0 if weights is None else weights[name]
    if not per_set:
        raise ValueError("nothing to fit on")
    emissions = {}
    for name, n in sizes.items():
        near_tables, far_tables = [], []
        for counts in per_set.values():
            c = counts[name]
            if sum(c.near) and sum(c.far):  # a set that saw this feature in both states
                near_tables.append([(x + 1) / (sum(c.near) + n) for x in c.near])
                far_tables.append([(x + 1) / (sum(c.far) + n) for x in c.far])
        if near_tables:
            emissions[name] = Emission(tuple(sum(col) / len(near_tables) for col in zip(*near_tables)),
                                       tuple(sum(col) / len(far_tables) for col in zip(*far_tables)))
        else:  # never observed in both states: uninformative
            emissions[name] = Emission(tuple([1 / n] * n), tuple([1 / n] * n))
    both = [s for s in share.values() if s[0] and s[1]]  # a set with one state says nothing of the share
    if not both:
        raise ValueError("no data set has both near and far minutes")
    pi = sum(s[0] / (s[0] + s[1]) for s in both) / len(both)
    pi = min(max(pi, 0.01), 0.99)
    near_to_far = 1.0 / dwell_near_minutes
    far_to_near = near_to_far * pi / (1.0 - pi)
    if near_to_far + far_to_near >= 1:
        raise ValueError("dwell_near_minutes too short for this near share")
    return HmmModel(template.attenuation_edges_db, template.relative_edges_db, emissions, near_to_far, far_to_near,
                    template.span_minutes, template.min_values, dict(fitted or {}))


def log_likelihood_ratio(model: HmmModel, bins: Mapping[str, int | None]) -> float:
    """log P(evidence | near) / P(evidence | far) of one minute (for explanations)."""
    en, ef = model.likelihoods(bins)
    return math.log(en / ef)
