"""Field experiments: the Parquet writer (read back by DuckDB), research recording in the
daemon (virtual clock, duty cycle), collection into a bundle, its manifest and checksums."""

import asyncio
import json
import random

import numpy as np
import pytest

from agent.ble.base import Radio
from agent.ble.sim import SimAdvertiser, SimScanner
from agent.clock import VirtualClock
from agent.daemon import Daemon
from agent.errors import InputFileError
from agent.experiment.bundle import TABLES, verify_bundle
from agent.timesync import ClockGuard, ClockState
from agent.experiment.collect import collect
from agent.experiment.parquet import Column, write_table
from agent.experiment.recording import ResearchRecorder
from agent.exposure.calibration import DeviceCalibration
from agent.modes.base import DeviceContext
from agent.modes.gaen import GaenMode
from agent.store import Store

from .helpers import DAY, MIDNIGHT, fast_passphrase

duckdb = pytest.importorskip("duckdb")
PI = DeviceCalibration("Raspberry Pi 3 Model B", 0.0, 4.0, 2)


def test_parquet_writer_read_back_by_duckdb(tmp_path):
    n = 300_000  # more than one page
    schema = [Column("t", "double"), Column("i", "int32"), Column("big", "int64"), Column("f", "fixed4"),
              Column("s", "string"), Column("b", "binary", nullable=True), Column("d", "double", nullable=True),
              Column("ok", "bool"), Column("o", "bool", nullable=True)]
    cols = {"t": np.arange(n) * 0.25, "i": np.arange(n) % 7 - 3, "big": np.arange(n) * 10**10,
            "f": [bytes([k % 256]) * 4 for k in range(n)], "s": [f"é{k % 3}" for k in range(n)],
            "b": [None if k % 2 else b"\x00xy" for k in range(n)], "d": np.where(np.arange(n) % 3, 1.5, np.nan),
            "ok": np.arange(n) % 2 == 0, "o": [None if k % 5 == 0 else k % 2 == 1 for k in range(n)]}
    write_table(tmp_path / "x.parquet", schema, cols, key_value={"k": "v"})
    db = duckdb.connect()
    got = db.execute(f"SELECT count(*), sum(t), sum(i), sum(big), min(f), max(s), count(b), sum(d), "
                     f"sum(ok::INT), count(o), sum(o::INT) FROM '{tmp_path / 'x.parquet'}'").fetchone()
    assert got == (n, float(cols["t"].sum()), int(cols["i"].sum()), sum(range(n)) * 10**10, b"\0" * 4, "é2",
                   n // 2, 1.5 * (n - (n + 2) // 3), n // 2, n - n // 5,
                   sum(1 for k in range(n) if k % 5 and k % 2 == 1))
    assert db.execute(f"SELECT b, d FROM '{tmp_path / 'x.parquet'}' LIMIT 2").fetchall() == [(b"\x00xy", None),
                                                                                             (None, 1.5)]
    empty = tmp_path / "empty.parquet"
    write_table(empty, schema[:2], {"t": [], "i": []})
    assert db.execute(f"SELECT count(*) FROM '{empty}'").fetchone() == (0,)


async def test_daemon_records_research_and_collect_writes_a_verified_bundle(tmp_path):
    clock = VirtualClock(MIDNIGHT + 9 * 3600)
    store = Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock, research_retention_days=2)
    rng = random.Random(1)
    mode = GaenMode(DeviceContext(store=store, clock=clock, calibration=PI, rng=rng, random_bytes=rng.randbytes))
    scanner = SimScanner(clock, peer_factory=GaenMode.simulated_peer, peers=3, seed=2, tick_s=4)
    research = ResearchRecorder(store, started_at=clock.now())
    daemon = Daemon(mode, Radio(SimAdvertiser(clock), scanner), clock=clock, rng=random.Random(3),
                    flush_interval_s=60, duty_cycle=(20.0, 10.0), research=research,
                    clock_guard=ClockGuard(lambda now: ClockState(now, True, False, "sim", 0.5, 0.25), policy="off"))
    run = asyncio.create_task(daemon.run(install_signals=False))
    await clock.run_until(MIDNIGHT + 9 * 3600 + 1800)
    daemon.stop()
    assert await asyncio.wait_for(run, 5) == 0
    assert research.recorded == daemon.sightings > 100  # every advertisement heard, none summarised away

    store = Store.open(tmp_path / "agent.db", fast_passphrase(), clock=clock, read_only=True)
    mode = GaenMode(DeviceContext(store=store, clock=clock, calibration=PI))
    out = tmp_path / "bundle"
    m = collect(store, mode, out, experiment_id="exp1", device_label="pi-01", device_model=PI.model,
                consent_at="2024-10-04T08:00:00Z", now=clock.now())
    store.close()
    assert verify_bundle(out).device_label == "pi-01" and m.protocol == "gaen"
    assert set(m.tables) == {f"{t}.parquet" for t in TABLES}
    assert oct((out / "sightings.parquet").stat().st_mode & 0o777) == "0o600"

    def q(sql):
        return duckdb.connect().execute(sql.replace("{b}", str(out))).fetchall()

    assert q("SELECT count(*) FROM '{b}/sightings.parquet'") == [(daemon.sightings,)]
    # each sighting's advert exists; three peers rotating every 10-15 min
    assert q("SELECT count(*) FROM '{b}/sightings.parquet' s ANTI JOIN '{b}/adverts.parquet' a USING (advert)") == \
        [(0,)]
    assert 3 <= q("SELECT count(*) FROM '{b}/adverts.parquet'")[0][0] <= 3 * 5
    assert q("SELECT kind, octet_length(id), period FROM '{b}/own_ids.parquet'") == [("tek", 16, 144)]
    assert q("SELECT count(*) >= 3, bool_and(new_identity) FROM '{b}/broadcasts.parquet'") == [(True, True)]
    # the duty cycle listens 10 s in 30: the windows say so, and so do the radio-down intervals
    scanning, span = q("SELECT sum(scanning_s), sum(\"end\" - start) FROM '{b}/windows.parquet'")[0]
    assert scanning / span == pytest.approx(1 / 3, abs=0.05)
    paused = q("SELECT sum(\"end\" - start) FROM '{b}/radio_down.parquet' WHERE kind = 'scan_paused'")[0][0]
    assert paused == pytest.approx(span - scanning, abs=1)
    assert q("SELECT DISTINCT clock_synchronized, clock_source, clock_offset_s FROM '{b}/windows.parquet'") == \
        [(False, "sim", 0.25)]
    with pytest.raises(InputFileError, match="not empty"):
        collect(Store.open(tmp_path / "agent.db", fast_passphrase(), clock=clock, read_only=True), mode, out,
                experiment_id="e", device_label="d", device_model="m", consent_at="", now=0)
    (out / "sightings.parquet").write_bytes((out / "sightings.parquet").read_bytes()[:-10])
    with pytest.raises(InputFileError, match="checksum"):
        verify_bundle(out)


