"""A simulated BLE medium: many devices in one process on a virtual clock.

Per receiver/transmitter pair and scan tick, the medium draws how many advertisements
the receiver hears and with what RSSI (the path loss is the project's one model,
``agent.exposure.pathloss``, with the simulated world's own parameters):

    attenuation = A_1m + 10 n log10(d) + body(tx) + body(rx) + walls + shadowing + fading
    RSSI        = tx_cal - attenuation - rx_correction

so that a receiver applying its calibration (attenuation = tx_cal - (RSSI + correction))
sees the physical attenuation. Shadowing is slow (an AR(1) process per pair, sigma
``shadow_db``, correlation time ``shadow_tau_s``); fast fading is Rayleigh (the power of
each packet is exponential around its mean); packets below ``sensitivity_dbm`` or lost
(``loss``) are not delivered. Advertising every 200-270 ms with a scan duty cycle
``duty`` gives the expected number of receptions per tick. Seeded and deterministic.

Everything is vectorised per tick over all pairs (numpy), so a day of 24 devices runs
in seconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ...exposure.pathloss import LogDistancePathLoss, rayleigh_fading_db

#: carriage -> extra attenuation (dB) of the human body; chosen from the 5-20 dB
#: differences between carriages in the pc-ng and MIT LL measurements (docs/proximity.md).
CARRIAGE_DB = {"hand": 0.0, "table": 0.0, "pocket": 6.0, "bag": 10.0}


@dataclass
class MediumConfig:
    #: the simulated world's path loss (the rule assumes its own, see ProximityConfig)
    path_loss: LogDistancePathLoss = field(default_factory=lambda: LogDistancePathLoss(50.0, 2.2))
    shadow_db: float = 3.0
    shadow_tau_s: float = 60.0
    wall_db: float = 12.0
    sensitivity_dbm: float = -98.0
    loss: float = 0.1
    adv_interval_s: tuple[float, float] = (0.200, 0.270)
    duty: float = 0.3
    #: delivered samples per pair and tick are capped (what BlueZ reports after its
    #: own merging is a few per second at most)
    max_samples_per_tick: int = 2


@dataclass
class SimDevice:
    name: str
    tx_cal_dbm: float  # the calibrated TX power it advertises in its AEM
    rx_correction_db: float
    carriage: str = "hand"


class Medium:
    def __init__(self, devices: list[SimDevice], config: MediumConfig | None = None, seed: int = 0) -> None:
        self.devices = devices
        self.cfg = config or MediumConfig()
        self.rng = np.random.default_rng(seed)
        n = len(devices)
        self._shadow = self.rng.normal(0, self.cfg.shadow_db, (n, n))
        self._shadow = (self._shadow + self._shadow.T) / math.sqrt(2)  # reciprocal channel
        self._body = np.array([CARRIAGE_DB[d.carriage] for d in devices])
        self._tx = np.array([d.tx_cal_dbm for d in devices])
        self._corr = np.array([d.rx_correction_db for d in devices])

    def set_carriage(self, i: int, carriage: str) -> None:
        self.devices[i].carriage = carriage
        self._body[i] = CARRIAGE_DB[carriage]

    def attenuation(self, pos: np.ndarray, room: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean attenuation matrix (dB) [rx, tx] for positions (n,2) and room ids (n,),
        advancing the shadowing by ``dt`` seconds. Also returns distances."""
        c = self.cfg
        d = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
        d = np.maximum(d, 0.1)
        rho = math.exp(-dt / c.shadow_tau_s)
        innov = self.rng.normal(0, c.shadow_db * math.sqrt(1 - rho * rho), self._shadow.shape)
        innov = (innov + innov.T) / math.sqrt(2)
        self._shadow = rho * self._shadow + innov
        att = (c.path_loss.attenuation_db_array(d) + self._body[:, None]
               + self._body[None, :] + c.wall_db * (room[:, None] != room[None, :]) + self._shadow)
        return att, d

    def tick(self, t: float, dt: float, pos: np.ndarray, room: np.ndarray, active: np.ndarray,
             deliver: Callable[[int, int, float, int], None] | None = None, *,
             deliver_many: Callable[[int, int, list[float], list[int]], None] | None = None) -> np.ndarray:
        """One scan tick of ``dt`` seconds: calls ``deliver(rx, tx, t_sample, rssi)``
        for every received advertisement, or ``deliver_many(rx, tx, times, rssis)`` once
        per pair with all of that pair's (the same draws, in the same order). Returns the
        distance matrix."""
        c = self.cfg
        att, d = self.attenuation(pos, room, dt)
        self.last_attenuation = att
        mean_rssi = self._tx[None, :] - att - self._corr[:, None]
        expected = dt / (sum(c.adv_interval_s) / 2) * c.duty * (1 - c.loss)
        heard = (mean_rssi > c.sensitivity_dbm - 10) & active[:, None] & active[None, :]
        np.fill_diagonal(heard, False)
        rx_idx, tx_idx = np.nonzero(heard)
        if rx_idx.size == 0:
            return d
        counts = np.minimum(self.rng.poisson(expected, rx_idx.size), c.max_samples_per_tick)
        total = int(counts.sum())
        if total == 0:
            return d
        rr = np.repeat(rx_idx, counts)
        tt = np.repeat(tx_idx, counts)
        fading = rayleigh_fading_db(self.rng, total)
        rssi = np.round(mean_rssi[rr, tt] + fading)
        times = t + self.rng.uniform(0, dt, total)
        keep = rssi >= c.sensitivity_dbm
        rr, tt, times_l, rssi_l = rr[keep].tolist(), tt[keep].tolist(), times[keep].tolist(), rssi[keep].tolist()
        if deliver_many is not None:  # pairs come in runs (np.repeat of the pairs)
            i, n = 0, len(rr)
            while i < n:
                j = i + 1
                while j < n and rr[j] == rr[i] and tt[j] == tt[i]:
                    j += 1
                deliver_many(rr[i], tt[i], times_l[i:j], [int(v) for v in rssi_l[i:j]])
                i = j
        elif deliver is not None:
            for r, x, ts, v in zip(rr, tt, times_l, rssi_l):
                deliver(r, x, ts, int(v))
        return d


