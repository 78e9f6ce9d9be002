"""The real-stack VM, started when the test session begins and run in a thread, so that
its minutes of emulated CPU (TCG keeps one core busy) overlap the rest of the suite on
the other core; its tests are ordered last and wait for it (``tests/conftest.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .vm import VmRun, run_vm, unavailable_reason

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: the VM's hard limit (boot ~5-12 s, ~1 min of checks per phase under TCG, more on a loaded machine)
VM_TIMEOUT_S = 600

_lock = threading.Lock()
_future: Future[tuple[Path, VmRun, dict[str, str]]] | None = None
_procs: list[subprocess.Popen[bytes]] = []


def init_agent(results: Path) -> dict[str, str]:
    """``ctagent init --radio bluez`` in the results folder, for ``ctagent run`` inside the VM."""
    env = {**os.environ, "CTAGENT_CONFIG": str(results / "agent" / "ctagent.toml"), "CTAGENT_AGENT_CLOCK_CHECK": "off"}
    (results / "agent").mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "cli", "init", "--data-dir", str(results / "agent" / "data"),
                        "--radio", "bluez"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"ctagent init for the VM failed: {r.stderr}")
    return env


def _pairs_missing(results: Path) -> bool:
    """A btvirt phase whose checks found fewer than the two pairs of controllers."""
    for f in results.glob("observations-*.json"):
        if f.name != "observations-bumble.json" and set(json.loads(f.read_text()).get("pairs", {})) != {
                "legacy", "extended"}:
            return True
    return False


def _run() -> tuple[Path, VmRun, dict[str, str]]:
    keep = os.environ.get("REALSTACK_RESULTS")  # a folder to keep the traces in
    env = {k: v for k, v in os.environ.items() if k in ("REALSTACK_PRIVACY", "REALSTACK_NO_BUMBLE")}
    earlier = ""
    for attempt in (1, 2):
        results = (Path(keep) / ("" if attempt == 1 else "boot2") if keep
                   else Path(tempfile.mkdtemp(prefix="ctagent-realstack-")))
        results.mkdir(parents=True, exist_ok=True)
        agent_env = init_agent(results)
        vm = run_vm(HERE / "guest.sh", results, timeout_s=VM_TIMEOUT_S, on_start=_procs.append, env=env)
        # btvirt's virtual controllers (the test rig, not what is tested) now and then
        # come up short under emulation after a failed start: one more boot, said in the log
        if attempt == 2 or vm.timed_out or not _pairs_missing(results):
            break
        log = results / "guest.log"
        earlier = "a first boot found fewer than two pairs of controllers; booted again. Its log:\n" + (
            log.read_text() if log.exists() else "") + "\n"
        if not keep:
            shutil.rmtree(results, ignore_errors=True)
    if earlier:
        log = results / "guest.log"
        log.write_text(earlier + (log.read_text() if log.exists() else ""))
    return results, vm, agent_env


def start() -> bool:
    """Boot the VM in the background (once); False when it cannot run here."""
    global _future
    with _lock:
        if _future is None:
            if unavailable_reason():
                return False
            pool = ThreadPoolExecutor(1, thread_name_prefix="realstack-vm")
            _future = pool.submit(_run)
            pool.shutdown(wait=False)
    return True


def outcome() -> tuple[Path, VmRun, dict[str, str]]:
    """(results folder, the VM's run, the agent's environment): waits for the VM."""
    start()
    assert _future is not None
    return _future.result()


def stop() -> None:
    """End a VM still running (the session is over, e.g. after ``-x``)."""
    for proc in _procs:
        if proc.poll() is None:
            proc.kill()
