"""The analysis report folder: ``index.html`` (self-contained: every figure embedded as
PNG data), ``summary.json``, and each figure as a PNG file."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..clock import iso_date, iso_time
from .analyze import Analysis

#: per-pair timelines drawn (the pairs with most true contact, else most minutes heard)
TIMELINE_PAIRS = 6
DISTANCE_BINS = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 5, 7, 10, 20])


def summary_json(a: Analysis) -> dict[str, Any]:
    return {
        "devices": [{"label": d.label, "model": d.model, "carriage": d.manifest.carriage,
                     "protocol": d.manifest.protocol, "host": d.manifest.host,
                     "software_version": d.manifest.software_version, "collected_at": d.manifest.collected_at,
                     "sightings": d.sightings, "resolved": d.resolved, "clock_offset_s": round(d.offset_s, 4),
                     "clock_offset_source": d.offset_source,
                     "radio_down_s": _down_seconds(a, d.index),
                     "rule": {"distance_threshold_m": d.proximity.distance_threshold_m,
                              "duration_threshold_min": d.proximity.duration_threshold_min,
                              "rule": d.proximity.rule}} for d in a.devices],
        "has_truth": a.has_truth,
        "metrics": a.metrics, "metrics_by_model": a.by_model, "metrics_by_carriage": a.by_carriage,
        "crowd_rank": a.crowd_rank,
        "pair_days": [{**r, "date": iso_date(r["day"])} for r in a.pair_days],
        "fused_pair_days": [{**r, "date": iso_date(r["day"])} for r in a.fused_days],
        "loss": a.loss,
        "timings_s": {k: round(v, 3) for k, v in a.timings.items()},
    }


def _down_seconds(a: Analysis, i: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind, s, e in a.radio_down.get(i, []):
        out[kind] = round(out.get(kind, 0.0) + max(0.0, e - s), 1)
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _pairs_to_show(a: Analysis) -> list[tuple[int, int]]:
    score: dict[tuple[int, int], float] = {}
    idx = {d.label: d.index for d in a.devices}
    for r in a.pair_days:
        k = (idx[r["receiver"]], idx[r["transmitter"]])
        score[k] = score.get(k, 0.0) + 1000 * (r["true_close_minutes"] or 0) + r["minutes_heard"]
    return [k for k, v in sorted(score.items(), key=lambda kv: -kv[1]) if v > 0][:TIMELINE_PAIRS]


def figures(a: Analysis) -> dict[str, tuple[str, bytes]]:
    """name -> (caption, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, out = a.minutes, {}
    cfg = a.devices[0].proximity if a.devices else None
    labels = [d.label for d in a.devices]
    t0 = float(m.true_start.min()) if len(m.true_start) else 0.0

    # 1. per-pair timelines: attenuation per minute, true distance
    pairs = _pairs_to_show(a)
    if pairs:
        fig, axes = plt.subplots(len(pairs), 1, figsize=(11, 2.2 * len(pairs)), sharex=True, squeeze=False)
        for ax, (rx, tx) in zip(axes[:, 0], pairs):
            sel = (m.rx == rx) & (m.tx == tx)
            hours = (m.true_start[sel] - t0) / 3600
            ax.plot(hours, m.att[sel], ".", ms=2, color="tab:blue", label="attenuation (dB)")
            if cfg is not None:
                ax.axhline(cfg.attenuation_at(cfg.distance_threshold_m), color="tab:blue", ls=":", lw=0.8)
            ax.set_ylabel(f"{labels[rx]}\n← {labels[tx]}", fontsize=8)
            if a.truth:
                t = np.arange(t0, float(m.true_start.max()) + 60, 30.0)
                dist = a.truth.distance_at(labels[rx], labels[tx], t)
                ax2 = ax.twinx()
                ax2.plot((t - t0) / 3600, dist, color="tab:red", lw=0.8, label="true distance (m)")
                ax2.set_ylim(0, 6)
                ax2.set_ylabel("m", color="tab:red", fontsize=8)
        axes[-1, 0].set_xlabel("hours since the first minute (true time)")
        fig.suptitle("Per-pair timelines: attenuation each minute (blue; dotted: the rule's 1 m) and true distance "
                     "(red)", fontsize=10)
        fig.tight_layout()
        out["timelines"] = ("Per-pair timelines of attenuation with the true distance", _png(fig))
        plt.close(fig)

    # 2. RSSI (attenuation) vs distance per pair, with spread
    if a.truth and len(m.rx):
        fig, ax = plt.subplots(figsize=(11, 4.5))
        dist = np.full(len(m.rx), np.nan)
        for rx in range(len(labels)):
            for tx in range(len(labels)):
                sel = (m.rx == rx) & (m.tx == tx)
                if sel.any():
                    dist[sel] = a.truth.distance_at(labels[rx], labels[tx], m.true_start[sel] + 30)
        ok = ~np.isnan(dist)
        data = [m.att[ok & (dist >= lo) & (dist < hi)] for lo, hi in zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:])]
        pos = [i for i, x in enumerate(data) if len(x)]
        if pos:
            ax.boxplot([data[i] for i in pos], positions=pos, widths=0.6, showfliers=False)
            for p in pairs:  # each shown pair's median per bin: the spread between pairs
                sel = ok & (m.rx == p[0]) & (m.tx == p[1])
                med = [float(np.median(m.att[sel & (dist >= lo) & (dist < hi)]))
                       if (sel & (dist >= lo) & (dist < hi)).any() else np.nan
                       for lo, hi in zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:])]
                ax.plot(range(len(med)), med, "o-", ms=3, lw=0.8, label=f"{labels[p[0]]} ← {labels[p[1]]}")
            ax.set_xticks(range(len(DISTANCE_BINS) - 1),
                          [f"{lo:g}-{hi:g}" for lo, hi in zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:])])
            ax.set_xlabel("true distance (m)")
            ax.set_ylabel("attenuation per minute (dB)")
            ax.set_title("Attenuation vs true distance: all pairs (boxes: quartiles, whiskers 1.5 IQR) and the "
                         "median of each shown pair", fontsize=10)
            ax.legend(fontsize=7)
            fig.tight_layout()
            out["rssi_vs_distance"] = ("Attenuation vs true distance, per pair, with spread", _png(fig))
        plt.close(fig)

        # 4. detection probability vs distance: true minutes heard at least once
        fig, ax = plt.subplots(figsize=(11, 3.5))
        heard = {(int(r), int(x), int(round(s / 60))) for r, x, s in zip(m.rx, m.tx, m.true_start)}
        t_all = np.arange(math.floor(t0 / 60) * 60, float(m.true_start.max()) + 60, 60.0)
        hits = np.zeros(len(DISTANCE_BINS) - 1)
        total = np.zeros(len(DISTANCE_BINS) - 1)
        for rx in range(len(labels)):
            for tx in range(len(labels)):
                if rx == tx:
                    continue
                d = a.truth.distance_at(labels[rx], labels[tx], t_all + 30)
                ok = ~np.isnan(d)
                b = np.digitize(d[ok], DISTANCE_BINS) - 1
                got = np.array([(rx, tx, int(round(t / 60))) in heard for t in t_all[ok]], dtype=bool)
                valid = (b >= 0) & (b < len(total))
                np.add.at(total, b[valid], 1)
                np.add.at(hits, b[valid], got[valid])
        with np.errstate(invalid="ignore", divide="ignore"):
            ax.bar(range(len(total)), np.where(total > 0, hits / total, np.nan), color="tab:green")
        ax.set_xticks(range(len(total)), [f"{lo:g}-{hi:g}" for lo, hi in zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:])])
        ax.set_ylim(0, 1)
        ax.set_xlabel("true distance (m)")
        ax.set_ylabel("P(heard in the minute)")
        ax.set_title("Detection probability vs true distance (minutes with at least one advertisement received)",
                     fontsize=10)
        fig.tight_layout()
        out["detection"] = ("Detection probability vs distance", _png(fig))
        plt.close(fig)

    # 3. contact matrix: minutes the rule counted (max per day) and the truth
    n = len(labels)
    if n:
        idx = {lab: i for i, lab in enumerate(labels)}
        counted, true = np.zeros((n, n)), np.zeros((n, n))
        for r in a.pair_days:
            i, j = idx[r["receiver"]], idx[r["transmitter"]]
            counted[i, j] = max(counted[i, j], r["rule_minutes"])
            true[i, j] = max(true[i, j], r["true_close_minutes"] or 0)
        panels = [(counted, "minutes the rule counted (max per day)")]
        if a.truth:
            panels.append((true, "true minutes within the rule's distance (max per day)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 5), squeeze=False)
        thr = a.devices[0].proximity.duration_threshold_min
        for ax, (mat, title) in zip(axes[0], panels):
            im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=max(thr * 2, float(mat.max()) or 1))
            for i in range(n):
                for j in range(n):
                    if mat[i, j] >= thr:
                        ax.text(j, i, "●", ha="center", va="center", color="white", fontsize=7)
            ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(n), labels, fontsize=7)
            ax.set_xlabel("transmitter")
            ax.set_ylabel("receiver")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"Contact matrix (● at or over {thr:g} min)", fontsize=10)
        fig.tight_layout()
        out["contact_matrix"] = ("The contact matrix", _png(fig))
        plt.close(fig)

    # 5. loss and radio-down timelines
    if n:
        fig, ax = plt.subplots(figsize=(11, 0.45 * n + 1.5))
        colours = {"scan_failed": "tab:red", "scanner_stall": "tab:orange", "scan_paused": "tab:gray",
                   "advertise_failed": "tab:purple", "advertise_paused": "lightgray"}
        for i in range(n):  # one collection per device and kind: thousands of windows stay fast
            start, end, frac = a.scanning.get(i, (np.zeros(0), np.zeros(0), np.zeros(0)))
            if len(start):
                ax.broken_barh(list(zip((start - t0) / 3600, (end - start) / 3600)), (i - 0.4, 0.8),
                               facecolors=[(0.2, 0.5, 0.9, 0.15 + 0.6 * f) for f in frac])
            by_kind: dict[str, list[tuple[float, float]]] = {}
            for kind, s, e in a.radio_down.get(i, []):
                by_kind.setdefault(kind, []).append(((s - t0) / 3600, max(e - s, 30) / 3600))
            for kind, ranges in by_kind.items():
                ax.broken_barh(ranges, (i - 0.15, 0.3), color=colours.get(kind, "black"), label=kind)
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(zip(names, handles))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper right")
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("hours since the first minute (true time)")
        ax.set_title("Listening (blue, darker = more of the window) and radio-down intervals; gaps: not running",
                     fontsize=10)
        fig.tight_layout()
        out["radio"] = ("Loss and radio-down timelines", _png(fig))
        plt.close(fig)
    return out


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def write_report(a: Analysis, out: Path, *, source: str, generated_at: float) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_json(a)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    figs = figures(a)
    for name, (_, png) in figs.items():
        (out / f"{name}.png").write_bytes(png)
    metric_rows = [{"decision": k, **v} for k, v in a.metrics.items()]
    interesting = [r for r in summary["pair_days"] if r["minutes_heard"] or r["true_close_minutes"]]
    interesting.sort(key=lambda r: (-(r["true_close_minutes"] or 0), -r["rule_minutes"]))
    fused = [r for r in summary["fused_pair_days"] if r["fusion_minutes"] or r["true_close_minutes"]]
    parts = [
        f"<h1>Field experiment analysis</h1><p>{html.escape(source)} — {len(a.devices)} devices, generated "
        f"{iso_time(generated_at)} by ctagent. Decisions: <b>rule</b> = the on-device rule (the agent's code, each "
        f"receiver's own settings); <b>fusion</b> = both directions of a pair fused (smaller attenuation per minute); "
        f"<b>crowd</b> = the rule counting a minute only when the transmitter ranks among the {a.crowd_rank} "
        "strongest the receiver heard that minute.</p>",
        "<h2>Precision, recall, F1 (15 min / 1 m per pair and day)</h2>" + (
            _table(metric_rows, ["decision", "tp", "fp", "fn", "tn", "precision", "recall", "f1"]) if a.has_truth
            else "<p>No ground truth given: decisions only.</p>"),
    ]
    if a.by_model:
        parts.append("<h3>The rule per device model (receiver ← transmitter)</h3>" + _table(
            [{"models": k, **v} for k, v in a.by_model.items()], ["models", "tp", "fp", "fn", "tn", "precision",
                                                                  "recall", "f1"]))
    if a.by_carriage:
        parts.append("<h3>The rule per carriage (receiver/transmitter)</h3>" + _table(
            [{"carriage": k, **v} for k, v in a.by_carriage.items()], ["carriage", "tp", "fp", "fn", "tn",
                                                                       "precision", "recall", "f1"]))
    parts.append("<h2>Devices</h2>" + _table(summary["devices"], ["label", "model", "carriage", "sightings",
                                                                   "resolved", "clock_offset_s",
                                                                   "clock_offset_source", "radio_down_s"]))
    for name, (caption, png) in figs.items():
        parts.append(f"<h2>{html.escape(caption)}</h2><img alt='{name}' src='data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}'>")
    parts.append("<h2>Per pair and day (pairs heard or truly close)</h2>" + _table(
        interesting, ["receiver", "transmitter", "date", "minutes_heard", "rule_minutes", "rule_exposed",
                      "crowd_minutes", "crowd_exposed", "true_close_minutes", "truly_exposed"]))
    parts.append("<h2>Fusion of both directions, per pair and day</h2>" + _table(
        fused, ["a", "b", "date", "fusion_minutes", "fusion_exposed", "true_close_minutes", "truly_exposed"]))
    parts.append("<h2>Loss per pair (minutes heard)</h2>" + _table(
        a.loss, ["receiver", "transmitter", "minutes_heard", "received", "expected", "reception_ratio", "assumed"]))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px;"
             "margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ctagent experiment analysis</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
