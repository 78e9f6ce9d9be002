"""Research recording on the device (opt-in per experiment: ``[experiment]`` in the
configuration, with the carrier's consent and its time).

Every received advertisement of the family's service (receiver time, address, RSSI, the
TX Power Level field when present, the service data) is kept, not only the per-minute
summary the rule needs; so are this device's own broadcasts (when which payload went on
air), the radio's down intervals (:class:`~agent.ble.base.RadioEvents`: scan task
failures, stalled scans, duty-cycle pauses, advertising failures), each flush window's
listening time, and the clock's state. Analysis derives from these the advertising
events expected per peer and minute (from the transmitter's time on air and advertising
interval, and the receiver's time listening) against those received.

Hot path: :meth:`ResearchRecorder.heard` appends a tuple. :meth:`ResearchRecorder.flush`
packs the batch (numpy, 14 bytes a sighting plus each distinct advertisement once) and
writes one encrypted row per UTC day plus one row of the window's state, in one
transaction, under the research key slots (``agent.store``: their own retention).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from ..ble.base import ADVERTISE_DOWN, SCAN_DOWN, RadioDown, RadioEvents
from ..clock import utc_day
from ..store import Store
from ..timesync import ClockState

#: one sighting in a packed batch: receiver time, index of its advertisement, RSSI,
#: TX Power Level field (-128: absent)
SIGHTING = np.dtype([("t", "<f8"), ("advert", "<u4"), ("rssi", "i1"), ("tx_power", "i1")])
NO_TX_POWER = -128
_HEAD = struct.Struct("<II")  # adverts, sightings


@dataclass(frozen=True)
class Advert:
    """What was on air, as heard: the address and the family's service data."""

    address: str
    payload: bytes


def pack_sightings(adverts: list[Advert], records: np.ndarray) -> bytes:
    parts = [_HEAD.pack(len(adverts), len(records))]
    for a in adverts:
        addr = a.address.encode()
        parts.append(struct.pack("<BH", len(addr), len(a.payload)) + addr + a.payload)
    parts.append(records.astype(SIGHTING, copy=False).tobytes())
    return b"".join(parts)


def unpack_sightings(data: bytes) -> tuple[list[Advert], np.ndarray]:
    n_adv, n_rec = _HEAD.unpack_from(data, 0)
    off = _HEAD.size
    adverts = []
    for _ in range(n_adv):
        la, lp = struct.unpack_from("<BH", data, off)
        off += 3
        adverts.append(Advert(data[off:off + la].decode(), bytes(data[off + la:off + la + lp])))
        off += la + lp
    records = np.frombuffer(data, SIGHTING, n_rec, off)
    if off + n_rec * SIGHTING.itemsize != len(data) or (n_rec and int(records["advert"].max()) >= n_adv):
        raise ValueError("malformed sightings batch")
    return adverts, records


@dataclass(frozen=True)
class FlushWindow:
    """The state of one flush window: how long the scanner listened, what went down,
    what this device put on air, the clock."""

    start: float
    end: float
    scanning_s: float
    advertising_s: float
    received: int
    down: tuple[RadioDown, ...]
    #: (time, address, service data hex, new identity)
    broadcasts: tuple[tuple[float, str, str, bool], ...]
    clock: ClockState

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["down"] = [asdict(x) for x in self.down]
        d["broadcasts"] = [list(b) for b in self.broadcasts]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FlushWindow:
        return cls(float(d["start"]), float(d["end"]), float(d["scanning_s"]), float(d["advertising_s"]),
                   int(d["received"]), tuple(RadioDown(**x) for x in d["down"]),
                   tuple((float(b[0]), str(b[1]), str(b[2]), bool(b[3])) for b in d["broadcasts"]),
                   ClockState.from_json(d["clock"]))


def _covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] covered by the union of ``intervals``."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


@dataclass(frozen=True)
class RadioFacts:
    """What the radio backend says of itself, for the analysis' loss accounting (clear
    state: nothing personal)."""

    STATE_NAME: ClassVar[str] = "experiment.radio"
    SENSITIVE: ClassVar[bool] = False
    kind: str
    advertising_interval_s: float | None
    scan_duty: float | None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "advertising_interval_s": self.advertising_interval_s,
                "scan_duty": self.scan_duty}

    @classmethod
    def from_json(cls, doc: Any) -> RadioFacts:
        return cls(str(doc["kind"]), doc.get("advertising_interval_s"), doc.get("scan_duty"))


