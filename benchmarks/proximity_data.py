"""The measurement sets of ../shared/data as episodes for the proximity evaluation.

An :class:`Episode` is what one receiver heard of one transmitter over one stretch at
one (labelled) condition: its 1-minute windows (calibrated attenuation and the RSSI as
measured), the receiver's minute context (``heard``: everything it heard, minute by
minute, over its whole recording, which the ``hmm`` rule reads backwards only), the
truth, and the cluster it belongs to for the bootstrap (a file, a session, a pair).
The Dublin tram set gives only minutes per attenuation bin per pair: its episodes carry
a histogram and the receiver-session context instead.

Calibration (the same attenuation for every rule; never fitted to a rule's result):
- NIST Pi 3 pair: the bundled calibration list (the Pi 3 entry; it was itself measured
  on this set, see agent/exposure/calibration.csv).
- MIT LL iPhone sets (matrix, range-angle, H0H1): one iPhone offset, the median
  1-minute RSSI at 3 ft (0.91 m) mapped to ``attenuation_at_1m_db``, taken from the
  *other* iPhone sets (leave-one-data-set-out; H0H1 has no 3 ft reference and uses
  both others).
- pc-ng phones: the set's own hand/hand files at 1.0 m (no other set has these phones).
- KRI anechoic (nRF52 sniffer): per phone, the median at the nearest range it was
  measured at (6 or 12 ft) set to the free-space loss from 1 m (20 log10(d / 1 m) dB
  above ``attenuation_at_1m_db``; free space holds in an anechoic chamber). It has no
  distance below 6 ft: it measures false notifications only.
- Dublin tram: attenuation as the phones' EN API reported it (Google's calibration), on
  which the 2020 rules were designed; taken as is.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.exposure.calibration import CalibrationTable, bundled_calibration_path
from agent.exposure.encounter import Encounter, valid_rssi
from agent.exposure.minutes import HeardMinute, summarise
from agent.exposure.rule import WindowObservation

FT = 0.3048
NEAR_M = 1.0
#: The 2 dB (then 5 and 10 dB) bins of the tram's GAEN histograms (SOURCE.md).
TRAM_EDGES_DB = (48, 50, 52, 54, 56, 58, 60, 62, 64, 66, 68, 70, 72, 74, 76, 78, 80, 85, 90, 100)
#: Where an episode's synthetic clock starts when a set gives only relative times.
_BASE = dt.datetime(2020, 6, 1, 12, 0, tzinfo=dt.UTC).timestamp()


@dataclass
class Episode:
    dataset: str
    setting: str
    cluster: str
    truth: bool
    distance_m: float | None
    #: minutes the contact lasted (first to last window, inclusive)
    minutes: float
    windows: list[WindowObservation] = field(default_factory=list)
    heard: dict[int, HeardMinute] = field(default_factory=dict)
    #: Dublin tram only: (attenuation dB, minutes) per bin, and per-minute context
    histogram: list[tuple[float, float]] | None = None
    #: Dublin tram only: identifiers heard in the session, how many stronger than this pair
    tram_heard: int | None = None
    tram_stronger: int | None = None
    #: Dublin tram only: per bin, the session's median minute minus its attenuation (as
    #: RSSI minus the median RSSI when TX powers are alike)
    tram_relative_db: list[float] | None = None
    #: the near/far truth per minute is the episode's (its distance), for fitting
    fit: bool = True


@dataclass
class Timeline:
    """One receiver's recording: samples of one transmitter, absolute times."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def encounter(self) -> Encounter | None:
        return _encounter(self.samples)


def _encounter(samples: Iterable[tuple[float, int]]) -> Encounter | None:
    enc = None
    for t, rssi in sorted(samples):
        if not valid_rssi(rssi):
            continue
        if enc is None:
            enc = Encounter(b"\0" * 16, b"\0" * 4, t, t, 60)
        enc.add(t, rssi)
    return enc


def _heard(timeline: Timeline) -> dict[int, HeardMinute]:
    enc = timeline.encounter()
    if enc is None:
        return {}
    return {m.minute: m for m in summarise([enc], enc.windows[0].index, enc.windows[-1].index + 1)}


