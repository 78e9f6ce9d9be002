"""Evaluate the proximity rule on real BLE measurements at known distances.

Data sets (../shared/data, see its README for sources and licences):
- NIST Raspberry Pi 3 pair (rpi_nist_exposure_notification): 0.5-4 m, ~8 h per distance.
  Episode-level: each file is cut into 30-minute episodes; truth "exposed" = distance
  <= 1 m; decision = the rule on that episode. Calibration: agent/exposure/calibration.csv.
- pc-ng phones carried hand/pocket/backpack (pcng_rss_smartphone): 0.2-5 m.
- MIT LL phone pairs (mitll_ble_rssi: MIT-Matrix, Range-Angle): 3-15 ft.
  Phones have no entry in our calibration: each set is calibrated once at ~1 m (the
  procedure of hardware/calibration.md: the median 1-minute attenuation of one reference
  carriage at 1 m is set to attenuation_at_1m_db), then that one offset is used for
  every carriage and distance of the set.
For every set: the share of 1-minute windows counted as "within 1 m" at each distance.

Run:  .venv/bin/python -m benchmarks.eval_proximity [--data ../shared/data] [--png docs/proximity.png]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import statistics
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.exposure.calibration import CalibrationTable, bundled_calibration_path
from agent.exposure.evaluate import Confusion, pair_encounter
from agent.exposure.rule import ProximityConfig, decide, observations_from_encounter

FT = 0.3048


def window_attenuations(samples, tx, corr):
    enc = pair_encounter(samples)
    if enc is None:
        return []
    return observations_from_encounter(enc, tx_power_dbm=tx, rx_correction_db=corr)


def load_nist(root: Path):
    """{(distance_m, device): [(t, rssi, None)]}"""
    out = {}
    for f in sorted((root / "rpi_nist_exposure_notification").glob("ContactTracingData_*cm_Device_*.csv")):
        parts = f.stem.split("_")
        d = int(parts[1].removesuffix("cm")) / 100
        with f.open() as fh:
            out[(d, parts[-1])] = [(float(r["Timestamp"]), int(r["RSSI"]), None) for r in csv.DictReader(fh)]
    return out


def load_pcng(root: Path):
    """{(scenario, distance_m, device): samples}"""
    out = defaultdict(list)
    for f in sorted((root / "pcng_rss_smartphone").glob("*/RSS_human??.csv")):
        with f.open() as fh:
            for r in csv.DictReader(fh):
                sample = (float(r["elapsed"]), int(float(r["rss"])), None)
                out[(f.parent.name, int(r["dist"]) / 100, r["device"])].append(sample)
    return out


def load_mitll(root: Path, name: str):
    """{(file_id, distance_m): samples}; files with a single range only."""
    out = defaultdict(list)
    with gzip.open(root / "mitll_ble_rssi" / f"{name}_rssi.csv.gz", "rt") as fh:
        for r in csv.DictReader(fh):
            sample = (float(r["t_s"]), int(float(r["rssi_dbm"])), None)
            out[(r["file_id"], round(float(r["range_ft"]) * FT, 2))].append(sample)
    return out


def calibrate_offset(series: dict, ref_keys, cfg: ProximityConfig) -> float:
    """TX power making the median 1-min window attenuation of ``ref_keys`` equal to A_1m."""
    means = [w.mean_attenuation_db for k in ref_keys for w in window_attenuations(series[k], 0.0, 0.0)]
    return cfg.attenuation_at_1m_db - statistics.median(means)  # means are -RSSI with tx=0


def detection_by_distance(series: dict, dist_of, tx: float, corr: float, cfg: ProximityConfig):
    counted, total = defaultdict(int), defaultdict(int)
    for k, samples in series.items():
        d = dist_of(k)
        for w in window_attenuations(samples, tx, corr):
            total[d] += 1
            att = w.mean_attenuation_db if cfg.window_attenuation == "mean" else w.min_attenuation_db
            counted[d] += cfg.distance_m(att) <= cfg.distance_threshold_m
    return {d: (counted[d] / total[d], total[d]) for d in sorted(total)}


def nist_episodes(series: dict, tx: float, corr: float, cfg: ProximityConfig, episode_s: int = 1800):
    conf, per_dist = Confusion(), defaultdict(lambda: [0, 0])
    for (d, _dev), samples in series.items():
        samples = sorted(samples)
        t0 = samples[0][0]
        buckets = defaultdict(list)
        for s in samples:
            buckets[int((s[0] - t0) // episode_s)].append(s)
        for seg in buckets.values():
            if seg[-1][0] - seg[0][0] < episode_s * 0.8:
                continue  # a partial episode at the end of a file
            obs = window_attenuations(seg, tx, corr)
            exposed = any(x.exposed for x in decide(obs, cfg))
            conf.add(d <= cfg.distance_threshold_m, exposed)
            per_dist[d][0] += exposed
            per_dist[d][1] += 1
    return conf, {d: (v[0] / v[1], v[1]) for d, v in sorted(per_dist.items())}


def run(data: Path, cfg: ProximityConfig, console: Console | None = None, png: Path | None = None) -> dict:
    console = console or Console()
    cal = CalibrationTable.load(bundled_calibration_path()).lookup("Raspberry Pi 3 Model B")
    result: dict = {"config": {k: getattr(cfg, k) for k in ("rule", "distance_threshold_m", "duration_threshold_min",
                                                            "attenuation_at_1m_db", "path_loss_exponent",
                                                            "window_attenuation", "gap_fill_windows")}}
    curves = {}
    nist = load_nist(data)
    conf, ep = nist_episodes(nist, cal.tx_power, cal.rssi_correction, cfg)
    result["nist_episodes"] = {"tp": conf.tp, "fp": conf.fp, "tn": conf.tn, "fn": conf.fn,
                               "precision": conf.precision, "recall": conf.recall,
                               "exposed_share_by_distance": {str(d): v[0] for d, v in ep.items()}}
    curves["NIST Pi 3 pair (line of sight)"] = detection_by_distance(nist, lambda k: k[0], cal.tx_power,
                                                                     cal.rssi_correction, cfg)

    pcng = load_pcng(data)
    tx = calibrate_offset(pcng, [k for k in pcng if k[0] == "HandHand" and k[1] == 1.0], cfg)
    for scen in sorted({k[0] for k in pcng}):
        sub = {k: v for k, v in pcng.items() if k[0] == scen}
        curves[f"pc-ng phones {scen}"] = detection_by_distance(sub, lambda k: k[1], tx, 0.0, cfg)

    for name, label in (("mit_matrix", "MIT LL matrix (many carriages)"), ("mitll_range_angle", "MIT LL range-angle")):
        ser = load_mitll(data, name)
        ref_d = min({k[1] for k in ser}, key=lambda d: abs(d - 1.0))
        tx = calibrate_offset(ser, [k for k in ser if k[1] == ref_d], cfg)
        curves[label] = detection_by_distance(ser, lambda k: k[1], tx, 0.0, cfg)
    result["window_detection"] = {n: {str(d): round(v[0], 3) for d, v in c.items()} for n, c in curves.items()}

    t = Table(title="NIST Pi 3 pair: 30-minute episodes, truth = distance <= "
                    f"{cfg.distance_threshold_m:g} m, decision = rule ({cfg.rule})")
    for c in ("distance m", "episodes", "decided exposed"):
        t.add_column(c, justify="right")
    for d, (share, n) in ep.items():
        t.add_row(f"{d:g}", str(n), f"{share:.0%}")
    t.caption = (f"precision {conf.precision:.2f}  recall {conf.recall:.2f}  "
                 f"(TP {conf.tp} FP {conf.fp} TN {conf.tn} FN {conf.fn})")
    console.print(t)
    t = Table(title="Share of 1-minute windows counted as within "
                    f"{cfg.distance_threshold_m:g} m (n windows), by true distance")
    t.add_column("data set")
    t.add_column("distance m: share (n)")
    for name, c in curves.items():
        t.add_row(name, "  ".join(f"{d:g}: {v[0]:.0%} ({v[1]})" for d, v in c.items()))
    console.print(t)
    if png:
        plot(curves, ep, cfg, png)
        console.print(f"figure written to {png}")
    return result


def plot(curves, episodes, cfg, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, c in curves.items():
        ds = sorted(c)
        a1.plot(ds, [c[d][0] for d in ds], marker="o", ms=3, label=name)
    a1.axvline(cfg.distance_threshold_m, color="k", ls="--", lw=1, label="threshold")
    a1.set_xlabel("true distance (m)")
    a1.set_ylabel("share of 1-min windows counted")
    a1.set_title("Window-level detection")
    a1.legend(fontsize=7)
    ds = sorted(episodes)
    a2.bar([str(d) for d in ds], [episodes[d][0] for d in ds],
           color=["tab:red" if d <= cfg.distance_threshold_m else "tab:blue" for d in ds])
    a2.set_xlabel("true distance (m)")
    a2.set_ylabel("share of 30-min episodes decided exposed")
    a2.set_title("NIST Pi 3 pair: episode decisions (red: truly within threshold)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--png", type=Path, default=Path("docs/proximity.png"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a ProximityConfig setting, e.g. --set window_attenuation=min")
    a = ap.parse_args(argv)
    overrides = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        overrides[k] = v if k in ("rule", "window_attenuation") else float(v) if "." in v else int(v)
    cfg = ProximityConfig.from_mapping(overrides)
    res = run(a.data, cfg, png=a.png)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
