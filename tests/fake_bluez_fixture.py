"""A private dbus-daemon with the fake bluetoothd on it, for the real BlueZ code paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""


class FakeBluezEnv:
    def __init__(self, adapters: int = 2, kinds: tuple[str, ...] = (), privacy: str = "off") -> None:
        self.adapters = adapters
        self.kinds, self.privacy = kinds, privacy
        self.skip_reason = None if shutil.which("dbus-daemon") else "dbus-daemon is not installed"
        self.dir = Path(tempfile.mkdtemp(prefix="ctagent-dbus-"))
        self.address = f"unix:path={self.dir / 'bus'}"
        self.procs: list[subprocess.Popen] = []
        self._old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")

    def start(self) -> bool:
        if self.skip_reason:
            return False
        conf = self.dir / "bus.conf"
        conf.write_text(CONF.format(sock=self.dir / "bus"))
        self.procs.append(subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={conf}"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        deadline = time.monotonic() + 10
        while not (self.dir / "bus").exists():  # a wait on a condition, bounded
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                self.skip_reason = "the private dbus-daemon did not start"
                return False
            time.sleep(0.05)
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.fakebluez", "--adapters", str(self.adapters),
                                 "--kinds", ",".join(self.kinds), "--privacy", self.privacy],
                                stdout=subprocess.PIPE, text=True, env={**os.environ}, cwd=ROOT)
        self.procs.append(fake)
        line = fake.stdout.readline()
        if "ready" not in line:
            self.skip_reason = "the fake bluetoothd did not start"
            return False
        return True

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if self._old is None:
            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self._old
        shutil.rmtree(self.dir, ignore_errors=True)
