"""Is the system clock right? A Raspberry Pi has no real-time clock: until NTP has run,
its clock says whatever it said at the last shutdown (or 1970), and every identifier it
advertises, every time it stores and every sync is then wrong.

:func:`probe` reads what the machine knows (the kernel's NTP state through
``adjtimex(2)``, chrony's tracking, systemd-timesyncd through ``timedatectl``) into a
:class:`ClockState`; :func:`clock_verdict` (pure) says whether to advertise with it. The
daemon records the state with every flush and in its status; `ctagent doctor` shows it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

#: no clock that says earlier than this is right: the day this version was built
#: (raise it with each release)
NOT_BEFORE = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
#: adjtimex(2): the clock is not synchronised (the kernel sets it when no NTP daemon
#: has disciplined it, or its error bound reached 16 s)
STA_UNSYNC = 0x0040
CLOCK_POLICIES = ("auto", "strict", "off")
ClockPolicy = Literal["auto", "strict", "off"]


@dataclass(frozen=True)
class ClockState:
    """What the machine says of its clock at ``checked_at`` (its own reading)."""

    checked_at: float
    #: not earlier than :data:`NOT_BEFORE`
    plausible: bool
    #: True/False as the best source says; None: nothing here can tell
    synchronized: bool | None
    #: where ``synchronized`` comes from: "chrony", "timedatectl", "kernel" or "none"
    source: str
    #: the source's bound on the clock's error, seconds (None: unknown)
    max_error_s: float | None = None
    #: the source's estimate of the clock's offset from true time, seconds
    offset_s: float | None = None
    #: the time service found on this machine ("chrony", "systemd-timesyncd"), if any
    service: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClockState:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def describe(self) -> str:
        """One phrase for status and doctor."""
        if not self.plausible:
            return f"WRONG: it says {_iso(self.checked_at)}, before this version was built ({_iso(NOT_BEFORE)})"
        if self.synchronized is None:
            return "synchronisation unknown (no adjtimex, chrony or timedatectl here)"
        error = f", error within {self.max_error_s:.3g} s" if self.max_error_s is not None else ""
        offset = f", offset {self.offset_s:+.3g} s" if self.offset_s is not None else ""
        by = f" by {self.service}" if self.service else ""
        if self.synchronized:
            return f"synchronised{by} (per {self.source}{error}{offset})"
        if self.service:
            return f"NOT synchronised: {self.service} runs but has not synchronised it yet"
        return "NOT synchronised, and no time service runs here"


def simulated_clock(now: float) -> ClockState:
    """A simulated device's clock: the virtual clock, right by construction."""
    return ClockState(now, True, True, "sim", 0.0, 0.0)


def unchecked_clock(now: float) -> ClockState:
    """The state recorded where nothing reads the clock (a daemon without a guard)."""
    return ClockState(now, now >= NOT_BEFORE, None, "unchecked")


@dataclass(frozen=True)
class ClockVerdict:
    #: the radios may start (advertise and scan) with this clock
    ok: bool
    #: why not, or what is wrong although it may go on: one sentence (None: all well)
    reason: str | None = None


def clock_verdict(state: ClockState, *, policy: ClockPolicy, waited_s: float, sync_wait_s: float,
                  max_error_s: float) -> ClockVerdict:
    """Advertise with this clock? ``auto``: never with a clock before the build date;
    with a time service that has not synchronised the clock yet, wait for it up to
    ``sync_wait_s`` and then go on with a warning; without any time service, go on with
    a warning (offline set-ups: the state is recorded with every flush). ``strict``: only
    with a synchronised clock whose error bound is within ``max_error_s``. ``off``: always."""
    if policy == "off":
        return ClockVerdict(True)
    if not state.plausible:
        return ClockVerdict(False, f"the system clock is wrong ({state.describe()}); set it or fix time "
                                   "synchronisation (`timedatectl`); not advertising until then")
    too_coarse = state.max_error_s is not None and state.max_error_s > max_error_s
    if state.synchronized and not too_coarse:
        return ClockVerdict(True)
    what = (f"the system clock's error bound is {state.max_error_s:.3g} s (more than {max_error_s:g} s)"
            if state.synchronized else f"the system clock is {state.describe()}")
    if policy == "strict":
        return ClockVerdict(False, f"{what}; [agent] clock_check = \"strict\": not advertising until it is "
                                   "synchronised")
    if state.service and not state.synchronized and waited_s < sync_wait_s:
        return ClockVerdict(False, f"{what}; waiting up to {sync_wait_s:g} s for it before advertising")
    return ClockVerdict(True, f"{what}; identifiers may be advertised for the wrong time")