def _windows(samples: Iterable[tuple[float, int]], tx_offset_db: float) -> list[WindowObservation]:
    """attenuation = offset - RSSI (the offset folds TX power and receiver correction)."""
    enc = _encounter(samples)
    if enc is None:
        return []
    return [WindowObservation(w.index * 60.0, 60.0, w.count, tx_offset_db - w.rssi_mean, tx_offset_db - w.rssi_max,
                              rssi_dbm=w.rssi_mean) for w in enc.windows]


def _span_minutes(windows: list[WindowObservation]) -> float:
    return (windows[-1].start - windows[0].start) / 60.0 + 1 if windows else 0.0


def _median_window_rssi(sample_sets: Iterable[list[tuple[float, int]]]) -> float:
    means = [-w.mean_attenuation_db for s in sample_sets for w in _windows(s, 0.0)]
    return statistics.median(means)


# -- NIST Raspberry Pi 3 pair ------------------------------------------------------------

def load_nist(root: Path, *, a1m: float, episode_s: int = 1800) -> list[Episode]:
    cal = CalibrationTable.load(bundled_calibration_path()).lookup("Raspberry Pi 3 Model B")
    offset = cal.tx_power - cal.rssi_correction
    out = []
    for f in sorted((root / "rpi_nist_exposure_notification").glob("ContactTracingData_*cm_Device_*.csv")):
        parts = f.stem.split("_")
        d = int(parts[1].removesuffix("cm")) / 100
        with f.open() as fh:
            samples = [(float(r["Timestamp"]), int(r["RSSI"])) for r in csv.DictReader(fh)]
        samples.sort()
        heard = _heard(Timeline(samples))
        t0 = samples[0][0]
        chunks: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for s in samples:
            chunks[int((s[0] - t0) // episode_s)].append(s)
        for seg in chunks.values():
            if seg[-1][0] - seg[0][0] < episode_s * 0.8:
                continue  # a partial episode at the end of a file
            w = _windows(seg, offset)
            out.append(Episode("NIST Pi 3 pair", "line of sight", f.stem, d <= NEAR_M, d, _span_minutes(w), w, heard))
    return out


# -- pc-ng phones carried by two people --------------------------------------------------

def load_pcng(root: Path, *, a1m: float) -> list[Episode]:
    series: dict[tuple[str, str, float], list[tuple[float, int]]] = defaultdict(list)
    for f in sorted((root / "pcng_rss_smartphone").glob("*/RSS_human??.csv")):
        with f.open() as fh:
            for r in csv.DictReader(fh):
                series[(f.parent.name, r["device"], int(r["dist"]) / 100)].append(
                    (_BASE + float(r["elapsed"]), int(float(r["rss"]))))
    ref = [v for (scen, _dev, d), v in series.items() if scen == "HandHand" and d == 1.0]
    offset = a1m + _median_window_rssi(ref)
    timelines: dict[tuple[str, str], Timeline] = defaultdict(Timeline)
    for (scen, dev, _d), v in series.items():
        timelines[(scen, dev)].samples.extend(v)
    heard = {k: _heard(t) for k, t in timelines.items()}
    out = []
    for (scen, dev, d), v in sorted(series.items()):
        w = _windows(v, offset)
        if w:
            out.append(Episode("pc-ng phones", scen, f"{scen}/{dev}", d <= NEAR_M, d, _span_minutes(w), w,
                               heard[(scen, dev)]))
    return out


# -- MIT Lincoln Laboratory phone sets ---------------------------------------------------

_STAMPS = (re.compile(r"(\d{4})-(\d{2})-(\d{2})[_T-](\d{2})\.(\d{2})\.(\d{2})"),
           re.compile(r"(\d{2})-(\d{2})-(\d{4})-(\d{2})(\d{2})(\d{2})"))


def _file_start(path: str, fallback: float) -> float:
    m = _STAMPS[0].search(path)
    if m:
        y, mo, d, h, mi, s = map(int, m.groups())
        return dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC).timestamp()
    m = _STAMPS[1].search(path)
    if m:
        mo, d, y, h, mi, s = map(int, m.groups())
        return dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.UTC).timestamp()
    return fallback


