"""The fleet playbook (hardware/fleet/experiment.yml) against two "hosts" on localhost
(ansible_connection: local), each with its own configuration and data folder, on a
shared simulated medium half a metre apart, daemons as background processes: install
from the working tree, configure, check, start, stop, collect, then analyse what came
back."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import wait_until

ROOT = Path(__file__).parent.parent
PLAYBOOK = ROOT / "hardware" / "fleet" / "experiment.yml"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) is None,
                                 reason="ansible-core is not installed (pip install 'ctagent[fleet]')")]


def playbook(inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "False",
           "ANSIBLE_LOCAL_TEMP": str(inventory.parent / "ansible-tmp"),
           "ANSIBLE_REMOTE_TEMP": str(inventory.parent / "ansible-tmp")}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(PLAYBOOK),
                           *args], capture_output=True, text=True, env=env, timeout=300)


def test_playbook_installs_configures_checks_starts_stops_and_collects(tmp_path):
    medium = subprocess.Popen([sys.executable, "-m", "cli", "sim-medium", "--socket", str(tmp_path / "medium.sock"),
                               "--position", "alice=0,0", "--position", "bob=0.5,0", "--tick", "0.5"],
                              cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp_path / "medium.sock").exists(), what="the simulated medium")
        venv = tmp_path / "venv"  # one machine: one installation for both devices
        hosts = {name: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                        "ctagent_config": str(tmp_path / name / "ctagent.toml"),
                        "ctagent_data_dir": str(tmp_path / name / "data"),
                        "ctagent_settings": [f"radio.sim_medium={tmp_path / 'medium.sock'}",
                                             f"radio.sim_name={name}", "agent.flush_interval_s=1",
                                             "agent.clock_check=\"off\""],
                        "carriage": carriage}
                 for name, carriage in (("alice", "hand"), ("bob", "pocket"))}
        hosts["bob"]["calibration_line"] = "acme,widget,Acme Widget,2.5,-10,2"
        hosts["bob"]["device_model"] = "Acme Widget"
        inventory = tmp_path / "inventory.yml"  # JSON is YAML
        inventory.write_text(json.dumps({"all": {"vars": {
            "experiment_id": "rehearsal-1", "ctagent_source": str(ROOT), "ctagent_pip_args": "--no-deps",
            "ctagent_extra_site_packages": site.getsitepackages()[0], "ctagent_venv": str(venv),
            "ctagent_radio": "sim", "ctagent_service": "process", "fleet_required_checks": [],
            "collect_dir": str(tmp_path / "collected"), "ctagent_controller": f"{sys.executable} -m cli"},
            "hosts": hosts}}))
        done = playbook(inventory, "--tags", "install", "--limit", "alice")
        assert done.returncode == 0, done.stdout[-3000:]
        done = playbook(inventory, "--tags", "configure,check,start")
        assert done.returncode == 0, done.stdout[-3000:]
        assert "bob: [['clock'," in done.stdout  # doctor's findings, per device
        toml = (tmp_path / "bob" / "ctagent.toml").read_text()
        assert 'id = "rehearsal-1"' in toml and 'device_label = "bob"' in toml and "calibration.csv" in toml
        assert 'device_model = "Acme Widget"' in toml and 'carriage = "pocket"' in toml

        def heard(name: str) -> int:
            status = tmp_path / name / "data" / "status.json"
            return json.loads(status.read_text() or "{}").get("sightings", 0) if status.exists() else 0

        wait_until(lambda: heard("alice") > 20 and heard("bob") > 20, timeout_s=60,
                   what="both daemons to hear each other")
        done = playbook(inventory, "--tags", "stop,collect")
        assert done.returncode == 0, done.stdout[-3000:]
        assert "2 bundles verified" in done.stdout
    finally:
        medium.terminate()
        medium.wait(timeout=10)
        for name in ("alice", "bob"):  # a daemon the play did not stop (a failed assertion) is stopped here
            if (tmp_path / name / "ctagent.toml").exists():
                subprocess.run([sys.executable, "-m", "cli", "--config", str(tmp_path / name / "ctagent.toml"),
                                "stop"], cwd=ROOT, capture_output=True, timeout=30)
    collected = tmp_path / "collected"
    for name in ("alice", "bob"):
        prov = json.loads((collected / f"{name}.provenance.json").read_text())
        assert prov["device_label"] == name and prov["experiment_id"] == "rehearsal-1"
        sightings = prov["files"]["sightings.parquet"]
        assert sightings["rows"] > 20 and len(sightings["sha256"]) == 64
        assert (collected / name / "manifest.json").exists()
    assert not list(tmp_path.glob("ansible-tmp/*ctagent-collect*"))
    from agent.experiment.analyze import analyze

    a = analyze(collected)
    by_label = {d.label: d for d in a.devices}
    assert by_label["bob"].manifest.carriage == "pocket" and by_label["bob"].manifest.calibration["tx_power"] == -10
    # each heard the other, resolved from the other's own keys
    assert by_label["alice"].resolved > 20 and by_label["bob"].resolved > 20
    assert {(r["receiver"], r["transmitter"]) for r in a.pair_days if r["minutes_heard"]} == {("alice", "bob"),
                                                                                               ("bob", "alice")}
