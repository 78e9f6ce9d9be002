"""Encounters: what the agent keeps of a peer's identifier, without raw samples.

An :class:`Encounter` is one RPI heard over a stretch of time, summarised as scan
windows of ``window_s`` seconds (default one minute): sample count, mean RSSI averaged
in the power domain, and the strongest RSSI. Attenuation is derived later, when the TX
power is known (from the decrypted AEM after a match, or a configured default).

The compact binary form (:meth:`Encounter.to_bytes`) is what the store encrypts:
77 bytes for an RPI heard for 10 minutes (105 sealed); times come back exactly.
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


#: The stored record, two forms told apart by length (the store reads both).
#: Written before 2026-12-03 (always an even length, 48 + 6 per window): _HEADER, RPI,
#: AEM, the first window's index (int64), then _WINDOW per window.
_HEADER = struct.Struct("<ddbHB")  # first_seen, last_seen, tx_power(-128=unknown), window_s, 0
_WINDOW = struct.Struct("<HHbb")  # offset from the first window, count (saturating), mean, max
#: Since (always an odd length): a mark byte (_MARK | _WIDE_TIMES | _WIDE_WINDOWS) and
#: either _COMPACT_HEAD: tx power, window_s, RPI, AEM, the whole second of first_seen, both
#: times as ticks of 2^-22 s after it (first in the low 22 bits, last in the high 42),
#: the first window's index less that second's; or _WIDE_HEAD, for times the ticks do not
#: give back bit for bit (before 2004, a clock that went back, over 12 days): both times
#: as float64 and the first window's index. Then 4 bytes a window (_NARROW_WINDOW), or
#: _WINDOW's 6 when an offset or a count is over 255. A crowded day's row: 117 bytes
#: sealed instead of 154. Times come back exactly in either form: the ticks are used only
#: when decoding them gives the same float.
_MARK = 0x10
_WIDE_TIMES = 0x01
_WIDE_WINDOWS = 0x02
_COMPACT_HEAD = struct.Struct("<BbH16s4sIQb")
_WIDE_HEAD = struct.Struct("<BbH16s4sddqx")  # a pad byte keeps the length odd
_NARROW_WINDOW = struct.Struct("<BBbb")  # offset from the first window, count, mean, max
_TICK = 2.0**-22  # a float64 time from 2004 to 2106 is a whole number of these
_TICKS_PER_S = 2.0**22
_TICKS_LAST = 2**42  # the last time up to 12 days after the first's whole second
_UNKNOWN_TX = -128


def _pack_windows(windows: list[ScanWindow], base: int, wide: bool) -> bytes | None:
    """The windows' records (:data:`_WINDOW` or :data:`_NARROW_WINDOW` each), in one call:
    an encounter is packed at every flush while open. None if a window does not fit the
    narrow form."""
    values: list[int] = []
    log10 = math.log10
    for w in windows:
        mean = round(10.0 * log10(w.power_sum_mw / w.count))  # rssi_mean, rounded
        top = w.rssi_max
        values += (w.index - base, w.count if w.count < 0xFFFF else 0xFFFF,
                   mean if -128 <= mean <= 127 else (-128 if mean < 0 else 127),
                   top if -128 <= top <= 127 else (-128 if top < 0 else 127))
    if wide:
        return struct.pack("<" + "HHbb" * len(windows), *values)
    try:
        return struct.pack("<" + "BBbb" * len(windows), *values)
    except struct.error:  # an offset or a count over 255
        return None


def _pack_window(w: ScanWindow, base: int, wide: bool) -> bytes | None:
    """:func:`_pack_windows` of one window (an open encounter's last, at every flush)."""
    mean = round(10.0 * math.log10(w.power_sum_mw / w.count))
    top = w.rssi_max
    offset, count = w.index - base, w.count
    mean = mean if -128 <= mean <= 127 else (-128 if mean < 0 else 127)
    top = top if -128 <= top <= 127 else (-128 if top < 0 else 127)
    if wide:
        return _WINDOW.pack(offset, count if count < 0xFFFF else 0xFFFF, mean, top)
    if 0 <= offset <= 255 and count <= 255:
        return _NARROW_WINDOW.pack(offset, count, mean, top)
    return None


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
    #: (base index, windows packed, their bytes, wide form): an open encounter is
    #: rewritten every flush, and all but its last window are final
    _packed: tuple[int, int, bytes, bool] | None = field(default=None, compare=False, repr=False)

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
        windows = self.windows
        base = windows[0].index if windows else int(self.first_seen // self.window_s)
        tx = _UNKNOWN_TX if self.tx_power is None else max(-127, min(127, self.tx_power))
        done = len(windows) - 1  # all but the last are final
        cached = self._packed
        if cached is None or cached[0] != base or cached[1] > done:
            cached = (base, 0, b"", False)
        if done > cached[1]:
            part = _pack_windows(windows[cached[1]:done], base, cached[3])
            if part is None:
                cached = (base, done, _pack_windows(windows[:done], base, True) or b"", True)
            else:
                cached = (base, done, cached[2] + part, cached[3])
            self._packed = cached
        if not windows:
            return self._head(base, tx, 0)
        last = _pack_window(windows[-1], base, cached[3])
        if last is None:  # the last window outgrew the narrow form: all of them wide from now on
            cached = self._packed = (base, done, _pack_windows(windows[:done], base, True) or b"", True)
            last = _pack_window(windows[-1], base, True)
        return b"".join((self._head(base, tx, _WIDE_WINDOWS if cached[3] else 0), cached[2], last or b""))

    def _head(self, base: int, tx: int, wide_windows: int) -> bytes:
        first, last, window_s = self.first_seen, self.last_seen, self.window_s
        if 1.0 <= first < 4294967296.0 and window_s > 0:
            t0 = int(first)
            fi = int((first - t0) * _TICKS_PER_S)
            li = int((last - t0) * _TICKS_PER_S)
            shift = base - t0 // window_s
            # the decoder's own arithmetic gives the same floats back, bit for bit
            if (t0 + fi * _TICK == first and t0 + li * _TICK == last and 0 <= li < _TICKS_LAST
                    and -128 <= shift <= 127):
                return _COMPACT_HEAD.pack(_MARK | wide_windows, tx, window_s, self.rpi, self.aem, t0,
                                          li << 22 | fi, shift)
        return _WIDE_HEAD.pack(_MARK | _WIDE_TIMES | wide_windows, tx, window_s, self.rpi, self.aem, first, last,
                               base)

    @classmethod
    def from_bytes(cls, data: bytes, row_id: int | None = None) -> Encounter:
        if len(data) % 2 == 0:
            return cls._from_old_bytes(data, row_id)
        mark = data[0]
        if mark & ~(_WIDE_TIMES | _WIDE_WINDOWS) != _MARK:
            raise ValueError("malformed encounter record")
        if mark & _WIDE_TIMES:
            _, tx, window_s, rpi, aem, first, last, base = _WIDE_HEAD.unpack_from(data, 0)
            off = _WIDE_HEAD.size
        else:
            _, tx, window_s, rpi, aem, t0, times, shift = _COMPACT_HEAD.unpack_from(data, 0)
            if window_s <= 0:
                raise ValueError("malformed encounter record")
            first = t0 + (times & 0x3FFFFF) * _TICK
            last = t0 + (times >> 22) * _TICK
            base = t0 // window_s + shift
            off = _COMPACT_HEAD.size
        form = _WINDOW if mark & _WIDE_WINDOWS else _NARROW_WINDOW
        rest = data[off:]
        if len(rest) % form.size or window_s <= 0:
            raise ValueError("malformed encounter record")
        windows = [ScanWindow(base + o, count, count * 10.0 ** (mean / 10.0), mx)
                   for o, count, mean, mx in form.iter_unpack(rest)]
        return cls(rpi, aem, first, last, window_s, None if tx == _UNKNOWN_TX else tx, windows, row_id)

    @classmethod
    def _from_old_bytes(cls, data: bytes, row_id: int | None) -> Encounter:
        """The form written before 2026-12-03."""
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