@dataclass(frozen=True)
class ClockGuard:
    """What the daemon needs to watch the clock: how to read it and the policy."""

    probe: Callable[[float], ClockState]
    policy: ClockPolicy = "auto"
    sync_wait_s: float = 300.0
    max_error_s: float = 60.0

    def verdict(self, state: ClockState, waited_s: float) -> ClockVerdict:
        return clock_verdict(state, policy=self.policy, waited_s=waited_s, sync_wait_s=self.sync_wait_s,
                             max_error_s=self.max_error_s)


def doctor_check(state: ClockState, *, max_error_s: float = 60.0) -> tuple[bool, str]:
    """`ctagent doctor`'s view: right only when plausible and synchronised within
    ``max_error_s``; the detail says what to do otherwise."""
    verdict = clock_verdict(state, policy="strict", waited_s=0, sync_wait_s=0, max_error_s=max_error_s)
    if verdict.ok:
        return True, state.describe()
    if not state.plausible:
        return False, f"{state.describe()}: set the time (`sudo timedatectl set-ntp true`, or `date -s`)"
    advice = ("wait for it (`timedatectl timesync-status`, `chronyc tracking`)" if state.service else
              "install one: `sudo apt install systemd-timesyncd` (or chrony); offline, the agent still runs "
              "([agent] clock_check = \"auto\") and records the clock's state for the analysis")
    return False, f"{state.describe()}; {advice}"


# -- reading the machine ------------------------------------------------------------------

class _Timex(ctypes.Structure):
    # struct timex (include/uapi/linux/timex.h) on Linux: only the leading fields are
    # read; the tail is padding the kernel may write
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("rest", ctypes.c_long * 32)]


def kernel_ntp_state() -> tuple[bool, float] | None:
    """(synchronised, the kernel's maximum error in seconds) from adjtimex(2), read only
    (modes = 0); None where there is no such call."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        tx = _Timex()
        if libc.adjtimex(ctypes.byref(tx)) < 0:
            return None
    except (OSError, AttributeError):
        return None
    return not tx.status & STA_UNSYNC, tx.maxerror / 1e6


Runner = Callable[[list[str]], str | None]


def run_quietly(argv: list[str]) -> str | None:
    """A command's stdout, or None when it is missing, fails or takes over 2 s."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _chrony(run: Runner) -> tuple[bool, float, float] | None:
    """(synchronised, max error, offset) from ``chronyc -c tracking`` (CSV: ref id, name,
    stratum, ref time, system time offset, last offset, RMS offset, frequency, residual
    frequency, skew, root delay, root dispersion, update interval, leap status)."""
    out = run(["chronyc", "-n", "-c", "tracking"])
    fields = out.strip().split(",") if out else []
    if len(fields) < 14:
        return None
    try:
        offset, delay, dispersion = float(fields[4]), float(fields[10]), float(fields[11])
    except ValueError:
        return None
    synced = fields[13].strip() != "Not synchronised" and fields[2].strip() not in ("", "0")
    # chrony's own bound on the error: |offset| + root delay / 2 + root dispersion
    return synced, abs(offset) + delay / 2 + dispersion, offset


def _timedatectl(run: Runner) -> tuple[bool, bool] | None:
    """(an NTP service is enabled, NTPSynchronized) from timedated."""
    out = run(["timedatectl", "show", "-p", "NTP", "-p", "NTPSynchronized"])
    if not out:
        return None
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if "NTPSynchronized" not in values:
        return None
    return values.get("NTP") == "yes", values["NTPSynchronized"] == "yes"


def probe(now: float, *, run: Runner = run_quietly,
          kernel: Callable[[], tuple[bool, float] | None] = kernel_ntp_state) -> ClockState:
    """The clock's state now, from the best source present: chrony (it knows its offset),
    then timedated (systemd-timesyncd), then the kernel alone."""
    plausible = now >= NOT_BEFORE
    chrony = _chrony(run)
    if chrony is not None:
        synced, max_error, offset = chrony
        return ClockState(now, plausible, synced, "chrony", max_error, offset, "chrony")
    kern = kernel()
    timedated = _timedatectl(run)
    if timedated is not None:
        enabled, synced = timedated
        return ClockState(now, plausible, synced, "timedatectl", kern[1] if kern and synced else None, None,
                          "systemd-timesyncd" if enabled else None)
    if kern is not None:
        synced, max_error = kern
        return ClockState(now, plausible, synced, "kernel", max_error if synced else None)
    return ClockState(now, plausible, None, "none")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
