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

    demo = run_demo(devices=6, days=1, seed=1, out_dir=tmp_path, log=lambda m: None, png=False,
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


# -- analysis on a synthetic experiment with known truth ---------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from agent.experiment.synthetic import write_synthetic_experiment

    folder = tmp_path_factory.mktemp("synthetic")
    truth = write_synthetic_experiment(folder, devices=4, hours=1.0, rate_hz=1.0, seed=3, noise_db=2.0)
    return folder, truth


def test_analysis_resolves_senders_estimates_clocks_and_calibration_fit_recovers_offsets(synthetic, tmp_path):
    from agent.experiment.analyze import analyze
    from agent.experiment.calibrate import fit_calibration
    from agent.exposure.calibration import CalibrationTable

    folder, truth = synthetic
    a = analyze(folder)
    assert sum(d.resolved for d in a.devices) == truth.sightings  # from the TEKs alone
    # beacon rotations give the clocks' offsets (relative to each other): at one sample a
    # second per pair, a rotation's moment is known to ~0.7 s, the mean of a dozen to ~0.3 s
    true = {d.label: truth.clock_offset[d.label] for d in a.devices}
    true_mean, est_mean = np.mean(list(true.values())), np.mean([d.offset_s for d in a.devices])
    for d in a.devices:
        assert d.offset_source == "beacon rotations"
        assert d.offset_s - est_mean == pytest.approx(true[d.label] - true_mean, abs=0.5)
    # the 5-minute scanner stall of dev-00 is in its radio-down intervals and listening time
    assert [k for k, _, _ in a.radio_down[0]] == ["scanner_stall"]
    assert min(a.scanning[0][2]) == 0.0 and min(a.scanning[1][2]) == 1.0
    assert fit_calibration(a, reference="dev-00").observations > 100  # from the walkers' truth too
    # a dedicated 1 m session (hardware/calibration.md, automated)
    from agent.experiment.synthetic import write_synthetic_experiment

    session = write_synthetic_experiment(tmp_path / "1m", devices=4, hours=0.5, rate_hz=1.0, seed=5,
                                         fixed_distance_m=1.0, noise_db=3.0)
    fit = fit_calibration(analyze(tmp_path / "1m"), distance_m=1.0, reference="dev-00")
    err = session.calibration_error
    for d in fit.devices:  # relative to the reference's true RX error, within 3 standard errors (+0.3 dB)
        assert d.rssi_correction == pytest.approx(err[d.label][1] - err["dev-00"][1],
                                                  abs=3 * d.rssi_correction_se + 0.3)
        assert d.tx_power == pytest.approx(4 + err[d.label][0] - err["dev-00"][1], abs=3 * d.tx_power_se + 0.3)
    (tmp_path / "fit.csv").write_text(fit.to_csv())
    table = CalibrationTable.load(tmp_path / "fit.csv")  # Google's format, as devices load it
    assert table.lookup("Synthetic").confidence == 2


def test_dp3t_round_trip_and_eval_csv_import(synthetic, tmp_path):
    import sqlite3

    from agent.experiment.analyze import analyze
    from agent.experiment.interchange import export_dp3t, import_dp3t, import_eval_csv

    folder, truth = synthetic
    db = tmp_path / "results.sqlite"
    n = export_dp3t(folder, db, [])
    assert n == truth.sightings
    con = sqlite3.connect(db)
    cols = [r[1] for r in con.execute("PRAGMA table_info(results)")]
    assert cols == ["db_id", "receiver_id", "receiver_model", "transmitter_id", "transmitter_model", "timestamp",
                    "rssi", "tx_power", "ground_truth_distance"]  # DP-3T's process_raw_data.py
    rows, with_distance, in_ms = con.execute("SELECT count(*), count(ground_truth_distance), min(timestamp) > 1e12 "
                                             "FROM results").fetchone()
    assert (rows, in_ms) == (n, 1) and with_distance >= 0.99 * n  # (none past the last position sample)
    con.close()
    back = import_dp3t(db, tmp_path / "imported", now=0)
    assert back == n
    orig, imported = analyze(folder), analyze(tmp_path / "imported")
    assert {d.label for d in imported.devices} == {"1", "2", "3", "4"}
    assert sum(d.resolved for d in imported.devices) == n
    close = [r["true_close_minutes"] for r in orig.pair_days]
    again = [r["true_close_minutes"] for r in imported.pair_days]
    assert sum(again) == pytest.approx(sum(close), rel=0.1)  # per-sample distances held until the next sample
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("pair,timestamp,rssi,tx_power\nA>B,1000,-60,4\nA>B,1001,-61,\nlone,1002,-70,4\n")
    assert import_eval_csv(csv_path, tmp_path / "from-csv", now=0) == 3
    from click.testing import CliRunner

    from cli import main

    r = CliRunner().invoke(main, ["experiment", "import", str(csv_path), "--out", str(tmp_path / "cli-csv")])
    assert r.exit_code == 0 and (tmp_path / "cli-csv" / "A" / "manifest.json").exists(), r.output
    a = analyze(tmp_path / "from-csv")
    assert sorted(d.label for d in a.devices) == ["A", "B", "lone:rx", "lone:tx"]
    with pytest.raises(InputFileError, match="not an SQLite database"):
        import_dp3t(csv_path, tmp_path / "x", now=0)
    sqlite3.connect(tmp_path / "other.sqlite").execute("CREATE TABLE t (x)")
    with pytest.raises(InputFileError, match="no DP-3T `results` table"):
        import_dp3t(tmp_path / "other.sqlite", tmp_path / "y", now=0)


def test_truth_readers_positions_markers_and_errors(tmp_path):
    from agent.experiment.resolve import marker_offsets
    from agent.experiment.truth import load_truth

    (tmp_path / "pos.csv").write_text("device,t,x,y\na,0,0,0\na,50,0,0\na,100,0,0\nb,0,0.5,0\nb,50,1.75,0\n"
                                      "b,100,3,0\nb,300,3,0\n")
    (tmp_path / "pairs.csv").write_text("a,b,start,end,distance_m\nc,d,0,120,0.5\nc,d,120,3600,2\n")
    (tmp_path / "markers.csv").write_text("marker,device,t\nclap,truth,1000\nclap,a,1000.5\nclap,b,999\n")
    truth, markers = load_truth([tmp_path / "pos.csv", tmp_path / "pairs.csv", tmp_path / "markers.csv"])
    assert truth.distance_at("a", "b", np.array([0.0, 25.0, 60.0])).tolist() == [0.5, 0.5, 1.75]
    assert np.isnan(truth.distance_at("a", "b", np.array([150.0]))[0])  # a is no longer tracked
    assert truth.close_seconds_by_day("d", "c", 1.0) == {0: 120.0}
    assert marker_offsets([(m.marker, m.device, m.t) for m in markers]) == {"a": 0.5, "b": -1.0}
    (tmp_path / "bad.csv").write_text("a,b,start,end,distance_m\nc,d,10,5,1\n")
    with pytest.raises(InputFileError, match="line 2"):
        load_truth([tmp_path / "bad.csv"])
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    with pytest.raises(InputFileError, match="not a ground-truth file"):
        load_truth([tmp_path / "other.csv"])


@pytest.mark.integration  # a subprocess, and the report's figures
def test_cli_experiment_join_mark_collect_analyze_and_calibration_fit(synthetic, tmp_path):
    import subprocess
    import sys

    from click.testing import CliRunner

    from cli import main

    folder, _ = synthetic
    runner = CliRunner()
    cfg = tmp_path / "c.toml"
    env = {"CTAGENT_CONFIG": str(cfg)}
    assert runner.invoke(main, ["init", "--radio", "sim", "--data-dir", str(tmp_path / "d")], env=env).exit_code == 0
    r = runner.invoke(main, ["experiment", "join", "exp-1", "--label", "pi-01"], env=env)
    assert r.exit_code == 1 and "consent" in r.output
    r = runner.invoke(main, ["experiment", "join", "exp-1", "--label", "pi-01", "--consent", "--carriage", "pocket"],
                      env=env)
    assert r.exit_code == 0, r.output
    assert 'id = "exp-1"' in cfg.read_text() and "consent_at = \"20" in cfg.read_text()
    assert runner.invoke(main, ["experiment", "mark", "clap-1"], env=env).exit_code == 0
    r = runner.invoke(main, ["experiment", "collect", "--out", str(tmp_path / "b"), "--consent", "--json"], env=env)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["device_label"] == "pi-01" and doc["carriage"] == "pocket"
    assert doc["tables"]["markers.parquet"]["rows"] == 1
    # the analysis from a subprocess, as a user runs it
    out = subprocess.run([sys.executable, "-m", "cli", "experiment", "analyze", str(folder), "--out",
                          str(tmp_path / "report"), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["devices"] == 4 and (tmp_path / "report" / "index.html").exists()
    r = runner.invoke(main, ["calibration", "fit", str(folder), "--reference", "dev-00", "--out",
                             str(tmp_path / "list.csv")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "list.csv").read_text().startswith("oem,device,model,rssi_correction,tx,calibration_confidence")
    r = runner.invoke(main, ["calibration", "fit", str(tmp_path / "b")])
    assert r.exit_code == 1 and "known distances" in r.output


def test_robert_hellos_resolve_to_their_sender_by_ebid():
    from agent.experiment.resolve import identifier_map, resolve_advert
    from agent.protocol import robert

    ebid_a, ebid_b = bytes(range(8)), bytes(range(8, 16))
    hello = robert.build_hello(b"\1" * 32, b"\7", ebid_b, robert.ntp_seconds(1_700_000_000))
    ids = identifier_map([("robert", [("ebid", ebid_a, 100, 1)], []),
                          ("robert", [], [robert.service_data(robert.build_hello(b"\2" * 32, b"\7", ebid_b, 0), 5)])])
    got = resolve_advert("robert", robert.service_data(hello, -7), ids)
    assert got is not None and (got.tx, got.tx_power, got.ident) == (1, -7.0, ebid_b)  # from b's own broadcasts
    assert resolve_advert("robert", robert.service_data(robert.build_hello(b"\1" * 32, b"\7", ebid_a, 0), 3),
                          ids).tx == 0  # from a's handed-over EBIDs
    assert resolve_advert("robert", b"\0" * 18, ids) is None


@pytest.mark.integration  # the report's figures
def test_analyze_reads_a_published_dp3t_file_unchanged(synthetic, tmp_path):
    from click.testing import CliRunner

    from agent.experiment.interchange import export_dp3t
    from cli import main

    folder, truth = synthetic
    export_dp3t(folder, tmp_path / "scenario.sqlite", [])
    r = CliRunner().invoke(main, ["experiment", "analyze", str(tmp_path / "scenario.sqlite"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["devices"] == 4 and doc["report"] == str(tmp_path / "scenario.sqlite.report" / "index.html")
    summary = json.loads((tmp_path / "scenario.sqlite.report" / "summary.json").read_text())
    assert sum(d["resolved"] for d in summary["devices"]) == truth.sightings and summary["has_truth"]
