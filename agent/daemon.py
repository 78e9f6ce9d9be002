"""`ctagent run`: the asyncio supervisor.

Tasks: advertiser rotation, scanner -> aggregator, periodic flushes to the store,
jittered sync with the backend followed by the exposure check, daily retention,
systemd watchdog, and a status file for `ctagent status`. Each task restarts with
bounded exponential back-off when it fails; a radio task that keeps failing leaves the
daemon in "scan only" / "advertise only" mode, reported in the status, not dead.
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
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from .agent import Agent
from .ble.base import Advertiser, Scanner
from .clock import VirtualClock
from .exposure.encounter import SECONDS_PER_DAY, Sighting
from .protocol.payload import PayloadError, parse_service_data
from .store.keys import write_private_file

log = logging.getLogger("ctagent.daemon")

BACKOFF_MAX_S = 300.0


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
    def __init__(self, agent: Agent, *, clock, advertiser: Advertiser | None, scanner: Scanner | None,
                 sync_client=None, status_path: Path | None = None, flush_interval_s: float = 60.0,
                 sync_interval_s: float = 4 * 3600, sync_jitter_s: float = 1800, on_exposure: str = "",
                 gatt=None, duty_cycle: tuple[float, float] | None = None, robert=None,
                 hello_refresh_s: float = 60.0, rng: random.Random | None = None) -> None:
        self.agent = agent
        self.clock = clock
        self.advertiser, self.scanner = advertiser, scanner
        self.sync_client = sync_client
        self.status_path = status_path
        self.flush_interval_s = flush_interval_s
        self.sync_interval_s, self.sync_jitter_s = sync_interval_s, sync_jitter_s
        self.on_exposure = on_exposure
        self.rng = rng or random.Random()
        self._stop = asyncio.Event()
        self.failures: dict[str, int] = {}
        self.degraded: set[str] = set()
        self.last_sync: dict | None = None
        self.bad_payloads = 0
        self.started_at = clock.now()
        self.notified_days: set[int] = set(agent.exposed_days())
        self.hook_runs = 0
        self.gatt = gatt
        self.duty_cycle = duty_cycle
        self.robert = robert  # a RobertDevice: the agent runs the ROBERT protocol
        self.hello_refresh_s = hello_refresh_s
        self.last_status: dict | None = None

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
            except Exception as e:  # noqa: BLE001 - a task's failure must not kill the daemon
                self.failures[name] = self.failures.get(name, 0) + 1
                if self.failures[name] >= 3:
                    self.degraded.add(name)
                log.error("task=%s failed error=%s restart_in=%.0fs", name, type(e).__name__, delay)
                await self.clock.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _advertise_robert(self) -> None:
        """A new EBID (and address) every epoch; within it, a fresh HELLO (time, MAC)
        every ``hello_refresh_s`` on the same address."""
        from .protocol import robert as rb
        while self.robert._reg is None and not self._stop.is_set():
            await self.clock.sleep(5)
        now = self.clock.now()
        await self.advertiser.start(self.robert.service_data(now), "")
        self.agent.stats.rotations += 1
        start = self.robert._reg["time_start"]
        epoch = rb.epoch_id(rb.ntp_seconds(now), start)
        while not self._stop.is_set():
            now = self.clock.now()
            next_epoch_unix = rb.epoch_start_ntp(epoch + 1, start) - rb.NTP_UNIX_OFFSET
            await self.clock.sleep(max(0.0, min(self.hello_refresh_s, next_epoch_unix - now)))
            now = self.clock.now()
            new_epoch = rb.epoch_id(rb.ntp_seconds(now), start)
            if new_epoch != epoch:
                epoch = new_epoch
                await self.advertiser.rotate(self.robert.service_data(now), "")
                self.agent.stats.rotations += 1
            else:
                await self.advertiser.update(self.robert.service_data(now))

    async def _robert_register(self) -> None:
        if not self.robert.registered:
            if isinstance(self.clock, VirtualClock):
                self.robert.register()
            else:
                await asyncio.to_thread(self.robert.register)
            log.info("robert registered")

    async def _robert_status(self) -> None:
        """/status at most once per two epochs, jittered."""
        await self.clock.sleep(self.rng.uniform(60, 600))
        while not self._stop.is_set():
            if self.robert.registered:
                now = self.clock.now()
                try:
                    if isinstance(self.clock, VirtualClock):
                        doc = self.robert.status(now)
                    else:
                        doc = await asyncio.to_thread(self.robert.status, now)
                    self.last_status = {"at": now, "atRisk": doc["atRisk"], "riskLevel": doc["riskLevel"]}
                    log.info("robert status at_risk=%s", doc["atRisk"])
                    await self._notify_new_exposures()
                except Exception as e:  # noqa: BLE001 - offline is normal
                    log.info("robert status failed error=%s", type(e).__name__)
            await self.clock.sleep(2 * 900 + self.rng.uniform(0, 600))

    async def _advertise(self) -> None:
        if self.robert is not None:
            return await self._advertise_robert()
        rot = self.agent.rotate(self.clock.now())
        await self.advertiser.start(rot.payload.service_data, rot.address)
        self.degraded.discard("advertise")
        while not self._stop.is_set():
            await self.clock.sleep(max(0.0, rot.next_at - self.clock.now()))
            rot = self.agent.rotate(self.clock.now())
            await self.advertiser.rotate(rot.payload.service_data, rot.address)

    async def _scan(self) -> None:
        async for raw in self.scanner.sightings():
            self.degraded.discard("scan")
            if self.robert is not None:
                sd = next((v for k, v in raw.service_data.items() if str(k).lower().startswith("0000fd64")), None)
                if sd is None or not self.robert.on_hello(raw.t, sd, raw.rssi):
                    self.bad_payloads += 1
                continue
            try:
                p = parse_service_data(raw.service_data)
            except PayloadError:
                self.bad_payloads += 1
                continue
            self.agent.on_sighting(Sighting(raw.t, p.rpi, p.aem, raw.rssi, raw.tx_power))
            if self._stop.is_set():
                return

    async def _flush(self) -> None:
        while not self._stop.is_set():
            await self.clock.sleep(self.flush_interval_s)
            self.agent.flush(self.clock.now())
            if self.robert is not None:
                self.robert.flush()
            self._write_status()

    async def _retention(self) -> None:
        while not self._stop.is_set():
            erased = self.agent.store.maybe_apply_retention()
            if erased:
                log.info("retention erased_days=%d", len(erased))
            await self.clock.sleep(3600)

    async def _sync(self) -> None:
        await self.clock.sleep(self.rng.uniform(0, min(self.sync_jitter_s, 60)))
        while not self._stop.is_set():
            await self.sync_once()
            await self.clock.sleep(self.sync_interval_s + self.rng.uniform(0, self.sync_jitter_s))

    async def sync_once(self) -> dict:
        now = self.clock.now()
        self.agent.flush(now)
        if isinstance(self.clock, VirtualClock):  # virtual time: inline, deterministic
            res, _ = self.agent.sync(self.sync_client, now)
        else:  # real time: HTTP and matching off the event loop
            res, _ = await asyncio.to_thread(self.agent.sync, self.sync_client, now)
        self.last_sync = {"at": now, "offline": res.offline, "files": res.files_new, "keys": len(res.keys),
                          "failed_files": len(res.files_failed)}
        log.info("sync offline=%s files=%d keys=%d", res.offline, res.files_new, len(res.keys))
        await self._notify_new_exposures()
        self._write_status()
        return self.last_sync

    async def _notify_new_exposures(self) -> None:
        for e in self.agent.store.exposures():
            if e["day"] in self.notified_days:
                continue
            self.notified_days.add(e["day"])
            date = datetime.fromtimestamp(e["day"] * SECONDS_PER_DAY, timezone.utc).date().isoformat()
            minutes = "" if e.get("minutes") is None else f"{e['minutes']:.0f}"  # ROBERT: the server decides
            log.warning("EXPOSURE date=%s minutes=%s", date, minutes or "n/a")
            if self.on_exposure:
                env = {**os.environ, "CTAGENT_EXPOSURE_DATE": date, "CTAGENT_EXPOSURE_MINUTES": minutes}
                try:
                    proc = await asyncio.create_subprocess_exec(*shlex.split(self.on_exposure), env=env)
                    await asyncio.wait_for(proc.wait(), 30)
                    self.hook_runs += 1
                except (OSError, asyncio.TimeoutError) as err:
                    log.error("on_exposure command failed error=%s", type(err).__name__)

    async def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            return
        while not self._stop.is_set():
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

    # -- status -------------------------------------------------------------------------
    def status(self) -> dict:
        mode = "normal"
        if self.advertiser is None or "advertise" in self.degraded:
            mode = "scan only"
        if self.scanner is None or "scan" in self.degraded:
            mode = "advertise only" if mode == "normal" else "degraded"
        return {
            "mode": mode, "now": self.clock.now(), "started_at": self.started_at,
            "rotations": self.agent.stats.rotations, "sightings": self.agent.stats.sightings,
            "open_encounters": len(self.agent.aggregator), "rows_written": self.agent.stats.rows_written,
            "bad_payloads": self.bad_payloads, "failures": self.failures, "last_sync": self.last_sync,
            "exposure_days": sorted(self.notified_days),
            "protocol": "robert" if self.robert is not None else "gaen", "robert_status": self.last_status,
            "advertiser": asdict(self.advertiser.health()) if self.advertiser else None,
            "scanner": asdict(self.scanner.health()) if self.scanner else None,
        }

    def _update_gatt(self) -> None:
        if self.gatt is None:
            return
        from .ble.gatt import status_bytes
        from .sync.client import STATE_LAST_SUCCESS
        st = self.status()
        self.gatt.update(status_bytes(exposed_days=sorted(self.notified_days),
                                      advertising=bool((st["advertiser"] or {}).get("advertising")),
                                      scanning=bool((st["scanner"] or {}).get("scanning")),
                                      last_sync=self.agent.store.get_state(STATE_LAST_SUCCESS), now=self.clock.now()))

    async def _gatt(self) -> None:
        await self.gatt.start()
        self._update_gatt()
        await self._stop.wait()

    async def _duty_cycle(self) -> None:
        from .ble.bluez import duty_cycle
        await duty_cycle(self.advertiser, self.scanner, advertise_s=self.duty_cycle[0], scan_s=self.duty_cycle[1],
                         stop=self._stop)

    def _write_status(self) -> None:
        self._update_gatt()
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
        tasks = [asyncio.create_task(self._supervise("flush", self._flush)),
                 asyncio.create_task(self._supervise("retention", self._retention)),
                 asyncio.create_task(self._watchdog())]
        if self.advertiser is not None:
            tasks.append(asyncio.create_task(self._supervise("advertise", self._advertise)))
        if self.scanner is not None:
            tasks.append(asyncio.create_task(self._supervise("scan", self._scan)))
        if self.sync_client is not None and self.robert is None:
            tasks.append(asyncio.create_task(self._supervise("sync", self._sync)))
        if self.robert is not None:
            tasks.append(asyncio.create_task(self._supervise("register", self._robert_register)))
            tasks.append(asyncio.create_task(self._supervise("status", self._robert_status)))
        if self.gatt is not None:
            tasks.append(asyncio.create_task(self._supervise("gatt", self._gatt)))
        if self.duty_cycle and self.advertiser is not None and self.scanner is not None:
            tasks.append(asyncio.create_task(self._supervise("duty_cycle", self._duty_cycle)))
        sd_notify("READY=1\nSTATUS=advertising and scanning")
        log.info("daemon started mode=%s", self.status()["mode"])
        self._write_status()
        await self._stop.wait()
        sd_notify("STOPPING=1")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.scanner is not None:
            await self.scanner.stop()
        if self.advertiser is not None:
            await self.advertiser.stop()
        if self.gatt is not None:
            try:
                await self.gatt.stop()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        self.agent.flush(self.clock.now(), final=True)
        if self.robert is not None:
            self.robert.flush()
        self._write_status()
        self.agent.store.close()
        log.info("daemon stopped cleanly")
        return 0

