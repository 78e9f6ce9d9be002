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
from typing import NamedTuple

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
        dx = pos[:, 0, None] - pos[None, :, 0]
        dy = pos[:, 1, None] - pos[None, :, 1]
        d = np.maximum(np.sqrt(dx * dx + dy * dy), 0.1)  # as ((a - b) ** 2).sum(-1), a sixth of the time
        rho = math.exp(-dt / c.shadow_tau_s)
        innov = self.rng.normal(0, c.shadow_db * math.sqrt(1 - rho * rho), self._shadow.shape)
        innov = (innov + innov.T) / math.sqrt(2)
        self._shadow = rho * self._shadow + innov
        att = (c.path_loss.attenuation_db_array(d) + self._body[:, None]
               + self._body[None, :] + c.wall_db * (room[:, None] != room[None, :]) + self._shadow)
        return att, d

    def draw(self, t: float, dt: float, pos: np.ndarray, room: np.ndarray, active: np.ndarray) -> Draws:
        """One scan tick of ``dt`` seconds, as arrays: every received advertisement's
        receiver, transmitter, time and RSSI, the samples of a pair contiguous (receivers
        ascending, then transmitters) in the order they were drawn."""
        c = self.cfg
        att, d = self.attenuation(pos, room, dt)
        self.last_attenuation = att
        n = len(att)
        mean_rssi = (self._tx[None, :] - att - self._corr[:, None]).ravel()
        expected = dt / (sum(c.adv_interval_s) / 2) * c.duty * (1 - c.loss)
        heard = mean_rssi > c.sensitivity_dbm - 10
        heard[:: n + 1] = False  # no device hears itself
        if not active.all():
            heard &= (active[:, None] & active[None, :]).ravel()
        pairs = np.flatnonzero(heard)  # rx * n + tx, receivers ascending, then transmitters
        if pairs.size == 0:
            return Draws(d, _NO_INT, _NO_INT, _NO_FLOAT, _NO_INT)
        counts = np.minimum(self.rng.poisson(expected, pairs.size), c.max_samples_per_tick)
        total = int(counts.sum())
        if total == 0:
            return Draws(d, _NO_INT, _NO_INT, _NO_FLOAT, _NO_INT)
        each = np.repeat(pairs, counts)
        fading = rayleigh_fading_db(self.rng, total)
        rssi = np.round(mean_rssi[each] + fading)
        times = t + self.rng.uniform(0, dt, total)
        keep = rssi >= c.sensitivity_dbm
        each = each[keep]
        return Draws(d, each // n, each % n, times[keep], rssi[keep].astype(np.int64))

    def tick(self, t: float, dt: float, pos: np.ndarray, room: np.ndarray, active: np.ndarray,
             deliver: Callable[[int, int, float, int], None]) -> np.ndarray:
        """One scan tick (:meth:`draw`), calling ``deliver(rx, tx, t_sample, rssi)`` for
        every received advertisement. Returns the distance matrix."""
        dr = self.draw(t, dt, pos, room, active)
        for r, x, ts, v in zip(dr.rx.tolist(), dr.tx.tolist(), dr.t.tolist(), dr.rssi.tolist()):
            deliver(r, x, ts, v)
        return dr.distance


class Draws(NamedTuple):
    """What :meth:`Medium.draw` drew for one tick."""

    distance: np.ndarray  # (n, n) metres
    rx: np.ndarray  # per sample: receiver index
    tx: np.ndarray  # per sample: transmitter index
    t: np.ndarray  # per sample: reception time
    rssi: np.ndarray  # per sample: RSSI (dBm, whole)


_NO_INT = np.empty(0, dtype=np.int64)
_NO_FLOAT = np.empty(0)


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
