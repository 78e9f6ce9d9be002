"""The hmm proximity rule: the posterior on hand-made minute sequences (known answers and
brute force over every state path), the minute context the device keeps, the daemon
deciding with it on a virtual clock, and ``exposures --explain`` showing it."""

import asyncio
import itertools
import json
import random
import statistics
import time

import numpy as np

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import cli
from agent.ble.base import Radio
from agent.ble.sim import SimAdvertiser, SimScanner
from agent.clock import VirtualClock, utc_day
from agent.daemon import Daemon
from agent.errors import ConfigError
from agent.exposure.aggregate import MINUTE_GRACE_S, Aggregator
from agent.exposure.calibration import DeviceCalibration
from agent.exposure.hmm import Emission, HmmModel, bundled_model, fit, posterior_near
from agent.exposure.minutes import (HeardMinute, heard_from_arrays, merge, pack, recent_medians, stronger_counts,
                                    summarise, unpack)
from agent.exposure.rule import ProximityConfig, WindowObservation, decide, decide_peers
from agent.modes.base import DeviceContext
from agent.modes.gaen import GaenMode
from agent.protocol.export import DiagnosisKey
from agent.store import KeyFile, Store

from .helpers import DAY, MIDNIGHT, T0, fast_passphrase

# A hand-made model: attenuation below the 1 m reference is 3x likelier near than far,
# above it 3x likelier far; the strongest of a minute 4x likelier near; a signal well above
# the receiver's recent median 2x likelier near.
MODEL = HmmModel((0.0,), (0.0,), {"attenuation": Emission((0.75, 0.25), (0.25, 0.75)),
                                  "rank": Emission((0.8, 0.1, 0.1), (0.2, 0.4, 0.4)),
                                  "relative": Emission((1 / 3, 2 / 3), (2 / 3, 1 / 3))},
                 near_to_far=0.1, far_to_near=0.05, span_minutes=10, min_values=3)
HMM = ProximityConfig(rule="hmm")


def windows(atts, start=T0, rssi=None):
    """One 1-minute window per attenuation (None: a minute not heard)."""
    out = []
    for k, a in enumerate(atts):
        if a is not None:
            out.append(WindowObservation(start + 60 * k, 60.0, 4, a, a - 2, rssi_dbm=rssi if rssi is None else rssi[k]))
    return out


def brute_force(steps, a, b):
    """P(near) per step by summing over every state path (gaps as matrix powers)."""
    pi = b / (a + b)
    t1 = [[1 - a, a], [b, 1 - b]]  # [from][to], state 0 = near

    def power(k):
        m = [[1.0, 0.0], [0.0, 1.0]]
        for _ in range(k):
            m = [[sum(m[i][x] * t1[x][j] for x in range(2)) for j in range(2)] for i in range(2)]
        return m
    n = len(steps)
    near = [0.0] * n
    total = 0.0
    for path in itertools.product((0, 1), repeat=n):
        p = (pi if path[0] == 0 else 1 - pi) * (steps[0][1] if path[0] == 0 else steps[0][2])
        for i in range(1, n):
            p *= power(steps[i][0])[path[i - 1]][path[i]] * (steps[i][1] if path[i] == 0 else steps[i][2])
        total += p
        for i in range(n):
            if path[i] == 0:
                near[i] += p
    return [x / total for x in near]


# --- the posterior ---------------------------------------------------------------------

def post(steps, a, b):
    """posterior_near of one sequence of (gap, P(e | near), P(e | far))."""
    g, en, ef = (np.array([[x[i] for x in steps]], dtype=float) for i in range(3))
    return posterior_near(g, en, ef, a, b)[0].tolist()


def test_posterior_known_values():
    # one minute: prior 1/3 (the chain's stationary share), likelihoods 0.6 vs 0.2 -> 0.6
    assert post([(1, 0.6, 0.2)], 0.1, 0.05) == pytest.approx([0.6])
    # no evidence at all: the stationary share everywhere
    assert post([(1, 1, 1)] * 4, 0.1, 0.05) == pytest.approx([1 / 3] * 4)
    # two minutes, worked by hand: P(path) = pi(s1) e1(s1) T(s1,s2) e2(s2)
    # near-near 1/3*.6*.9*.6=.108, near-far 1/3*.6*.1*.2=.004, far-near 2/3*.2*.05*.6=.004, far-far 2/3*.2*.95*.2=.02533
    nn, nf, fn, ff = 0.108, 0.004, 0.004, 2 / 3 * 0.2 * 0.95 * 0.2
    z = nn + nf + fn + ff
    assert post([(1, 0.6, 0.2), (1, 0.6, 0.2)], 0.1, 0.05) == pytest.approx([(nn + nf) / z, (nn + fn) / z])
    assert post([], 0.1, 0.05) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.floats(0.01, 1.0), st.floats(0.01, 1.0)), min_size=1, max_size=7),
       st.floats(0.01, 0.5), st.floats(0.01, 0.45))
