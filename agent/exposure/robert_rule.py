"""ROBERT's server-side risk scoring, as deployed by TousAntiCovid (sans-I/O).

Per 15-minute epoch of one contact: readings above ``drop_above_dbm`` are dropped, the
rest clipped at ``clip_dbm``; 2-minute windows are averaged in the power domain; each
window's risk is ``clip((avg - rssi_threshold_dbm) / delta, 0, 1)`` where delta shrinks
with the number of packets in the window (more packets, more confidence); the epoch
contributes the sum of window risks x window minutes. The total risk is
``1 - exp(-lambda x sum of risk-weighted minutes)``; a device is "at risk" at or above
``at_risk_threshold`` when the last contact is within ``max_contact_age_days``.
With the defaults, 15 minutes of close contact (every window at full risk) gives
1 - exp(-0.0071 x 15) = 0.101: at risk, like the GAEN 15-minute rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..protocol.robert import EPOCH_SECONDS


@dataclass(frozen=True)
class RobertRiskConfig:
    epoch_s: int = EPOCH_SECONDS
    window_s: int = 120
    clip_dbm: float = -35.0
    drop_above_dbm: float = -5.0
    rssi_threshold_dbm: float = -66.0
    #: delta for 1, 2, 3, 4, 5 and 6+ packets in a window
    deltas: tuple[float, ...] = (39.0, 27.0, 23.0, 21.0, 20.0, 15.0)
    lambda_per_min: float = 0.0071
    at_risk_threshold: float = 0.1
    max_contact_age_days: int = 7


def epoch_weighted_minutes(samples: Iterable[tuple[float, float]], epoch_start: float,
                           cfg: RobertRiskConfig = RobertRiskConfig()) -> float:
    """Risk-weighted minutes of one contact in one epoch; samples are (time s, RSSI dBm)."""
    windows: dict[int, list[float]] = {}
    for t, rssi in samples:
        if rssi > cfg.drop_above_dbm:
            continue
        offset = t - epoch_start
        if not 0 <= offset < cfg.epoch_s:
            continue
        windows.setdefault(int(offset // cfg.window_s), []).append(min(rssi, cfg.clip_dbm))
    total = 0.0
    for w, values in windows.items():
        avg = 10 * math.log10(sum(10 ** (v / 10) for v in values) / len(values))
        delta = cfg.deltas[min(len(values), len(cfg.deltas)) - 1]
        risk = min(1.0, max(0.0, (avg - cfg.rssi_threshold_dbm) / delta))
        minutes = min(cfg.window_s, cfg.epoch_s - w * cfg.window_s) / 60
        total += risk * minutes
    return total


def total_risk(weighted_minutes: float, cfg: RobertRiskConfig = RobertRiskConfig()) -> float:
    return 1.0 - math.exp(-cfg.lambda_per_min * weighted_minutes)


def at_risk(weighted_minutes: float, last_contact_age_days: float, cfg: RobertRiskConfig = RobertRiskConfig()) -> bool:
    return (total_risk(weighted_minutes, cfg) >= cfg.at_risk_threshold
            and last_contact_age_days <= cfg.max_contact_age_days)
