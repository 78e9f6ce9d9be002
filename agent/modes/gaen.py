"""Exposure Notification (GAEN), decentralized: rotate RPI + AEM with the address, keep
what is heard as encounters, download the key server's signed exports, match and decide
on the device, upload own keys when positive."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..clock import utc_day
from ..errors import ConfigError, StoreError
from ..exposure.aggregate import Aggregator
from ..exposure.engine import ExposureDecision, decide_matches
from ..exposure.matching import EncounterIndex, KeyMatch, MatchStats, confirm, find_candidates
from ..protocol import gaen
from ..protocol.export import DiagnosisKey, PackedKeys
from ..protocol.payload import EN_SERVICE_UUID, EN_SERVICE_UUID16, ENPayload, PayloadError, parse_service_data
from ..protocol.schedule import IdSchedule, Rotation
from ..records import DaySummary, DeclareResult
from ..sync.keyserver import KeyServerClient, LastSync, SyncResult
from ..ble.base import SimulatedPeer
from .base import Broadcast, CheckResult, CoverTraffic, DeviceContext, ProtocolMode, ServerSchedule

log = logging.getLogger("ctagent.gaen")

#: Own keys of this many days are uploaded when declaring (today's included: the server embargoes it).
UPLOAD_DAYS = 14
#: The first sync after start waits up to this long (jittered), the later ones [sync] interval_s.
FIRST_SYNC_MAX_DELAY_S = 60.0
#: chaff is considered every 4 hours, as the Android app's UploadCoverTrafficWorker
CHAFF_TICK_S = 4 * 3600.0


class GaenMode(ProtocolMode[ENPayload]):
    name = "gaen"
    service_uuid16 = EN_SERVICE_UUID16

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        if ctx.backend_url and not ctx.trusted_keys:
            raise ConfigError("[sync] trusted_keys: needed to verify the backend's export files")
        self.calibration = ctx.calibration
        self.config = ctx.proximity
        # The AEM carries our calibrated TX power (as EN phones carry theirs).
        self.schedule = IdSchedule(tx_power_dbm=int(round(ctx.calibration.tx_power)), rng=ctx.rng,
                                   tek_factory=lambda: ctx.random_bytes(gaen.KEY_LEN))
        for t in self.store.teks.all():
            self.schedule.load_tek(t)
        self.aggregator = Aggregator()
        self.client = (KeyServerClient(ctx.backend_url, trusted_keys=ctx.trusted_keys, clock=ctx.clock, rng=ctx.rng,
                                       retries=ctx.http_retries, http=ctx.http,
                                       max_export_bytes=ctx.max_export_bytes, index_url=ctx.index_url,
                                       export_base_url=ctx.export_base_url, timeout_s=ctx.http_timeout_s)
                       if ctx.backend_url else None)
        self._schedule = ServerSchedule((0.0, min(ctx.sync_jitter_s, FIRST_SYNC_MAX_DELAY_S)), ctx.sync_interval_s,
                                        ctx.sync_jitter_s)
        #: what the last exposure check computed (keys skipped, derived, RPIs, candidates)
        self.last_match = MatchStats()
        self._cover = (CoverTraffic(CHAFF_TICK_S, min(1.0, CHAFF_TICK_S / ctx.chaff_interval_s))
                       if self.client is not None and ctx.chaff_interval_s > 0 else None)

    # -- advertising ------------------------------------------------------------------
    def broadcast(self, now: float) -> Broadcast:
        """Every broadcast is a rotation: new RPI, AEM and address together."""
        rot = self.schedule.rotate(now)
        if rot.new_tek:
            self.store.teks.add(rot.tek)
        return Broadcast(rot.payload.service_data, rot.address, True, rot.next_at)

    # -- hearing ----------------------------------------------------------------------
    def decode(self, service_data: Mapping[Any, Any]) -> ENPayload | None:
        try:
            return parse_service_data(service_data)
        except PayloadError:
            return None

    def record(self, t: float, payload: ENPayload, rssi: int, tx_power: int | None = None) -> None:
        self.aggregator.add_raw(t, payload.rpi, payload.aem, rssi, tx_power)

    def record_block(self, times: np.ndarray, ids: np.ndarray, rssis: np.ndarray,
                     payloads: Sequence[ENPayload]) -> None:
        heard = {i: (payloads[i].rpi, payloads[i].aem) for i in np.unique(ids).tolist()}
        self.aggregator.add_block(times, ids, rssis, heard)

    def flush(self, now: float, *, final: bool = False) -> int:
        minutes = self.aggregator.completed_minutes(now, final=final)  # before flush forgets closed encounters
        batch, closed = self.aggregator.flush_closing(now, final=final)
        try:
            with self.store.rows.transaction():  # one commit (one sync to the disk) per flush
                written = self.store.encounters.write(batch, closed=closed)
                self.store.heard_minutes.add(minutes)
            return written
        except StoreError:
            # written at the next flush (encounters are rewritten in place, closed ones closed again)
            self.aggregator.requeue(batch, closed)
            self.aggregator.requeue_minutes(minutes)
            raise

    # -- exposure ---------------------------------------------------------------------
    def exposure_check(self, now: float) -> ExposureCheck:
        """Keys in, file by file (:meth:`ExposureCheck.add`), then :meth:`ExposureCheck.finish`."""
        return ExposureCheck(self, now)

    def check_exposures(self, keys: Sequence[DiagnosisKey] | PackedKeys, now: float) -> list[ExposureDecision]:
        """Match keys against the stored encounters; record new exposures in the store."""
        check = self.exposure_check(now)
        check.add(keys if isinstance(keys, PackedKeys) else PackedKeys.from_keys(keys))
        return check.finish()

    # -- the server -------------------------------------------------------------------
    def _client(self) -> KeyServerClient:
        if self.client is None:
            raise ConfigError("[sync] backend_url: no backend configured")
        return self.client

    @property
    def server_schedule(self) -> ServerSchedule | None:
        return self._schedule if self.client is not None else None

    @property
    def cover_traffic(self) -> CoverTraffic | None:
        return self._cover

    def send_chaff(self, now: float, user_delay_s: float) -> int:
        return self._client().send_chaff(user_delay_s)

    def sync(self, now: float, progress: Callable[[int, int], None] | None = None
             ) -> tuple[SyncResult, list[ExposureDecision]]:
        client = self._client()
        check = self.exposure_check(now)
        res = client.download(self.store, check.add, progress=progress)
        decisions = check.finish()
        client.commit(self.store, res)
        return res, decisions

    def check(self, now: float, progress: Callable[[int, int], None] | None = None) -> CheckResult:
        res, decisions = self.sync(now, progress)
        exposed = any(d.exposed for d in decisions)
        message = ("backend unreachable: nothing downloaded (the daemon retries by itself)" if res.offline else
                   f"{res.files_new} new export file(s), {res.key_count} key(s) checked; "
                   + ("EXPOSURE FOUND: see `ctagent exposures`" if exposed else "no exposure found"))
        problem = None
        if res.offline:
            problem = res.offline_reason or f"the backend at {self._client().base_url} is unreachable"
        elif res.files_failed:
            shown = ", ".join(res.files_failed[:3]) + (" ..." if len(res.files_failed) > 3 else "")
            problem = (f"{len(res.files_failed)} export file(s) failed verification or could not be fetched ({shown}); "
                       "check [sync] trusted_keys (the backend's `public-key`), else they are retried at the next sync")
        return CheckResult(now, res.offline, f"sync offline={res.offline} files={res.files_new} keys={res.key_count}",
                           message, exposed, {"files": res.files_new, "failed_files": list(res.files_failed),
                                              "keys": res.key_count}, problem)

    def teks_to_upload(self, now: float) -> list[gaen.TemporaryExposureKey]:
        """Own TEKs of the last ``UPLOAD_DAYS`` days, including today's (embargoed by the server)."""
        since = utc_day(now) - UPLOAD_DAYS + 1
        return sorted(self.store.teks.all(since_day=since), key=lambda t: t.rolling_start_interval_number)

    def declare_prompt(self, now: float) -> str:
        return (f"Upload your {len(self.teks_to_upload(now))} key(s) of the last {UPLOAD_DAYS} days? People you met "
                "will be notified without learning who you are.")

    def declare(self, code: str, now: float) -> DeclareResult:
        return self._client().declare(code, self.teks_to_upload(now), self.store, now=now)

    # -- status -----------------------------------------------------------------------
    def status_fields(self) -> dict[str, Any]:
        return {"own_keys": len(self.store.teks.all()), "open_encounters": len(self.aggregator)}

    def identifiers_by_day(self) -> dict[int, int]:
        return self.store.encounters.count_by_day()  # counted without decrypting

    def heard_by_day(self) -> list[DaySummary]:
        days: dict[int, list[int]] = {}
        for e in self.store.encounters.read():
            d = days.setdefault(e.day, [0, 0, 0])
            d[0] += 1
            d[1] += e.sample_count
            d[2] += len(e.windows)
        return [DaySummary(k, *days[k]) for k in sorted(days)]

    def last_server_success(self) -> float | None:
        last = self.store.state.get(LastSync)
        return last.at if last else None

    def own_identifiers(self) -> list[tuple[str, bytes, int, int]]:
        """Own TEKs: the analysis derives every RPI (and opens every AEM) from them."""
        return [("tek", k.key_data, k.rolling_start_interval_number, k.rolling_period) for k in self.store.teks.all()]

    # -- simulation -------------------------------------------------------------------
    @classmethod
    def simulated_peer(cls, rng: random.Random, tx_power_dbm: int) -> SimulatedPeer:
        return _GaenPeer(rng, tx_power_dbm)


