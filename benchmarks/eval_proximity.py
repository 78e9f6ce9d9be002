"""Every proximity rule on every measurement set of ../shared/data, with intervals.

Rules: ours ("distance", "buckets", "hmm", and "hmm" on attenuation alone to show what
the context evidence adds) through the rule code the device runs
(``agent.exposure.rule.decide``), and the rules that apps shipped in 2020 as baselines
(``agent.exposure.baselines``: CWA v2, SwissCovid, Ireland, Canada, Immuni).

Episodes (``benchmarks/proximity_data.py``): one receiver, one transmitter, one labelled
condition. Each episode stands for a 30-minute contact at its condition: a rule
notifies when its counted minutes, scaled from the episode's L minutes to 30
(x 30 / L), reach its threshold (15 minutes: half the contact). NIST episodes are 30
minutes long, so nothing is scaled there; the Dublin tram rows (about 15 minutes) are
doubled. Truth: the transmitter within 1 m (the H0H1 sessions: the label "kept within
6 ft"; the tram also with a 2 m truth, the definition its paper used). Google's calibration
lists (also in ../shared/data) are calibration, not measurements at distances: nothing to
score.

Fitting: the "hmm" tables are fitted leave-one-data-set-out: the model that decides on
a set never saw it (``hmm.fit``: class-conditional frequencies of each feature's bins,
every set weighing the same). H0H1 is never fitted on (its labels are not distances).
``--fit PATH`` writes the model fitted on all sets: the one ctagent ships.

Intervals: 95% percentile bootstrap over clusters (files, sessions, receiver
sessions), 2,000 replicates, the same resamples for every rule (paired). A difference
between two rules whose interval contains 0 is reported as no difference.

Run:  .venv/bin/python -m benchmarks.eval_proximity [--data ../shared/data]
      [--png docs/proximity.png] [--json out.json] [--fit agent/exposure/hmm_model.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from agent.exposure.baselines import RULES_2020, AttenuationRule, ImmuniV1
from agent.exposure.hmm import Emission, HmmModel, fit
from agent.exposure.rule import ProximityConfig, WindowObservation, decide, hmm_evidence

from .proximity_data import NEAR_M, Episode, load_all

#: Each episode stands for a contact this long (minutes).
CONTACT_MIN = 30.0
BOOTSTRAP = 2000
SEED = 20260101

#: The model's design, fixed before any evaluation (not tuned on its results): bins of
#: attenuation relative to the 1 m reference (dB), bins of the relative signal (dB), the
#: receiver's recent median over 30 minutes of at least 5 values, and near stretches
#: lasting 10 minutes on average (P(near -> far) = 0.1 per minute; no set has per-minute
#: truth with natural movement to fit it on).
_UNIFORM = {"attenuation": 7, "rank": 3, "relative": 6}
TEMPLATE = HmmModel((-6.0, -3.0, 0.0, 3.0, 6.0, 10.0), (-8.0, -4.0, 0.0, 4.0, 8.0),
                    {k: Emission(tuple([1 / n] * n), tuple([1 / n] * n)) for k, n in _UNIFORM.items()},
                    0.1, 0.05, span_minutes=30, min_values=5)
DWELL_NEAR_MIN = 10.0


def family(dataset: str) -> str:
    """Variants of one set (the tram's two truths) share their data."""
    return dataset.split(" (")[0]


# -- the rules ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalRule:
    name: str
    kind: str  # "ours" or "2020"
    #: (episode, LODO model) -> (counted minutes, notifies)
    run: Callable[[Episode, HmmModel], tuple[float, bool]]


def _scale(ep: Episode) -> float:
    return CONTACT_MIN / ep.minutes if ep.minutes > 0 else 0.0


def _pseudo_windows(ep: Episode) -> list[WindowObservation]:
    """A histogram's minutes as consecutive windows (the order does not matter to the
    rules that use them: each minute counts on its own)."""
    out = []
    t = 0.0
    for att, n in ep.histogram or []:
        for _ in range(int(round(n))):
            out.append(WindowObservation(t, 60.0, 1, att, att))
            t += 60.0
    return out


def ours(name: str, cfg: ProximityConfig, *, context: bool = True) -> EvalRule:
    def run(ep: Episode, model: HmmModel) -> tuple[float, bool]:
        if cfg.rule == "hmm" and ep.histogram is not None:
            counted = _hmm_histogram(ep, cfg, model, context=context)
        elif cfg.rule == "hmm":
            heard = ep.heard if context else None
            m = model if context else _attenuation_only(model)
            counted = sum(d.minutes for d in decide(ep.windows, cfg, heard=heard, model=m))
        else:
            windows = _pseudo_windows(ep) if ep.histogram is not None else ep.windows
            counted = sum(d.minutes for d in decide(windows, cfg))
        return counted, counted * _scale(ep) >= cfg.duration_threshold_min
    return EvalRule(name, "ours", run)


def _attenuation_only(model: HmmModel) -> HmmModel:
    flat = {k: (e if k == "attenuation" else Emission(tuple([1 / len(e.near)] * len(e.near)),
                                                        tuple([1 / len(e.far)] * len(e.far))))
            for k, e in model.emissions.items()}
    return replace(model, emissions=flat)


def _hmm_histogram(ep: Episode, cfg: ProximityConfig, model: HmmModel, *, context: bool) -> float:
    """The tram gives minutes without their order: each minute's posterior from its own
    evidence and the stationary share (no smoothing over time), rank and relative signal
    at the level of the receiver's session."""
    pi = model.stationary_near
    total = 0.0
    for (att, n), rel in zip(ep.histogram or [], ep.tram_relative_db or []):
        bins: dict[str, int | None] = {"attenuation": model.attenuation_bin(att, cfg.attenuation_at_1m_db),
                                       "rank": None, "relative": None}
        if context:
            if (ep.tram_heard or 0) >= 2 and ep.tram_stronger is not None:
                bins["rank"] = model.rank_bin(ep.tram_stronger)
            bins["relative"] = model.relative_bin(rel)
        en, ef = model.likelihoods(bins)
        total += n * pi * en / (pi * en + (1 - pi) * ef)
    return total


def baseline(rule: AttenuationRule | ImmuniV1) -> EvalRule:
    gaps = ProximityConfig()  # the same gap filling as ours, then 1 minute per window

    def run(ep: Episode, model: HmmModel) -> tuple[float, bool]:
        if ep.histogram is not None:
            minutes = list(ep.histogram)
        else:
            minutes = [(w.attenuation_db, 1.0) for d in decide(ep.windows, gaps) for w in d.windows]
        k = _scale(ep)
        scaled = [(a, m * k) for a, m in minutes]
        return rule.score(minutes), rule.notifies(scaled)
    return EvalRule(rule.name, "2020", run)


def all_rules() -> list[EvalRule]:
    return [ours("distance (ours, default)", ProximityConfig(rule="distance")),
            ours("buckets (ours)", ProximityConfig(rule="buckets")),
            ours("hmm (ours)", ProximityConfig(rule="hmm")),
            ours("hmm, attenuation only", ProximityConfig(rule="hmm"), context=False),
            *(baseline(r) for r in RULES_2020)]


# -- fitting ---------------------------------------------------------------------------------

def fit_minutes(episodes: Sequence[Episode], cfg: ProximityConfig):
    """(data set, truly near, bins, weights) of every minute of the episodes marked for fitting."""
    for ep in episodes:
        if not ep.fit or ep.distance_m is None:
            continue
        near = ep.distance_m <= NEAR_M
        if ep.histogram is not None:
            # The tram's attenuation is on Google's scale, which has no known 1 m reference:
            # it informs only the features that do not depend on the scale.
            # Its rank is known per pair and session only: it counts once per pair, not per minute.
            heard_ok = (ep.tram_heard or 0) >= 2 and ep.tram_stronger is not None
            weights = {"rank": 1.0 / ep.minutes, "relative": 1.0}
            for (_att, n), rel in zip(ep.histogram, ep.tram_relative_db or []):
                bins = {"attenuation": None,
                        "rank": TEMPLATE.rank_bin(ep.tram_stronger or 0) if heard_ok else None,
                        "relative": TEMPLATE.relative_bin(rel)}
                for _ in range(int(round(n))):
                    yield ep.dataset, near, bins, weights
        else:
            for ev in hmm_evidence(ep.windows, cfg, heard=ep.heard, model=TEMPLATE):
                if not ev.window.filled:
                    yield ep.dataset, near, ev.bins, None


def fit_model(minutes: Sequence[tuple], *, note: str = "") -> HmmModel:
    """The model fitted on ``minutes`` (:func:`fit_minutes`), with how and on what."""
    sets: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ds, near, _, _ in minutes:
        sets[ds][0 if near else 1] += 1
    meta = {"on": {ds: {"near_minutes": v[0], "far_minutes": v[1]} for ds, v in sorted(sets.items())},
            "method": "class-conditional bin frequencies, +1 per bin, averaged over data sets; stationary near share "
                      "= mean near share of the sets with both states; P(near->far) = 1/10 per minute (a prior: "
                      "no set has per-minute truth with natural movement); the Dublin tram informs rank (once "
                      "per pair) and relative signal only (its attenuation is on Google's scale)",
            "near_definition_m": NEAR_M, "command": "python -m benchmarks.eval_proximity --fit agent/exposure/"
                                                     "hmm_model.json", "note": note}
    return fit(minutes, template=TEMPLATE, dwell_near_minutes=DWELL_NEAR_MIN, fitted=meta)


def lodo_models(minutes: Sequence[tuple], datasets: Sequence[str]) -> dict[str, HmmModel]:
    """Per data set, the model fitted on every other set (never on itself)."""
    return {ds: fit_model([m for m in minutes if family(m[0]) != family(ds)]) for ds in sorted(set(datasets))}


# -- scoring -----------------------------------------------------------------------------------

@dataclass
class Scored:
    """Per data set: episodes' truth, clusters and each rule's decisions and minutes."""

    dataset: str
    episodes: list[Episode]
    decisions: dict[str, np.ndarray]
    counted: dict[str, np.ndarray]

    @property
    def truth(self) -> np.ndarray:
        return np.array([e.truth for e in self.episodes])


def score_all(episodes: Sequence[Episode], rules: Sequence[EvalRule], models: dict[str, HmmModel]) -> list[Scored]:
    out = []
    for ds in sorted({e.dataset for e in episodes}, key=_dataset_order):
        eps = [e for e in episodes if e.dataset == ds]
        dec, cnt = {}, {}
        for r in rules:
            res = [r.run(e, models[ds]) for e in eps]
            cnt[r.name] = np.array([x[0] for x in res])
            dec[r.name] = np.array([x[1] for x in res])
        out.append(Scored(ds, eps, dec, cnt))
    return out


def _dataset_order(ds: str) -> tuple[int, str]:
    order = ["NIST", "pc-ng", "MIT LL matrix", "MIT LL range", "MIT LL H0H1", "Dublin tram", "KRI"]
    return next((i for i, p in enumerate(order) if ds.startswith(p)), 99), ds


def confusion(truth: np.ndarray, decided: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(tp, fp, fn, tn), optionally weighted per episode (bootstrap multiplicities)."""
    w = np.ones(len(truth)) if weights is None else weights
    return np.array([(w * (truth & decided)).sum(), (w * (~truth & decided)).sum(),
                     (w * (truth & ~decided)).sum(), (w * (~truth & ~decided)).sum()])


def f1(c: np.ndarray) -> np.ndarray:
    """F1 of (..., 4) confusion counts; NaN where it is undefined."""
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)


def rates(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True-positive rate (recall) and false-positive rate."""
    tp, fp, fn, tn = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fn > 0, tp / np.where(tp + fn > 0, tp + fn, 1), np.nan), \
            np.where(fp + tn > 0, fp / np.where(fp + tn > 0, fp + tn, 1), np.nan)


def cluster_weights(sc: Scored, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, episodes): how many times each episode is drawn when clusters are resampled."""
    clusters = sorted({e.cluster for e in sc.episodes})
    index = {c: i for i, c in enumerate(clusters)}
    of = np.array([index[e.cluster] for e in sc.episodes])
    draws = rng.multinomial(len(clusters), [1 / len(clusters)] * len(clusters), size=n)  # (n, clusters)
    return draws[:, of].astype(float)


@dataclass
class Metric:
    value: float
    low: float
    high: float

    def fmt(self, digits: int = 2) -> str:
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_json(self) -> dict:
        return {k: None if math.isnan(v) else round(v, 4) for k, v in
                (("value", self.value), ("low", self.low), ("high", self.high))}


def _ci(samples: np.ndarray) -> tuple[float, float]:
    s = samples[~np.isnan(samples)]
    if len(s) < BOOTSTRAP * 0.5:  # undefined in most resamples: no interval
        return float("nan"), float("nan")
    return float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))


@dataclass
class Result:
    dataset: str
    setting: str | None
    episodes: int
    positives: int
    clusters: int
    f1: dict[str, Metric]
    tpr: dict[str, Metric]
    fpr: dict[str, Metric]
    #: F1 difference to the reference rule, with its interval
    delta: dict[str, Metric]


def evaluate_set(sc: Scored, rules: Sequence[EvalRule], reference: str, rng: np.random.Generator,
                 mask: np.ndarray | None = None, setting: str | None = None) -> Result:
    eps = [e for e, m in zip(sc.episodes, mask if mask is not None else [True] * len(sc.episodes)) if m]
    sub = Scored(sc.dataset, eps, {k: v[mask] if mask is not None else v for k, v in sc.decisions.items()}, {})
    truth = sub.truth
    w = cluster_weights(sub, rng, BOOTSTRAP)
    out_f1, out_tpr, out_fpr, out_delta = {}, {}, {}, {}
    boot_f1 = {}
    for r in rules:
        d = sub.decisions[r.name]
        point = confusion(truth, d)
        boot = np.stack([w @ (truth & d), w @ (~truth & d), w @ (truth & ~d), w @ (~truth & ~d)], axis=-1)
        bf = f1(boot)
        boot_f1[r.name] = bf
        out_f1[r.name] = Metric(float(f1(point)), *_ci(bf))
        tpr, fpr = rates(point)
        btpr, bfpr = rates(boot)
        out_tpr[r.name] = Metric(float(tpr), *_ci(btpr))
        out_fpr[r.name] = Metric(float(fpr), *_ci(bfpr))
    for r in rules:
        diff = boot_f1[r.name] - boot_f1[reference]
        out_delta[r.name] = Metric(float(out_f1[r.name].value - out_f1[reference].value), *_ci(diff))
    return Result(sc.dataset, setting, len(eps), int(truth.sum()), len({e.cluster for e in eps}),
                  out_f1, out_tpr, out_fpr, out_delta)


def macro(scored: Sequence[Scored], rules: Sequence[EvalRule], reference: str,
          rng: np.random.Generator) -> tuple[dict[str, Metric], dict[str, Metric]]:
    """Mean F1 over the sets with both classes (the tram with its 1 m truth only), each
    set resampled on its own; and each rule's difference to ``reference``."""
    use = [s for s in scored if 0 < s.truth.sum() < len(s.truth) and "truth <= 2" not in s.dataset]
    boots = {r.name: np.zeros(BOOTSTRAP) for r in rules}
    points = {r.name: 0.0 for r in rules}
    for s in use:
        w = cluster_weights(s, rng, BOOTSTRAP)
        t = s.truth
        for r in rules:
            d = s.decisions[r.name]
            boot = np.stack([w @ (t & d), w @ (~t & d), w @ (t & ~d), w @ (~t & ~d)], axis=-1)
            boots[r.name] += np.nan_to_num(f1(boot)) / len(use)
            points[r.name] += float(f1(confusion(t, d))) / len(use)
    level = {k: Metric(points[k], *_ci(v)) for k, v in boots.items()}
    delta = {k: Metric(points[k] - points[reference], *_ci(boots[k] - boots[reference])) for k in boots}
    return level, delta


def choose_default(results: Sequence[Result], rules: Sequence[EvalRule], macro_delta: dict[str, Metric],
                   reference: str) -> tuple[str, str]:
    """The rule that wins: among our rules (what ``[proximity] rule`` can select), one whose
    mean F1 is above the current default's beyond noise and which is worse beyond noise on
    no set; the best such by mean F1. Otherwise the default stays. Returns (rule, why)."""
    scored = [r for r in results if 0 < r.positives < r.episodes and "truth <= 2" not in r.dataset]
    winners = []
    for rule in rules:
        if rule.kind != "ours" or rule.name == reference or rule.name not in _SELECTABLE:
            continue
        worse = [r.dataset for r in scored if verdict(r.delta[rule.name]) == "worse"]
        if verdict(macro_delta[rule.name]) == "better" and not worse:
            winners.append(rule.name)
        elif verdict(macro_delta[rule.name]) == "better":
            winners_note = f"{rule.name}: better on mean F1 but worse on {', '.join(worse)}"
            _NOTES.append(winners_note)
    if not winners:
        return reference, ("no rule of ours beats it beyond noise without losing beyond noise on some set"
                           + (f" ({'; '.join(_NOTES)})" if _NOTES else ""))
    best = max(winners, key=lambda k: macro_delta[k].value)
    return best, f"mean F1 {macro_delta[best].fmt()} above '{reference}', worse on no set beyond noise"


#: Our rules that ``[proximity] rule`` selects (the ablation row is not one).
_SELECTABLE = {"distance (ours, default)": "distance", "buckets (ours)": "buckets", "hmm (ours)": "hmm"}
_NOTES: list[str] = []


def verdict(delta: Metric) -> str:
    if math.isnan(delta.low):
        return "n/a"
    if delta.low > 0:
        return "better"
    if delta.high < 0:
        return "worse"
    return "no difference"


# -- output -------------------------------------------------------------------------------------

def print_tables(console: Console, results: list[Result], per_setting: list[Result], rules: Sequence[EvalRule],
                 macro_level: dict[str, Metric], macro_delta: dict[str, Metric], reference: str) -> None:
    t = Table(title="F1 [95% bootstrap interval] per data set (episodes: positives/total, clusters)")
    t.add_column("rule")
    for r in results:
        t.add_column(f"{r.dataset}\n{r.positives}/{r.episodes}, {r.clusters} cl.", justify="right")
    t.add_column("mean F1 (sets with both classes)", justify="right")
    for rule in rules:
        t.add_row(rule.name, *[r.f1[rule.name].fmt() if r.positives else
                               f"FPR {r.fpr[rule.name].fmt()}" for r in results], macro_level[rule.name].fmt())
    console.print(t)
    t = Table(title=f"Difference in F1 to '{reference}' [95% interval]: better / worse only when the interval "
                    "excludes 0")
    t.add_column("rule")
    for r in results:
        if r.positives and r.positives < r.episodes:
            t.add_column(r.dataset, justify="right")
    t.add_column("mean F1", justify="right")
    for rule in rules:
        cells = [f"{r.delta[rule.name].fmt()} {verdict(r.delta[rule.name])}" for r in results
                 if r.positives and r.positives < r.episodes]
        t.add_row(rule.name, *cells, f"{macro_delta[rule.name].fmt()} {verdict(macro_delta[rule.name])}")
    console.print(t)
    t = Table(title="True-positive rate / false-positive rate per data set")
    t.add_column("rule")
    for r in results:
        t.add_column(r.dataset, justify="right")
    for rule in rules:
        t.add_row(rule.name, *[f"{_pct(r.tpr[rule.name])} / {_pct(r.fpr[rule.name])}" for r in results])
    console.print(t)
    t = Table(title="Per setting: F1 (or FPR where no positives)")
    t.add_column("data set / setting")
    t.add_column("pos/eps", justify="right")
    for rule in rules:
        t.add_column(rule.name, justify="right")
    for r in per_setting:
        t.add_row(f"{r.dataset} / {r.setting}", f"{r.positives}/{r.episodes}",
                  *[(f"{r.f1[x.name].value:.2f}" if r.positives else f"FPR {r.fpr[x.name].value:.2f}")
                    for x in rules])
    console.print(t)


def _pct(m: Metric) -> str:
    return "n/a" if math.isnan(m.value) else f"{m.value:.0%}"


def plot(results: list[Result], rules: Sequence[EvalRule], scored: list[Scored], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if 0 < r.positives < r.episodes]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    n = len(rules)
    for i, rule in enumerate(rules):
        xs = np.arange(len(shown)) + (i - (n - 1) / 2) * 0.09
        ys = [r.f1[rule.name].value for r in shown]
        lo = [r.f1[rule.name].value - r.f1[rule.name].low for r in shown]
        hi = [r.f1[rule.name].high - r.f1[rule.name].value for r in shown]
        a1.errorbar(xs, ys, yerr=[np.nan_to_num(lo), np.nan_to_num(hi)], fmt="o" if rule.kind == "ours" else "s",
                    ms=4, capsize=2, lw=1, label=rule.name, color=plt.cm.tab10(i % 10))
    a1.set_xticks(range(len(shown)), [r.dataset.replace(" (", "\n(") for r in shown], fontsize=8)
    a1.set_ylabel("F1 per episode (95% bootstrap interval)")
    a1.set_ylim(-0.02, 1.02)
    a1.set_title("Each rule on each data set (circles: ours, squares: 2020 apps)")
    a1.legend(fontsize=7, ncol=3, loc="lower left")
    # per-minute view: the share of minutes each of ours counts, by true distance (sequence sets)
    for name, colour in (("distance (ours, default)", "tab:blue"), ("hmm (ours)", "tab:green")):
        by_d: dict[float, list[float]] = defaultdict(list)
        for s in scored:
            for e, c in zip(s.episodes, s.counted[name]):
                if e.distance_m is not None and e.histogram is None and e.minutes > 0:
                    by_d[round(e.distance_m * 2) / 2].append(c / e.minutes)
        ds = sorted(k for k in by_d if len(by_d[k]) >= 3)
        a2.plot(ds, [np.mean(by_d[d]) for d in ds], marker="o", color=colour, label=name)
    a2.axvline(NEAR_M, color="k", ls="--", lw=1)
    a2.set_xlabel("true distance (m), rounded to 0.5 m; all sets with distances")
    a2.set_ylabel("mean share of an episode's minutes counted near")
    a2.set_title("What the rules count, by distance")
    a2.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# -- the command -----------------------------------------------------------------------------------

def run(data: Path, *, png: Path | None = None, fit_path: Path | None = None, console: Console | None = None,
        episodes: list[Episode] | None = None) -> dict:
    console = console or Console(width=250)
    cfg = ProximityConfig(rule="hmm")
    t0 = time.perf_counter()
    eps = episodes if episodes is not None else load_all(data, a1m=cfg.attenuation_at_1m_db)
    loaded = time.perf_counter() - t0
    minutes = list(fit_minutes(eps, cfg))
    if fit_path is not None:
        model = fit_model(minutes, note=f"fitted {dt.date.today().isoformat()} on {data.name}")
        fit_path.write_text(json.dumps(model.to_json(), indent=1) + "\n")
        console.print(f"model fitted on every set written to {fit_path}")
    models = lodo_models(minutes, [e.dataset for e in eps])
    rules = all_rules()
    reference = rules[0].name
    scored = score_all(eps, rules, models)
    rng = np.random.default_rng(SEED)
    results = [evaluate_set(s, rules, reference, rng) for s in scored]
    per_setting = []
    for s in scored:
        settings = sorted({e.setting for e in s.episodes})
        if len(settings) > 1:
            for st in settings:
                mask = np.array([e.setting == st for e in s.episodes])
                per_setting.append(evaluate_set(s, rules, reference, rng, mask, st))
    macro_level, macro_delta = macro(scored, rules, reference, rng)
    print_tables(console, results, per_setting, rules, macro_level, macro_delta, reference)
    _NOTES.clear()
    winner, why = choose_default(results, rules, macro_delta, reference)
    best_2020 = max((r.name for r in rules if r.kind == "2020"), key=lambda k: macro_level[k].value)
    gap = Metric(macro_level[winner].value - macro_level[best_2020].value, float("nan"), float("nan"))
    console.print(f"default rule: {_SELECTABLE[winner]!r} ({why}); best 2020 rule by mean F1: {best_2020} "
                  f"({macro_level[best_2020].fmt()}), against {macro_level[winner].fmt()} for '{winner}'")
    console.print(f"({len(eps)} episodes loaded in {loaded:.0f} s; evaluated in "
                  f"{time.perf_counter() - t0 - loaded:.0f} s)")
    if png:
        plot(results, rules, scored, png)
        console.print(f"figure written to {png}")

    def res_json(r: Result) -> dict:
        return {"dataset": r.dataset, "setting": r.setting, "episodes": r.episodes, "positives": r.positives,
                "clusters": r.clusters,
                "rules": {k: {"f1": r.f1[k].to_json(), "tpr": r.tpr[k].to_json(), "fpr": r.fpr[k].to_json(),
                              "f1_minus_reference": r.delta[k].to_json(), "verdict": verdict(r.delta[k])}
                          for k in r.f1}}
    del gap
    return {"reference": reference, "default": _SELECTABLE[winner], "why": why, "best_2020": best_2020,
            "contact_min": CONTACT_MIN, "bootstrap": BOOTSTRAP,
            "datasets": [res_json(r) for r in results], "settings": [res_json(r) for r in per_setting],
            "mean_f1": {k: {"f1": macro_level[k].to_json(), "minus_reference": macro_delta[k].to_json(),
                            "verdict": verdict(macro_delta[k])} for k in macro_level},
            "models": {k: m.to_json() for k, m in models.items()}}


def default_data() -> Path | None:
    """``shared/data`` beside the checkout or beside one of its parents (worktrees nest)."""
    for parent in Path(__file__).resolve().parents[1:]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data(),
                    help="the measurement sets (default: the nearest shared/data above the checkout)")
    ap.add_argument("--png", type=Path, default=Path("docs/proximity.png"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--fit", type=Path, default=None, metavar="PATH",
                    help="also write the hmm model fitted on every set (what ctagent ships) to PATH")
    a = ap.parse_args(argv)
    if a.data is None or not (a.data / "README.md").exists():
        ap.error(f"no measurement sets at {a.data}: give --data (the folder of ../shared/data)")
    res = run(a.data, png=a.png, fit_path=a.fit)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
