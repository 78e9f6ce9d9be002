"""The proximity evaluation's machinery on a slice of the real sets (tests/data: two NIST
files and the Dublin tram histograms): loading, leave-one-data-set-out fitting, the
cluster bootstrap and its verdicts, the default's choice, the 2020 rules as published."""

import io
import json
import shutil

import numpy as np
import pytest
from rich.console import Console

from agent.exposure.baselines import CANADA, CWA_V2, IMMUNI, IRELAND, SWISSCOVID, AttenuationRule
from agent.exposure.hmm import HmmModel
from benchmarks import eval_proximity as ev
from benchmarks.proximity_data import Episode, load_nist, load_tram

from .conftest import DATA


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(DATA / "nist", root / "rpi_nist_exposure_notification")
    shutil.copytree(DATA / "dublin_tram_gaen", root / "dublin_tram_gaen")
    return root


@pytest.fixture(scope="module")
def episodes(data_root):
    return (load_nist(data_root, a1m=50.0) + load_tram(data_root)
            + load_tram(data_root, near_m=2.0, dataset="Dublin tram (truth <= 2 m)"))


def test_loaders_on_the_slice(episodes):
    nist = [e for e in episodes if e.dataset == "NIST Pi 3 pair"]
    tram = [e for e in episodes if e.dataset == "Dublin tram"]
    assert {e.distance_m for e in nist} == {1.0, 3.0} and all(e.truth == (e.distance_m == 1.0) for e in nist)
    assert all(24 <= e.minutes <= 31 for e in nist)  # 30-minute episodes (at least 80% covered)
    assert all(e.heard and min(e.heard) <= e.windows[0].start // 60 for e in nist)  # the receiver's past is known
    # 72 rows, 2 of them empty; truth within 1 m: the six 0.5 m rows; 12 receiver sessions of six
    assert len(tram) == 70 and sum(e.truth for e in tram) == 6 and len({e.cluster for e in tram}) == 12
    row3 = tram[3]  # handsets 5 and 4, 1.8 m: 7 min at 48-50 dB, 2 at 50-52, 6 at 62-64
    assert row3.histogram == [(49.0, 7.0), (51.0, 2.0), (63.0, 6.0)] and row3.tram_heard == 6


def test_the_tram_reproduces_its_paper(episodes):
    """Leith & Farrell: on these rows the German rule of June 2020 (weights 1 below 55 dB,
    0.5 to 63 dB, 15 weighted minutes) notifies nobody."""
    cwa_2020_june = AttenuationRule("CWA v1", (55.0, 63.0), (1.0, 0.5), 15.0)
    assert not any(cwa_2020_june.notifies(e.histogram) for e in episodes if e.dataset == "Dublin tram")


def test_2020_rules_as_published():
    minutes = [(50.0, 8), (58.0, 6), (70.0, 4)]  # (attenuation, minutes)
    assert CWA_V2.score(minutes) == pytest.approx(1.4 * (8 + 0.5 * 6))
    assert CWA_V2.score([(50.0, 9)]) == 0  # fewer than 10 minutes below 73 dB: dropped
    assert SWISSCOVID.score(minutes) == pytest.approx(8 + 0.5 * 6)  # 53 / 60 dB
    assert IRELAND.score([(55.0, 10), (61.0, 10)]) == 15 and IRELAND.notifies([(55.0, 10), (61.0, 10)])
    assert CANADA.score(minutes) == 14 and not CANADA.notifies(minutes)
    assert IMMUNI.notifies([(72.0, 16)]) and not IMMUNI.notifies([(72.0, 15)]) and not IMMUNI.notifies([(74.0, 30)])


def _scored(truth, decisions, clusters):
    eps = [Episode("set", "s", c, t, None, 30.0) for t, c in zip(truth, clusters)]
    return ev.Scored("set", eps, {k: np.array(v) for k, v in decisions.items()}, {})


def test_bootstrap_intervals_and_verdicts():
    rules = [ev.EvalRule(n, "ours", lambda e, m: (0, False)) for n in ("ref", "same", "perfect", "noisy")]
    truth = [True, False] * 20
    clusters = [f"c{i // 4}" for i in range(40)]
    sc = _scored(truth, {"ref": [t and i % 4 != 0 for i, t in enumerate(truth)],
                         "same": [t and i % 4 != 0 for i, t in enumerate(truth)],
                         "perfect": truth, "noisy": [i % 3 == 0 for i in range(40)]}, clusters)
    r = ev.evaluate_set(sc, rules, "ref", np.random.default_rng(1))
    assert r.f1["perfect"].fmt() == "1.00 [1.00, 1.00]" and r.clusters == 10
    assert r.f1["ref"].low <= r.f1["ref"].value <= r.f1["ref"].high
    assert ev.verdict(r.delta["same"]) == "no difference" and r.delta["same"].value == 0
    assert ev.verdict(r.delta["perfect"]) == "better" and ev.verdict(r.delta["noisy"]) == "worse"


def test_whole_evaluation_on_the_slice(data_root, episodes, tmp_path):
    out = io.StringIO()
    res = ev.run(data_root, episodes=episodes, png=tmp_path / "p.png", fit_path=tmp_path / "m.json",
                 console=Console(file=out, width=250))
    text = out.getvalue()
    assert "F1 [95% bootstrap interval]" in text and "default rule:" in text and (tmp_path / "p.png").stat().st_size
    # leave one data set out: the model that decides on a set never saw it
    assert "NIST Pi 3 pair" not in res["models"]["NIST Pi 3 pair"]["fitted"]["on"]
    assert "Dublin tram" not in res["models"]["Dublin tram (truth <= 2 m)"]["fitted"]["on"]  # the same rows
    shipped = HmmModel.load(tmp_path / "m.json")  # fitted on every set, as ctagent ships it
    assert set(shipped.fitted["on"]) == {"NIST Pi 3 pair", "Dublin tram"}
    names = {r["dataset"] for r in res["datasets"]}
    assert names == {"NIST Pi 3 pair", "Dublin tram", "Dublin tram (truth <= 2 m)"}
    for d in res["datasets"]:
        assert set(d["rules"]) == {r.name for r in ev.all_rules()}
        for v in d["rules"].values():
            f = v["f1"]
            assert f["low"] is None or f["low"] <= f["value"] + 1e-9 <= f["high"] + 2e-9
    assert res["default"] in ("distance", "buckets", "hmm") and res["why"]
    json.dumps(res)  # all of it serialisable for --json
