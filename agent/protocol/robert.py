"""ROBERT (StopCovid / TousAntiCovid) protocol core, sans-I/O.

Follows the ROBERT specification v1.1 and, where the two differ, the deployed code
(TousAntiCovid robert-server and the Android app): key-derivation labels "mac" and
"tuples". Pure functions over bytes and integers:

- SKINNY-64/192 block cipher (Beierle et al., CRYPTO 2016, section 2: 40 rounds), used
  by the server to encrypt EBID = epoch (24 bits) ‖ ID_A (40 bits) under K_S;
- ECC = first byte of AES-256-ECB(K_G, EBID ‖ 0^64) XOR country code (spec 4.1);
- HELLO = ECC ‖ EBID ‖ time16 ‖ MAC40, MAC40 = first 5 bytes of
  HMAC-SHA256(K_mac, 0x01 ‖ ECC ‖ EBID ‖ time16) (spec 5.1);
- MACs of authenticated requests: HMAC-SHA256(K_mac, prefix ‖ EBID ‖ epoch (4 BE) ‖ time (4 BE))
  with prefix 0x02 status, 0x03 unregister, 0x04 deleteExposureHistory (spec 6-7);
- registration keys: ECDH P-256 shared x, K_mac = HMAC-SHA256(x, "mac"),
  K_tuples = HMAC-SHA256(x, "tuples"); tuples are AES-256-GCM (IV 12 ‖ ct ‖ tag 16);
- epochs of 15 minutes on NTP seconds (Unix + 2208988800).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import array
import functools
import struct
from dataclasses import dataclass

import numpy as np

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ProtocolError

# The ROBERT constants; every other module imports them from here.
NTP_UNIX_OFFSET = 2_208_988_800
#: Epochs of 15 minutes: one EBID (and one BLE address) per epoch (spec 2).
EPOCH_SECONDS = 900
HELLO_LEN = 16
#: A device broadcasts each HELLO (time, MAC) for at most this long, then a fresh one
#: (this implementation's pace): a receiver hears one HELLO over at most this span.
HELLO_REFRESH_S = 60
#: Service UUID of the HELLO broadcast, and its 128-bit form (bleak/BlueZ keys).
ROBERT_SERVICE_UUID16 = 0xFD64
ROBERT_SERVICE_UUID = "0000fd64-0000-1000-8000-00805f9b34fb"
#: The version byte after the HELLO in the 0xFD64 service data: TousAntiCovid broadcasts 1
#: (issue 12.11, from its ProximityNotification BluetoothProximityPayload.swift; the
#: stored STOP-COVID 2020-05 version of that file wrote 0). Receivers, theirs
#: (Android BlePayload.from) and ours, read any value.
HELLO_PAYLOAD_VERSION = 1
PREFIX_HELLO = 0x01
PREFIX_STATUS = 0x02
PREFIX_UNREGISTER = 0x03
PREFIX_DELETE_HISTORY = 0x04


class RobertError(ProtocolError):
    """Malformed ROBERT data (HELLO, tuple bundle, request)."""


# --- time ---------------------------------------------------------------------------

def ntp_seconds(unix_seconds: float) -> int:
    return int(unix_seconds) + NTP_UNIX_OFFSET


def epoch_id(ntp: int, service_start_ntp: int) -> int:
    """15-minute epochs counted from the server's start (24-bit counter)."""
    return (ntp - service_start_ntp) // EPOCH_SECONDS


def epoch_start_ntp(epoch: int, service_start_ntp: int) -> int:
    return service_start_ntp + epoch * EPOCH_SECONDS


def time16(ntp: int) -> bytes:
    return struct.pack(">H", ntp & 0xFFFF)


def reconstruct_ntp(t16: int, reference_ntp: int) -> int:
    """The full NTP time nearest to ``reference_ntp`` whose low 16 bits are ``t16``."""
    base = reference_ntp - (reference_ntp & 0xFFFF) + t16
    candidates = (base - 0x10000, base, base + 0x10000)
    return min(candidates, key=lambda c: abs(c - reference_ntp))


# --- SKINNY-64/192 ------------------------------------------------------------------------

_SBOX = (0xC, 0x6, 0x9, 0x0, 0x1, 0xA, 0x2, 0xB, 0x3, 0x8, 0x5, 0xD, 0x4, 0xE, 0x7, 0xF)
_SBOX_INV = tuple(_SBOX.index(i) for i in range(16))
_PT = (9, 15, 8, 13, 10, 14, 12, 11, 0, 1, 2, 3, 4, 5, 6, 7)  # tweakey cell permutation
SKINNY64_192_ROUNDS = 40


