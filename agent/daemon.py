"""`ctagent run`: the asyncio supervisor of one device.

Tasks: advertise what the protocol mode says (a new identity, or a refresh of the
current one), scan and hand what is heard to the mode, flush to the store, set up with
the server once (``prepare``) and call it on the mode's schedule (``check``), notify new
exposures, daily retention, the systemd watchdog, the optional status service and duty
cycle, and a status file for `ctagent status`. Each task restarts with bounded
exponential back-off when it fails, and the status says which tasks are failing now and
why. systemd hears the truth: READY=1 once the radios run (or one of them, in the
documented "scan only" / "advertise only" modes), STATUS= kept current; when neither
radio comes up within ``radio_start_attempts`` the daemon says why in one log line and
exits with :data:`EXIT_RADIO_DOWN`, so that ``Restart=on-failure`` acts.
SIGTERM/SIGINT: flush, close the store, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shlex
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .ble.base import Radio, RadioEvents
from .ble.duty_cycle import duty_cycle
from .ble.status import status_bytes
from .clock import Clock, iso_date
from .errors import BackendUnreachable, UserError
from .files import write_private_file
from .modes.base import CheckResult, ProtocolMode
from .protocol.payload import find_service_data
from .timesync import ClockGuard, ClockState, unchecked_clock

if TYPE_CHECKING:
    from .experiment.recording import ResearchRecorder

log = logging.getLogger("ctagent.daemon")

BACKOFF_MAX_S = 300.0
#: the exit status when neither radio could start: systemd's Restart=on-failure restarts
EXIT_RADIO_DOWN = 3
RADIO_TASKS = ("advertise", "scan")
#: how often the daemon looks whether the radios came up (before READY=1)
READY_POLL_S = 0.2
#: while the mode has nothing to broadcast yet (ROBERT before registration), ask again this often
NOT_READY_RETRY_S = 5.0
RETENTION_CHECK_S = 3600.0
HOOK_TIMEOUT_S = 30.0
#: how often the clock's state is read: while waiting for a right clock, and after
CLOCK_WAIT_POLL_S = 5.0
CLOCK_CHECK_S = 60.0


def sd_notify(message: str) -> bool:
    """The systemd notification protocol: one datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


