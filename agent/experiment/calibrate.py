"""Calibration from an experiment: per-device TX and RX offsets by least squares, with
standard errors, written as a calibration list in Google's format.

Model (attenuation = TX power − (RSSI + RX correction), and calibrated devices read the
project's path loss A(d) at distance d):

    RSSI_ij + A(d_ij) = tx_j − corr_i + noise

for receiver i hearing transmitter j at a known distance, one observation per minute
(the minute's mean RSSI in dBm). Only differences are
identified (adding c to every tx and every corr changes nothing), so the reference
device keeps its correction (``--reference``, else the device whose calibration has the
highest confidence, else the first). Ordinary least squares; standard errors from the
residuals. Devices of one model are merged (inverse-variance weights) into the model's
line, since a calibration list is per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .analyze import Analysis

MIN_MINUTES = 10


@dataclass(frozen=True)
class DeviceFit:
    label: str
    model: str
    rssi_correction: float
    rssi_correction_se: float
    tx_power: float
    tx_power_se: float
    minutes_rx: int
    minutes_tx: int
    #: the calibration it had: kept for what the experiment could not measure (a device
    #: that only received has no TX fit)
    prior_correction: float = 0.0
    prior_tx: float = 0.0


@dataclass(frozen=True)
class CalibrationFit:
    devices: tuple[DeviceFit, ...]
    reference: str
    residual_db: float
    observations: int

    def models(self) -> list[tuple[str, float, float, float, float, int]]:
        """(model, correction, its se, tx, its se, confidence) per model."""
        out = []
        for model in sorted({d.model for d in self.devices}):
            group = [d for d in self.devices if d.model == model]
            corr, corr_se = _merge([(d.rssi_correction, d.rssi_correction_se) for d in group
                                    if math.isfinite(d.rssi_correction)] or [(group[0].prior_correction, math.inf)])
            tx, tx_se = _merge([(d.tx_power, d.tx_power_se) for d in group if math.isfinite(d.tx_power)]
                               or [(group[0].prior_tx, math.inf)])
            minutes = sum(min(d.minutes_rx, d.minutes_tx) for d in group)
            confidence = 2 if max(corr_se, tx_se) <= 1.0 and minutes >= 30 else 1
            out.append((model, corr, corr_se, tx, tx_se, confidence))
        return out

    def to_csv(self) -> str:
        """Google's calibration list format (2020-09-30 / 2020-12-14 header)."""
        lines = ["oem,device,model,rssi_correction,tx,calibration_confidence",
                 f"# fitted by ctagent calibration fit: reference {self.reference}, {self.observations} minutes, "
                 f"residual {self.residual_db:.1f} dB; attenuation = tx - (rssi + rssi_correction)"]
        for model, corr, _, tx, _, conf in self.models():
            safe = model.replace(",", " ")
            lines.append(f",{safe},{safe},{corr:.1f},{tx:.1f},{conf}")
        return "\n".join(lines) + "\n"


def _merge(values: list[tuple[float, float]]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0]
    w = np.array([1 / max(se if math.isfinite(se) else 1e3, 1e-3) ** 2 for _, se in values])
    x = np.array([v for v, _ in values])
    return float((w * x).sum() / w.sum()), float(math.sqrt(1 / w.sum()))


def fit_calibration(a: Analysis, *, distance_m: float | None = None, reference: str | None = None,
                    max_distance_m: float = 5.0) -> CalibrationFit:
    """``distance_m``: every pair was that far apart (a dedicated session); else the
    truth gives each minute's distance (minutes beyond ``max_distance_m`` are left out)."""
    m, devices = a.minutes, a.devices
    n = len(devices)
    if distance_m is not None:
        dist = np.full(len(m.rx), float(distance_m))
    elif a.truth:
        dist = np.full(len(m.rx), np.nan)
        for rx in range(n):
            for tx in range(n):
                sel = (m.rx == rx) & (m.tx == tx)
                if sel.any():
                    dist[sel] = a.truth.distance_at(devices[rx].label, devices[tx].label, m.true_start[sel] + 30)
    else:
        raise UserError("calibration needs known distances: give --distance (a session at one distance) or "
                        "ground truth (--truth)")
    ok = np.isfinite(dist) & (dist > 0) & (dist <= max_distance_m)
    rx, tx, rssi, dist = m.rx[ok], m.tx[ok], m.rssi_db[ok], dist[ok]
    if len(rx) < MIN_MINUTES:
        raise UserError(f"only {len(rx)} minute(s) at a known distance: calibration needs at least {MIN_MINUTES}")
    if reference is None:
        ref = max(range(n), key=lambda i: (devices[i].manifest.calibration.get("confidence", 0), -i))
    else:
        found = [d.index for d in devices if d.label == reference]
        if not found:
            raise UserError(f"no device labelled {reference!r} in the experiment")
        ref = found[0]
    cfg = devices[ref].proximity
    y = rssi + cfg.attenuation_at_1m_db + 10 * cfg.path_loss_exponent * np.log10(dist)
    corr_ref = devices[ref].rx_correction
    # unknowns: tx_0..tx_{n-1}, then corr_i for i != ref
    others = [i for i in range(n) if i != ref]
    col = {i: n + k for k, i in enumerate(others)}
    x = np.zeros((len(y), n + len(others)))
    x[np.arange(len(y)), tx] = 1.0
    rhs = y.astype(float).copy()
    for k in range(len(y)):
        if rx[k] == ref:
            rhs[k] += corr_ref
        else:
            x[k, col[int(rx[k])]] = -1.0
    used = x.any(axis=0)
    coef = np.full(x.shape[1], np.nan)
    sol, *_ = np.linalg.lstsq(x[:, used], rhs, rcond=None)
    coef[used] = sol
    resid = rhs - x[:, used] @ sol
    dof = max(1, len(y) - int(used.sum()))
    sigma2 = float(resid @ resid) / dof
    se = np.full(x.shape[1], np.nan)
    try:
        cov = sigma2 * np.linalg.pinv(x[:, used].T @ x[:, used])
        se[used] = np.sqrt(np.maximum(np.diag(cov), 0))
    except np.linalg.LinAlgError:
        pass
    fits = []
    for i, d in enumerate(devices):
        corr, corr_se = (corr_ref, 0.0) if i == ref else (coef[col[i]], se[col[i]])
        if math.isnan(coef[i]) and math.isnan(corr):
            continue
        fits.append(DeviceFit(d.label, d.model, round(float(corr), 2), round(float(corr_se), 2),
                              round(float(coef[i]), 2), round(float(se[i]), 2),
                              int((rx == i).sum()), int((tx == i).sum()), d.rx_correction, d.tx_power))
    return CalibrationFit(tuple(fits), devices[ref].label, round(math.sqrt(sigma2), 2), len(y))
