import random

from agent.clock import DAY_SECONDS
from agent.protocol import gaen
from agent.protocol.gaen import TemporaryExposureKey
from agent.protocol.schedule import IdSchedule, random_nrpa

DAY0 = 1_700_006_400  # a UTC midnight


def make(seed=1, **kw):
    rng = random.Random(seed)
    return IdSchedule(tx_power_dbm=-10, rng=rng, tek_factory=lambda: rng.randbytes(16), **kw)


def run_day(sched, start=DAY0, end=DAY0 + DAY_SECONDS):
    now, rots = float(start), []
    while now < end:
        rots.append(sched.rotate(now))
        now = rots[-1].next_at
    return rots


def test_rotation_per_interval_with_unsynchronised_offsets():
    rots = run_day(make())
    assert len(rots) == 144
    gaps = [b.at - a.at for a, b in zip(rots[1:], rots[2:])]
    assert min(gaps) >= 300 and max(gaps) <= 900
    offsets = [r.at % 600 for r in rots[1:]]
    assert len({round(o) for o in offsets}) > 100  # not in step with the interval grid
    for r in rots:  # each RPI is the one of the interval it is broadcast in
        assert r.enin == gaen.en_interval_number(r.at)


def test_address_and_payload_rotate_together():
    rots = run_day(make())
    assert len({r.address for r in rots}) == len(rots) == len({r.payload.rpi for r in rots})
    for r in rots:
        assert int(r.address[:2], 16) >> 6 == 0  # non-resolvable private address


def test_payload_decrypts_to_tx_power():
    rots = run_day(make(), end=DAY0 + 3600)
    tek = rots[0].tek.key_data
    aemk = gaen.derive_aemk(tek)
    for r in rots:
        assert r.payload.rpi == gaen.rpi(gaen.derive_rpik(tek), r.enin)
        assert gaen.Metadata.from_bytes(gaen.decrypt_aem(aemk, r.payload.rpi, r.payload.aem)).tx_power_dbm == -10


def test_new_tek_at_utc_day_start_only():
    rots = run_day(make(), end=DAY0 + 3 * DAY_SECONDS)
    new = [r for r in rots if r.new_tek]
    assert len(new) == 3
    assert [r.tek.rolling_start_interval_number for r in new] == [gaen.rolling_start_for_day(DAY0 + d * DAY_SECONDS)
                                                                  for d in range(3)]
    assert len({r.tek.key_data for r in new}) == 3


def test_restart_keeps_the_days_tek():
    s1 = make(seed=1)
    first = s1.rotate(DAY0 + 100)
    s2 = make(seed=2)
    s2.load_tek(TemporaryExposureKey(first.tek.key_data, first.tek.rolling_start_interval_number))
    again = s2.rotate(DAY0 + 5000)
    assert not again.new_tek and again.tek.key_data == first.tek.key_data


def test_same_seed_same_schedule():
    a = [(r.at, r.address, r.payload) for r in run_day(make(7), end=DAY0 + 7200)]
    b = [(r.at, r.address, r.payload) for r in run_day(make(7), end=DAY0 + 7200)]
    assert a == b


def test_repr_hides_keys():
    r = make().rotate(DAY0)
    assert r.tek.key_data.hex() not in repr(r) and r.tek.key_data.hex() not in repr(r.tek)


def test_nrpa_format():
    rng = random.Random(3)
    for _ in range(100):
        a = random_nrpa(rng)
        assert len(a) == 17 and int(a[:2], 16) < 0x40
