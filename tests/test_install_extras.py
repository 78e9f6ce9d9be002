"""The base install is what a device needs: every device command works without the
extras' modules (FastAPI, SQLAlchemy, matplotlib, ...), and a command that needs an
extra names it in one sentence. The modules are made unimportable in the subprocess, as
in an install without the extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.extras import EXTRAS

from .helpers import wait_until

ROOT = Path(__file__).parent.parent
BLOCKED = [m for extra in ("backend", "plots", "postgresql", "experiment") for m in EXTRAS[extra]]
WITHOUT_EXTRAS = (f"import sys\nfor m in {BLOCKED!r}: sys.modules[m] = None\n"
                  "import cli\ncli.main(prog_name='ctagent')\n")


def ctagent(env: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kw)


def test_the_base_install_holds_none_of_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist = {"jwt": "pyjwt", "multipart": "python-multipart"}  # import name -> distribution
    base = {d.split(">")[0].split("[")[0].split(";")[0].strip().lower() for d in project["dependencies"]}
    for extra, modules in EXTRAS.items():
        declared = " ".join(project["optional-dependencies"][extra]).lower()
        for m in modules:
            assert dist.get(m, m) in declared and dist.get(m, m) not in base, (extra, m)


@pytest.mark.integration
def test_a_device_runs_on_the_base_install_and_commands_name_missing_extras(tmp_path):
    env = {"CTAGENT_CONFIG": str(tmp_path / "c.toml"), "CTAGENT_AGENT_FLUSH_INTERVAL_S": "1",
           "CTAGENT_AGENT_CLOCK_CHECK": "off", "CTAGENT_BACKEND_DIR": str(tmp_path / "backend")}
    r = ctagent(env, "init", "--data-dir", str(tmp_path / "d"), "--radio", "sim")
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, "-c", WITHOUT_EXTRAS, "run"], env={**os.environ, **env}, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        status = tmp_path / "d" / "status.json"
        wait_until(lambda: status.exists() and json.loads(status.read_text() or "{}").get("sightings", 0) > 0,
                   what="the daemon to hear its simulated peers")
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, proc.stderr.read()
    for args in (["status"], ["encounters"], ["exposures"], ["calibration", "list"], ["config", "check"],
                 ["export", "--consent", "--format", "json"]):
        r = ctagent(env, *args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    # a device records and collects research bundles on the base install; analysis names its extra
    r = ctagent(env, "experiment", "join", "exp-1", "--label", "pi-01", "--consent")
    assert r.returncode == 0, r.stderr
    r = ctagent(env, "experiment", "collect", "--consent", "--out", str(tmp_path / "bundle"))
    assert r.returncode == 0 and (tmp_path / "bundle" / "manifest.json").exists(), r.stderr
    r = ctagent(env, "experiment", "analyze", str(tmp_path / "bundle"))
    assert r.returncode == 1 and "pip install 'ctagent[experiment]'" in r.stderr, r.stderr
    r = ctagent(env, "sync")  # no backend configured: a sentence, not an import error
    assert r.returncode == 1 and "backend_url" in r.stderr
    r = ctagent(env, "backend", "init")
    assert r.returncode == 1 and "needs the [backend] extra" in r.stderr
    assert "pip install 'ctagent[backend]'" in r.stderr
    r = ctagent(env, "demo")
    assert r.returncode == 1 and "needs the [demo] extra" in r.stderr
    assert "Traceback" not in r.stderr


def test_postgresql_without_its_driver_names_the_extra(tmp_path):
    script = "import sys\nsys.modules['psycopg'] = None\nimport cli\ncli.main(prog_name='ctagent')\n"
    r = subprocess.run([sys.executable, "-c", script, "backend", "--data-dir", str(tmp_path / "b"), "--database",
                        "postgresql://ctagent@127.0.0.1:1/ctagent", "init"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "needs the [postgresql] extra" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
