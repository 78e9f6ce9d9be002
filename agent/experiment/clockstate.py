"""The system clock's synchronisation, as the research log keeps it with every flush:
synchronised or not, by what (chrony, systemd-timesyncd, ...), and the estimated offset
when the source says one. Behind a small interface (:class:`ClockStateSource`) so that
tests and simulated devices use :class:`FixedClockState`.

Sources, first that answers: ``chronyc -c tracking`` (offset and root dispersion, CSV
mode: chrony's ``tracking`` report, fields 4 "System time" offset in seconds and 11
"Root dispersion"), then ``timedatectl show`` (``NTPSynchronized``, and the service
``timedatectl show-timesync`` names). Neither: unknown (not an error: a Pi without
network has no time source, and analysis must know that).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Protocol

#: a clock query that takes longer than this is given up (the daemon must not stall)
QUERY_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ClockState:
    #: True / False as the source says; None: no source answered
    synchronized: bool | None
    #: "chrony", "timesyncd", "sim" or "" (unknown)
    source: str
    #: estimated offset of the system clock from true time (s; positive: ahead), if known
    offset_s: float | None = None
    #: the source's bound on its error (s), if known
    error_s: float | None = None


class ClockStateSource(Protocol):
    def read(self) -> ClockState: ...


@dataclass(frozen=True)
class FixedClockState:
    """Always the same answer: tests, simulated devices (``source = "sim"``)."""

    state: ClockState = ClockState(True, "sim", 0.0, 0.0)

    def read(self) -> ClockState:
        return self.state


def _run(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_chrony_tracking(csv_line: str) -> ClockState | None:
    """``chronyc -c tracking``: ref id, ref name, stratum, ref time, system time offset
    (s, positive: the system clock is fast), last offset, RMS offset, frequency, residual
    frequency, skew, root delay, root dispersion, update interval, leap status."""
    fields = csv_line.strip().split(",")
    if len(fields) < 14:
        return None
    try:
        offset, root_delay, root_dispersion = float(fields[4]), float(fields[10]), float(fields[11])
    except ValueError:
        return None
    synced = fields[13].strip().lower() != "not synchronised" and int(fields[2] or 0) > 0
    return ClockState(synced, "chrony", offset, root_delay / 2 + root_dispersion)


def parse_timedatectl(show: str, timesync: str | None) -> ClockState:
    """``timedatectl show`` (NTPSynchronized=yes|no) and, when present, ``timedatectl
    show-timesync`` (systemd-timesyncd: ServerName=...)."""
    props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    synced = {"yes": True, "no": False}.get(props.get("NTPSynchronized", ""))
    source = "timesyncd" if timesync and "ServerName=" in timesync else ("ntp" if synced else "")
    return ClockState(synced, source)


class SystemClockState:
    """The machine's own clock state: chrony, else timedatectl, else unknown."""

    def read(self) -> ClockState:
        out = _run("chronyc", "-c", "tracking")
        if out:
            state = parse_chrony_tracking(out.splitlines()[0])
            if state is not None:
                return state
        show = _run("timedatectl", "show")
        if show:
            return parse_timedatectl(show, _run("timedatectl", "show-timesync"))
        return ClockState(None, "")
