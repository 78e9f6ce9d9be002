"""Matches -> decisions: the rule applied per diagnosis key (one person's day) per UTC day."""

from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Mapping

from ..protocol.export import DiagnosisKey
from ..records import Exposure
from .calibration import DeviceCalibration
from .matching import KeyMatch
from .minutes import HeardMinute
from .rule import DayDecision, ProximityConfig, WindowObservation, decide_peers, observations_from_encounter


@dataclass(frozen=True)
class ExposureDecision:
    key: DiagnosisKey
    day: DayDecision

    @property
    def exposed(self) -> bool:
        return self.day.exposed

    def to_exposure(self, found_at: float) -> Exposure:
        """The record the store keeps: windows, distances and minutes, no identifiers."""
        return Exposure(
            day=self.day.day, protocol="gaen", decided_by=self.day.rule, found_at=found_at,
            minutes=round(self.day.minutes, 1), threshold_min=self.day.threshold_min,
            key_rolling_start=self.key.rolling_start_interval_number, report_type=int(self.key.report_type),
            days_since_onset=self.key.days_since_onset_of_symptoms, windows=tuple(self.day.windows))


def decide_matches(matches: list[KeyMatch], config: ProximityConfig, receiver: DeviceCalibration, *,
                   heard: Mapping[int, HeardMinute] | None = None) -> list[ExposureDecision]:
    """TX power from each hit's decrypted AEM; the receiver's own RSSI correction; one
    peer per diagnosis key; ``heard``: the receiver's minutes (the hmm rule)."""
    peers: dict[int, list[WindowObservation]] = {}
    for i, m in enumerate(matches):
        obs = peers[i] = []
        for h in m.hits:
            obs.extend(observations_from_encounter(h.encounter, tx_power_dbm=h.tx_power_dbm,
                                                   rx_correction_db=receiver.rssi_correction))
    decided = decide_peers(peers, config, heard=heard)
    return [ExposureDecision(m.key, d) for i, m in enumerate(matches) for d in decided[i]]