def test_posterior_equals_the_sum_over_every_path(steps, a, b):
    assert post(steps, a, b) == pytest.approx(brute_force(steps, a, b), abs=1e-9)
    # in a batch, padded with steps of no time and no evidence: the same posteriors
    other = [(1, 0.3, 0.9)] * 9
    g = np.array([[x[0] for x in steps] + [0] * (9 - len(steps)), [x[0] for x in other]], dtype=float)
    en = np.array([[x[1] for x in steps] + [1] * (9 - len(steps)), [x[1] for x in other]])
    ef = np.array([[x[2] for x in steps] + [1] * (9 - len(steps)), [x[2] for x in other]])
    both = posterior_near(g, en, ef, a, b)
    assert both[0, :len(steps)].tolist() == pytest.approx(post(steps, a, b), abs=1e-12)
    assert both[1].tolist() == pytest.approx(post(other, a, b), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(35, 75)), min_size=1, max_size=40), st.integers(0, 39),
       st.floats(0.5, 15))
def test_more_near_evidence_never_lowers_the_expected_minutes(atts, k, stronger_by):
    """Expected near minutes lie between 0 and the minutes counted (seen + filled), and
    lowering one minute's attenuation (a stronger signal) never lowers them."""
    cfg = ProximityConfig(rule="hmm")
    base = decide(windows(atts), cfg, model=MODEL)
    seen = [a for a in atts if a is not None]
    if not seen:
        assert base == []
        return
    filled = sum(len(d.windows) for d in base)
    total = sum(d.minutes for d in base)
    assert 0 <= total <= filled + 1e-9
    i = k % len(atts)
    if atts[i] is not None:
        better = list(atts)
        better[i] = atts[i] - stronger_by
        assert sum(d.minutes for d in decide(windows(better), cfg, model=MODEL)) >= total - 1e-9


# --- the rule ------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(35, 75)), min_size=1, max_size=30), st.randoms(use_true_random=False),
       st.sampled_from(["hmm", "distance", "buckets"]))
def test_order_and_duplicates_do_not_matter(atts, rnd, rule):
    """Windows in any order, and a window given twice with a weaker copy, decide alike."""
    cfg = ProximityConfig(rule=rule)
    ws = windows(atts)
    shuffled = ws + [WindowObservation(w.start, 60.0, 1, w.mean_attenuation_db + 9, w.min_attenuation_db + 9)
                     for w in ws[::3]]
    rnd.shuffle(shuffled)
    a, b = decide(ws, cfg, model=MODEL), decide(shuffled, cfg, model=MODEL)
    assert [(d.day, d.minutes, d.exposed) for d in a] == [(d.day, d.minutes, d.exposed) for d in b]
    assert [w.to_json() for d in a for w in d.windows] == [w.to_json() for d in b for w in d.windows]


def test_near_day_exposes_far_day_does_not_and_explains():
    near = decide(windows([46.0] * 25), HMM, model=MODEL)
    (d,) = near
    assert d.rule == "hmm" and d.exposed and 15 < d.minutes < 25
    assert all(w.posterior_near is not None and w.minutes == pytest.approx(w.posterior_near, abs=1e-3)
               for w in d.windows)
    (far,) = decide(windows([56.0] * 25), HMM, model=MODEL)
    assert not far.exposed and far.minutes < 2
    # one odd minute in a near stretch is smoothed: its posterior stays high
    (mixed,) = decide(windows([46.0] * 10 + [56.0] + [46.0] * 10), HMM, model=MODEL)
    assert mixed.windows[10].posterior_near > 0.5


