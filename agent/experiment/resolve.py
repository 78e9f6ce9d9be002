"""Offline: who sent what, and how far each device's clock was off.

- :func:`identifier_map`: every device's identifiers, from the identifiers it handed over
  (GAEN: all RPIs of each TEK, one AES call per key, ``agent.protocol.gaen``; ROBERT: the
  EBIDs) and from its own broadcasts;
- :func:`resolve_advert`: one advert heard -> (transmitter, the TX power it advertised,
  its identity); for GAEN the AEM is opened with the transmitter's key (the same
  cryptography the agent's matching uses);
- :func:`beacon_offsets` / :func:`marker_offsets`: clock offsets (see docs/experiments.md).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..protocol import gaen, robert

#: a rotation counts for clock offsets when the receiver heard the old identity and the
#: new one within this many seconds of each other (the gap bounds the midpoint's error)
MAX_ROTATION_GAP_S = 20.0
#: and when at least this many receivers heard it
MIN_RECEIVERS = 2
FIT_ROUNDS = 40
MAX_RESIDUAL_S = 5.0


@dataclass(frozen=True)
class Resolved:
    tx: int
    #: the TX power the transmitter advertised (AEM or ROBERT's clear byte); None: unknown
    tx_power: float | None
    #: the identity (RPI, EBID): rotations are changes of identity
    ident: bytes


@dataclass
class IdentifierMap:
    #: identity -> (device index, its key's AEMK for GAEN, or None)
    by_ident: dict[bytes, tuple[int, bytes | None]]

    def __len__(self) -> int:
        return len(self.by_ident)


def identity_of(protocol: str, payload: bytes) -> bytes | None:
    """The identity inside a service-data payload: the RPI (GAEN) or the EBID (ROBERT)."""
    if protocol == "robert":
        return payload[1:9] if len(payload) >= robert.HELLO_LEN else None
    return payload[:gaen.RPI_LEN] if len(payload) >= gaen.RPI_LEN + gaen.AEM_LEN else None


def identifier_map(devices: Sequence[tuple[str, Iterable[tuple[str, bytes, int, int]], Iterable[bytes]]]
                   ) -> IdentifierMap:
    """``devices``: per device index, (protocol, own identifiers (kind, id, start, period),
    own broadcast payloads)."""
    out: dict[bytes, tuple[int, bytes | None]] = {}
    for i, (protocol, own_ids, payloads) in enumerate(devices):
        for kind, ident, start, period in own_ids:
            if kind == "tek" and len(ident) == gaen.KEY_LEN and 0 < period <= 0xFFFF:
                aemk = gaen.derive_aemk(ident)
                for rpi in gaen.rpis_for_key(ident, start, period):
                    out[rpi] = (i, aemk)
            elif kind == "ebid":
                out[bytes(ident)] = (i, None)
        for p in payloads:
            ident_b = identity_of(protocol, p)
            if ident_b is not None:
                out.setdefault(ident_b, (i, None))
    return IdentifierMap(out)


def resolve_advert(protocol: str, payload: bytes, ids: IdentifierMap) -> Resolved | None:
    ident = identity_of(protocol, payload)
    if ident is None:
        return None
    found = ids.by_ident.get(ident)
    if found is None:
        return None
    tx, aemk = found
    tx_power: float | None = None
    if protocol == "robert":
        if len(payload) >= robert.HELLO_LEN + 2:
            tx_power = float(int.from_bytes(payload[robert.HELLO_LEN + 1:robert.HELLO_LEN + 2], "little",
                                            signed=True))
    elif aemk is not None:
        try:
            meta = gaen.Metadata.from_bytes(gaen.decrypt_aem(aemk, ident, payload[16:20]))
            tx_power = float(meta.tx_power_dbm)
        except gaen.MetadataError:
            return None  # the agent's matching rejects it too
    return Resolved(tx, tx_power, ident)


def beacon_offsets(rows: Iterable[tuple[int, int, bytes, float, float]], n_devices: int) -> dict[int, float]:
    """Clock offsets from rotations heard by several receivers. ``rows``: per receiver,
    transmitter and identity: first and last time heard (receiver clock). Devices that
    heard no shared rotation get no offset. The median device is fixed at 0."""
    heard: dict[tuple[int, int], list[tuple[float, float, bytes]]] = defaultdict(list)
    for rx, tx, ident, first, last in rows:
        heard[(rx, tx)].append((first, last, ident))
    mids: dict[bytes, dict[int, float]] = defaultdict(dict)  # new identity -> receiver -> midpoint
    for (rx, _), seq in heard.items():
        seq.sort()
        for (_, last_old, _), (first_new, _, new) in zip(seq, seq[1:]):
            if 0 <= first_new - last_old <= MAX_ROTATION_GAP_S:
                mids[new][rx] = (first_new + last_old) / 2
    obs = [(b, m) for b, m in mids.items() if len(m) >= MIN_RECEIVERS]
    if not obs:
        return {}
    devices = sorted({rx for _, m in obs for rx in m})
    off = dict.fromkeys(devices, 0.0)
    # least squares of the two-way model midpoint = rotation time + offset, by alternating
    # means; midpoints more than MAX_RESIDUAL_S off after a first fit are dropped (a
    # rotation heard only late, a receiver that missed the old identity's last packets)
    for round_ in range(FIT_ROUNDS):
        times = [(m, float(np.mean([t - off[rx] for rx, t in m.items()]))) for _, m in obs]
        per_dev: dict[int, list[float]] = defaultdict(list)
        for m, tb in times:
            for rx, t in m.items():
                if round_ < FIT_ROUNDS // 2 or abs(t - tb - off[rx]) <= MAX_RESIDUAL_S:
                    per_dev[rx].append(t - tb)
        off = {rx: float(np.mean(v)) if v else off[rx] for rx, v in per_dev.items()} | \
            {rx: off[rx] for rx in off if rx not in per_dev}
        ref = float(np.median(list(off.values())))
        off = {rx: v - ref for rx, v in off.items()}
    return {rx: v for rx, v in off.items() if rx < n_devices}


def marker_offsets(markers: Iterable[tuple[str, str, float]]) -> dict[str, float]:
    """``(marker, device label, time on that device)``; the device ``truth`` gives true
    time. Offsets against truth where a marker has it, else against the median of the
    devices that logged the marker."""
    by_marker: dict[str, dict[str, float]] = defaultdict(dict)
    for marker, device, t in markers:
        by_marker[marker][device] = t
    diffs: dict[str, list[float]] = defaultdict(list)
    for seen in by_marker.values():
        ref = seen.get("truth")
        others = {d: t for d, t in seen.items() if d != "truth"}
        if ref is None:
            if len(others) < 2:
                continue
            ref = float(np.median(list(others.values())))
        for d, t in others.items():
            diffs[d].append(t - ref)
    return {d: float(np.median(v)) for d, v in diffs.items() if v and all(math.isfinite(x) for x in v)}
