"""Ground truth: pair distance intervals, position traces (pair distances computed from
them), sync markers. Every reader rejects a malformed file with its line and reason.

Internally the truth is one table of pair intervals (:class:`PairTruth`): for each
unordered pair of device labels, intervals ``[start, end)`` of true time with a distance.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError

PAIRS_HEADER = ("a", "b", "start", "end", "distance_m")
POSITIONS_HEADER = ("device", "t", "x", "y")
MARKERS_HEADER = ("marker", "device", "t")
#: position samples further apart than this are not interpolated (the device was not tracked)
MAX_POSITION_GAP_S = 60.0


def pair_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


@dataclass
class PairTruth:
    """Unordered pair -> arrays (start, end, distance_m), sorted by start."""

    pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, a: str, b: str, start: np.ndarray, end: np.ndarray, dist: np.ndarray) -> None:
        k = pair_key(a, b)
        if k in self.pairs:
            s0, e0, d0 = self.pairs[k]
            start, end, dist = np.concatenate([s0, start]), np.concatenate([e0, end]), np.concatenate([d0, dist])
        order = np.argsort(start, kind="stable")
        self.pairs[k] = (start[order], end[order], dist[order])

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def close_seconds_by_day(self, a: str, b: str, threshold_m: float) -> dict[int, float]:
        """Seconds within ``threshold_m`` per UTC day (intervals split at midnight)."""
        got = self.pairs.get(pair_key(a, b))
        out: dict[int, float] = {}
        if got is None:
            return out
        start, end, dist = got
        sel = dist <= threshold_m
        for s, e in zip(start[sel].tolist(), end[sel].tolist()):
            while s < e:
                day = int(s // 86_400)
                cut = min(e, (day + 1) * 86_400)
                out[day] = out.get(day, 0.0) + (cut - s)
                s = cut
        return out

    def distance_at(self, a: str, b: str, t: np.ndarray) -> np.ndarray:
        """True distance at times ``t`` (NaN where the truth has no interval)."""
        got = self.pairs.get(pair_key(a, b))
        out = np.full(len(t), np.nan)
        if got is None or not len(t):
            return out
        start, end, dist = got
        idx = np.searchsorted(start, t, side="right") - 1
        ok = idx >= 0
        ok[ok] &= t[ok] < end[idx[ok]]
        out[ok] = dist[idx[ok]]
        return out


@dataclass(frozen=True)
class Marker:
    marker: str
    device: str
    t: float


def _rows(text: str, source: str, header: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        names = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise InputFileError(f"{source}: the file is empty") from None
    missing = [h for h in header if h not in names]
    if missing:
        raise InputFileError(f"{source}: missing column(s) {', '.join(missing)}")
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(names):
            raise InputFileError(f"{source}, line {lineno}: {len(row)} fields, expected {len(names)}")
        yield lineno, {n: v.strip() for n, v in zip(names, row)}


def _number(value: str, source: str, lineno: int, what: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise InputFileError(f"{source}, line {lineno}: {what} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise InputFileError(f"{source}, line {lineno}: {what} must be finite")
    return x


def truth_kind(text: str) -> str | None:
    """"pairs", "positions" or "markers" by the header, else None."""
    first = text.lstrip("\ufeff").split("\n", 1)[0].lower()
    cols = {c.strip() for c in first.split(",")}
    for kind, header in (("pairs", PAIRS_HEADER), ("positions", POSITIONS_HEADER), ("markers", MARKERS_HEADER)):
        if set(header) <= cols:
            return kind
    return None


def read_pairs(text: str, source: str, truth: PairTruth) -> None:
    acc: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for lineno, r in _rows(text, source, PAIRS_HEADER):
        start, end = _number(r["start"], source, lineno, "start"), _number(r["end"], source, lineno, "end")
        d = _number(r["distance_m"], source, lineno, "distance_m")
        if end < start or d < 0 or not r["a"] or not r["b"] or r["a"] == r["b"]:
            raise InputFileError(f"{source}, line {lineno}: need two devices, end >= start and distance >= 0")
        acc.setdefault(pair_key(r["a"], r["b"]), []).append((start, end, d))
    for (a, b), rows in acc.items():
        arr = np.array(rows)
        truth.add(a, b, arr[:, 0], arr[:, 1], arr[:, 2])


def read_positions(text: str, source: str, truth: PairTruth) -> None:
    """Pair distances from position traces: both devices' positions interpolated on the
    union of their sample times, each interval taking the distance at its start."""
    tracks: dict[str, list[tuple[float, float, float, float]]] = {}
    for lineno, r in _rows(text, source, POSITIONS_HEADER):
        z = _number(r["z"], source, lineno, "z") if r.get("z") else 0.0
        tracks.setdefault(r["device"], []).append((_number(r["t"], source, lineno, "t"),
                                                   _number(r["x"], source, lineno, "x"),
                                                   _number(r["y"], source, lineno, "y"), z))
    arrays = {d: np.array(sorted(v)) for d, v in tracks.items() if d}
    names = sorted(arrays)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ta, tb = arrays[a], arrays[b]
            lo, hi = max(ta[0, 0], tb[0, 0]), min(ta[-1, 0], tb[-1, 0])
            if hi <= lo:
                continue
            t = np.unique(np.concatenate([ta[:, 0], tb[:, 0]]))
            t = t[(t >= lo) & (t <= hi)]
            pa = np.stack([np.interp(t, ta[:, 0], ta[:, k]) for k in (1, 2, 3)], 1)
            pb = np.stack([np.interp(t, tb[:, 0], tb[:, k]) for k in (1, 2, 3)], 1)
            d = np.sqrt(((pa - pb) ** 2).sum(1))
            start, end = t[:-1], t[1:]
            tracked = (_gap_ok(ta[:, 0], start, end)) & (_gap_ok(tb[:, 0], start, end))
            truth.add(a, b, start[tracked], end[tracked], d[:-1][tracked])


def _gap_ok(samples: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """True where [start, end) lies between two samples at most MAX_POSITION_GAP_S apart."""
    i = np.searchsorted(samples, start, side="right") - 1
    j = np.minimum(i + 1, len(samples) - 1)
    return (i >= 0) & (samples[j] - samples[np.maximum(i, 0)] <= MAX_POSITION_GAP_S) & (samples[j] >= end)


def read_markers(text: str, source: str) -> list[Marker]:
    return [Marker(r["marker"], r["device"], _number(r["t"], source, lineno, "t"))
            for lineno, r in _rows(text, source, MARKERS_HEADER)]


def load_truth(paths: list[Path]) -> tuple[PairTruth, list[Marker]]:
    truth, markers = PairTruth(), []
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise InputFileError(f"{p}: cannot read the ground truth: {getattr(e, 'strerror', None) or e}") from None
        kind = truth_kind(text)
        if kind == "pairs":
            read_pairs(text, str(p), truth)
        elif kind == "positions":
            read_positions(text, str(p), truth)
        elif kind == "markers":
            markers.extend(read_markers(text, str(p)))
        else:
            raise InputFileError(f"{p}: not a ground-truth file: the header must be {','.join(PAIRS_HEADER)}, "
                                 f"{','.join(POSITIONS_HEADER)}[,z] or {','.join(MARKERS_HEADER)}")
    return truth, markers


def truth_files(experiment_dir: Path) -> list[Path]:
    """The CSV files in an experiment folder's ``truth/``."""
    folder = Path(experiment_dir) / "truth"
    return sorted(folder.glob("*.csv")) if folder.is_dir() else []
