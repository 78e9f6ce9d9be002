import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.exposure.aggregate import Aggregator
from agent.exposure.calibration import CalibrationError, CalibrationTable, DeviceCalibration
from agent.exposure.encounter import Encounter, Sighting
from agent.exposure.engine import decide_matches
from agent.exposure.matching import EncounterIndex, MatchStats, match_keys
from agent.errors import ConfigError
from agent.exposure.rule import ProximityConfig, WindowObservation, decide
from agent.protocol import gaen
from agent.protocol.export import DiagnosisKey

from .conftest import DATA
from .helpers import DAY, MIDNIGHT

T0 = MIDNIGHT


# --- aggregation ------------------------------------------------------------------

def test_aggregation_per_rpi_minute_power_mean():
    agg = Aggregator(window_s=60)
    r = b"r" * 16
    for t, rssi in [(T0 + 1, -50), (T0 + 2, -60), (T0 + 61, -70), (T0 + 3, 127)]:
        agg.add(Sighting(t, r, b"aaaa", rssi))
    assert agg.stats.dropped_rssi == 1
    (e,) = agg.flush(T0 + 100)
    assert [w.count for w in e.windows] == [2, 1]
    # power-domain mean of -50 and -60 dBm is -52.6 dBm, not -55
    assert e.windows[0].rssi_mean == pytest.approx(-52.596, abs=1e-3)
    assert e.windows[0].rssi_max == -50
    assert (e.first_seen, e.last_seen) == (T0 + 1, T0 + 61)
    assert agg.flush(T0 + 100) == [] and len(agg) == 1
    agg.flush(T0 + 61 + 301)
    assert len(agg) == 0  # closed after 5 silent minutes


