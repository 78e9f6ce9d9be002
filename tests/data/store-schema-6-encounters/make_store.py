"""Run against a checkout of commit a9bd506 (its directory first on sys.path):
    git worktree add /tmp/oldwt a9bd506 && python make_store.py > expected.json
writes /tmp/oldstore6/agent.db and its keyring."""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, "/tmp/oldwt")
from agent.clock import ManualClock
from agent.exposure.aggregate import Aggregator
from agent.exposure.encounter import Encounter, ScanWindow
from agent.store import Passphrase, Store

d0 = 20430
clock = ManualClock((d0 + 1) * 86400 - 1800.25)
path = Path("/tmp/oldstore6/agent.db")
rng = random.Random(11)
with Store.create(path, Passphrase("old-store-6", scrypt={"n": 2**10, "r": 8, "p": 1}), clock=clock) as s:
    agg = Aggregator()
    rpis = []
    # an hour over midnight, times with sub-second parts as a real clock gives them
    for minute in range(60):
        t0 = clock.t + minute * 60
        if minute % 6 == 0:
            rpis.append(rng.randbytes(16))
        for k in range(40):
            for r in rpis[-3:]:
                agg.add_raw(t0 + k * 1.5 + rng.random(), r, rng.randbytes(4), rng.randint(-95, -40),
                            -7 if r == rpis[0] else None)
        if minute == 20:  # a late sample (scanner batching) reaching back two minutes
            agg.add_raw(t0 - 100.5, rpis[-1], bytes(4), -50)
        changed, closed = agg.flush_closing(t0 + 60)
        s.encounters.write(changed, closed=closed)
    # the last ones stay open: rows without an index entry (the daemon stopped by a power cut)
    # and a few written by hand: a busy scanner (over 255 samples a window), 30-second windows,
    # no tx power known, windows far from the first time, a clock that went back
    odd = []
    for first, last, window_s, counts, tx in [((d0 + 1) * 86400 + 100.0000001, (d0 + 1) * 86400 + 400.7, 60,
                                               [300, 1000, 70000], 4),
                                              ((d0 + 1) * 86400 + 7.25, (d0 + 1) * 86400 + 95.5, 30, [3, 9, 2, 1],
                                               None),
                                              ((d0 + 1) * 86400 + 3000.5, (d0 + 1) * 86400 + 3100.5, 60, [5, 6],
                                               -20),
                                              ((d0 + 1) * 86400 + 900.5, (d0 + 1) * 86400 + 850.25, 60, [1], 127)]:
        e = Encounter(rng.randbytes(16), rng.randbytes(4), first, last, window_s, tx)
        base = int(first // window_s) - (500 if tx == -20 else 0)
        e.windows = [ScanWindow(base + 2 * i, c, c * 10 ** (rng.randint(-95, -40) / 10), rng.randint(-90, -30))
                     for i, c in enumerate(counts)]
        odd.append(e)
    s.encounters.write(odd, closed=odd[:2])
    s.encounters.compact_index(before_day=d0 + 1)
    want = [{"row": e.row_id, "day": e.day, "rpi": e.rpi.hex(), "aem": e.aem.hex(), "first": e.first_seen.hex(),
             "last": e.last_seen.hex(), "window_s": e.window_s, "tx": e.tx_power,
             "windows": [[w.index, w.count, w.power_sum_mw.hex(), w.rssi_max] for w in e.windows]}
            for e in s.encounters.read()]
    arrays = s.encounters.matching_arrays()
    matching = sorted([r, arrays.rpis[16 * i:16 * i + 16].hex(), f, la] for i, (r, f, la) in enumerate(
        zip(arrays.row_ids.tolist(), arrays.first_enin.tolist(), arrays.last_enin.tolist())))
    lens = sorted(len(p) for _, _, p in s.rows.rows("encounters"))
print('{"encounters": [\n' + ",\n".join(json.dumps(e) for e in want) + "],\n"
      + '"matching": [\n' + ",\n".join(json.dumps(m) for m in matching) + "],\n"
      + '"record_lengths": ' + json.dumps(lens) + "}")