def _nibbles(b: bytes) -> list[int]:
    out = []
    for x in b:
        out += [x >> 4, x & 0xF]
    return out


def _lfsr2(x: int) -> int:  # TK2, 4-bit cells: (x3,x2,x1,x0) -> (x2,x1,x0,x3^x2)
    return ((x << 1) & 0xE) | (((x >> 3) ^ (x >> 2)) & 1)


def _lfsr3(x: int) -> int:  # TK3: (x3,x2,x1,x0) -> (x0^x3,x3,x2,x1)
    return (x >> 1) | (((x & 1) ^ (x >> 3)) << 3)


class Skinny64_192:
    """SKINNY-64/192 with a fixed 24-byte tweakey (TK1 ‖ TK2 ‖ TK3)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 24:
            raise RobertError("SKINNY-64/192 needs a 24-byte key")
        tk = [_nibbles(key[0:8]), _nibbles(key[8:16]), _nibbles(key[16:24])]
        self._round_keys: list[list[int]] = []
        self._round_consts: list[tuple[int, int]] = []
        rc = 0
        for _ in range(SKINNY64_192_ROUNDS):
            rc = ((rc << 1) & 0x3F) | (((rc >> 5) ^ (rc >> 4) ^ 1) & 1)
            self._round_consts.append((rc & 0xF, rc >> 4))
            self._round_keys.append([tk[0][i] ^ tk[1][i] ^ tk[2][i] for i in range(8)])
            tk = [[t[_PT[i]] for i in range(16)] for t in tk]
            tk[1] = [_lfsr2(x) if i < 8 else x for i, x in enumerate(tk[1])]
            tk[2] = [_lfsr3(x) if i < 8 else x for i, x in enumerate(tk[2])]

        # The state as four 16-bit rows (cell 4r the top nibble of row r). ShiftRows
        # rotates row r right by r cells and commutes with the cell-wise S-box, and the
        # round key and constants fall on rows 0-2 only, so a round is one table look-up
        # per row (S-box then rotation), three XORs with the rotated round tweakey and
        # constants, and MixColumns, which mixes whole rows.
        self._row_keys: list[tuple[int, int, int]] = []
        for (c0, c1), rk in zip(self._round_consts, self._round_keys):
            k0 = ((rk[0] ^ c0) << 12) | (rk[1] << 8) | (rk[2] << 4) | rk[3]
            k1 = ((rk[4] ^ c1) << 12) | (rk[5] << 8) | (rk[6] << 4) | rk[7]
            self._row_keys.append((k0, _rotr16(k1, 4), _rotr16(0x2000, 8)))
        self._tables = _row_tables()

    def encrypt(self, block: bytes) -> bytes:
        if len(block) != 8:
            raise RobertError("SKINNY-64 blocks are 8 bytes")
        t0, t1, t2, t3 = self._tables[0]
        r0, r1, r2, r3 = _ROWS.unpack(block)
        for k0, k1, k2 in self._row_keys:
            r0 = t0[r0] ^ k0
            r1 = t1[r1] ^ k1
            r2 = t2[r2] ^ k2
            r3 = t3[r3]
            r1 ^= r2  # MixColumns
            r2 ^= r0
            r3 ^= r2
            r0, r1, r2, r3 = r3, r0, r1, r2
        return _ROWS.pack(r0, r1, r2, r3)

    def decrypt(self, block: bytes) -> bytes:
        if len(block) != 8:
            raise RobertError("SKINNY-64 blocks are 8 bytes")
        u0, u1, u2, u3 = self._tables[1]
        n0, n1, n2, n3 = _ROWS.unpack(block)
        for k0, k1, k2 in reversed(self._row_keys):
            r0, r1, r2, r3 = n1, n2, n3, n0  # inverse MixColumns
            r3 ^= r2
            r2 ^= r0
            r1 ^= r2
            n0, n1, n2, n3 = u0[r0 ^ k0], u1[r1 ^ k1], u2[r2 ^ k2], u3[r3]
        return _ROWS.pack(n0, n1, n2, n3)


_ROWS = struct.Struct(">4H")


def _rotr16(x: int, bits: int) -> int:
    return ((x >> bits) | (x << (16 - bits))) & 0xFFFF if bits else x


@functools.cache
def _row_tables() -> tuple[tuple[array.array[int], ...], tuple[array.array[int], ...]]:
    """Per row r: the S-box on each cell then a right rotation by r cells; and the
    inverse (left rotation, then the inverse S-box). 8 tables of 2**16 entries (1 MiB),
    built once, on first use."""
    x = np.arange(1 << 16, dtype=np.uint32)
    sbox, inv = np.array(_SBOX, dtype=np.uint32), np.array(_SBOX_INV, dtype=np.uint32)

    def cells(table: np.ndarray, v: np.ndarray) -> np.ndarray:
        return sum(table[(v >> s) & 0xF] << s for s in (12, 8, 4, 0))  # type: ignore[no-any-return]

    def rotr(v: np.ndarray, bits: int) -> np.ndarray:
        return ((v >> bits) | (v << (16 - bits))) & 0xFFFF if bits else v

    def as_array(v: np.ndarray) -> array.array[int]:
        return array.array("H", v.astype(np.uint16).tobytes())

    enc = tuple(as_array(rotr(cells(sbox, x), 4 * r)) for r in range(4))
    dec = tuple(as_array(cells(inv, rotr(x, 16 - 4 * r) if r else x)) for r in range(4))
    return enc, dec


# --- EBID and ECC (server side) -------------------------------------------------------------

def make_ebid(k_s: bytes, epoch: int, id_a: bytes) -> bytes:
    """EBID = SKINNY-64/192(K_S, epoch (24 bits BE) ‖ ID_A (40 bits))."""
    if not 0 <= epoch < 1 << 24 or len(id_a) != 5:
        raise RobertError("epoch must fit 24 bits and ID_A be 5 bytes")
    return Skinny64_192(k_s).encrypt(epoch.to_bytes(3, "big") + id_a)


def open_ebid(k_s: bytes | Skinny64_192, ebid: bytes) -> tuple[int, bytes]:
    """(epoch, ID_A) of an EBID; K_S as bytes, or as its cipher (no key schedule per call)."""
    cipher = k_s if isinstance(k_s, Skinny64_192) else Skinny64_192(k_s)
    plain = cipher.decrypt(ebid)
    return int.from_bytes(plain[:3], "big"), plain[3:]


def make_ecc(k_g: bytes, ebid: bytes, country_code: int) -> bytes:
    """ECC = MSB_8(AES-256-ECB(K_G, EBID ‖ 0^64)) XOR CC."""
    enc = Cipher(algorithms.AES(k_g), modes.ECB()).encryptor()
    block = enc.update(ebid + bytes(8)) + enc.finalize()
    return bytes([block[0] ^ (country_code & 0xFF)])


def open_ecc(k_g: bytes, ebid: bytes, ecc: bytes) -> int:
    """The country code an ECC encodes."""
    return make_ecc(k_g, ebid, 0)[0] ^ ecc[0]


# --- HELLO ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    ecc: bytes
    ebid: bytes
    time16: int
    mac: bytes

    def to_bytes(self) -> bytes:
        return self.ecc + self.ebid + struct.pack(">H", self.time16) + self.mac

    def __repr__(self) -> str:  # identifiers stay out of logs
        return f"Hello(time16={self.time16})"


def hello_mac(k_mac: bytes, ecc: bytes, ebid: bytes, t16: bytes) -> bytes:
    return hmac.new(k_mac, bytes([PREFIX_HELLO]) + ecc + ebid + t16, hashlib.sha256).digest()[:5]


def build_hello(k_mac: bytes, ecc: bytes, ebid: bytes, ntp: int) -> bytes:
    if len(ecc) != 1 or len(ebid) != 8:
        raise RobertError("ECC is 1 byte and EBID 8 bytes")
    t16 = time16(ntp)
    return ecc + ebid + t16 + hello_mac(k_mac, ecc, ebid, t16)


def parse_hello(data: bytes) -> Hello:
    """A HELLO from the 16 first bytes of 0xFD64 service data (HELLO ‖ version ‖ TX power:
    parsers accept 18 bytes or more, and bare 16-byte HELLOs)."""
    data = bytes(data)
    if len(data) < HELLO_LEN:
        raise RobertError(f"a HELLO is {HELLO_LEN} bytes, got {len(data)}")
    return Hello(data[0:1], data[1:9], struct.unpack(">H", data[9:11])[0], data[11:16])


def service_data(hello: bytes, tx_power: int, version: int = HELLO_PAYLOAD_VERSION) -> bytes:
    """0xFD64 service data as broadcast: HELLO ‖ version ‖ TX power (signed)."""
    return bytes(hello) + struct.pack("<Bb", version, tx_power)


def verify_hello_mac(k_mac: bytes, hello: Hello) -> bool:
    return hmac.compare_digest(hello_mac(k_mac, hello.ecc, hello.ebid, struct.pack(">H", hello.time16)), hello.mac)


# --- authenticated requests ----------------------------------------------------------------

def request_mac(k_mac: bytes, prefix: int, ebid: bytes, epoch: int, ntp: int) -> bytes:
    """HMAC-SHA256(K_mac, prefix ‖ EBID ‖ epochId (4 BE) ‖ time (4 BE)), all 32 bytes."""
    msg = bytes([prefix]) + ebid + struct.pack(">II", epoch & 0xFFFFFFFF, ntp & 0xFFFFFFFF)
    return hmac.new(k_mac, msg, hashlib.sha256).digest()


def verify_request_mac(k_mac: bytes, prefix: int, ebid: bytes, epoch: int, ntp: int, mac: bytes) -> bool:
    return hmac.compare_digest(request_mac(k_mac, prefix, ebid, epoch, ntp), bytes(mac))


# --- registration keys and tuples -----------------------------------------------------------

@dataclass(frozen=True)
class SessionKeys:
    k_mac: bytes
    k_tuples: bytes

    def __repr__(self) -> str:
        return "SessionKeys(***)"


def derive_keys(shared_x: bytes) -> SessionKeys:
    """K_mac = HMAC-SHA256(x, "mac"), K_tuples = HMAC-SHA256(x, "tuples") (deployed labels)."""
    return SessionKeys(hmac.new(shared_x, b"mac", hashlib.sha256).digest(),
                       hmac.new(shared_x, b"tuples", hashlib.sha256).digest())


def public_key_b64(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return base64.b64encode(pub.public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


def ecdh_keys(private: ec.EllipticCurvePrivateKey, peer_public_b64: str) -> SessionKeys:
    try:
        peer = serialization.load_der_public_key(base64.b64decode(peer_public_b64, validate=True))
    except (ValueError, TypeError) as e:
        raise RobertError(f"not a P-256 public key: {e}") from None
    if not isinstance(peer, ec.EllipticCurvePublicKey) or not isinstance(peer.curve, ec.SECP256R1):
        raise RobertError("registration keys are P-256")
    return derive_keys(private.exchange(ec.ECDH(), peer))


@dataclass(frozen=True)
class Tuple:
    epoch: int
    ebid: bytes
    ecc: bytes


def encrypt_tuples(k_tuples: bytes, tuples: list[Tuple]) -> str:
    plain = json.dumps([{"epochId": t.epoch, "key": {"ebid": base64.b64encode(t.ebid).decode(),
                                                     "ecc": base64.b64encode(t.ecc).decode()}} for t in tuples])
    iv = os.urandom(12)
    return base64.b64encode(iv + AESGCM(k_tuples).encrypt(iv, plain.encode(), None)).decode()


def decrypt_tuples(k_tuples: bytes, blob_b64: str) -> list[Tuple]:
    """The identifiers of an encrypted tuple bundle. Whatever the server sent, the only
    error is :class:`RobertError` (the bundle is authenticated, but its inside is still
    checked: a server can be wrong, or hostile)."""
    try:
        blob = base64.b64decode(blob_b64, validate=True)
        plain = AESGCM(k_tuples).decrypt(blob[:12], blob[12:], None)
        doc = json.loads(plain, parse_constant=_no_constant)
    except (InvalidTag, ValueError, TypeError, RecursionError) as e:  # ValueError: JSON, UTF-8, base64
        raise RobertError(f"the tuple bundle cannot be decrypted or parsed: {type(e).__name__}") from None
    if not isinstance(doc, list):
        raise RobertError("the tuple bundle is not a list of tuples")
    return [_tuple(item) for item in doc]


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _tuple(item: object) -> Tuple:
    bad = RobertError("a tuple of the bundle is malformed")
    if not isinstance(item, dict) or not isinstance(item.get("key"), dict):
        raise bad
    epoch, ebid, ecc = item.get("epochId"), item["key"].get("ebid"), item["key"].get("ecc")
    if type(epoch) is not int or not 0 <= epoch < 1 << 24 or not isinstance(ebid, str) or not isinstance(ecc, str):
        raise bad
    try:
        t = Tuple(epoch, base64.b64decode(ebid, validate=True), base64.b64decode(ecc, validate=True))
    except ValueError:
        raise bad from None
    if len(t.ebid) != 8 or len(t.ecc) != 1:
        raise bad
    return t
