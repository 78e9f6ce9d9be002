"""Setting a device up without editing TOML by hand: `init --backend-url` trusts the
backend's key only after its fingerprint was confirmed, a failed `init` writes nothing,
`init --force` keeps the settings, `config show|check`, the passphrase's sources and
`rotate-master-key` (also when a power cut interrupts it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from agent.app import open_store, passphrase, rotate_master_key
from agent.config import load_config
from agent.errors import ConfigError, StoreKeyError
from agent.protocol.export import key_fingerprint
from agent.store import KeyFile, Store, create_key_file
from backend import Backend, BackendConfig
from backend.server import BackgroundServer

ROOT = Path(__file__).parent.parent


@pytest.fixture
def served(tmp_path):
    backend = Backend(BackendConfig(tmp_path / "backend"))
    with BackgroundServer(backend) as srv:
        yield srv, backend.public_key_b64
    backend.engine.dispose()


def invoke(cfg: Path, *args: str, input: str | None = None, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli.main, ["--config", str(cfg), *args], input=input,
                              env={"CTAGENT_PASSPHRASE": "", **(env or {})})


def test_init_trusts_the_backends_key_only_when_its_fingerprint_is_confirmed(tmp_path, served):
    srv, key = served
    cfg, data = tmp_path / "c.toml", tmp_path / "data"
    base = ["init", "--radio", "sim", "--data-dir", str(data), "--backend-url", srv.url]
    r = invoke(cfg, *base)  # no terminal to confirm at
    assert r.exit_code == 1 and key_fingerprint(key) in r.output and "--trust-key" in r.output
    assert not cfg.exists() and not data.exists()
    r = invoke(cfg, *base, "--trust-key", "SHA256:AAAA")
    assert r.exit_code == 1 and "not SHA256:AAAA" in r.output and not cfg.exists() and not data.exists()
    r = invoke(cfg, *base, "--trust-key", key_fingerprint(key))
    assert r.exit_code == 0, r.output
    c = load_config(cfg, env={})
    assert c.sync.backend_url == srv.url and c.sync.trusted_keys == [key]
    assert (cfg.stat().st_mode & 0o777) == 0o600
    r = invoke(cfg, "config", "check", "--json")
    assert r.exit_code == 0, r.output
    assert {c["check"]: c["ok"] for c in json.loads(r.output)} == {
        "settings": True, "store": True, "calibration": True, "backend": True}


def test_an_unreachable_backend_or_a_failed_store_leaves_nothing_written(tmp_path):
    cfg, data = tmp_path / "c.toml", tmp_path / "data"
    r = invoke(cfg, "init", "--radio", "sim", "--data-dir", str(data), "--backend-url", "http://127.0.0.1:9")
    assert r.exit_code == 1 and "unreachable" in r.output and not cfg.exists() and not data.exists()
    # a passphrase store with no passphrase anywhere (and no terminal to ask at)
    r = invoke(cfg, "init", "--radio", "sim", "--data-dir", str(data), "--key", "passphrase")
    assert r.exit_code == 1 and "protected by a passphrase" in r.output
    assert not cfg.exists() and not data.exists()
    # and the rerun needs no --force
    r = invoke(cfg, "init", "--radio", "sim", "--data-dir", str(data))
    assert r.exit_code == 0 and cfg.exists()


def test_init_force_keeps_the_settings_and_the_store(tmp_path):
    cfg, data = tmp_path / "c.toml", tmp_path / "data"
    assert invoke(cfg, "init", "--radio", "sim", "--data-dir", str(data)).exit_code == 0
    text = cfg.read_text().replace('backend_url = ""', 'backend_url = "https://backend.example"')
    cfg.write_text(text.replace("sim_peers = 5", "sim_peers = 9").replace("interval_s = 14400", "interval_s = 600"))
    keyring = (data / "agent.db.keyring").read_bytes()
    assert invoke(cfg, "init").exit_code == 1  # no --force: refused
    r = invoke(cfg, "init", "--force", "--device-model", "Raspberry Pi 4 Model B")
    assert r.exit_code == 0, r.output
    c = load_config(cfg, env={})
    assert (c.sync.backend_url, c.radio.sim_peers, c.sync.interval_s, c.radio.kind, c.agent.data_dir) == (
        "https://backend.example", 9, 600.0, "sim", str(data))
    assert c.agent.device_model == "Raspberry Pi 4 Model B"
    assert (data / "agent.db.keyring").read_bytes() == keyring  # the store was not touched
    assert "# Days of encounters and own keys kept" in cfg.read_text()  # the comments stay


def test_config_show_says_what_the_agent_uses_and_hides_secrets(tmp_path):
    cfg = tmp_path / "c.toml"
    assert invoke(cfg, "init", "--radio", "sim", "--data-dir", str(tmp_path / "d")).exit_code == 0
    cfg.write_text(cfg.read_text().replace('robert_api_key = ""', 'robert_api_key = "s3cret"'))
    r = invoke(cfg, "config", "show", "--json", env={"CTAGENT_RADIO_SIM_PEERS": "7"})
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["radio"]["sim_peers"] == 7 and shown["proximity"]["distance_threshold_m"] == 1.0
    assert "s3cret" not in r.output and shown["sync"]["robert_api_key"] == "(set, hidden)"
    text = invoke(cfg, "config", "show").output
    assert tomllib.loads(text.split("\n", 1)[1].replace('"(set, hidden)"', '""'))["radio"]["sim_peers"] == 5


def test_config_check_fails_on_an_untrusted_backend_key(tmp_path, served):
    srv, key = served
    cfg = tmp_path / "c.toml"
    assert invoke(cfg, "init", "--radio", "sim", "--data-dir", str(tmp_path / "d")).exit_code == 0
    cfg.write_text(cfg.read_text().replace('backend_url = ""', f'backend_url = "{srv.url}"'))
    r = invoke(cfg, "config", "check")
    assert r.exit_code == 1 and "[!!] backend" in r.output and key_fingerprint(key) in r.output
    assert "[ok] store" in r.output


def test_the_passphrase_comes_from_the_environment_a_file_a_systemd_credential_or_a_prompt(tmp_path):
    cfg = load_config(None, env={})
    cfg.agent.key = "passphrase"
    assert passphrase(cfg, env={"CTAGENT_PASSPHRASE": "from-env"}) == "from-env"
    secret = tmp_path / "pass"
    secret.write_text("from-file\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        passphrase(cfg, env={"CTAGENT_PASSPHRASE_FILE": str(secret)})
    secret.chmod(0o600)
    assert passphrase(cfg, env={"CTAGENT_PASSPHRASE_FILE": str(secret)}) == "from-file"
    cfg.agent.passphrase_file = str(secret)
    assert passphrase(cfg, env={}) == "from-file"
    cfg.agent.passphrase_file = ""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ctagent-passphrase").write_text("from-systemd")
    (creds / "ctagent-passphrase").chmod(0o400)
    assert passphrase(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)}) == "from-systemd"
    assert passphrase(cfg, prompt=lambda: "from-prompt", env={}) == "from-prompt"
    with pytest.raises(ConfigError, match="run the command in a terminal"):
        passphrase(cfg, env={})


@pytest.mark.integration
def test_a_passphrase_store_works_from_a_passphrase_file_through_the_cli(tmp_path):
    secret = tmp_path / "pass"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    env = {**os.environ, "CTAGENT_CONFIG": str(tmp_path / "c.toml"), "CTAGENT_PASSPHRASE_FILE": str(secret)}
    env.pop("CTAGENT_PASSPHRASE", None)
    run = [sys.executable, str(ROOT / "cli.py")]
    r = subprocess.run([*run, "init", "--radio", "sim", "--data-dir", str(tmp_path / "d"), "--key", "passphrase"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*run, "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*run, "status"], env={**env, "CTAGENT_PASSPHRASE_FILE": ""}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "protected by a passphrase" in r.stderr


def test_rotate_master_key_replaces_the_key_file_and_the_old_one_no_longer_opens(tmp_path):
    cfg_path = tmp_path / "c.toml"
    assert invoke(cfg_path, "init", "--radio", "sim", "--data-dir", str(tmp_path / "d")).exit_code == 0
    cfg = load_config(cfg_path, env={})
    with open_store(cfg) as store:
        store.keyring.key_for_day(store.today(), create=True)  # a day key to re-wrap
    old = cfg.key_file.read_bytes()
    (tmp_path / "old.key").write_bytes(old)
    (tmp_path / "old.key").chmod(0o600)
    r = invoke(cfg_path, "rotate-master-key")
    assert r.exit_code == 0 and "master key rotated" in r.output
    assert cfg.key_file.read_bytes() != old and (cfg.key_file.stat().st_mode & 0o777) == 0o600
    with open_store(cfg) as store:
        assert len(store.keyring.days()) == 1
    with pytest.raises(StoreKeyError):
        Store.open(cfg.db_path, KeyFile(tmp_path / "old.key")).close()


def test_a_rotation_cut_between_the_rewrap_and_the_rename_is_finished_at_the_next_open(tmp_path):
    cfg_path = tmp_path / "c.toml"
    assert invoke(cfg_path, "init", "--radio", "sim", "--data-dir", str(tmp_path / "d")).exit_code == 0
    cfg = load_config(cfg_path, env={})
    pending = cfg.key_file.with_name("master.key.new")
    with open_store(cfg) as store:  # what rotate_master_key does, up to the power cut
        create_key_file(pending)
        store.rotate_master_key(KeyFile(pending))
    with open_store(cfg):  # the old key file no longer opens it: the new one does, and replaces it
        pass
    assert not pending.exists()
    with open_store(cfg):
        pass
    # cut before the re-wrap: the stale new file is dropped, the old key stays
    create_key_file(pending)
    before = cfg.key_file.read_bytes()
    with open_store(cfg):
        pass
    assert not pending.exists() and cfg.key_file.read_bytes() == before
    rotate_master_key(cfg)  # and a full rotation still works afterwards
    with open_store(cfg):
        pass
