"""A synthetic experiment with known truth, written as research bundles the way devices
write them: real GAEN identifiers (each device's TEK, its RPIs and AEMs), rotations,
clock offsets, per-device RX and TX calibration errors, people walking in a room (their
position traces are the truth), a radio outage. For the analysis benchmark (20 devices
× 8 h × 19 peers at 5 samples/s, ~55 M sightings) and for tests at a small scale.

Vectorised per receiver (numpy); only the adverts (one per transmitter and rotation) are
built one by one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..clock import DAY_SECONDS
from ..exposure.pathloss import LogDistancePathLoss
from ..protocol import gaen
from ..protocol.schedule import random_nrpa
from .bundle import Manifest, write_bundle
from .collect import utc_iso

#: 2024-10-04 08:00 UTC
DEFAULT_START = 20_000 * DAY_SECONDS + 8 * 3600
ROOM_M = 8.0
TRACK_STEP_S = 10.0


@dataclass
class SyntheticTruth:
    #: device -> (true TX power - nominal, true RX correction - nominal), dB
    calibration_error: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: device -> clock offset (device time - true time), s
    clock_offset: dict[str, float] = field(default_factory=dict)
    sightings: int = 0


def write_synthetic_experiment(out: Path, *, devices: int = 4, hours: float = 0.5, rate_hz: float = 1.0,
                               seed: int = 1, start: float = DEFAULT_START, clock_offsets_s: float = 1.0,
                               calibration_error_db: float = 3.0, noise_db: float = 4.0, level: int = 1,
                               fixed_distance_m: float | None = None) -> SyntheticTruth:
    """``fixed_distance_m``: every pair at that distance all along (a calibration
    session), else people walking in a room (their traces are ``truth/positions.csv``)."""
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    out = Path(out)
    labels = [f"dev-{i:02d}" for i in range(devices)]
    duration = hours * 3600
    world = LogDistancePathLoss(50.0, 2.5)  # the rule's default model: calibration is then unbiased
    nominal_tx, nominal_corr = 4.0, 0.0
    tx_err = rng.normal(0, calibration_error_db, devices)
    rx_err = rng.normal(0, calibration_error_db, devices)
    offsets = rng.uniform(-clock_offsets_s, clock_offsets_s, devices)
    truth = SyntheticTruth({labels[i]: (float(tx_err[i]), float(rx_err[i])) for i in range(devices)},
                           {labels[i]: float(offsets[i]) for i in range(devices)})
    # people walking: a waypoint every few minutes, positions every TRACK_STEP_S
    track_t = start + np.arange(0, duration + TRACK_STEP_S, TRACK_STEP_S)
    pos = np.empty((devices, len(track_t), 2))
    for i in range(devices):
        way_t = np.arange(start, start + duration + 600, 300.0)
        way = rng.uniform(0, ROOM_M, (len(way_t), 2))
        pos[i, :, 0] = np.interp(track_t, way_t, way[:, 0])
        pos[i, :, 1] = np.interp(track_t, way_t, way[:, 1])
    truth_dir = out / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    if fixed_distance_m is None:
        with open(truth_dir / "positions.csv", "w") as f:
            f.write("device,t,x,y\n")
            for i in range(devices):
                f.writelines(f"{labels[i]},{t:.1f},{x:.3f},{y:.3f}\n" for t, (x, y) in zip(track_t, pos[i]))
    # identities: one TEK per device and day, a rotation every 10 min plus a random offset
    teks = [prng.randbytes(16) for _ in range(devices)]
    rot_times, rot_payloads, rot_addresses = [], [], []
    for i in range(devices):
        rpik, aemk = gaen.derive_rpik(teks[i]), gaen.derive_aemk(teks[i])
        meta = gaen.metadata(int(nominal_tx))
        first = gaen.interval_start_seconds(gaen.en_interval_number(start))
        times = [start] + [first + k * 600 + prng.uniform(0, 300) for k in range(1, int(duration // 600) + 3)]
        times = [t for t in times if t < start + duration]
        payloads = []
        for t in times:
            rpi = gaen.rpi(rpik, gaen.en_interval_number(t))
            payloads.append(rpi + gaen.encrypt_aem(aemk, rpi, meta))
        rot_times.append(np.array(times))
        rot_payloads.append(payloads)
        rot_addresses.append([random_nrpa(prng) for _ in times])
    per_pair = int(duration * rate_hz)
    for rx in range(devices):
        t_parts, a_parts, r_parts = [], [], []
        adverts: list[tuple[str, bytes]] = []
        for tx in range(devices):
            if tx == rx:
                continue
            t_true = np.sort(start + rng.uniform(0, duration, per_pair))
            k = np.clip(np.searchsorted(track_t, t_true) - 1, 0, len(track_t) - 1)
            d = (np.full(len(k), fixed_distance_m) if fixed_distance_m is not None
                 else np.maximum(np.sqrt(((pos[rx, k] - pos[tx, k]) ** 2).sum(1)), 0.1))
            rssi = (nominal_tx + tx_err[tx]) - world.attenuation_db_array(d) - (nominal_corr + rx_err[rx]) \
                + rng.normal(0, noise_db, len(d))
            rot = np.searchsorted(rot_times[tx], t_true, side="right") - 1
            base = len(adverts)
            adverts.extend(zip(rot_addresses[tx], rot_payloads[tx]))
            t_parts.append(t_true + offsets[rx])
            a_parts.append((base + rot).astype(np.int32))
            r_parts.append(np.clip(np.round(rssi), -126, 20).astype(np.int32))
        t_all: np.ndarray = np.concatenate(t_parts) if t_parts else np.zeros(0)
        order = np.argsort(t_all, kind="stable")
        t_all = t_all[order]
        down_start = start + duration / 2 + offsets[rx]  # device 0's scanner stalls for 5 minutes
        keep = ~((t_all >= down_start) & (t_all < down_start + 300)) if rx == 0 else np.ones(len(t_all), dtype=bool)
        win = start + offsets[rx] + np.arange(0, duration, 60.0)
        tables: dict[str, dict[str, Any] | None] = {
            "sightings": {"t": t_all[keep], "advert": np.concatenate(a_parts)[order][keep],
                          "rssi": np.concatenate(r_parts)[order][keep], "tx_power": np.full(int(keep.sum()), np.nan)},
            "adverts": {"advert": np.arange(len(adverts), dtype=np.int32), "address": [a for a, _ in adverts],
                        "payload": [p for _, p in adverts], "transmitter": [None] * len(adverts)},
            "own_ids": {"kind": ["tek"], "id": [teks[rx]], "start": [gaen.rolling_start_for_day(start)],
                        "period": [gaen.TEK_ROLLING_PERIOD]},
            "broadcasts": {"t": rot_times[rx] + offsets[rx], "address": rot_addresses[rx],
                           "payload": rot_payloads[rx], "new_identity": [True] * len(rot_times[rx])},
            "windows": {"start": win, "end": win + 60, "scanning_s": np.where(
                (rx == 0) & (win + 60 > down_start) & (win < down_start + 300), 0.0, 60.0),
                "advertising_s": np.full(len(win), 60.0),
                "received": np.histogram(t_all[keep], bins=np.append(win, win[-1] + 60))[0].astype(np.int64),
                "clock_synchronized": [True] * len(win), "clock_source": ["sim"] * len(win),
                "clock_offset_s": np.full(len(win), np.nan), "clock_error_s": np.full(len(win), np.nan)},
            "radio_down": ({"kind": ["scanner_stall"], "start": np.array([down_start]),
                            "end": np.array([down_start + 300]), "detail": ["synthetic"]} if rx == 0 else None),
        }
        manifest = Manifest(experiment_id=f"synthetic-{seed}", device_label=labels[rx], device_model="Synthetic",
                            protocol="gaen", consent_at=utc_iso(start), collected_at=utc_iso(start + duration),
                            host="synthetic", software_version=__version__,
                            first_t=float(t_all[0]) if len(t_all) else None,
                            last_t=float(t_all[-1]) if len(t_all) else None,
                            radio={"kind": "sim", "advertising_interval_s": 1 / rate_hz, "scan_duty": 1.0},
                            calibration={"model": "Synthetic", "rssi_correction": nominal_corr,
                                         "tx_power": nominal_tx, "confidence": 0})
        write_bundle(out / labels[rx], manifest, {k: v for k, v in tables.items() if v is not None}, level=level)
        truth.sightings += int(keep.sum())
    return truth