def test_gaps_filled_up_to_the_setting_long_gaps_not_counted():
    (d,) = decide(windows([46.0, None, None, 46.0]), HMM, model=MODEL)  # 2 missing minutes: filled
    assert len(d.windows) == 4 and [w.filled for w in d.windows] == [False, True, True, False]
    assert d.windows[1].attenuation_db == 46.0 and d.windows[1].posterior_near > 0.5
    (d,) = decide(windows([46.0] + [None] * 30 + [46.0]), HMM, model=MODEL)  # a long gap: 2 minutes only
    assert len(d.windows) == 2 and d.minutes < 2


def test_rank_and_relative_evidence_from_the_minute_context():
    start = T0
    atts = [50.5] * 20  # just above the 1 m reference: by itself mildly far
    alone = decide(windows(atts, start), HMM, model=MODEL)[0]
    # a crowd each minute: the peer (-60 dBm) is the strongest of 6 and well above the recent median
    crowd = {start // 60 + k: HeardMinute(start // 60 + k, 6, (-60, -75, -78, -80, -82, -85)) for k in range(20)}
    rssi = [-60.0] * 20
    strongest = decide(windows(atts, start, rssi), HMM, heard=crowd, model=MODEL)[0]
    assert strongest.minutes > alone.minutes + 5 and strongest.exposed and not alone.exposed
    w = strongest.windows[5]
    assert (w.heard, w.stronger) == (6, 0) and w.relative_db == pytest.approx(-60 - (-79.0))
    # the same peer among stronger ones: rank says far
    loud = {m: HeardMinute(m, 6, (-50, -52, -55, -60, -82, -85)) for m in crowd}
    weaker = decide(windows(atts, start, rssi), HMM, heard=loud, model=MODEL)[0]
    assert weaker.windows[5].stronger == 3 and weaker.minutes < alone.minutes
    # without the RSSI as measured, the context cannot be used
    assert decide(windows(atts, start), HMM, heard=crowd, model=MODEL)[0].minutes == pytest.approx(alone.minutes)


def test_decide_peers_per_peer_and_day_and_other_rules():
    peers = {"a": windows([46.0] * 20, MIDNIGHT + DAY - 600), "b": windows([60.0] * 5)}
    out = decide_peers(peers, HMM, model=MODEL)
    assert [d.day for d in out["a"]] == [MIDNIGHT // DAY, MIDNIGHT // DAY + 1]  # split at UTC midnight
    assert len(out["b"]) == 1 and not out["b"][0].exposed
    dist = decide_peers(peers, ProximityConfig(), heard={})
    assert dist["a"][0].rule == "distance" and dist["a"][0].windows[0].posterior_near is None


def test_bundled_model_is_valid_and_documented():
    m = bundled_model()
    assert m.fitted["on"] and "method" in m.fitted and 0 < m.stationary_near < 0.5
    for e in m.emissions.values():
        assert sum(e.near) == pytest.approx(1) and sum(e.far) == pytest.approx(1)
    with pytest.raises(ConfigError, match="must be one of"):
        ProximityConfig(rule="kalman")
    with pytest.raises(ConfigError, match="malformed"):
        HmmModel.from_json({"format": "ctagent hmm proximity model v1"})


def test_fit_counts_per_set_and_weights():
    minutes = [("s1", True, {"attenuation": 0, "rank": None, "relative": None}, None)] * 3 + \
              [("s1", False, {"attenuation": 1, "rank": None, "relative": None}, None)] * 3 + \
              [("s2", True, {"attenuation": 0, "rank": 0, "relative": None}, {"rank": 0.5, "attenuation": 1.0})] * 2 + \
              [("s2", False, {"attenuation": 1, "rank": 2, "relative": None}, {"rank": 0.5, "attenuation": 1.0})] * 2
    m = fit(minutes, template=MODEL, dwell_near_minutes=10)
    # s1: near (3+1)/(3+2) = 0.8 in bin 0; s2: (2+1)/(2+2) = 0.75; averaged
    assert m.emissions["attenuation"].near[0] == pytest.approx((0.8 + 0.75) / 2)
    assert m.emissions["rank"].near == pytest.approx(((1 + 1) / (1 + 3), 1 / 4, 1 / 4))  # weight 0.5 x 2 = one pair
    assert m.emissions["relative"].near == (0.5, 0.5)  # never seen: uninformative
    assert m.near_to_far == 0.1 and m.stationary_near == pytest.approx(0.5)


# --- the minute context ------------------------------------------------------------------

def test_heard_minutes_pack_rank_median_and_merge():
    h = HeardMinute(T0 // 60, 5, (-50, -60, -60, -70, -80))
    assert [h.stronger_than(x) for x in (-40, -50, -60, -65, -90)] == [0, 0, 1, 3, 5]
    assert unpack(pack([h, HeardMinute(T0 // 60 + 1, 1, (-99,))])) == [h, HeardMinute(T0 // 60 + 1, 1, (-99,))]
    with pytest.raises(ValueError):
        unpack(pack([h])[:-1])
    assert merge([h, HeardMinute(h.minute, 2, (-1, -2))])[h.minute] == h
    m = np.array([h.minute, h.minute + 1, h.minute + 2])
    assert recent_medians({h.minute: h}, m, 2, 3).tolist()[:2] == [-60, -60]
    assert np.isnan(recent_medians({h.minute: h}, m, 2, 3)[2]) and np.isnan(recent_medians({h.minute: h}, m, 2, 6)[0])


minute_st = st.lists(st.integers(-128, 20), min_size=1, max_size=12).map(lambda v: tuple(sorted(v, reverse=True)))


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.integers(0, 12), minute_st, max_size=10), st.lists(st.tuples(st.integers(0, 14),
       st.floats(-130, 25)), min_size=1, max_size=20), st.integers(1, 6), st.integers(1, 8))
def test_batch_rank_and_median_match_their_definitions(rows, asks, span, min_values):
    heard = {m: HeardMinute(m, len(v) + 1, v) for m, v in rows.items()}
    minutes = np.array([m for m, _ in asks])
    rssi = np.array([r for _, r in asks])
    count, stronger = stronger_counts(heard, minutes, rssi)
    med = recent_medians(heard, minutes, span, min_values)
    for k, (m, r) in enumerate(asks):
        h = heard.get(m)
        assert count[k] == (h.heard if h else 0)
        assert stronger[k] == (h.stronger_than(r) if h else 0)
        values = [x for mm in range(m - span + 1, m + 1) if mm in heard for x in heard[mm].rssi]
        if len(values) >= min_values:
            assert med[k] == statistics.median(values)
        else:
            assert np.isnan(med[k])


def test_aggregator_summarises_every_identifier_per_completed_minute():
    agg = Aggregator()
    m0 = T0 // 60
    for k, rpi in enumerate((b"a" * 16, b"b" * 16, b"c" * 16)):
        agg.add_raw(m0 * 60 + 10, rpi, b"aaaa", -50 - 10 * k)
        agg.add_raw(m0 * 60 + 20, rpi, b"aaaa", -50 - 10 * k)
    agg.add_raw(m0 * 60 + 70, b"a" * 16, b"aaaa", -40)
    assert agg.completed_minutes(m0 * 60 + 60 + MINUTE_GRACE_S - 1) == []  # within the grace
    (first,) = agg.completed_minutes(m0 * 60 + 60 + MINUTE_GRACE_S)
    assert first == HeardMinute(m0, 3, (-50, -60, -70))
    agg.flush(m0 * 60 + 330)  # the others are forgotten ...
    assert len(agg) == 1
    (second,) = agg.completed_minutes(m0 * 60 + 120 + MINUTE_GRACE_S)  # ... after their minutes were summarised
    assert second == HeardMinute(m0 + 1, 1, (-40,))
    agg.requeue_minutes([second])
    assert agg.completed_minutes(m0 * 60 + 130) == [second]
    assert summarise([], 0, 10) == []
    # the same from recorded minutes (field experiments): one row per identifier and minute
    rows = heard_from_arrays(np.array([m0, m0, m0, m0 + 1]), np.array([-70.2, -49.6, -60.0, -40.0]))
    assert rows == {m0: first, m0 + 1: second}


def test_store_keeps_heard_minutes_encrypted_per_day(tmp_path):
    from agent.clock import ManualClock

    clock = ManualClock(T0)
    path = tmp_path / "agent.db"
    mins = [HeardMinute(T0 // 60 + k, 2, (-51, -77)) for k in range(3)] + [HeardMinute((T0 + DAY) // 60, 1, (-66,))]
    with Store.create(path, fast_passphrase(), clock=clock, retention_days=2) as s:
        assert s.heard_minutes.add(mins) == 4
        assert s.heard_minutes.add(mins[:1]) == 1  # a batch written twice reads once
        got = s.heard_minutes.read()
        assert sorted(got) == [m.minute for m in mins] and got[T0 // 60] == mins[0]
        assert list(s.heard_minutes.read(since_day=utc_day(T0) + 1)) == [(T0 + DAY) // 60]
        assert s.conn.execute("SELECT COUNT(DISTINCT day) FROM heard_minutes").fetchone()[0] == 2
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert pack(mins[:1]) not in raw
    clock.advance(3 * DAY)
    with Store.open(path, fast_passphrase(), clock=clock, retention_days=2) as s:  # retention erases old days
        assert s.heard_minutes.read() == {}


# --- the daemon on a virtual clock, and the CLI ---------------------------------------------

PI = DeviceCalibration("Raspberry Pi 3 Model B", 0.0, 4.0, 2)


def _published(tek):
    return DiagnosisKey(tek.key_data, tek.rolling_start_interval_number)


async def test_daemon_decides_with_the_hmm_rule(tmp_path):
    """A GAEN daemon on simulated radio for 40 virtual minutes: peer 0 stays at 0.5 m,
    the others at 5 m; its keys make an hmm exposure, explained minute by minute with the
    context of everything heard; a far peer's keys make none."""
    clock = VirtualClock(T0)
    store = Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock)
    rng = random.Random(1)
    mode = GaenMode(DeviceContext(store=store, clock=clock, calibration=PI, rng=rng, random_bytes=rng.randbytes,
                                  proximity=ProximityConfig(rule="hmm"), match_workers=1))
    scan = SimScanner(clock, peer_factory=GaenMode.simulated_peer, peers=3, seed=2, tick_s=4)
    scan._pos[1:] = [[0.5, 0.0], [5.0, 0.0], [0.0, 5.0]]
    scan._move = lambda: None  # nobody moves
    d = Daemon(mode, Radio(SimAdvertiser(clock), scan), clock=clock, status_path=tmp_path / "status.json",
               rng=random.Random(3), flush_interval_s=60)
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(T0 + 40 * 60)
    heard = store.heard_minutes.read()
    assert len(heard) >= 35 and max(h.heard for h in heard.values()) >= 3
    near_key, far_key = (_published(p.schedule.tek_for(T0)[0]) for p in scan.peers[:2])
    decisions = mode.check_exposures([near_key, far_key], clock.now())
    by_key = {dec.key.key_data: dec for dec in decisions}
    near, far = by_key[near_key.key_data], by_key[far_key.key_data]
    assert near.day.rule == "hmm" and near.exposed and near.day.minutes >= 15
    assert not far.exposed and far.day.minutes < near.day.minutes
    assert any(w.stronger == 0 and w.heard == 3 for w in near.day.windows)
    (found,) = store.exposures.all()
    assert found.decided_by == "hmm" and found.windows[0].posterior_near is not None
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0


def test_exposures_explain_shows_the_posterior(tmp_path):
    cfg = tmp_path / "ctagent.toml"
    env = {"CTAGENT_CONFIG": str(cfg)}
    r = CliRunner().invoke(cli.main, ["init", "--data-dir", str(tmp_path / "data"), "--radio", "sim"], env=env)
    assert r.exit_code == 0, r.output
    today = utc_day(time.time())  # the CLI runs on the real clock
    crowd = {today * DAY // 60 + 600 + k: HeardMinute(today * DAY // 60 + 600 + k, 4, (-58, -70, -75, -80))
             for k in range(20)}
    (day,) = decide(windows([47.0] * 20, today * DAY + 36000, [-58.0] * 20), HMM, heard=crowd)
    from agent.records import Exposure
    with Store.open(tmp_path / "data" / "agent.db", KeyFile(tmp_path / "data" / "master.key")) as store:
        store.exposures.add(Exposure(day=day.day, protocol="gaen", decided_by=day.rule, found_at=time.time(),
                                     minutes=round(day.minutes, 1), threshold_min=15.0, key_rolling_start=1,
                                     windows=day.windows))
    r = CliRunner().invoke(cli.main, ["exposures", "--explain"], env=env)
    assert r.exit_code == 0, r.output
    assert "hmm" in r.output and "P(near) 0." in r.output and "0 of 4 heard stronger" in r.output
    assert "dB vs recent median" in r.output
    doc = json.loads(CliRunner().invoke(cli.main, ["exposures", "--explain", "--json"], env=env).output)
    w = doc[0]["windows"][5]
    assert doc[0]["decided_by"] == "hmm" and 0 < w["posterior_near"] <= 1 and w["stronger"] == 0 and w["heard"] == 4
