"""The one path-loss model of the project: log-distance, referenced at 1 m,

    attenuation(d) = A_1m + 10 n log10(d)        d(attenuation) = 10 ** ((A - A_1m) / (10 n))

The proximity rule inverts it (with its configured A_1m and n), the simulated medium and
the fake bluetoothd use it forwards (with the parameters of the "true" world they
simulate, which need not be the rule's). Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogDistancePathLoss:
    #: Attenuation (dB) at 1 m between calibrated devices.
    attenuation_at_1m_db: float = 50.0
    #: Path-loss exponent n (2 = free space; indoors 2-4).
    exponent: float = 2.5

    def attenuation_db(self, distance_m: float) -> float:
        return self.attenuation_at_1m_db + 10.0 * self.exponent * math.log10(distance_m)

    def attenuation_db_array(self, distance_m: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`attenuation_db` (the simulator's every-pair matrix)."""
        att: np.ndarray = self.attenuation_at_1m_db + 10 * self.exponent * np.log10(distance_m)
        return att

    def distance_m(self, attenuation_db: float) -> float:
        return float(10.0 ** ((attenuation_db - self.attenuation_at_1m_db) / (10.0 * self.exponent)))


def rayleigh_fading_db(rng: np.random.Generator, n: int) -> np.ndarray:
    """Fast fading of ``n`` packets: received power exponential around its mean (Rayleigh)."""
    fading: np.ndarray = 10 * np.log10(rng.exponential(1.0, n))
    return fading
