"""The real-stack VM, started when the test session begins and run in a thread, so that
its minutes of emulated CPU (TCG keeps one core busy) overlap the rest of the suite on
the other core; its tests are ordered last and wait for it (``tests/conftest.py``)."""

from __future__ import annotations

import os
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


def _run() -> tuple[Path, VmRun, dict[str, str]]:
    keep = os.environ.get("REALSTACK_RESULTS")  # a folder to keep the traces in
    results = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="ctagent-realstack-"))
    agent_env = init_agent(results)
    vm = run_vm(HERE / "guest.sh", results, timeout_s=VM_TIMEOUT_S, on_start=_procs.append,
                env={k: v for k, v in os.environ.items() if k in ("REALSTACK_PRIVACY", "REALSTACK_NO_BUMBLE")})
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
