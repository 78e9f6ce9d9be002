"""A short end-to-end walk through the protocol core, on a simulated clock.

Alice's device rotates identifiers for a day; Bob's device hears some of her
advertisements; Alice tests positive and her keys are published in a signed export
file; Bob's device verifies the file, re-derives Alice's RPIs and finds the match.
No radio, no network: only the pure protocol code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from .protocol import export, gaen, payload
from .protocol.schedule import IdSchedule


@dataclass
class WalkthroughResult:
    rotations: int
    heard: int
    published_keys: int
    export_bytes: int
    matched_rpis: int
    tx_power_dbm: int


def run_walkthrough(seed: int = 1, start_unix: int = 1_700_006_400, log=print) -> WalkthroughResult:
    rng = random.Random(seed)
    sched = IdSchedule(tx_power_dbm=-8, rng=rng, tek_factory=lambda: rng.randbytes(16))
    now = float(start_unix)
    heard: list[tuple[float, bytes]] = []
    rotations = 0
    teks = {}
    while now < start_unix + 86_400:
        rot = sched.rotate(now)
        rotations += 1
        if rot.new_tek:
            teks[rot.tek.rolling_start] = rot.tek
        frame = payload.build_advertisement(rot.payload.rpi, rot.payload.aem)
        # Bob is near Alice from 09:00 to 09:40: he receives the raw frame and parses it.
        if 9 * 3600 <= now - start_unix < 9 * 3600 + 2400:
            heard.append((now, frame))
        now = rot.next_at
    log(f"Alice rotated RPI+address {rotations} times in one simulated day (TEKs: {len(teks)})")
    log(f"Bob heard {len(heard)} distinct advertisements (31-byte frames, service 0xFD6F)")

    signing_key = ec.generate_private_key(ec.SECP256R1())
    keys = [export.DiagnosisKey(t.tek, t.rolling_start, t.rolling_period, 4,
                                export.ReportType.CONFIRMED_TEST) for t in teks.values()]
    blob = export.build_export(keys, signing_key=signing_key, start_timestamp=start_unix,
                               end_timestamp=start_unix + 86_400, region="XX")
    log(f"Alice's {len(keys)} key(s) published in a signed export of {len(blob)} bytes")

    exp = export.parse_export(blob, trusted_keys=[export.public_key_b64(signing_key)])
    heard_by_rpi = {payload.parse_advertisement(f).rpi: payload.parse_advertisement(f) for _, f in heard}
    matched, tx = 0, 0
    for key in exp.keys:
        aemk = gaen.derive_aemk(key.key_data)
        for r in gaen.rpis_for_key(key.key_data, key.rolling_start_interval_number, key.rolling_period):
            p = heard_by_rpi.get(r)
            if p is not None:
                matched += 1
                tx = gaen.Metadata.from_bytes(gaen.decrypt_aem(aemk, r, p.aem)).tx_power_dbm
    log(f"Bob verified the export signature and matched {matched} of Alice's RPIs "
        f"(decrypted TX power {tx} dBm)")
    return WalkthroughResult(rotations, len(heard), len(keys), len(blob), matched, tx)
