"""The proximity rules that Exposure Notification apps shipped in 2020, as published, for
comparison with ours (``benchmarks/eval_proximity.py``, field-experiment analysis).

Each rule reads minutes at an attenuation (dB, on the calibrated attenuation scale of
Exposure Notification: TX power - (RSSI + the receiver's correction)) and says whether
it would have notified. Where a rule has several buckets, an attenuation falls in the
first bucket whose upper bound it is below (the EN "attenuation durations" below,
between and above the thresholds). Sources (the configuration each app fetched or
shipped) are cited beside each rule; their published thresholds are used as they are,
never tuned here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class AttenuationRule:
    """Weighted minutes per attenuation bucket, times ``factor``, against a threshold."""

    name: str
    #: Upper bounds (dB, exclusive) of the weighted buckets; above the last: weight 0.
    bounds_db: tuple[float, ...]
    weights: tuple[float, ...]
    #: Notify when the (weighted, factored) minutes reach this.
    threshold_min: float
    #: CWA: the transmission risk value multiplying the weighted minutes.
    factor: float = 1.0
    #: CWA: a contact with fewer than ``drop_min`` minutes below ``drop_above_db`` is dropped.
    drop_above_db: float | None = None
    drop_min: float = 0.0
    source: str = ""

    def score(self, minutes: Iterable[tuple[float, float]]) -> float:
        """``minutes``: (attenuation dB, minutes at it)."""
        weighted = below_drop = 0.0
        for att, mins in minutes:
            for bound, w in zip(self.bounds_db, self.weights):
                if att < bound:
                    weighted += w * mins
                    break
            if self.drop_above_db is not None and att < self.drop_above_db:
                below_drop += mins
        if self.drop_above_db is not None and below_drop < self.drop_min:
            return 0.0
        return weighted * self.factor

    def notifies(self, minutes: Iterable[tuple[float, float]]) -> bool:
        return self.score(minutes) >= self.threshold_min


@dataclass(frozen=True)
class ImmuniV1:
    """Exposure Notification v1 risk score as Immuni configured it: attenuation score 5
    unless the exposure's time-weighted mean attenuation is above 73 dB (EN v1 bucket 0),
    duration score 5 only above 15 minutes (EN v1 duration buckets: 0, <=5, <=10, <=15,
    <=20, ...), other scores 1: risk 25 >= the minimum 20, else 0."""

    name: str = "Immuni (2020)"
    max_mean_attenuation_db: float = 73.0
    threshold_min: float = 15.0
    # ../shared/data/dublin_tram_gaen/immuni_config_settings.txt (fetched 22 June 2020 by
    # Leith & Farrell): attenuation_bucket_scores [0,5,5,5,5,5,5,5], duration_bucket_scores
    # [0,0,0,0,5,5,5,5], exposure_info_minimum_risk_score 20.
    source: str = "Immuni settings of 22 June 2020 (dublin_tram_gaen/immuni_config_settings.txt)"

    def score(self, minutes: Iterable[tuple[float, float]]) -> float:
        """The exposure's minutes if its mean attenuation scores, else 0."""
        pairs = list(minutes)
        total = sum(m for _, m in pairs)
        if total <= 0:
            return 0.0
        mean = sum(a * m for a, m in pairs) / total
        return total if mean <= self.max_mean_attenuation_db else 0.0

    def notifies(self, minutes: Iterable[tuple[float, float]]) -> bool:
        return self.score(minutes) > self.threshold_min  # "> 15 min": duration bucket 4 starts above 15


#: Corona-Warn-App (Germany), its first EN v2 risk parameters:
#: corona-warn-app/cwa-server services/distribution/src/main/resources/main-config/v2/
#: risk-calculation-parameters.yaml @ fd252963: windows with < 10 min below 73 dB dropped;
#: weights [0, 55) dB 1.0, [55, 63) dB 0.5; normalised time >= 15 min is high risk;
#: normalised time = transmission risk value x weighted minutes (the app's
#: RiskCalculation), value = TRL x 0.2 with TRL = 6 (confirmed test) + 1 (standard
#: infectiousness) = 7 (trlEncoding of the same file): 1.4.
CWA_V2 = AttenuationRule("CWA v2 (2020)", (55.0, 63.0), (1.0, 0.5), 15.0, factor=1.4, drop_above_db=73.0,
                         drop_min=10.0, source="cwa-server risk-calculation-parameters.yaml @ fd252963")
#: SwissCovid: SwissCovid/swisscovid-config-backend GAENSDKConfig.java @ c43de039:
#: lowerThreshold 53, higherThreshold 60, factorLow 1.0, factorHigh 0.5, triggerThreshold 15.
SWISSCOVID = AttenuationRule("SwissCovid (2020)", (53.0, 60.0), (1.0, 0.5), 15.0,
                             source="swisscovid-config-backend GAENSDKConfig.java @ c43de039")
#: Ireland (COVID Tracker, built on NearForm's covidgreen code base, package ie.gov.tracing):
#: the covidgreen documentation's configuration: durationAtAttenuationThresholds [56, 62],
#: thresholdWeightings [1, 0.5, 0], timeThreshold 15 (weighted minutes >= 15 notify).
IRELAND = AttenuationRule("Ireland (2020)", (56.0, 62.0), (1.0, 0.5), 15.0,
                          source="covidgreen configuration documentation (ie.gov.tracing)")
#: Canada (COVID Alert): cds-snc/covid-alert-app, ExposureNotificationService
#: summaryExceedsMinimumMinutes: immediate + near minutes (below attenuationDurationThresholds[1])
#: >= minimumExposureDurationMinutes; the app's default configuration: thresholds [50, 63], 15 min.
CANADA = AttenuationRule("Canada (2020)", (50.0, 63.0), (1.0, 1.0), 15.0,
                         source="cds-snc/covid-alert-app ExposureNotificationService, default configuration")
IMMUNI = ImmuniV1()

RULES_2020: tuple[AttenuationRule | ImmuniV1, ...] = (CWA_V2, SWISSCOVID, IRELAND, CANADA, IMMUNI)
