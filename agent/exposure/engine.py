"""Matches -> decisions: the rule applied per diagnosis key (one person's day) per UTC day."""

from __future__ import annotations

from dataclasses import dataclass

from .calibration import DeviceCalibration
from .matching import KeyMatch
from .rule import DayDecision, ProximityConfig, decide, observations_from_encounter


@dataclass
class ExposureDecision:
    key_rolling_start: int
    report_type: int
    days_since_onset: int | None
    day: DayDecision

    @property
    def exposed(self) -> bool:
        return self.day.exposed

    def explain(self) -> dict:
        """Windows, estimated distances and minutes that led to the decision (no identifiers)."""
        return {"key_rolling_start": self.key_rolling_start, "report_type": self.report_type,
                "days_since_onset": self.days_since_onset, **self.day.explain()}


def decide_matches(matches: list[KeyMatch], config: ProximityConfig,
                   receiver: DeviceCalibration) -> list[ExposureDecision]:
    """TX power from each hit's decrypted AEM; the receiver's own RSSI correction."""
    out = []
    for m in matches:
        obs = []
        for h in m.hits:
            obs.extend(observations_from_encounter(h.encounter, tx_power_dbm=h.tx_power_dbm,
                                                   rx_correction_db=receiver.rssi_correction))
        for d in decide(obs, config):
            out.append(ExposureDecision(m.key.rolling_start_interval_number, int(m.key.report_type),
                                        m.key.days_since_onset_of_symptoms, d))
    return out