def test_out_of_order_samples_and_serialisation():
    e = Encounter(b"x" * 16, b"yyyy", T0 + 130, T0 + 130, 60)
    e.add(T0 + 130, -60)
    e.add(T0 + 10, -70, tx_power=-8)
    e.add(T0 + 70, -65)
    assert [w.index for w in e.windows] == [T0 // 60, T0 // 60 + 1, T0 // 60 + 2]
    back = Encounter.from_bytes(e.to_bytes())
    assert back.rpi == e.rpi and back.tx_power == -8 and back.first_seen == T0 + 10
    assert [(w.index, w.count, w.rssi_max, round(w.rssi_mean)) for w in back.windows] == \
        [(w.index, w.count, w.rssi_max, round(w.rssi_mean)) for w in e.windows]



def _record_of_schema_6(e: Encounter) -> bytes:
    """Encounter.to_bytes as commit a9bd506 wrote it (the reference the compact record is
    checked against): float64 times, the first window's index as int64, 6 bytes a window."""
    import math
    import struct
    base = e.windows[0].index if e.windows else int(e.first_seen // e.window_s)
    tx = -128 if e.tx_power is None else max(-127, min(127, e.tx_power))
    out = [struct.pack("<ddbHB", e.first_seen, e.last_seen, tx, e.window_s, 0), e.rpi, e.aem, struct.pack("<q", base)]
    for w in e.windows:
        mean = round(10.0 * math.log10(w.power_sum_mw / w.count))
        out.append(struct.pack("<HHbb", w.index - base, min(w.count, 0xFFFF), max(-128, min(127, mean)),
                               max(-128, min(127, w.rssi_max))))
    return b"".join(out)


def _fields(e: Encounter) -> tuple:
    """Every field of an encounter, times as their float64 bits (0.0 and -0.0 differ)."""
    import struct
    return (e.rpi, e.aem, struct.pack("<dd", e.first_seen, e.last_seen), e.window_s, e.tx_power,
            [(w.index, w.count, struct.pack("<d", w.power_sum_mw), w.rssi_max) for w in e.windows])


_REAL_TIMES = st.floats(1.1e9, 4.2e9)  # 2004-2103: the ticks' range
_ANY_TIMES = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=400, deadline=None)
@given(first=st.one_of(_REAL_TIMES, _ANY_TIMES, st.sampled_from([0.0, -0.0, 1.0, 2.0**30, 2.0**32 - 2**-20])),
       span=st.one_of(st.floats(0, 3600), st.floats(-600, 13 * 86400), _ANY_TIMES),
       window_s=st.sampled_from([1, 30, 60, 120, 65535]), tx=st.one_of(st.none(), st.integers(-200, 200)),
       offsets=st.lists(st.integers(0, 300), max_size=30), shift=st.integers(-200, 200),
       counts=st.lists(st.sampled_from([1, 2, 30, 255, 256, 70000]), min_size=30, max_size=30),
       rssis=st.lists(st.integers(-130, 30), min_size=30, max_size=30))
def test_the_record_gives_back_exactly_what_schema_6_did(first, span, window_s, tx, offsets, shift, counts, rssis):
    """The compact record reads back exactly what the record written before it read back
    (times bit for bit, windows, TX power): over real times and any floats, clocks that
    went back, long encounters, wide windows; and it is the compact form, 37 bytes and 4 a
    window, when the times are a real clock's and the windows are narrow."""
    from agent.exposure.encounter import ScanWindow
    last = first + span
    if abs(first) > 2.0**62 or abs(last) > 1e300:  # the first window's index is an int64 in both forms
        return
    base = int(first // window_s) + shift
    windows = [ScanWindow(base + o, c, c * 10 ** (r / 10), r) for o, c, r in zip(sorted(set(offsets)), counts, rssis)]
    e = Encounter(bytes(range(16)), b"\x01\x02\x03\x04", first, last, window_s, tx, windows)
    got = Encounter.from_bytes(e.to_bytes())
    assert _fields(got) == _fields(Encounter.from_bytes(_record_of_schema_6(e)))
    assert Encounter.from_bytes(got.to_bytes()).to_bytes() == got.to_bytes()
    narrow = all(w.count <= 255 and w.index - windows[0].index <= 255 for w in windows)
    near = not windows or abs(windows[0].index - int(first) // window_s) <= 127  # the first window near the first time
    if 1.1e9 <= first < 4.2e9 and 0 <= span < 86400 and near and narrow:
        assert len(e.to_bytes()) == 37 + 4 * len(windows)
    assert len(e.to_bytes()) % 2 == 1 and len(_record_of_schema_6(e)) % 2 == 0


def test_a_ten_minute_encounter_is_77_bytes_and_a_busy_scanner_keeps_its_counts():
    e = Encounter(b"r" * 16, b"a" * 4, T0 + 0.3, T0 + 0.3)
    for k in range(600):
        e.add(T0 + 0.3 + k + k / 1e3, -60 - k % 20)
    assert len(e.to_bytes()) == 37 + 4 * 10 == 77
    assert _fields(Encounter.from_bytes(e.to_bytes())) == _fields(Encounter.from_bytes(_record_of_schema_6(e)))
    for k in range(300):  # 300 samples in the last minute: its count needs two bytes, and so all windows
        e.add(T0 + 600 + k / 5, -50)
    assert len(e.to_bytes()) == 37 + 6 * 11
    assert Encounter.from_bytes(e.to_bytes()).windows[-1].count == 300
    with pytest.raises(ValueError, match="malformed"):
        Encounter.from_bytes(b"\x30" + e.to_bytes()[1:])  # an unknown mark


# --- calibration ------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 4))
def test_a_block_of_samples_aggregates_exactly_as_one_sample_after_another(seed, blocks):
    """``add_block`` (the demo's path) and ``add_raw`` (the daemon's) give the same
    encounters bit for bit: windows, power sums, first and last times, the stored bytes;
    across blocks that split a window, out-of-order times and unusable RSSI values."""
    rng = np.random.default_rng(seed)
    ids = [(bytes(rng.integers(0, 256, 16, dtype=np.uint8)), bytes(rng.integers(0, 256, 4, dtype=np.uint8)))
           for _ in range(6)]
    one, many = Aggregator(), Aggregator()
    t0 = MIDNIGHT + 3600 + float(rng.uniform(0, 60))
    for b in range(blocks):
        n = int(rng.integers(0, 400))
        times = t0 + b * 90 + rng.uniform(0, 150, n)  # blocks overlap: later blocks reach back into windows
        who = rng.integers(0, len(ids), n)
        rssi = rng.integers(-100, -30, n)
        rssi[rng.random(n) < 0.05] = rng.choice([127, -127, -128, 21])  # unavailable or impossible
        for t, i, r in zip(times.tolist(), who.tolist(), rssi.tolist()):
            one.add_raw(t, ids[i][0], ids[i][1], r)
        many.add_block(times, who, rssi, dict(enumerate(ids)))
        now = t0 + b * 90 + 200
        assert sorted(e.rpi for e in one.flush(now)) == sorted(e.rpi for e in many.flush(now))
    assert one.stats == many.stats
    assert one._open.keys() == many._open.keys()
    for rpi, a in one._open.items():
        b_ = many._open[rpi]
        assert (a.first_seen, a.last_seen, a.aem) == (b_.first_seen, b_.last_seen, b_.aem)
        assert [(w.index, w.count, w.power_sum_mw, w.rssi_max) for w in a.windows] == \
               [(w.index, w.count, w.power_sum_mw, w.rssi_max) for w in b_.windows]
        assert a.to_bytes() == b_.to_bytes()


def test_google_lists_load():
    t = CalibrationTable.load(DATA / "en-calibration-2020-12-14.csv")
    assert len(t) > 500
    old = CalibrationTable.from_csv_text(
        "oem,model,rssi correction (android rssi + rssi correction = iphone rssi),"
        "tx (as iphone would report for same power),has direct measurement\n"
        "Google,Pixel 4,3,-25,yes\n")
    assert old.lookup("pixel 4").confidence == 2
    t = CalibrationTable.load(DATA / "en-calibration-2020-12-14.csv")
    assert t.lookup("ASUS_A001") == DeviceCalibration("ASUS_A001", 9.0, -25.0, 3, "asus", "ASUS_A001")
    assert t.lookup("no such phone") is t.default and t.default.confidence == 0


def test_bundled_hardware_calibration():
    from agent.exposure.calibration import bundled_calibration_path
    t = CalibrationTable.load(bundled_calibration_path())
    assert t.lookup("Raspberry Pi 3 Model B").confidence >= 1
    assert t.lookup("raspberry pi 3 model b").model == "Raspberry Pi 3 Model B"


def test_bad_calibration_file(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(CalibrationError, match="header"):
        CalibrationTable.load(p)
    p.write_text("oem,device,model,rssi_correction,tx,calibration_confidence\nx,y,z,notanumber,1,1\n")
    with pytest.raises(CalibrationError, match="bad row"):
        CalibrationTable.load(p)


# --- the rule -------------------------------------------------------------------

def obs(minutes, att, start=T0, step=60):
    return [WindowObservation(start + k * step, step, 4, att, att - 3) for k in range(minutes)]


def test_distance_model_round_trip():
    c = ProximityConfig()
    assert c.distance_m(c.attenuation_at_1m_db) == pytest.approx(1.0)
    assert c.distance_m(c.attenuation_at(3.0)) == pytest.approx(3.0)


def test_exactly_fifteen_minutes_is_exposure_fourteen_is_not():
    c = ProximityConfig()
    near = c.attenuation_at(0.8)
    (d,) = decide(obs(15, near), c)
    assert d.exposed and d.minutes == 15
    (d,) = decide(obs(14, near), c)
    assert not d.exposed and d.minutes == 14
    (d,) = decide(obs(60, c.attenuation_at(1.5)), c)
    assert not d.exposed and d.minutes == 0


def test_minutes_sum_over_separate_stretches_and_gap_fill():
    c = ProximityConfig(gap_fill_windows=2)
    near = c.attenuation_at(0.5)
    windows = obs(5, near) + obs(5, near, start=T0 + 3600) + obs(3, near, start=T0 + 7200)
    (d,) = decide(windows, c)
    assert d.minutes == 13 and not d.exposed
    # two missed scans inside a stretch are filled; three are not
    w = obs(6, near)
    gappy = w[:2] + w[4:]
    assert decide(gappy, c)[0].minutes == 6
    assert decide(obs(2, near) + obs(2, near, start=T0 + 5 * 60), c)[0].minutes == 4


def test_windows_spanning_midnight_split_by_day():
    c = ProximityConfig()
    near = c.attenuation_at(0.5)
    d1, d2 = decide(obs(20, near, start=T0 + DAY - 10 * 60), c)
    assert (d1.day, d1.minutes, d2.day, d2.minutes) == (20000, 10, 20001, 10)
    assert not d1.exposed and not d2.exposed


def test_bucket_rule_weights():
    c = ProximityConfig(rule="buckets")
    (d,) = decide(obs(15, 50.0), c)  # immediate: 1.0 x 15
    assert d.minutes == 15 and d.exposed
    (d,) = decide(obs(20, 60.0), c)  # medium: 0.25 x 20
    assert d.minutes == 5 and not d.exposed
    assert d.windows[0].bucket == 2
    (d,) = decide(obs(10, 55.0) + obs(10, 50.0, start=T0 + 600), c)  # near 0.5 x 10 + immediate 10
    assert d.minutes == 15 and d.exposed


def test_config_validation():
    with pytest.raises(ConfigError):
        ProximityConfig(rule="magic")
    with pytest.raises(ConfigError):
        ProximityConfig(bucket_weights=(1.0,))
    with pytest.raises(ConfigError, match="unknown"):
        ProximityConfig.from_mapping({"distance_treshold_m": 2})
    cfg = ProximityConfig.from_mapping({"distance_threshold_m": 2, "bucket_weights": [1, 1, 1, 0]})
    assert cfg.distance_threshold_m == 2


# --- matching ---------------------------------------------------------------------

def broadcast(tek, start_enin, minutes, *, tx=-10, rssi=-55, clock_skew_s=0.0, aem_override=None):
    """Encounters a receiver stores from a peer using ``tek`` from ``start_enin``."""
    rpik, aemk = gaen.derive_rpik(tek), gaen.derive_aemk(tek)
    agg = Aggregator()
    t0 = start_enin * 600
    for s in range(0, minutes * 60, 4):
        t = t0 + s
        enin = gaen.en_interval_number(t)
        r = gaen.rpi(rpik, enin)
        aem = aem_override if aem_override is not None else gaen.encrypt_aem(aemk, r, gaen.metadata(tx))
        agg.add_raw(t + clock_skew_s, r, aem, rssi)
    return agg.flush(t0 + minutes * 60 + 1e6, final=True)


def noise(n, seed=1):
    rng = random.Random(seed)
    return [Encounter(rng.randbytes(16), rng.randbytes(4), T0 + i, T0 + i + 60) for i in range(n)]


def test_match_decrypts_tx_power_and_decides():
    tek = bytes(range(16))
    rs = T0 // 600
    encs = broadcast(tek, rs + 50, 30, tx=-10, rssi=-60)
    index = EncounterIndex(encs + noise(500))
    keys = [DiagnosisKey(tek, rs), DiagnosisKey(b"z" * 16, rs)]
    st = MatchStats()
    (m,) = match_keys(keys, index, stats=st)
    assert len(m.hits) == len(encs) and {h.tx_power_dbm for h in m.hits} == {-10}
    # calibrated receiver: attenuation = -10 - (-60 + 0) = 50 dB = 1 m by default
    cfg = ProximityConfig(distance_threshold_m=1.01)
    (dec,) = decide_matches([m], cfg, DeviceCalibration("rx", 0.0, -10, 2))
    assert dec.exposed and dec.day.minutes == 30
    exposure = dec.to_exposure(found_at=T0)
    assert exposure.minutes == 30 and exposure.key_rolling_start == rs and exposure.protocol == "gaen"
    assert exposure.windows[0].distance_m == pytest.approx(1.0, abs=0.02)
    assert tek.hex() not in repr(exposure) and tek.hex() not in exposure.to_bytes().decode()


def test_clock_skew_within_tolerance_only():
    tek = b"\x01" * 16
    rs = T0 // 600
    ok = broadcast(tek, rs + 30, 15, clock_skew_s=+100 * 60)   # receiver clock 100 min ahead
    bad = broadcast(tek, rs + 80, 15, clock_skew_s=-180 * 60)  # 3 hours behind
    (m,) = match_keys([DiagnosisKey(tek, rs)], EncounterIndex(ok + bad))
    assert len(m.hits) == len(ok) and m.rejected_time == len(bad)


def test_malformed_aem_is_rejected():
    tek = b"\x02" * 16
    rs = T0 // 600
    encs = broadcast(tek, rs + 10, 10, aem_override=b"\x00\x00\x00\x00")  # decrypts to garbage
    m = match_keys([DiagnosisKey(tek, rs)], EncounterIndex(encs))
    bad = sum(x.rejected_metadata for x in m)
    good = sum(len(x.hits) for x in m)
    assert bad + good == len(encs) and bad >= 1
    for x in m:
        for h in x.hits:  # whatever got through decrypted to version 1 metadata
            assert -128 <= h.tx_power_dbm <= 127


def test_keys_outside_the_store_window_skip_cryptography(monkeypatch):
    import agent.exposure.matching as mm
    encs = broadcast(b"\x03" * 16, T0 // 600, 10)
    calls = []
    real = mm._rpik
    monkeypatch.setattr(mm, "_rpik", lambda k: calls.append(k) or real(k))
    st = MatchStats()
    far = [DiagnosisKey(bytes([i]) * 16, T0 // 600 - 144 * 3) for i in range(50)]
    assert match_keys(far, EncounterIndex(encs), stats=st) == []
    assert st.skipped_no_overlap == 50 and calls == []


def test_parallel_equals_serial():
    rs = T0 // 600
    teks = [bytes([i, 7]) * 8 for i in range(40)]
    encs = []
    for i, t in enumerate(teks[:10]):
        encs += broadcast(t, rs + i * 5, 5)
    keys = [DiagnosisKey(t, rs) for t in teks]
    keys += [DiagnosisKey(random.Random(i).randbytes(16), rs) for i in range(20_000)]
    index = EncounterIndex(encs + noise(3000))
    serial = match_keys(keys, index, workers=1, native=False)
    parallel = match_keys(keys, index, workers=2, native=False)
    native = match_keys(keys, index, workers=2)  # the C kernel when it was built
    want = [(m.key.key_data, len(m.hits)) for m in serial]
    assert [(m.key.key_data, len(m.hits)) for m in parallel] == want
    assert [(m.key.key_data, len(m.hits)) for m in native] == want
    assert len(serial) == 10


def test_native_kernel_is_built_here():
    import shutil
    import agent.exposure.matching as mm
    import os
    if shutil.which("cc") is None or not os.path.exists("/usr/include/openssl/evp.h"):
        pytest.skip("no C compiler or OpenSSL headers: the pure-Python matcher is used")
    assert mm._fastmatch is not None, "setup.py should have built agent/exposure/_fastmatch"


def test_incremental_serialisation_equals_a_fresh_one():
    """to_bytes keeps the packing of the windows before the last (an open encounter is
    rewritten every flush): after any sequence of samples, in order or not, and when a
    window outgrows the narrow form, it writes what a fresh encoding of the same windows
    writes."""
    rng = random.Random(3)
    for _ in range(50):
        e = Encounter(b"r" * 16, b"a" * 4, T0, T0)
        t = T0
        for _ in range(rng.randint(1, 60)):
            t += rng.choice([0.1, 1, 5, 30, 61, 200])
            ts = t - rng.choice([0, 0, 0, 90, 300])  # sometimes late (scanner batching)
            for _ in range(rng.choice([1, 1, 1, 300])):  # sometimes a busy scanner: counts over 255
                e.add(ts, rng.randint(-90, -40))
            if rng.random() < 0.3:
                got = e.to_bytes()
                fresh = Encounter(e.rpi, e.aem, e.first_seen, e.last_seen, e.window_s, e.tx_power,
                                  [type(w)(w.index, w.count, w.power_sum_mw, w.rssi_max) for w in e.windows])
                assert got == fresh.to_bytes()
        assert Encounter.from_bytes(e.to_bytes()).to_bytes() == e.to_bytes()
