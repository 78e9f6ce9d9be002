"""The agent's application layer: one device's store, identifier schedule, aggregator,
matching and sync, driven by whoever owns the clock and the radio (the daemon on a
real device, the simulator in tests and the demo). No I/O of its own beyond the store
and the sync client it is given."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .exposure.aggregate import Aggregator
from .exposure.calibration import DEFAULT_CALIBRATION, DeviceCalibration
from .exposure.encounter import SECONDS_PER_DAY, Sighting
from .exposure.engine import ExposureDecision, decide_matches
from .exposure.matching import EncounterIndex, MatchStats, match_keys
from .exposure.rule import ProximityConfig
from .protocol import gaen
from .protocol.export import DiagnosisKey
from .protocol.schedule import IdSchedule, Rotation
from .store import Store

log = logging.getLogger("ctagent.agent")


@dataclass
class AgentStats:
    rotations: int = 0
    sightings: int = 0
    flushes: int = 0
    rows_written: int = 0
    syncs: int = 0
    last_match: MatchStats = field(default_factory=MatchStats)


class Agent:
    def __init__(self, store: Store, *, calibration: DeviceCalibration = DEFAULT_CALIBRATION,
                 config: ProximityConfig | None = None, rng: random.Random | None = None,
                 tek_factory: Callable[[], bytes] = gaen.new_tek, match_workers: int | None = None) -> None:
        self.store = store
        self.calibration = calibration
        self.config = config or ProximityConfig()
        # The AEM carries our calibrated TX power (as EN phones carry theirs).
        self.schedule = IdSchedule(tx_power_dbm=int(round(calibration.tx_power)), rng=rng, tek_factory=tek_factory)
        for t in store.teks():
            self.schedule.load_tek(t)
        self.aggregator = Aggregator()
        self.stats = AgentStats()
        self.match_workers = match_workers
        self.current: Rotation | None = None

    # -- advertising ----------------------------------------------------------------
    def rotate(self, now: float) -> Rotation:
        rot = self.schedule.rotate(now)
        if rot.new_tek:
            self.store.add_tek(rot.tek)
        self.current = rot
        self.stats.rotations += 1
        return rot

    # -- scanning -------------------------------------------------------------------
    def on_sighting(self, s: Sighting) -> None:
        self.stats.sightings += 1
        self.aggregator.add(s)

    def flush(self, now: float, *, final: bool = False) -> int:
        n = self.store.write_encounters(self.aggregator.flush(now, final=final))
        self.stats.flushes += 1
        self.stats.rows_written += n
        return n

    # -- exposure -------------------------------------------------------------------
    def check_exposures(self, keys: list[DiagnosisKey], now: float) -> list[ExposureDecision]:
        """Match keys against the stored encounters; record new exposures in the store."""
        since = int(now // SECONDS_PER_DAY) - self.store.retention_days + 1
        index = EncounterIndex(list(self.store.encounters(since_day=since)))
        st = MatchStats()
        matches = match_keys(keys, index, workers=self.match_workers, stats=st)
        self.stats.last_match = st
        decisions = decide_matches(matches, self.config, self.calibration)
        known = {(e.get("key_rolling_start"), e["day"]) for e in self.store.exposures()}
        for d in decisions:
            if d.exposed and (d.key_rolling_start, d.day.day) not in known:
                self.store.add_exposure(d.day.day, {"key_rolling_start": d.key_rolling_start,
                                                    "minutes": round(d.day.minutes, 1), "rule": d.day.rule,
                                                    "report_type": d.report_type, "found_at": now,
                                                    "explain": d.explain()})
                log.info("exposure found: day=%d minutes=%.1f", d.day.day, d.day.minutes)
        return decisions

    def sync(self, client, now: float, progress=None) -> tuple[object, list[ExposureDecision]]:
        res = client.download_exports(self.store, progress=progress)
        decisions = self.check_exposures(res.keys, now) if res.keys else []
        client.mark_processed(self.store, res)
        self.stats.syncs += 1
        return res, decisions

    def exposed_days(self) -> list[int]:
        return sorted({e["day"] for e in self.store.exposures()})