def packet_rssi(rng: random.Random, distance_m: float, *, tx_power_dbm: float, rx_correction_db: float = 0.0,
                config: MediumConfig | None = None) -> int | None:
    """One packet between two devices ``distance_m`` apart, in the medium's model (path
    loss and Rayleigh fading; no body, walls or shadowing): its RSSI, or None when it is
    below the receiver's sensitivity. For single-pair simulators (the fake bluetoothd)."""
    c = config or MediumConfig()
    mean = tx_power_dbm - c.path_loss.attenuation_db(max(0.1, distance_m)) - rx_correction_db
    rssi = round(mean + 10 * math.log10(max(rng.expovariate(1.0), 1e-6)))
    return rssi if rssi >= c.sensitivity_dbm else None


class PacketChannel:
    """The medium packet by packet, for radios that transmit real PDUs (the bumble link,
    ``agent.ble.bumble.controller``): each call says whether one packet from ``tx``
    reaches ``rx`` and with what RSSI, in the same model as :meth:`Medium.tick` (path
    loss, body and wall loss, shadowing, Rayleigh fading, loss, sensitivity) but without
    its per-tick counting: the caller transmits every advertising event itself.

    Shadowing advances in steps of ``shadow_step_s`` of the caller's time, so the draws
    depend only on the seed and on the sequence of calls."""

    def __init__(self, devices: list[SimDevice], positions: list[tuple[float, float]], rooms: list[int],
                 config: MediumConfig | None = None, seed: int = 0, shadow_step_s: float = 1.0) -> None:
        self.medium = Medium(devices, config, seed=seed)
        self.pos = np.array(positions, dtype=float).reshape(len(devices), 2)
        self.room = np.array(rooms, dtype=int)
        self.shadow_step_s = shadow_step_s
        self._t: float | None = None
        self._att = np.zeros((len(devices), len(devices)))

    def _advance(self, t: float) -> None:
        if self._t is None:
            self._att, _ = self.medium.attenuation(self.pos, self.room, 0.0)
            self._t = t
        steps = int((t - self._t) // self.shadow_step_s)
        if steps > 0:
            # one step per call, however long the silence: the AR(1) decays by the whole gap
            self._att, _ = self.medium.attenuation(self.pos, self.room, steps * self.shadow_step_s)
            self._t += steps * self.shadow_step_s

    def mean_rssi(self, rx: int, tx: int, t: float) -> float:
        """The pair's mean RSSI (dBm) at ``t``: no fading."""
        self._advance(t)
        m = self.medium
        return float(m._tx[tx] - self._att[rx, tx] - m._corr[rx])

    def packet_rssi(self, rx: int, tx: int, t: float) -> int | None:
        """One packet from ``tx`` to ``rx`` at ``t``: its RSSI (dBm), or None when it is lost
        or below the receiver's sensitivity."""
        c = self.medium.cfg
        mean = self.mean_rssi(rx, tx, t)
        rng = self.medium.rng
        if rng.random() < c.loss:
            return None
        rssi = round(mean + float(rayleigh_fading_db(rng, 1)[0]))
        return rssi if rssi >= c.sensitivity_dbm else None

    def move(self, i: int, x: float, y: float) -> None:
        self.pos[i] = (x, y)
        self._t = None  # the new distance applies from the next packet