class ResearchRecorder:
    def __init__(self, store: Store, *, started_at: float, events: RadioEvents | None = None) -> None:
        self.store = store
        #: the radio's outages; the daemon hands over its own
        self.events = events or RadioEvents()
        self._window_start = started_at
        self._adverts: dict[tuple[str, bytes], int] = {}
        # one list per field: appending to four lists is cheaper than building a tuple,
        # and numpy reads each list at C speed at the flush
        self._t: list[float] = []
        self._advert: list[int] = []
        self._rssi: list[int] = []
        self._tx: list[int] = []
        self._broadcasts: list[tuple[float, str, str, bool]] = []
        #: batches a failed flush kept for the next one
        self._pending: list[tuple[str, int, bytes]] = []
        self.recorded = 0

    def heard(self, t: float, address: str, rssi: int, tx_power: int | None, payload: bytes) -> None:
        """Hot path: one received advertisement."""
        key = (address, payload)
        idx = self._adverts.get(key)
        if idx is None:
            idx = self._adverts[key] = len(self._adverts)
        self._t.append(t)
        self._advert.append(idx)
        self._rssi.append(rssi)
        self._tx.append(NO_TX_POWER if tx_power is None else tx_power)

    def restart(self, t: float) -> None:
        """The device was off until ``t`` (a gap between windows); call after a flush."""
        self._window_start = t

    def advertised(self, t: float, address: str, payload: bytes, new_identity: bool) -> None:
        self._broadcasts.append((t, address, payload.hex(), new_identity))

    def _batches(self, now: float, clock: ClockState) -> list[tuple[str, int, bytes]]:
        adverts = [Advert(a, p) for (a, p), _ in sorted(self._adverts.items(), key=lambda kv: kv[1])]
        records = np.zeros(len(self._t), SIGHTING)
        records["t"] = self._t
        records["advert"] = self._advert
        records["rssi"] = np.clip(np.asarray(self._rssi, dtype=np.int64), -127, 127)
        tx = np.asarray(self._tx, dtype=np.int64)
        records["tx_power"] = np.where(tx == NO_TX_POWER, NO_TX_POWER, np.clip(tx, -127, 127))
        out: list[tuple[str, int, bytes]] = []
        if len(records):
            days = (records["t"] // 86_400).astype(np.int64)
            for day in np.unique(days).tolist():
                out.append(("sightings", int(day), pack_sightings(adverts, records[days == day])))
        down = self.events.drain(now)
        start = self._window_start
        scan_down = [(d.start, d.end or now) for d in down if d.kind in SCAN_DOWN]
        adv_down = [(d.start, d.end or now) for d in down if d.kind in ADVERTISE_DOWN]
        window = FlushWindow(start, now, max(0.0, now - start - _covered(scan_down, start, now)),
                             max(0.0, now - start - _covered(adv_down, start, now)), len(records), tuple(down),
                             tuple(self._broadcasts), clock)
        out.append(("window", utc_day(start), json.dumps(window.to_json()).encode()))
        return out

    def flush(self, now: float, clock: ClockState) -> int:
        """Write what was recorded since the last flush (one transaction). A failed write
        (a full disk) keeps the batches for the next flush. Returns sightings written."""
        n = len(self._t)
        self._pending.extend(self._batches(now, clock))
        self._adverts, self._broadcasts = {}, []
        self._t, self._advert, self._rssi, self._tx = [], [], [], []
        self._window_start = now
        self.store.research.add(self._pending)  # a StoreError leaves them pending
        self._pending = []
        self.recorded += n
        return n


def read_sightings(store: Store) -> Iterator[tuple[list[Advert], np.ndarray]]:
    for _, plain in store.research.read("sightings"):
        try:
            yield unpack_sightings(plain)
        except (ValueError, struct.error, UnicodeDecodeError):
            store.stats.corrupt_rows += 1


def read_windows(store: Store) -> Iterator[FlushWindow]:
    for _, plain in store.research.read("window"):
        try:
            yield FlushWindow.from_json(json.loads(plain))
        except (ValueError, KeyError, TypeError):
            store.stats.corrupt_rows += 1
