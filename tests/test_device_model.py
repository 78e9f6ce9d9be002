"""The device's model: detected at init, a misspelt or unknown one named with the
nearest known models instead of silently getting the default calibration, and the list
of known models."""

from __future__ import annotations

import json

from click.testing import CliRunner

import cli
from agent.device import detect_device_model
from agent.exposure.calibration import CalibrationTable, bundled_calibration_path


def test_detects_a_raspberry_pi_and_a_laptop(tmp_path):
    pi = tmp_path / "pi"
    (pi / "proc/device-tree").mkdir(parents=True)
    (pi / "proc/device-tree/model").write_bytes(b"Raspberry Pi 3 Model B Rev 1.2\x00")
    assert detect_device_model(pi) == "Raspberry Pi 3 Model B Rev 1.2"
    laptop = tmp_path / "laptop"
    (laptop / "sys/class/dmi/id").mkdir(parents=True)
    (laptop / "sys/class/dmi/id/sys_vendor").write_text("LENOVO\n")
    (laptop / "sys/class/dmi/id/product_name").write_text("20XW0026GE\n")
    assert detect_device_model(laptop) == "LENOVO 20XW0026GE"
    assert detect_device_model(tmp_path / "nothing") is None


def test_nearest_known_models():
    table = CalibrationTable.load(bundled_calibration_path())
    assert table.nearest("Rasberry Pi 3 Modle B")[0] == "Raspberry Pi 3 Model B"
    assert table.known("Raspberry Pi 3 Model B Rev 1.2")  # a revision suffix is the same model
    assert not table.known("Rasberry Pi 3 Modle B")


def test_init_names_an_unknown_model_and_status_says_the_default_is_used(tmp_path):
    env = {"CTAGENT_CONFIG": str(tmp_path / "ctagent.toml")}
    r = CliRunner().invoke(cli.main, ["init", "--data-dir", str(tmp_path / "data"), "--radio", "sim",
                                      "--device-model", "Rasberry Pi 3 Modle B"], env=env)
    assert r.exit_code == 0, r.output
    assert "not in the calibration list" in r.output and "Raspberry Pi 3 Model B" in r.output
    assert 'device_model = "Rasberry Pi 3 Modle B"' in (tmp_path / "ctagent.toml").read_text()
    st = json.loads(CliRunner().invoke(cli.main, ["status", "--json"], env=env).output)
    assert st["calibration"]["model"] == "unknown" and st["calibration"]["confidence"] == 0
    assert "ctagent.toml: [agent] device_model" in st["calibration"]["warning"]
    assert "default calibration" in CliRunner().invoke(cli.main, ["status"], env=env).output


def test_calibration_list():
    r = CliRunner().invoke(cli.main, ["calibration", "list", "--search", "raspberry"])
    assert r.exit_code == 0 and "Raspberry Pi 3 Model B" in r.output and "Intel" not in r.output
    rows = json.loads(CliRunner().invoke(cli.main, ["calibration", "list", "--json"]).output)
    assert {"model", "rssi_correction", "tx_power", "confidence"} <= set(rows[0])