@dataclass
class MitFile:
    file_id: str
    path: str
    label: str
    meta: dict
    start: float
    #: (absolute t, rssi, range_ft or None)
    rows: list[tuple[float, int, float | None]] = field(default_factory=list)


def read_mitll(root: Path, name: str) -> dict[str, MitFile]:
    files = {}
    with (root / "mitll_ble_rssi" / f"{name}_files.csv").open() as fh:
        for r in csv.DictReader(fh):
            files[r["file_id"]] = MitFile(r["file_id"], r["source_path"], r["path_label"], json.loads(r["meta"]),
                                          _file_start(r["source_path"], _BASE + 86400 * int(r["file_id"])))
    with gzip.open(root / "mitll_ble_rssi" / f"{name}_rssi.csv.gz", "rt") as fh:
        for r in csv.DictReader(fh):
            f = files[r["file_id"]]
            rng = float(r["range_ft"]) if r["range_ft"] else None
            f.rows.append((f.start + float(r["t_s"]), int(float(r["rssi_dbm"])), rng))
    return {k: f for k, f in files.items() if f.rows}


def iphone_reference_rssi(root: Path, names: Iterable[str]) -> float:
    """Median 1-minute RSSI of the 3 ft (0.91 m) files of the given iPhone sets."""
    sets = []
    for name in names:
        for f in read_mitll(root, name).values():
            near = [(t, r) for t, r, rng in f.rows if rng is not None and abs(rng - 3.0) < 0.01]
            if near:
                sets.append(near)
    return _median_window_rssi(sets)


def _mit_episodes(files: dict[str, MitFile], dataset: str, *, offset: float, timeline_of, setting_of,
                  split_ranges: bool) -> list[Episode]:
    timelines: dict[str, Timeline] = defaultdict(Timeline)
    for f in files.values():
        timelines[timeline_of(f)].samples.extend((t, r) for t, r, _ in f.rows)
    heard = {k: _heard(t) for k, t in timelines.items()}
    out = []
    for f in files.values():
        groups: dict[float | None, list[tuple[float, int]]] = defaultdict(list)
        for t, r, rng in f.rows:
            groups[rng if split_ranges else None].append((t, r))
        for rng, samples in groups.items():
            if rng is None and split_ranges:
                continue
            if not split_ranges:
                rngs = {x for _, _, x in f.rows if x is not None}
                rng = min(rngs) if len(rngs) == 1 else None
            d = None if rng is None else rng * FT
            w = _windows(samples, offset)
            if w and d is not None:
                out.append(Episode(dataset, setting_of(f), timeline_of(f), d <= NEAR_M, d, _span_minutes(w), w,
                                   heard[timeline_of(f)]))
    return out


def load_mit_matrix(root: Path, *, a1m: float) -> list[Episode]:
    offset = a1m + iphone_reference_rssi(root, ["mitll_range_angle"])
    return _mit_episodes(read_mitll(root, "mit_matrix"), "MIT LL matrix", offset=offset,
                         timeline_of=lambda f: f.meta.get("session_id", f.label), setting_of=lambda f: f.label,
                         split_ranges=False)


def load_mit_range_angle(root: Path, *, a1m: float) -> list[Episode]:
    offset = a1m + iphone_reference_rssi(root, ["mit_matrix"])
    return _mit_episodes(read_mitll(root, "mitll_range_angle"), "MIT LL range-angle", offset=offset,
                         timeline_of=lambda f: f.path.split("/")[0], setting_of=lambda f: f.path.split("/")[0],
                         split_ranges=True)


