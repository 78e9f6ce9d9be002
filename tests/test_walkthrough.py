"""The README's "Rehearse on one machine" block, run exactly as written (in bash, in an
empty folder, with the installed `ctagent` first on PATH): a backend, a shared simulated
medium and two `ctagent run` processes, a code, a declaration, an exposure. Only the
backend's port is changed, to a free one. Then the pieces the block relies on: the
medium's refusals, and two devices hearing each other and nobody else."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ble.sim.shared import (MediumLink, MediumService, Placement, SharedMediumAdvertiser, SharedMediumScanner,
                                  load_scenario, parse_position)
from agent.clock import RealClock
from agent.errors import InputFileError, RadioError
from agent.protocol.payload import EN_SERVICE_UUID

from .helpers import eventually

ROOT = Path(__file__).parent.parent


def readme_walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- walkthrough: begin -->\n```sh\n(.*?)```\n<!-- walkthrough: end -->", text, re.S)
    assert m, "the README lost its walk-through block"
    return m.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
def test_the_readme_walkthrough_ends_in_an_exposure(tmp_path):
    script = readme_walkthrough().replace("8080", str(free_port()))
    assert "rehearsal-embargo" in script and script.count("ctagent") >= 10
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for var in ("CTAGENT_CONFIG", "CTAGENT_BACKEND_DIR", "CTAGENT_PASSPHRASE"):
        env.pop(var, None)
    assert shutil.which("ctagent", path=env["PATH"]), "the ctagent command is not installed beside this Python"
    r = subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    logs = "".join((tmp_path / "rehearsal" / f"{n}.log").read_text() for n in ("alice", "bob")
                   if (tmp_path / "rehearsal" / f"{n}.log").exists())
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-3000:]}\ndevice logs:\n{logs[-3000:]}"
    assert "published: " in r.stdout and "EXPOSURE FOUND" in r.stdout, r.stdout
    assert re.search(r"│\s+\d{4}-\d\d-\d\d\s+│\s+distance\s+│", r.stdout), r.stdout  # the exposures table
    assert "sim medium: alice joined" in r.stderr and "sim medium: bob joined" in r.stderr
    assert "Traceback" not in r.stderr + logs


def test_a_medium_scenario_is_checked_before_anything_runs(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text('{"devices": {"alice": {"position": [0]}}}')
    with pytest.raises(InputFileError, match="not a scenario"):
        load_scenario(bad)
    bad.write_text('{"devices": {"alice": {"position": [0, 0], "carriage": "sleeve"}}}')
    with pytest.raises(InputFileError, match="carriage must be one of"):
        load_scenario(bad)
    with pytest.raises(InputFileError, match="NAME=X,Y"):
        parse_position("alice=0")
    assert parse_position("bob=0.5,-1") == ("bob", Placement(0.5, -1.0))


async def test_two_devices_on_a_shared_medium_hear_each_other_and_a_stranger_is_refused(tmp_path):
    sock = tmp_path / "m.sock"
    clock = RealClock()
    service = MediumService({"alice": Placement(0, 0), "bob": Placement(0.5, 0), "far": Placement(500, 0)},
                            clock=clock, tick_s=0.1)
    ready = asyncio.Event()
    server = asyncio.create_task(service.serve(sock, ready=ready))
    await ready.wait()
    assert (sock.stat().st_mode & 0o777) == 0o600
    links = {n: MediumLink(sock, n, tx_power=-10, rx_correction=0) for n in ("alice", "bob", "far")}
    try:
        with pytest.raises(RadioError, match="'eve' is not in the medium's scenario"):
            await MediumLink(sock, "eve", tx_power=0, rx_correction=0).connect()
        advertisers = {n: SharedMediumAdvertiser(link, clock, EN_SERVICE_UUID) for n, link in links.items()}
        for n, adv in advertisers.items():
            await adv.start(n.encode().ljust(20, b"."), f"AA:AA:AA:AA:AA:{len(n):02X}")
        with pytest.raises(RadioError, match="on the medium already"):
            await MediumLink(sock, "bob", tx_power=0, rx_correction=0).connect()
        heard: dict[str, list] = {"alice": [], "bob": [], "far": []}

        async def listen(name: str) -> None:
            async for s in SharedMediumScanner(links[name], clock).sightings():
                heard[name].append(s)
        listeners = [asyncio.create_task(listen(n)) for n in heard]
        await eventually(lambda: len(heard["alice"]) >= 3 and len(heard["bob"]) >= 3, timeout_s=15,
                         what="alice and bob to hear each other")
        assert {s.service_data[EN_SERVICE_UUID][:3] for s in heard["alice"]} == {b"bob"}  # 500 m: not heard
        assert {s.service_data[EN_SERVICE_UUID][:5] for s in heard["bob"]} == {b"alice"}
        assert all(-80 < s.rssi < -20 for s in heard["bob"])  # 0.5 m on the project's path-loss model
        assert heard["far"] == []
        # paused: bob hears nothing more of alice
        await advertisers["alice"].pause()
        await asyncio.sleep(0.3)  # what was in flight
        before = len(heard["bob"])
        await asyncio.sleep(0.5)
        assert len(heard["bob"]) == before
        for t in listeners:
            t.cancel()
    finally:
        for link in links.values():
            await link.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    assert not sock.exists()
