"""The demo's figure: distance to person 0 and the attenuation each device saw, for the
devices worth a look (every mistake, and every true contact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..exposure.rule import ProximityConfig
from .scenario import DAY0
from .score import DemoResult
from .simulate import Trace

#: gaps longer than this between ticks are nights: the lines break there
GAP_S = 60


def plot(res: DemoResult, trace: Trace, cfg: ProximityConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array(trace.t)
    d = np.array(trace.distance_to_p0)
    att = np.array(trace.attenuation_from_p0)
    interesting = [r for r in res.rows if r.outcome != "TN" or r.true_close_minutes >= 5][:8]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    hours = (t - DAY0) / 3600
    gap = np.append(np.diff(t) > GAP_S, False)
    for r in interesting:
        i = r.device
        near = np.where((d[:, i] < 5) & ~gap, d[:, i], np.nan)
        label = f"device {i}: {r.outcome} ({r.true_close_minutes:.0f} true min, {r.carriage})"
        (line,) = ax.plot(hours, near, lw=1, label=label)
        ax2.plot(hours, np.where((d[:, i] < 5) & ~gap, att[:, i], np.nan), lw=0.8, color=line.get_color())
    ax.axhline(cfg.distance_threshold_m, color="k", ls="--", lw=1, label=f"{cfg.distance_threshold_m:g} m threshold")
    ax2.axhline(cfg.attenuation_at(cfg.distance_threshold_m), color="k", ls="--", lw=1)
    ax2.set_xlabel("hours since day 1, 00:00 UTC (virtual time)")
    ax.set_ylabel("true distance to person 0 (m)")
    ax2.set_ylabel("mean attenuation (dB)\n(body, walls, shadowing)")
    ax.set_ylim(0, 5)
    ax.set_title(f"ctagent demo '{res.scenario}' ({res.protocol}), seed {res.seed}: who was near the positive person "
                 f"(TP {res.tp}, FP {res.fp}, FN {res.fn}, TN {res.tn})")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