class ExposureCheck:
    """One exposure check: keys come in as arrays, file by file; the stored encounters are
    read once, in bulk, at the first keys (:meth:`EncounterTable.matching_arrays`); only the
    few encounters whose RPIs match are read in full. ``finish`` decides and records."""

    def __init__(self, mode: GaenMode, now: float) -> None:
        self.mode, self.now = mode, now
        self.index: EncounterIndex | None = None
        self.matches: list[KeyMatch] = []
        mode.last_match = self.stats = MatchStats()

    def add(self, keys: PackedKeys) -> None:
        if not len(keys):
            return
        store = self.mode.store
        if self.index is None:
            arrays = store.encounters.matching_arrays(since_day=utc_day(self.now) - store.retention_days + 1)
            self.index = EncounterIndex.from_arrays(arrays.rpis, arrays.first_enin, arrays.last_enin, arrays.row_ids)
        found = find_candidates(keys, self.index, workers=self.mode.ctx.match_workers, stats=self.stats)
        if len(found):
            encounters = store.encounters.get_many(self.index.row_ids[found.entry].tolist())
            self.matches += confirm(keys, found, self.index, encounters)

    def finish(self) -> list[ExposureDecision]:
        store = self.mode.store
        # the hmm rule also reads what was heard each minute, of every identifier
        heard = (store.heard_minutes.read(since_day=utc_day(self.now) - store.retention_days + 1)
                 if self.mode.config.rule == "hmm" and self.matches else None)
        decisions = decide_matches(self.matches, self.mode.config, self.mode.calibration, heard=heard)
        exposed = [d for d in decisions if d.exposed]
        for d, new in zip(exposed, store.exposures.add_many([d.to_exposure(self.now) for d in exposed])):
            if new:
                log.info("exposure found: day=%d minutes=%.1f", d.day.day, d.day.minutes)
        return decisions


class _GaenPeer:
    """A simulated EN device: its own identifier schedule, real payloads."""

    def __init__(self, rng: random.Random, tx_power_dbm: int) -> None:
        schedule_rng = random.Random(rng.getrandbits(64))
        key_rng = random.Random(rng.getrandbits(64))
        self.schedule = IdSchedule(tx_power_dbm=tx_power_dbm, rng=schedule_rng,
                                   tek_factory=lambda: key_rng.randbytes(gaen.KEY_LEN))
        self._rot: Rotation | None = None

    def advertisement(self, now: float) -> tuple[str, dict[str, bytes]]:
        if self._rot is None or now >= self._rot.next_at:
            self._rot = self.schedule.rotate(now)
        return self._rot.address, {EN_SERVICE_UUID: self._rot.payload.service_data}