def test_research_rows_are_encrypted_with_their_own_retention(tmp_path):
    clock = VirtualClock(MIDNIGHT + 3600)
    store = Store.create(tmp_path / "agent.db", fast_passphrase(), clock=clock, retention_days=14,
                         research_retention_days=2)
    rec = ResearchRecorder(store, started_at=clock.now())
    payload = bytes(range(20))
    rec.heard(clock.now(), "11:22:33:44:55:66", -60, None, payload)
    rec.flush(clock.now() + 60, ClockState(clock.now(), True, True, "sim"))
    assert store.research.count_by_kind() == {"sightings": 1, "window": 1}
    store.close()
    raw = (tmp_path / "agent.db").read_bytes() + (tmp_path / "agent.db-wal").read_bytes() \
        if (tmp_path / "agent.db-wal").exists() else (tmp_path / "agent.db").read_bytes()
    assert payload not in raw and b"11:22:33" not in raw
    clock.t += 2 * DAY  # past the research retention, within the agent's
    store = Store.open(tmp_path / "agent.db", fast_passphrase(), clock=clock, retention_days=14,
                       research_retention_days=2)
    assert store.research.count_by_kind() == {}
    assert json.loads(json.dumps(store.keyring.days())) == []
    store.close()


@pytest.mark.integration
def test_rehearsal_demo_bundles_analysed_give_the_demos_own_confusion_matrix(tmp_path):
    """Set-up, run, collect, analyse on one machine: the demo's devices record research
    data and hand over their bundles and the truth; the analysis (DuckDB, the agent's rule
    code on the research log, offline resolution from the TEKs) must reach, for every
    device hearing person 0, the decision the device itself reached by matching person
    0's published keys, and the truth the demo computed."""
    from agent.demo import run_demo
    from agent.experiment.analyze import analyze
    from agent.experiment.report import write_report

    demo = run_demo(devices=6, days=1, seed=5, out_dir=tmp_path, log=lambda m: None, png=False,
                    research_dir=tmp_path / "experiment")
    a = analyze(tmp_path / "experiment")
    assert all(d.offset_source == "beacon rotations" and abs(d.offset_s) < 1 for d in a.devices)
    assert all(d.resolved == d.sightings > 0 for d in a.devices)  # every sighting resolved to its sender
    person0 = [r for r in a.pair_days if r["transmitter"] == "device-00"]
    decided = {r["receiver"]: r["rule_exposed"] for r in person0}
    truly = {r["receiver"]: r["truly_exposed"] for r in person0}
    confusion = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for rx in decided:
        confusion[("t" if decided[rx] == truly[rx] else "f") + ("p" if decided[rx] else "n")] += 1
    assert confusion == {"tp": demo.tp, "fp": demo.fp, "fn": demo.fn, "tn": demo.tn}
    for row in demo.rows:  # device by device, and the minutes the device counted
        label = f"device-{row.device:02d}"
        assert (decided[label], truly[label]) == (row.notified, row.truly_exposed)
        if row.notified:
            assert max(r["rule_minutes"] for r in person0 if r["receiver"] == label) == \
                pytest.approx(row.minutes_counted, abs=0.05)
    index = write_report(a, tmp_path / "report", source="rehearsal", generated_at=0)
    page = index.read_text()
    assert page.count("data:image/png;base64,") == 5 and "Precision, recall, F1" in page
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["metrics"]["rule"]["tp"] + summary["metrics"]["rule"]["fn"] > 0
