"""Reads a ``btmon -w`` trace (btsnoop, data link 2001 "Linux monitor": one record per HCI
packet of every controller, its index and opcode in the record's flags) and rebuilds what
each controller put on air and heard.

Sources: btsnoop format (RFC 1761 layout, as in BlueZ's src/shared/btsnoop.h), the monitor
opcodes of BlueZ's src/shared/btsnoop.h (BTSNOOP_OPCODE_*), and the HCI commands and
events of the Core Specification v5.3, Vol 4, Part E, 7.8 (LE Controller commands) and
7.7.65 (LE Meta events). Only what the realstack tests read is decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: microseconds from 0000-01-01 to 1970-01-01 (btsnoop's epoch)
BTSNOOP_EPOCH_DELTA_US = 0x00DCDDB30F2F8000
MONITOR_NEW_INDEX, MONITOR_COMMAND, MONITOR_EVENT = 0, 2, 3

LE_SET_RANDOM_ADDRESS = 0x2005
LE_SET_ADV_PARAMETERS = 0x2006
LE_SET_ADV_DATA = 0x2008
LE_SET_ADV_ENABLE = 0x200A
LE_SET_SCAN_ENABLE = 0x200C
LE_SET_ADV_SET_RANDOM_ADDRESS = 0x2035
LE_SET_EXT_ADV_PARAMETERS = 0x2036
LE_SET_EXT_ADV_DATA = 0x2037
LE_SET_EXT_ADV_ENABLE = 0x2039
LE_REMOVE_ADV_SET = 0x203C
LE_CLEAR_ADV_SETS = 0x203D
LE_SET_EXT_SCAN_ENABLE = 0x2042
EVT_COMMAND_COMPLETE, EVT_COMMAND_STATUS, EVT_LE_META = 0x0E, 0x0F, 0x3E
LE_ADV_REPORT, LE_EXT_ADV_REPORT = 0x02, 0x0D
#: legacy PDU types by LE Set Advertising Parameters' Advertising_Type
LEGACY_ADV_TYPES = {0: "ADV_IND", 1: "ADV_DIRECT_IND", 2: "ADV_SCAN_IND", 3: "ADV_NONCONN_IND", 4: "ADV_DIRECT_IND"}


@dataclass(frozen=True)
class Packet:
    t: float  # Unix time (s)
    index: int
    opcode: int  # monitor opcode
    data: bytes


def read_packets(path: Path) -> Iterator[Packet]:
    raw = path.read_bytes()
    if raw[:8] != b"btsnoop\0":
        raise ValueError(f"{path} is not a btsnoop file")
    version, datalink = struct.unpack(">II", raw[8:16])
    if datalink != 2001:
        raise ValueError(f"{path}: data link {datalink}, not the Linux monitor (2001)")
    i = 16
    while i + 24 <= len(raw):
        _orig, incl, flags, _drops, ts = struct.unpack(">IIIIq", raw[i:i + 24])
        data = raw[i + 24:i + 24 + incl]
        i += 24 + incl
        yield Packet((ts - BTSNOOP_EPOCH_DELTA_US) / 1e6, flags >> 16, flags & 0xFFFF, data)


def addr(b: bytes) -> str:
    return ":".join(f"{x:02X}" for x in reversed(b))


def ad_structures(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data) and data[i]:
        n = data[i]
        out.append((data[i + 1], bytes(data[i + 2:i + 1 + n])))
        i += 1 + n
    return out


def flags_of(data: bytes) -> int | None:
    return next((v[0] for t, v in ad_structures(data) if t == 0x01 and v), None)


def service_data_of(data: bytes) -> bytes | None:
    """The value of the first 16-bit service data structure (after its UUID)."""
    return next((v[2:] for t, v in ad_structures(data) if t == 0x16), None)


@dataclass(frozen=True)
class OnAir:
    """What a controller started sending at ``t`` (one advertising set)."""

    t: float
    address: str
    data: bytes
    pdu: str
    interval_ms: tuple[float, float]


@dataclass(frozen=True)
class Heard:
    t: float
    address: str
    data: bytes
    rssi: int


@dataclass
class _Set:
    params: dict[str, object] = field(default_factory=dict)
    data: bytes = b""
    random: str = ""
    enabled: bool = False
    last: tuple[str, bytes] | None = None


@dataclass
class Controller:
    index: int
    public: str = ""
    scanning: bool = False
    on_air: list[OnAir] = field(default_factory=list)
    heard: list[Heard] = field(default_factory=list)
    #: (t, opcode, status) of every LE command that failed
    failures: list[tuple[float, int, int]] = field(default_factory=list)
    #: times LE Set Random Address succeeded while this controller scanned: a real
    #: controller refuses it then (Core v5.3 Vol 4 Part E 7.8.4: Command Disallowed)
    random_address_while_scanning: list[float] = field(default_factory=list)
    #: every LE Set (Extended) Scan Enable: (time, on, with the duplicate filter)
    scan_changes: list[tuple[float, bool, bool]] = field(default_factory=list)
    #: the time of every LE Set (Extended) Advertising Enable that turned a set off/on
    advertising_changes: list[tuple[float, bool]] = field(default_factory=list)
    _sets: dict[int, _Set] = field(default_factory=dict)
    _pending: dict[int, bytes] = field(default_factory=dict)
    _random: str = ""

    def _set(self, handle: int) -> _Set:
        return self._sets.setdefault(handle, _Set())

    def _emit(self, t: float, handle: int) -> None:
        """A set's (address, data) on air changed (or it was enabled): one more OnAir."""
        s = self._set(handle)
        if not s.enabled:
            s.last = None
            return
        own = s.params.get("own", 0)
        random = self._random if handle < 0 else s.random
        state = (random if own in (1, 3) else self.public, s.data)
        if state != s.last:
            interval = s.params.get("interval", (0.0, 0.0))
            self.on_air.append(OnAir(t, state[0], state[1], str(s.params.get("pdu", "")), interval))  # type: ignore[arg-type]
            s.last = state

    def command_done(self, t: float, opcode: int, status: int) -> None:
        p = self._pending.pop(opcode, None)
        if p is None:
            return
        if status:
            if opcode >> 10 == 0x08:
                self.failures.append((t, opcode, status))
            return
        if opcode == LE_SET_RANDOM_ADDRESS:
            self._random = addr(p[:6])
            if self.scanning:
                self.random_address_while_scanning.append(t)
            self._emit(t, -1)
        elif opcode == LE_SET_ADV_PARAMETERS:
            lo, hi, typ, own = struct.unpack("<HHBB", p[:6])
            self._set(-1).params.update(interval=(lo * 0.625, hi * 0.625), pdu=LEGACY_ADV_TYPES.get(typ, str(typ)),
                                        own=own)
        elif opcode == LE_SET_ADV_DATA:
            self._set(-1).data = bytes(p[1:1 + p[0]])
            self._emit(t, -1)
        elif opcode == LE_SET_ADV_ENABLE:
            s = self._set(-1)
            s.enabled = bool(p[0])
            self.advertising_changes.append((t, s.enabled))
            self._emit(t, -1)
        elif opcode in (LE_SET_SCAN_ENABLE, LE_SET_EXT_SCAN_ENABLE):
            self.scanning = bool(p[0])
            self.scan_changes.append((t, self.scanning, bool(p[1])))
        elif opcode == LE_SET_ADV_SET_RANDOM_ADDRESS:
            self._set(p[0]).random = addr(p[1:7])  # per set: allowed while scanning
            self._emit(t, p[0])
        elif opcode == LE_SET_EXT_ADV_PARAMETERS:
            handle, props = p[0], struct.unpack("<H", p[1:3])[0]
            lo = int.from_bytes(p[3:6], "little")
            hi = int.from_bytes(p[6:9], "little")
            pdu = ("ADV_IND" if props & 1 else "ADV_NONCONN_IND") if props & 0x10 else \
                ("EXT_CONNECTABLE" if props & 1 else "EXT_NONCONN")
            self._set(handle).params.update(interval=(lo * 0.625, hi * 0.625), pdu=pdu, own=p[10])
        elif opcode == LE_SET_EXT_ADV_DATA:
            handle, op, _frag, n = p[0], p[1], p[2], p[3]
            s = self._set(handle)
            s.data = (s.data if op in (0, 2) else b"") + bytes(p[4:4 + n]) if op in (0, 1, 2) else bytes(p[4:4 + n])
            self._emit(t, handle)
        elif opcode == LE_SET_EXT_ADV_ENABLE:
            enable, n = p[0], p[1]
            handles = [p[2 + 4 * k] for k in range(n)] if n else list(self._sets)
            for h in handles:
                s = self._set(h)
                s.enabled = bool(enable)
                self.advertising_changes.append((t, s.enabled))
                self._emit(t, h)
        elif opcode in (LE_REMOVE_ADV_SET, LE_CLEAR_ADV_SETS):
            for h in ([p[0]] if opcode == LE_REMOVE_ADV_SET else list(self._sets)):
                self._sets.pop(h, None)

    def advertising(self) -> bool:
        """Whether a set is enabled at the end of what was read."""
        return any(s.enabled for s in self._sets.values())


