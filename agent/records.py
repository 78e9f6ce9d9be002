"""Records that cross module boundaries and are shared by both protocol families.

Family-specific records live beside their family: keys in ``agent.protocol`` (one
family: :class:`~agent.protocol.gaen.TemporaryExposureKey` and its
:class:`~agent.protocol.export.DiagnosisKey`), the ROBERT registration in
``agent.sync.robert``, sync results in ``agent.sync``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .exposure.rule import WindowDecision


@dataclass(frozen=True)
class Exposure:
    """An exposure found on one UTC day: one shape for every protocol family.

    GAEN decides on the device (``minutes`` counted by the rule, ``windows`` explain
    them); ROBERT's server decides (``risk`` is its score, no windows on the device).
    """

    day: int
    #: "gaen" or "robert": the protocol family that found it
    protocol: str
    #: what decided: the device's rule ("distance", "buckets", "hmm") or "server"
    decided_by: str
    found_at: float
    minutes: float | None = None
    threshold_min: float | None = None
    risk: float | None = None
    #: GAEN: the matching diagnosis key (its start interval, report type, onset)
    key_rolling_start: int | None = None
    report_type: int | None = None
    days_since_onset: int | None = None
    windows: tuple[WindowDecision, ...] = ()

    @property
    def uniqueness_key(self) -> bytes:
        """What the store keeps unique: one exposure per family, day and diagnosis key."""
        return f"{self.protocol}|{self.day}|{self.key_rolling_start}".encode()

    def to_json(self, *, windows: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "day": self.day, "protocol": self.protocol, "decided_by": self.decided_by, "found_at": self.found_at,
            "minutes": self.minutes, "threshold_min": self.threshold_min, "risk": self.risk,
            "key_rolling_start": self.key_rolling_start, "report_type": self.report_type,
            "days_since_onset": self.days_since_onset,
        }
        if windows:
            d["windows"] = [w.to_json() for w in self.windows]
        return d

    def to_bytes(self) -> bytes:
        doc = self.to_json()
        del doc["day"]  # the store keeps the day in its own column
        return json.dumps(doc).encode()

    @classmethod
    def from_bytes(cls, data: bytes, day: int) -> Exposure:
        """Read a stored exposure; also the two shapes written before this record existed
        (GAEN: ``rule`` and ``explain``; ROBERT: ``rule = "robert"``)."""
        doc = json.loads(data)
        if "protocol" not in doc:
            legacy_rule = doc.get("rule")
            explain = doc.get("explain") or {}
            doc = {
                "protocol": "robert" if legacy_rule == "robert" else "gaen",
                "decided_by": "server" if legacy_rule == "robert" else (legacy_rule or "distance"),
                "found_at": doc.get("found_at", 0.0), "minutes": doc.get("minutes"),
                "threshold_min": explain.get("threshold_min"), "risk": doc.get("risk"),
                "key_rolling_start": doc.get("key_rolling_start"), "report_type": doc.get("report_type"),
                "days_since_onset": explain.get("days_since_onset"), "windows": explain.get("windows", []),
            }
        return cls(
            day=day, protocol=str(doc["protocol"]), decided_by=str(doc["decided_by"]),
            found_at=float(doc["found_at"]), minutes=_opt_float(doc.get("minutes")),
            threshold_min=_opt_float(doc.get("threshold_min")), risk=_opt_float(doc.get("risk")),
            key_rolling_start=doc.get("key_rolling_start"), report_type=doc.get("report_type"),
            days_since_onset=doc.get("days_since_onset"),
            windows=tuple(WindowDecision.from_json(w) for w in doc.get("windows", [])),
        )


def _opt_float(v: object) -> float | None:
    return None if v is None else float(v)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DaySummary:
    """What a device heard on one UTC day, nothing identifying."""

    day: int
    #: distinct identifiers heard (GAEN RPIs, ROBERT EBIDs): a peer counts once per
    #: identifier it had that day (they rotate every 10 to 20 minutes)
    identifiers: int
    #: receptions kept (GAEN: samples in the per-minute windows; ROBERT: HELLOs)
    samples: int
    #: minutes with at least one reception, counted per identifier
    identifier_minutes: int

    def to_json(self) -> dict[str, Any]:
        from .clock import iso_date

        return {"date": iso_date(self.day), "identifiers": self.identifiers, "samples": self.samples,
                "identifier_minutes": self.identifier_minutes}


@dataclass(frozen=True)
class DeclareResult:
    """What a declaration achieved (GAEN: keys published; ROBERT: HELLOs reported)."""

    #: keys (GAEN) or HELLOs (ROBERT) sent
    sent: int
    #: keys the key server inserted, or HELLOs the ROBERT server verified (None: the
    #: server did not say, as robert-server does not)
    accepted: int | None
    #: one sentence for the user
    summary: str
    #: ROBERT: HELLOs the server could not verify
    dropped: int | None = None
    #: one sentence when the declaration did not achieve what it is for (nothing the
    #: server could use): the CLI then exits 1
    problem: str | None = None
