"""The rule on recorded data: the plain sightings format and a slice of real measurements."""

import csv
import json

import pytest
from click.testing import CliRunner

import cli
from agent.exposure.calibration import CalibrationTable, bundled_calibration_path
from agent.exposure.evaluate import EvalInputError, evaluate, read_sightings_csv
from agent.exposure.rule import ProximityConfig

from .conftest import DATA


def nist_as_sightings(path, pair, start_h=0.0, hours=1.0):
    rows = list(csv.DictReader(open(path)))
    t0 = float(rows[0]["Timestamp"]) + start_h * 3600
    out = []
    for r in rows:
        t = float(r["Timestamp"])
        if t0 <= t < t0 + hours * 3600:
            out.append(f"{pair},{t},{r['RSSI']},4,Raspberry Pi 3 Model B Rev 1.2,Raspberry Pi 3 Model B")
    return out


@pytest.fixture
def sightings_file(tmp_path):
    lines = ["pair,timestamp,rssi,tx_power,receiver_model,transmitter_model"]
    lines += nist_as_sightings(DATA / "nist" / "ContactTracingData_100cm_Device_A.csv", "one_metre", 1.0, 1.0)
    lines += nist_as_sightings(DATA / "nist" / "ContactTracingData_300cm_Device_A.csv", "three_metres", 1.0, 1.0)
    body = lines[1:]
    body.reverse()  # rows of a pair in any order
    p = tmp_path / "s.csv"
    p.write_text("\n".join([lines[0]] + body) + "\n")
    return p


def test_real_measurements_one_metre_vs_three(sightings_file):
    pairs = read_sightings_csv(sightings_file.read_text())
    res = {r.pair: r for r in evaluate(pairs, ProximityConfig(), CalibrationTable.load(bundled_calibration_path()))}
    assert res["one_metre"].exposed and res["one_metre"].minutes_counted >= 15
    assert not res["three_metres"].exposed and res["three_metres"].minutes_counted < 15
    assert res["one_metre"].receiver_confidence == 2  # prefix match of the Pi model string


def test_eval_cli_table_and_json(sightings_file):
    r = CliRunner().invoke(cli.main, ["eval", "--input", str(sightings_file), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    by = {p["pair"]: p for p in doc["pairs"]}
    assert by["one_metre"]["exposed"] is True and by["three_metres"]["exposed"] is False
    r = CliRunner().invoke(cli.main, ["eval", "--input", str(sightings_file)])
    assert r.exit_code == 0 and "one_metre" in r.output and "EXPOSED" in r.output


def test_eval_cli_hmm_rule(sightings_file):
    """The hmm rule on recorded pairs: no minute context in the file, so attenuation and
    each pair's own recent median; 1 m counts more expected near minutes than 3 m."""
    r = CliRunner().invoke(cli.main, ["eval", "--input", str(sightings_file), "--rule", "hmm", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    by = {p["pair"]: p for p in doc["pairs"]}
    assert doc["rule"] == "hmm" and not by["three_metres"]["exposed"]
    assert by["one_metre"]["minutes_counted"] > 2 * by["three_metres"]["minutes_counted"]


@pytest.mark.parametrize("text,msg", [
    ("", "empty"),
    ("pair,timestamp,rssi\n", "missing column"),
    ("pair,timestamp,rssi,tx_power\na,notatime,-50,1\n", "line 2"),
    ("pair,timestamp,rssi,tx_power\n", "no sightings"),
])
def test_bad_input_is_one_clear_error(tmp_path, text, msg):
    with pytest.raises(EvalInputError, match=msg):
        read_sightings_csv(text)
    p = tmp_path / "bad.csv"
    p.write_text(text)
    r = CliRunner().invoke(cli.main, ["eval", "--input", str(p)])
    assert r.exit_code != 0 and "Traceback" not in r.output and msg.split()[0] in r.output
