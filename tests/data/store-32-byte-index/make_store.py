"""Run against a checkout of commit c52278d (its directory first on sys.path):
    git worktree add /tmp/oldwt c52278d && python make_store.py > expected.json
writes /tmp/oldstore/agent.db and its keyring."""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, "/tmp/oldwt")
from agent.clock import ManualClock
from agent.exposure.aggregate import Aggregator
from agent.store import Passphrase, Store

d0 = 20420
clock = ManualClock((d0 + 1) * 86400 - 3600)
path = Path("/tmp/oldstore/agent.db")
rng = random.Random(7)
rpis = []
with Store.create(path, Passphrase("old-store", scrypt={"n": 2**10, "r": 8, "p": 1}), clock=clock) as s:
    agg = Aggregator()
    for minute in range(120):
        t = clock.t + minute * 60
        if minute % 7 == 0:
            rpis.append(rng.randbytes(16))
        for r in rpis[-2:]:
            agg.add_raw(t, r, bytes(4), -60)
        changed, closed = agg.flush_closing(t + 60)
        s.encounters.write(changed, closed=closed)
    changed, closed = agg.flush_closing(clock.t + 200 * 60, final=True)
    s.encounters.write(changed, closed=closed)
    s.encounters.compact_index(before_day=d0 + 1)
    want = sorted([e.row_id, e.rpi.hex(), int(e.first_seen // 600), int(e.last_seen // 600)]
                  for e in s.encounters.read())
    lens = sorted(len(p) for _, _, p in s.rows.rows("encounter_index"))
print(json.dumps({"want": want, "index_row_lengths": lens}))