class Daemon:
    def __init__(self, mode: ProtocolMode[Any], radio: Radio, *, clock: Clock, status_path: Path | None = None,
                 flush_interval_s: float = 60.0, on_exposure: str = "",
                 duty_cycle: tuple[float, float] | None = None, rng: random.Random | None = None,
                 radio_start_attempts: int = 5, clock_guard: ClockGuard | None = None,
                 research: ResearchRecorder | None = None) -> None:
        self.mode = mode
        self.store = mode.store
        self.clock = clock
        self.advertiser = radio.advertiser
        self.scanner = radio.scanner
        self.status_service = radio.status_service
        #: radio outages (scan or advertising failing, stalls, duty-cycle pauses)
        self.radio_events = RadioEvents()
        self.scanner.events = self.radio_events
        #: research recording (an experiment's opt-in); it keeps the clock's state with
        #: every flush (the last one _watch_clock read)
        self.research = research
        if research is not None:
            research.events = self.radio_events  # one record of the radio's outages
        self.status_path = status_path
        self.flush_interval_s = flush_interval_s
        self.on_exposure = on_exposure
        self.duty_cycle = duty_cycle
        self.rng = rng or random.Random()
        self._stop = asyncio.Event()
        self.radio_start_attempts = radio_start_attempts
        #: failures per task since start
        self.failures: dict[str, int] = {}
        #: tasks failing now: task -> {"error", "since", "failures"}; gone once they work again
        self.failing: dict[str, dict[str, Any]] = {}
        #: tasks that worked at least once; radio tasks that never did within their attempts
        self.ever_ok: set[str] = set()
        self.radio_down: set[str] = set()
        self.ready = False
        self.exit_code = 0
        self.started_at = clock.now()
        self.rotations = 0
        self.sightings = 0
        self.rows_written = 0
        self.bad_payloads = 0
        self.last_check: CheckResult | None = None
        self.notified_days: set[int] = set(self.store.exposures.days())
        self.hook_runs = 0
        #: chaff declarations sent (cover traffic)
        self.chaff_sent = 0
        #: None: the clock is not checked (a simulated one); the radios wait for _clock_ok
        self.clock_guard = clock_guard
        self.clock_state: ClockState | None = None
        #: what is wrong with the clock now (None: nothing), one sentence
        self.clock_problem: str | None = None
        self._clock_ok = asyncio.Event()
        if clock_guard is None:
            self._clock_ok.set()

    def stop(self) -> None:
        self._stop.set()

    # -- supervised tasks ---------------------------------------------------------------
    def _ok(self, name: str) -> None:
        """``name`` just worked: no longer failing."""
        self.ever_ok.add(name)
        if name in RADIO_TASKS:
            self.radio_events.up(f"{name}_failed", self.clock.now())
        if self.failing.pop(name, None) is not None:
            log.info("task=%s works again", name)

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a task's failure must not kill the daemon
                self.failures[name] = self.failures.get(name, 0) + 1
                info = self.failing.setdefault(name, {"since": self.clock.now(), "failures": 0})
                info["failures"] += 1
                info["error"] = f"{type(e).__name__}: {e}"
                if name in RADIO_TASKS:
                    self.radio_events.down(f"{name}_failed", info["since"], type(e).__name__)
                log.error("task=%s failed error=\"%s\" restart_in=%.0fs", name, info["error"], delay)
                if name in RADIO_TASKS and name not in self.ever_ok and info["failures"] >= self.radio_start_attempts:
                    self.radio_down.add(name)
                    if self.radio_down.issuperset(RADIO_TASKS):
                        self._give_up_on_the_radio()
                        return
                await self.clock.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    def _give_up_on_the_radio(self) -> None:
        errors = "; ".join(f"{t}: {self.failing[t]['error']}" for t in RADIO_TASKS if t in self.failing)
        log.error("radio: neither advertising nor scanning could start after %d attempts (%s); run `ctagent "
                  "doctor` to see what to fix; exiting with status %d", self.radio_start_attempts, errors,
                  EXIT_RADIO_DOWN)
        sd_notify(f"STATUS=radio down: {errors}")
        self.exit_code = EXIT_RADIO_DOWN
        self.stop()

    async def _watch_clock(self) -> None:
        """Read the clock's state (off the loop: it may ask chronyc or timedated), let the
        radios start once it is right enough, and keep the state current for the status
        and the flushes."""
        guard = self.clock_guard
        if guard is None:
            return
        while not self._stop.is_set():
            now = self.clock.now()
            self.clock_state = await self.clock.run_blocking(guard.probe, now)
            verdict = guard.verdict(self.clock_state, now - self.started_at)
            if verdict.reason != self.clock_problem:
                if verdict.reason:
                    (log.warning if verdict.ok else log.error)("clock: %s", verdict.reason)
                elif self.clock_problem:
                    log.info("clock: %s", self.clock_state.describe())
                self.clock_problem = verdict.reason
                if not verdict.ok:
                    sd_notify(f"STATUS=waiting for the clock: {verdict.reason}"[:500])
            if verdict.ok and not self._clock_ok.is_set():
                self._clock_ok.set()
            self._ok("clock")
            await self.clock.sleep(CLOCK_CHECK_S if self._clock_ok.is_set() else CLOCK_WAIT_POLL_S)

    async def _announce_ready(self) -> None:
        """READY=1 once both radios run, or one runs and the other never came up (a
        documented degraded mode); STATUS= says which. While the radios wait for a right
        clock, READY=1 too (systemd would otherwise restart a daemon that only waits for
        NTP), with STATUS= saying so."""
        waiting_said = False
        while not self._stop.is_set():
            if not self._clock_ok.is_set() and self.clock_problem and not waiting_said:
                sd_notify(f"READY=1\nSTATUS=waiting for the clock: {self.clock_problem}"[:500])
                waiting_said = True
            if self.advertiser.health().advertising:
                self._ok("advertise")
            if self.scanner.health().scanning:
                self._ok("scan")
            up = {t for t in RADIO_TASKS if t in self.ever_ok}
            if up and up | self.radio_down == set(RADIO_TASKS):
                self.ready = True
                sd_notify(f"READY=1\nSTATUS={self._status_line()}")
                log.info("daemon ready protocol=%s mode=%s", self.mode.name, self._mode())
                return
            await self.clock.sleep(READY_POLL_S)

    async def _advertise(self) -> None:
        await self._clock_ok.wait()
        on_air = False
        while not self._stop.is_set():
            b = self.mode.broadcast(self.clock.now())
            if b is None:  # nothing to advertise (yet, or any more)
                if on_air:
                    await self.advertiser.pause()
                    on_air = False
                await self.clock.sleep(NOT_READY_RETRY_S)
                continue
            if not on_air:
                await self.advertiser.start(b.service_data, b.address)
                self.rotations += 1
                on_air = True
            elif b.new_identity:
                await self.advertiser.rotate(b.service_data, b.address)
                self.rotations += 1
            else:
                await self.advertiser.update(b.service_data)
            if self.research is not None:
                self.research.advertised(self.clock.now(), b.address, b.service_data, b.new_identity)
            self._ok("advertise")
            await self.clock.sleep(max(0.0, b.next_at - self.clock.now()))

    async def _scan(self) -> None:
        decode, record = self.mode.decode, self.mode.record
        await self._clock_ok.wait()  # times stored from a wrong clock are wrong for good
        research, uuid16 = self.research, self.mode.service_uuid16
        async for raw in self.scanner.sightings():
            if "scan" in self.failing:
                self._ok("scan")
            if research is not None:
                data = find_service_data(cast(Mapping[object, object], raw.service_data), uuid16)
                if data is not None:
                    research.heard(raw.t, raw.address, raw.rssi, raw.tx_power, data)
            payload = decode(raw.service_data)
            if payload is None:
                self.bad_payloads += 1
                continue
            record(raw.t, payload, raw.rssi, raw.tx_power)
            self.sightings += 1
            if self._stop.is_set():
                return

    def _flush(self, *, final: bool = False) -> None:
        now = self.clock.now()
        self.rows_written += self.mode.flush(now, final=final)
        if self.research is not None:
            self.research.flush(now, self.clock_state or unchecked_clock(now))

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            await self.clock.sleep(self.flush_interval_s)
            self._flush()
            self._ok("flush")
            self._write_status()

    async def _retention(self) -> None:
        while not self._stop.is_set():
            erased = self.store.maybe_apply_retention()
            self._ok("retention")
            if erased:
                log.info("retention erased_days=%d", len(erased))
            await self.clock.sleep(RETENTION_CHECK_S)

    async def _prepare(self) -> None:
        await self.clock.run_blocking(self.mode.prepare, self.clock.now())

    async def _server(self) -> None:
        schedule = self.mode.server_schedule
        assert schedule is not None
        await self.clock.sleep(self.rng.uniform(*schedule.first_delay_s))
        while not self._stop.is_set():
            await self.check_once()
            self._ok("server")
            await self.clock.sleep(schedule.interval_s + self.rng.uniform(0, schedule.jitter_s))

    async def _cover_traffic(self) -> None:
        """Chaff at unforeseeable times, so that a declaration is not told by its requests."""
        cover = self.mode.cover_traffic
        assert cover is not None
        while not self._stop.is_set():
            await self.clock.sleep(cover.tick_s + self.rng.uniform(0, cover.tick_s / 2))
            if self.rng.random() < cover.probability:
                delay = self.rng.uniform(0, cover.user_delay_s)
                try:
                    await self.clock.run_blocking(self.mode.send_chaff, self.clock.now(), delay)
                except UserError as e:
                    log.info("cover traffic not sent error=%s", type(e).__name__)
                self.chaff_sent += 1
            self._ok("cover_traffic")

    async def check_once(self) -> CheckResult:
        """Flush, then the mode's server call (off the event loop), then notify."""
        now = self.clock.now()
        self._flush()
        try:
            res = await self.clock.run_blocking(self.mode.check, now)
        except UserError as e:  # offline or refused: normal for a device; the schedule retries
            res = CheckResult(now, isinstance(e, BackendUnreachable), f"server call failed error={type(e).__name__}",
                              str(e))
        self.last_check = res
        log.info("%s", res.summary)
        await self._notify_new_exposures()
        self._write_status()
        return res

    async def _notify_new_exposures(self) -> None:
        for e in self.store.exposures.all():
            if e.day in self.notified_days:
                continue
            self.notified_days.add(e.day)
            date = iso_date(e.day)
            minutes = "" if e.minutes is None else f"{e.minutes:.0f}"  # a server-side decision has no minutes
            log.warning("EXPOSURE date=%s minutes=%s", date, minutes or "n/a")
            if self.on_exposure:
                env = {**os.environ, "CTAGENT_EXPOSURE_DATE": date, "CTAGENT_EXPOSURE_MINUTES": minutes}
                try:
                    proc = await asyncio.create_subprocess_exec(*shlex.split(self.on_exposure), env=env)
                    await asyncio.wait_for(proc.wait(), HOOK_TIMEOUT_S)
                    self.hook_runs += 1
                except (TimeoutError, OSError) as err:
                    log.error("on_exposure command failed error=%s", type(err).__name__)

    async def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            return
        while not self._stop.is_set():
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)  # systemd's clock is the real one, whatever ours is

    async def _status_service(self) -> None:
        assert self.status_service is not None
        await self.status_service.start()
        self._update_status_service()
        await self._stop.wait()

    async def _duty_cycle(self) -> None:
        assert self.duty_cycle is not None
        await self._clock_ok.wait()
        await duty_cycle(self.advertiser, self.scanner, advertise_s=self.duty_cycle[0], scan_s=self.duty_cycle[1],
                         clock=self.clock, stop=self._stop, events=self.radio_events)

    # -- status -------------------------------------------------------------------------
    def _mode(self) -> str:
        """normal; scan only / advertise only / radio down (a radio task failing or never
        up); degraded (another task failing)."""
        if not self._clock_ok.is_set():
            return "waiting for clock"
        bad = {t for t in RADIO_TASKS if t in self.failing or t in self.radio_down}
        if bad == set(RADIO_TASKS):
            return "radio down"
        if bad:
            return "scan only" if "advertise" in bad else "advertise only"
        return "degraded" if self.failing or self.clock_problem else "normal"

    def _status_line(self) -> str:
        failing = "".join(f"; {t} failing: {info['error']}" for t, info in sorted(self.failing.items()))
        if self.clock_problem:
            failing += f"; clock: {self.clock_problem}"
        return f"{self._mode()}: rotations={self.rotations} sightings={self.sightings}{failing}"[:500]

    def status(self) -> dict[str, Any]:
        return {
            "mode": self._mode(), "now": self.clock.now(), "started_at": self.started_at, "pid": os.getpid(),
            "ready": self.ready, "protocol": self.mode.name,
            "rotations": self.rotations, "sightings": self.sightings, "rows_written": self.rows_written,
            "bad_payloads": self.bad_payloads, "failures": self.failures, "failing": self.failing,
            "last_check": self.last_check.to_json() if self.last_check else None,
            "exposure_days": sorted(self.notified_days), "protocol_status": self.mode.status_fields(),
            "advertiser": asdict(self.advertiser.health()), "scanner": asdict(self.scanner.health()),
            "clock": self.clock_state.to_json() if self.clock_state else None, "clock_problem": self.clock_problem,
            "research": None if self.research is None else {"recorded": self.research.recorded},
        }

    def _update_status_service(self) -> None:
        if self.status_service is None:
            return
        self.status_service.update(status_bytes(
            exposed_days=sorted(self.notified_days), advertising=self.advertiser.health().advertising,
            scanning=self.scanner.health().scanning, last_sync=self.mode.last_server_success(), now=self.clock.now()))

    def _write_status(self) -> None:
        self._update_status_service()
        if self.ready:
            sd_notify(f"STATUS={self._status_line()}")
        if self.status_path:
            try:
                write_private_file(self.status_path, json.dumps(self.status(), indent=1).encode())
            except OSError as e:
                log.error("status file not written error=%s", e.strerror)

    # -- main -----------------------------------------------------------------------------
    async def run(self, *, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self.stop)
                except (NotImplementedError, RuntimeError):
                    pass
        jobs: dict[str, Callable[[], Awaitable[None]]] = {
            "flush": self._flush_loop, "retention": self._retention, "advertise": self._advertise,
            "scan": self._scan, "prepare": self._prepare, "ready": self._announce_ready, "clock": self._watch_clock}
        if self.mode.server_schedule is not None:
            jobs["server"] = self._server
        if self.mode.cover_traffic is not None:
            jobs["cover_traffic"] = self._cover_traffic
        if self.status_service is not None:
            jobs["status_service"] = self._status_service
        if self.duty_cycle:
            jobs["duty_cycle"] = self._duty_cycle
        tasks = [asyncio.create_task(self._supervise(name, job)) for name, job in jobs.items()]
        tasks.append(asyncio.create_task(self._watchdog()))
        sd_notify("STATUS=starting the radios")
        log.info("daemon started protocol=%s", self.mode.name)
        self._write_status()
        await self._stop.wait()
        sd_notify("STOPPING=1")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.scanner.stop()
        await self.advertiser.stop()
        if self.status_service is not None:
            try:
                await self.status_service.stop()
            except Exception:  # shutting down anyway
                pass
        self._flush(final=True)
        self._write_status()
        self.store.close()
        log.info("daemon stopped %s", "cleanly" if not self.exit_code else f"with status {self.exit_code}")
        return self.exit_code
