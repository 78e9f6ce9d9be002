"""The matching kernel's paths against each other and against the reference.

The C kernel has a portable path (OpenSSL for HKDF and AES, scalar look-up) and, on
x86-64, one of its own (SHA-NI, AES-NI/VAES, AVX2); the pure-Python path is a third.
They must find exactly the same (key, RPI, encounter) triples, and their primitives the
same bytes as ``agent.protocol.gaen`` (the spec's reference)."""

import json
import os
import random

import numpy as np
import pytest

from agent.exposure import matching as mm
from agent.exposure.matching import EncounterIndex, MatchStats, find_candidates
from agent.protocol import gaen
from agent.protocol.export import PackedKeys

native = pytest.mark.skipif(mm._fastmatch is None, reason="the C kernel was not built (no compiler or libssl-dev)")
DAY0 = 20_000


@native
@pytest.mark.parametrize("portable", [False, True])
def test_kernel_primitives_equal_the_reference(portable):
    fm = mm._fastmatch
    rng = random.Random(portable)
    for n in (1, 2, 3, 8):
        teks = rng.randbytes(16 * n)
        assert fm.rpiks(teks, portable) == b"".join(gaen.derive_rpik(teks[i : i + 16]) for i in range(0, 16 * n, 16))
    for count in (1, 2, 7, 8, 15, 16, 17, 143, 144):
        key, e0 = rng.randbytes(16), rng.randrange(2**32 - 200)
        assert fm.rpis(key, e0, count, portable) == b"".join(gaen.rpis_from_rpik(key, e0, count))


def _store_and_keys(seed: int, n_keys: int = 600, noise: int = 3000):
    """Keys of any start and period; stored RPIs of some of them, heard at, near and far
    from their interval (across day boundaries too), some twice; random noise."""
    rng = random.Random(seed)
    keys, rpis, first, last = [], [], [], []
    for _ in range(n_keys):
        start = DAY0 * 144 + rng.randrange(-30, 6 * 144)
        period = rng.choice([144, 144, rng.randint(1, 144)])
        keys.append(gaen.TemporaryExposureKey(rng.randbytes(16), start, period))
    for k in rng.sample(keys, n_keys // 3):
        for _ in range(rng.randint(1, 3)):
            j = rng.randrange(k.rolling_period)
            f = k.rolling_start_interval_number + j + rng.choice([0, 0, 1, -3, 12, -12, 13, -13, 40, -150, 200])
            rpis.append(gaen.rpis_for_key(k.key_data, k.rolling_start_interval_number + j, 1)[0])
            first.append(f)
            last.append(f + rng.choice([0, 0, 1, 5, 30]))
            if rng.random() < 0.2:  # the same RPI heard again later: another encounter
                rpis.append(rpis[-1])
                first.append(f + 20)
                last.append(f + 21)
    for _ in range(noise):
        f = DAY0 * 144 + rng.randrange(-144, 7 * 144)
        rpis.append(rng.randbytes(16))
        first.append(f)
        last.append(f + rng.randint(0, 2))
    order = list(range(len(rpis)))
    rng.shuffle(order)
    index = EncounterIndex.from_arrays(b"".join(rpis[i] for i in order), [first[i] for i in order],
                                       [last[i] for i in order], np.arange(len(order)) + 1000)
    packed = PackedKeys.from_keys(gaen_to_diagnosis(keys))
    return packed, index


def gaen_to_diagnosis(keys):
    from agent.protocol.export import DiagnosisKey
    return [DiagnosisKey(k.key_data, k.rolling_start_interval_number, k.rolling_period) for k in keys]


def _reference(keys: PackedKeys, index: EncounterIndex, tol: int) -> list[tuple[int, int, int]]:
    """Straight from the definition: every RPI of the looked-up days, every stored equal one
    whose [first - tol, last + tol] reaches the RPI's day."""
    lo, hi = index.interval_range(tol)
    stored: dict[bytes, list[int]] = {}
    for i in range(len(index)):
        stored.setdefault(index.rpis[16 * i : 16 * i + 16], []).append(i)
    out = []
    for pos in range(len(keys)):
        k = keys.key(pos)
        for j, r in enumerate(gaen.rpis_for_key(k.key_data, k.rolling_start_interval_number, k.rolling_period)):
            e = k.rolling_start_interval_number + j
            if not lo <= e <= hi:
                continue
            for i in stored.get(r, ()):
                if (int(index.first[i]) - tol) // 144 <= e // 144 <= (int(index.last[i]) + tol) // 144:
                    out.append((pos, j, i))
    return sorted(out)


def _triples(c) -> list[tuple[int, int, int]]:
    return list(zip(c.key_pos.tolist(), c.offset.tolist(), c.entry.tolist()))


@pytest.mark.parametrize("seed", [1, 2])
def test_all_paths_find_the_same_triples(seed):
    keys, index = _store_and_keys(seed)
    want = _reference(keys, index, 12)
    assert len(want) > 100
    got = {"python": _triples(find_candidates(keys, index, native=False, workers=1))}
    if mm._fastmatch is not None:
        for portable in (False, True):
            for threads in (1, 2):
                raw, *_ = index.native(12).scan(keys.key_data, keys.rolling_start.astype("<u4"),
                                                keys.rolling_period.astype("<u2"), threads, portable)
                got[f"C portable={portable} threads={threads}"] = [
                    tuple(t) for t in np.frombuffer(raw, "<u4").reshape(-1, 3).tolist()]
    for name, triples in got.items():
        assert triples == want, name


def test_stats_count_the_work_alike():
    keys, index = _store_and_keys(3, n_keys=300)
    stats = {}
    for native_ in ([True, False] if mm._fastmatch is not None else [False]):
        st = MatchStats()
        find_candidates(keys, index, native=native_, workers=1, stats=st)
        stats[native_] = st
        assert st.keys == 300 and st.keys_derived + st.skipped_no_overlap == 300 and st.rpi_hits > 0
    if len(stats) == 2:  # the filters differ (Bloom / prefix table), the work does not
        a, b = stats[True], stats[False]
        assert (a.keys_derived, a.rpis_computed, a.rpi_hits) == (b.keys_derived, b.rpis_computed, b.rpi_hits)


@native
def test_masking_aes_ni_like_openssl_turns_the_kernel_portable():
    """OPENSSL_ia32cap masks AES-NI, PCLMULQDQ and SHA for OpenSSL; the kernel reads it too
    (the benchmark's stand-in for a Raspberry Pi's software AES)."""
    import subprocess
    import sys
    env = {**os.environ, "OPENSSL_ia32cap": "~0x200000200000000:~0x20000000"}
    code = "import json; from agent.exposure import _fastmatch as f; print(json.dumps(f.features()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    feats = json.loads(out)
    if feats:  # x86-64
        assert not feats["aesni"] and not feats["vaes"] and not feats["shani"]


@native
def test_index_rejects_inconsistent_buffers():
    fm = mm._fastmatch
    with pytest.raises(ValueError):
        fm.Index(b"x" * 17, b"\0" * 4, b"\0" * 4, 12, bytes(40))
    with pytest.raises(ValueError):
        fm.Index(b"x" * 16, b"\0" * 4, b"\0" * 4, 12, bytes(8))
    ix = fm.Index(b"x" * 16, b"\0" * 4, b"\0" * 4, 12, bytes(40))
    with pytest.raises(ValueError):  # a period of 0
        ix.scan(b"k" * 16, b"\0" * 4, b"\0\0", 1)
    with pytest.raises(ValueError):  # buffers of different lengths
        ix.scan(b"k" * 32, b"\0" * 4, b"\x90\0", 1)
