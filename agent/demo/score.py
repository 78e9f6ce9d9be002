"""The demo's score: who was notified, against who truly spent >= 15 minutes within 1 m
of person 0 on one day (the confusion matrix and one row per device)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..exposure.evaluate import Confusion
from .fleet import Fleet
from .simulate import Trace


@dataclass
class DemoRow:
    device: int
    true_close_minutes: float
    truly_exposed: bool
    notified: bool
    #: minutes the device's rule counted; None where the server decided (ROBERT)
    minutes_counted: float | None
    #: "p0's carriage/this device's carriage" on the day of the most contact
    carriage: str

    @property
    def outcome(self) -> str:
        return ("TP" if self.truly_exposed and self.notified else "FN" if self.truly_exposed
                else "FP" if self.notified else "TN")

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "true_close_minutes": self.true_close_minutes,
                "truly_exposed": self.truly_exposed, "notified": self.notified,
                "minutes_counted": self.minutes_counted, "outcome": self.outcome, "carriage": self.carriage}


@dataclass
class DemoResult(Confusion):
    devices: int = 0
    days: int = 0
    seed: int = 0
    scenario: str = ""
    protocol: str = ""
    rows: list[DemoRow] = field(default_factory=list)
    sightings: int = 0
    rotations: int = 0
    wall_s: float = 0.0
    png: str | None = None

    def to_json(self) -> dict[str, Any]:
        def finite(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"devices": self.devices, "days": self.days, "seed": self.seed, "scenario": self.scenario,
                "protocol": self.protocol, "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
                "precision": finite(self.precision), "recall": finite(self.recall),
                "rows": [r.to_json() for r in self.rows], "sightings": self.sightings, "rotations": self.rotations,
                "wall_s": self.wall_s, "png": self.png}


def score(fleet: Fleet, trace: Trace, threshold_min: float, result: DemoResult) -> DemoResult:
    """Fill ``result`` with one row per device other than person 0."""
    for i in range(1, len(fleet.modes)):
        truth_min = float(trace.close_minutes[:, i].max())
        day_of = int(trace.close_minutes[:, i].argmax())
        truly = truth_min >= threshold_min
        exposures = fleet.stores[i].exposures.all()
        notified = bool(exposures)
        counted = max((e.minutes for e in exposures if e.minutes is not None), default=0.0)
        row = DemoRow(i, round(truth_min, 1), truly, notified, counted if fleet.mode_cls.decides_on_device else None,
                      f"{trace.carriages[day_of][0]}/{trace.carriages[day_of][i]}")
        result.add(truly, notified)
        result.rows.append(row)
    return result