def analyse(path: Path) -> dict[int, Controller]:
    """Every controller of the trace, its on-air timeline and what it heard."""
    ctl: dict[int, Controller] = {}
    for pk in read_packets(path):
        c = ctl.setdefault(pk.index, Controller(pk.index))
        if pk.opcode == MONITOR_NEW_INDEX and len(pk.data) >= 8:
            c.public = addr(pk.data[2:8])
        elif pk.opcode == MONITOR_COMMAND and len(pk.data) >= 3:
            op, n = struct.unpack("<HB", pk.data[:3])
            c._pending[op] = bytes(pk.data[3:3 + n])
        elif pk.opcode == MONITOR_EVENT and len(pk.data) >= 2:
            code, body = pk.data[0], pk.data[2:]
            if code == EVT_COMMAND_COMPLETE and len(body) >= 4:
                c.command_done(pk.t, struct.unpack("<H", body[1:3])[0], body[3])
            elif code == EVT_COMMAND_STATUS and len(body) >= 4:
                c.command_done(pk.t, struct.unpack("<H", body[2:4])[0], body[0])
            elif code == EVT_LE_META and body:
                c.heard.extend(_reports(pk.t, body))
    return ctl


def _reports(t: float, body: bytes) -> list[Heard]:
    out: list[Heard] = []
    sub, i = body[0], 2
    if sub == LE_ADV_REPORT:
        for _ in range(body[1]):
            a = addr(body[i + 2:i + 8])
            n = body[i + 8]
            data = bytes(body[i + 9:i + 9 + n])
            rssi = struct.unpack("b", body[i + 9 + n:i + 10 + n])[0]
            out.append(Heard(t, a, data, rssi))
            i += 10 + n
    elif sub == LE_EXT_ADV_REPORT:
        for _ in range(body[1]):
            a = addr(body[i + 3:i + 9])
            rssi = struct.unpack("b", body[i + 13:i + 14])[0]
            n = body[i + 23]
            out.append(Heard(t, a, bytes(body[i + 24:i + 24 + n]), rssi))
            i += 24 + n
    return out
