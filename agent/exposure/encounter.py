"""Encounters: what the agent keeps of a peer's identifier, without raw samples.

An :class:`Encounter` is one RPI heard over a stretch of time, summarised as scan
windows of ``window_s`` seconds (default one minute): sample count, mean RSSI averaged
in the power domain, and the strongest RSSI. Attenuation is derived later, when the TX
power is known (from the decrypted AEM after a match, or a configured default).

The compact binary form (:meth:`Encounter.to_bytes`) is what the store encrypts;
about 100 bytes for a 10-minute RPI.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from ..clock import utc_day

RSSI_UNAVAILABLE = (127, -127)  # BlueZ / HCI "RSSI not available"


@dataclass(frozen=True, slots=True)
class Sighting:
    """One received advertisement."""

    t: float
    rpi: bytes
    aem: bytes
    rssi: int
    #: TX power from the advertisement's TX Power Level field, if the peer sent one.
    tx_power: int | None = None

    def __repr__(self) -> str:  # identifiers never reach logs
        return f"Sighting(t={self.t:.3f}, rssi={self.rssi})"


def valid_rssi(rssi: int) -> bool:
    return rssi not in RSSI_UNAVAILABLE and -126 <= rssi <= 20


@dataclass(slots=True)
class ScanWindow:
    """Samples of one RPI within one window (index = floor(t / window_s))."""

    index: int
    count: int = 0
    power_sum_mw: float = 0.0
    rssi_max: int = -127

    def add(self, rssi: int) -> None:
        self.count += 1
        self.power_sum_mw += 10.0 ** (rssi / 10.0)
        if rssi > self.rssi_max:
            self.rssi_max = rssi

    @property
    def rssi_mean(self) -> float:
        """Mean RSSI in dBm, averaged in the power (mW) domain."""
        return 10.0 * math.log10(self.power_sum_mw / self.count)


_HEADER = struct.Struct("<ddbHB")  # first_seen, last_seen, tx_power(-128=unknown), window_s, n_windows>255 flag
_WINDOW = struct.Struct("<HHbb")  # offset from first window, count (saturating), mean, max
_UNKNOWN_TX = -128


def _pack_windows(windows: list[ScanWindow], base: int) -> bytes:
    """The windows' records (:data:`_WINDOW` each), in one call: an encounter is packed at
    every flush while open."""
    values: list[int] = []
    log10 = math.log10
    for w in windows:
        mean = round(10.0 * log10(w.power_sum_mw / w.count))  # rssi_mean, rounded
        top = w.rssi_max
        values += (w.index - base, w.count if w.count < 0xFFFF else 0xFFFF,
                   mean if -128 <= mean <= 127 else (-128 if mean < 0 else 127),
                   top if -128 <= top <= 127 else (-128 if top < 0 else 127))
    return struct.pack("<" + "HHbb" * len(windows), *values)


@dataclass(slots=True)
class Encounter:
    rpi: bytes
    aem: bytes
    first_seen: float
    last_seen: float
    window_s: int = 60
    tx_power: int | None = None
    windows: list[ScanWindow] = field(default_factory=list)
    #: The store's row id once written (None before the first write).
    row_id: int | None = None
    #: to_bytes' packing of the windows before the last, while they stay as they were
    #: (base index, windows packed, their bytes): an open encounter is rewritten every
    #: flush, and all but its last window are final
    _packed: tuple[int, int, bytes] | None = field(default=None, compare=False, repr=False)

    def __repr__(self) -> str:
        return (f"Encounter(first_seen={self.first_seen:.0f}, last_seen={self.last_seen:.0f}, "
                f"windows={len(self.windows)}, samples={self.sample_count})")

    @property
    def day(self) -> int:
        """UTC day number of the first sighting: the only value the store keeps in clear."""
        return utc_day(self.first_seen)

    @property
    def sample_count(self) -> int:
        return sum(w.count for w in self.windows)

    def window(self, idx: int) -> ScanWindow:
        """The window of index ``idx``, made (in order) if it is new."""
        if self.windows and self.windows[-1].index == idx:
            return self.windows[-1]
        if self.windows and idx < self.windows[-1].index:
            # out-of-order sample (scanner batching): find or insert its window
            self._packed = None
            for w in self.windows:
                if w.index == idx:
                    return w
            w = ScanWindow(idx)
            self.windows.append(w)
            self.windows.sort(key=lambda x: x.index)
            return w
        w = ScanWindow(idx)
        self.windows.append(w)
        return w

    def add(self, t: float, rssi: int, tx_power: int | None = None) -> None:
        self.window(int(t // self.window_s)).add(rssi)
        if t < self.first_seen:
            self.first_seen = t
        if t > self.last_seen:
            self.last_seen = t
        if tx_power is not None:
            self.tx_power = tx_power

    # -- compact serialisation (encrypted by the store) ---------------------------
    def to_bytes(self) -> bytes:
        base = self.windows[0].index if self.windows else int(self.first_seen // self.window_s)
        tx = _UNKNOWN_TX if self.tx_power is None else max(-127, min(127, self.tx_power))
        done = len(self.windows) - 1  # all but the last are final
        cached = self._packed
        if cached is None or cached[0] != base or cached[1] > done:
            cached = (base, 0, b"")
        if done > cached[1]:
            cached = (base, done, cached[2] + _pack_windows(self.windows[cached[1]:done], base))
            self._packed = cached
        last = _pack_windows(self.windows[-1:], base)
        return b"".join((_HEADER.pack(self.first_seen, self.last_seen, tx, self.window_s, 0), self.rpi, self.aem,
                         struct.pack("<q", base), cached[2], last))

    @classmethod
    def from_bytes(cls, data: bytes, row_id: int | None = None) -> Encounter:
        first, last, tx, window_s, _ = _HEADER.unpack_from(data, 0)
        off = _HEADER.size
        rpi, aem = data[off : off + 16], data[off + 16 : off + 20]
        (base,) = struct.unpack_from("<q", data, off + 20)
        off += 28
        rest = data[off:]
        if len(rpi) != 16 or len(aem) != 4 or len(rest) % _WINDOW.size or window_s <= 0:
            raise ValueError("malformed encounter record")
        windows = []
        for o, count, mean, mx in _WINDOW.iter_unpack(rest):
            w = ScanWindow(base + o, count, count * 10.0 ** (mean / 10.0), mx)
            windows.append(w)
        return cls(bytes(rpi), bytes(aem), first, last, window_s, None if tx == _UNKNOWN_TX else tx, windows, row_id)
