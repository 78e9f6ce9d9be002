"""`ctagent run`: the asyncio supervisor of one device.

Tasks: advertise what the protocol mode says (a new identity, or a refresh of the
current one), scan and hand what is heard to the mode, flush to the store, set up with
the server once (``prepare``) and call it on the mode's schedule (``check``), notify new
exposures, daily retention, the systemd watchdog, the optional status service and duty
cycle, and a status file for `ctagent status`. Each task restarts with bounded
exponential back-off when it fails; a radio task that keeps failing leaves the daemon in
"scan only" / "advertise only" mode, reported in the status, not dead. SIGTERM/SIGINT:
flush, close the store, exit 0.
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
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .ble.base import Radio
from .ble.duty_cycle import duty_cycle
from .ble.status import status_bytes
from .clock import Clock, iso_date
from .errors import BackendUnreachable, UserError
from .files import write_private_file
from .modes.base import CheckResult, ProtocolMode

log = logging.getLogger("ctagent.daemon")

BACKOFF_MAX_S = 300.0
#: a task that failed this many times puts the daemon in a degraded mode
DEGRADED_AFTER_FAILURES = 3
#: while the mode has nothing to broadcast yet (ROBERT before registration), ask again this often
NOT_READY_RETRY_S = 5.0
RETENTION_CHECK_S = 3600.0
HOOK_TIMEOUT_S = 30.0


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
                 duty_cycle: tuple[float, float] | None = None, rng: random.Random | None = None) -> None:
        self.mode = mode
        self.store = mode.store
        self.clock = clock
        self.advertiser = radio.advertiser
        self.scanner = radio.scanner
        self.status_service = radio.status_service
        self.status_path = status_path
        self.flush_interval_s = flush_interval_s
        self.on_exposure = on_exposure
        self.duty_cycle = duty_cycle
        self.rng = rng or random.Random()
        self._stop = asyncio.Event()
        self.failures: dict[str, int] = {}
        self.degraded: set[str] = set()
        self.started_at = clock.now()
        self.rotations = 0
        self.sightings = 0
        self.rows_written = 0
        self.bad_payloads = 0
        self.last_check: CheckResult | None = None
        self.notified_days: set[int] = set(self.store.exposures.days())
        self.hook_runs = 0

    def stop(self) -> None:
        self._stop.set()

    # -- supervised tasks ---------------------------------------------------------------
    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures[name] = self.failures.get(name, 0) + 1
                if self.failures[name] >= DEGRADED_AFTER_FAILURES:
                    self.degraded.add(name)
                log.error("task=%s failed error=%s restart_in=%.0fs", name, type(e).__name__, delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _advertise(self) -> None:
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
                self.degraded.discard("advertise")
            elif b.new_identity:
                await self.advertiser.rotate(b.service_data, b.address)
                self.rotations += 1
            else:
                await self.advertiser.update(b.service_data)
            await self.clock.sleep(max(0.0, b.next_at - self.clock.now()))

    async def _scan(self) -> None:
        decode, record = self.mode.decode, self.mode.record
        async for raw in self.scanner.sightings():
            self.degraded.discard("scan")
            payload = decode(raw.service_data)
            if payload is None:
                self.bad_payloads += 1
                continue
            record(raw.t, payload, raw.rssi, raw.tx_power)
            self.sightings += 1
            if self._stop.is_set():
                return

    def _flush(self, *, final: bool = False) -> None:
        self.rows_written += self.mode.flush(self.clock.now(), final=final)

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            await self.clock.sleep(self.flush_interval_s)
            self._flush()
            self._write_status()

    async def _retention(self) -> None:
        while not self._stop.is_set():
            erased = self.store.maybe_apply_retention()
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
            await self.clock.sleep(schedule.interval_s + self.rng.uniform(0, schedule.jitter_s))

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
        await duty_cycle(self.advertiser, self.scanner, advertise_s=self.duty_cycle[0], scan_s=self.duty_cycle[1],
                         clock=self.clock, stop=self._stop)

    # -- status -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        mode = "normal"
        if "advertise" in self.degraded:
            mode = "scan only"
        if "scan" in self.degraded:
            mode = "advertise only" if mode == "normal" else "degraded"
        return {
            "mode": mode, "now": self.clock.now(), "started_at": self.started_at, "protocol": self.mode.name,
            "rotations": self.rotations, "sightings": self.sightings, "rows_written": self.rows_written,
            "bad_payloads": self.bad_payloads, "failures": self.failures,
            "last_check": self.last_check.to_json() if self.last_check else None,
            "exposure_days": sorted(self.notified_days), "protocol_status": self.mode.status_fields(),
            "advertiser": asdict(self.advertiser.health()), "scanner": asdict(self.scanner.health()),
        }

    def _update_status_service(self) -> None:
        if self.status_service is None:
            return
        self.status_service.update(status_bytes(
            exposed_days=sorted(self.notified_days), advertising=self.advertiser.health().advertising,
            scanning=self.scanner.health().scanning, last_sync=self.mode.last_server_success(), now=self.clock.now()))

    def _write_status(self) -> None:
        self._update_status_service()
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
            "scan": self._scan, "prepare": self._prepare}
        if self.mode.server_schedule is not None:
            jobs["server"] = self._server
        if self.status_service is not None:
            jobs["status_service"] = self._status_service
        if self.duty_cycle:
            jobs["duty_cycle"] = self._duty_cycle
        tasks = [asyncio.create_task(self._supervise(name, job)) for name, job in jobs.items()]
        tasks.append(asyncio.create_task(self._watchdog()))
        sd_notify("READY=1\nSTATUS=advertising and scanning")
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
            except Exception:
                pass
        self._flush(final=True)
        self._write_status()
        self.store.close()
        log.info("daemon stopped cleanly")
        return 0