def load_h0h1(root: Path, *, a1m: float) -> list[Episode]:
    """Truth = the session's label (H1: testers kept within 6 ft; H0: 10 ft or more apart),
    not a distance: these sessions test the 15-minute decision as a person would label
    it. They are never used for fitting."""
    offset = a1m + iphone_reference_rssi(root, ["mit_matrix", "mitll_range_angle"])
    out = []
    for f in read_mitll(root, "h0h1").values():
        samples = [(t, r) for t, r, _ in f.rows]
        w = _windows(samples, offset)
        if not w:
            continue
        session = "-".join(sorted([f.file_id, *[x for x in str(f.meta.get("other_phone_file_ids", "")).split(",")
                                                if x]]))
        out.append(Episode("MIT LL H0H1", f.meta.get("carriage_group", "?"), session, f.label == "H1", None,
                           _span_minutes(w), w, _heard(Timeline(samples)), fit=False))
    return out


def load_kri(root: Path, *, a1m: float) -> list[Episode]:
    files = read_mitll(root, "kri_anechoic_nrf52")
    by_phone: dict[str, list[MitFile]] = defaultdict(list)
    for f in files.values():
        by_phone[f.path.split("/")[1]].append(f)
    out = []
    for _phone, fs in sorted(by_phone.items()):
        ranges = sorted({rng for f in fs for _, _, rng in f.rows if rng is not None})
        if not ranges:
            continue
        ref_ft = ranges[0]  # the nearest this phone was measured at
        ref = [x for x in ([(t, r) for t, r, rng in f.rows if rng == ref_ft] for f in fs) if x]
        offset = a1m + 20 * math.log10(ref_ft * FT) + _median_window_rssi(ref)
        out.extend(_mit_episodes({f.file_id: f for f in fs}, "KRI anechoic (far only)", offset=offset,
                                 timeline_of=lambda f: f.path.split("/")[1], setting_of=lambda f: f.path.split("/")[1],
                                 split_ranges=False))
    return out


# -- Dublin tram GAEN histograms ---------------------------------------------------------

def load_tram(root: Path, *, near_m: float = NEAR_M, dataset: str = "Dublin tram") -> list[Episode]:
    """Rows come in blocks of six: one handset (the pair's first index) with the six
    others, recorded together; we take the first index to be the receiver (the source
    does not say) and a block to be one receiver's session."""
    d = root / "dublin_tram_gaen"
    hist = np.loadtxt(d / "dublintram_dataset_attenuations.txt")
    dist = np.loadtxt(d / "dublintram_dataset_distances.txt")
    centres = [(TRAM_EDGES_DB[i] + TRAM_EDGES_DB[i + 1]) / 2 for i in range(len(TRAM_EDGES_DB) - 1)]
    out = []
    for block in range(len(hist) // 6):
        rows = range(6 * block, 6 * block + 6)
        means = {i: float((hist[i] * centres).sum() / hist[i].sum()) for i in rows if hist[i].sum() > 0}
        all_minutes = [c for i in rows for c, n in zip(centres, hist[i]) for _ in range(int(n))]
        median = float(np.median(all_minutes)) if all_minutes else 0.0
        for i in rows:
            if i not in means:
                continue  # no minute recorded: nothing for any rule to decide on
            h = [(c, float(n)) for c, n in zip(centres, hist[i]) if n > 0]
            stronger = sum(1 for j, m in means.items() if j != i and m < means[i])
            out.append(Episode(dataset, f"truth <= {near_m:g} m", f"block{block}", float(dist[i]) <= near_m,
                               float(dist[i]), float(hist[i].sum()), histogram=h, tram_heard=len(means),
                               tram_stronger=stronger, tram_relative_db=[median - c for c, _ in h],
                               fit=near_m == NEAR_M))
    return out


def load_all(root: Path, *, a1m: float) -> list[Episode]:
    eps = []
    eps += load_nist(root, a1m=a1m)
    eps += load_pcng(root, a1m=a1m)
    eps += load_mit_matrix(root, a1m=a1m)
    eps += load_mit_range_angle(root, a1m=a1m)
    eps += load_h0h1(root, a1m=a1m)
    eps += load_kri(root, a1m=a1m)
    eps += load_tram(root)
    eps += load_tram(root, near_m=2.0, dataset="Dublin tram (truth <= 2 m)")
    return eps
