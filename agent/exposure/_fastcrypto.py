"""Fast per-key primitives for bulk matching (one million keys a sync).

Profiling showed that in Python the cost per diagnosis key is dominated not by AES or
SHA-256 but by per-call set-up: ``cryptography`` fetches the cipher from OpenSSL's
provider for every new key (~9 us), ``hmac.digest`` fetches SHA-256 each call (~2.5 us).
So:
- HKDF-SHA256 for the RPIK uses ``hashlib`` with the constant HMAC pads pre-hashed;
- AES-128-ECB re-keys one reused OpenSSL EVP context through ctypes (the system's
  libcrypto 3), when one is available; otherwise it falls back to ``cryptography``.
Both are checked against ``agent.protocol.gaen`` (the reference) in the tests and at
import: a mismatch disables the fast path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..protocol import gaen

_IPAD = bytes(b ^ 0x36 for b in bytes(64))
_OPAD = bytes(b ^ 0x5C for b in bytes(64))
_SALT_INNER = hashlib.sha256(_IPAD)  # HMAC key = 32 zero bytes (HKDF with no salt), padded to 64
_SALT_OUTER = hashlib.sha256(_OPAD)
_IPAD_INT = int.from_bytes(b"\x36" * 64, "big")
_OPAD_INT = int.from_bytes(b"\x5c" * 64, "big")
_RPIK_INFO1 = b"EN-RPIK\x01"


def rpik(tek: bytes) -> bytes:
    """HKDF-SHA256(IKM=tek, salt=None, info="EN-RPIK", L=16) (RFC 5869, one expand block)."""
    h = _SALT_INNER.copy()
    h.update(tek)
    o = _SALT_OUTER.copy()
    o.update(h.digest())
    prk = int.from_bytes(o.digest() + bytes(32), "big")
    inner = hashlib.sha256((prk ^ _IPAD_INT).to_bytes(64, "big") + _RPIK_INFO1).digest()
    return hashlib.sha256((prk ^ _OPAD_INT).to_bytes(64, "big") + inner).digest()[:16]


class _CryptographyECB:
    name = "cryptography"

    def encrypt(self, key: bytes, data: bytes) -> bytes:
        enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        return enc.update(data)


class _LibcryptoECB:
    """One EVP_CIPHER_CTX re-keyed per call (EVP_EncryptInit_ex with a NULL cipher)."""

    name = "libcrypto"

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
        lib.EVP_aes_128_ecb.restype = ctypes.c_void_p
        lib.EVP_EncryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                                           ctypes.c_char_p]
        lib.EVP_EncryptUpdate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                          ctypes.c_char_p, ctypes.c_int]
        lib.EVP_CIPHER_CTX_set_padding.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self._ctx = lib.EVP_CIPHER_CTX_new()
        if not self._ctx or lib.EVP_EncryptInit_ex(self._ctx, lib.EVP_aes_128_ecb(), None, None, None) != 1:
            raise OSError("EVP init failed")
        lib.EVP_CIPHER_CTX_set_padding(self._ctx, 0)
        self._init, self._update = lib.EVP_EncryptInit_ex, lib.EVP_EncryptUpdate
        self._outl = ctypes.c_int()
        self._outl_ref = ctypes.byref(self._outl)
        self._bufs: dict[int, ctypes.Array] = {}

    def encrypt(self, key: bytes, data: bytes) -> bytes:
        n = len(data)
        buf = self._bufs.get(n)
        if buf is None:
            buf = self._bufs[n] = ctypes.create_string_buffer(n)
        if self._init(self._ctx, None, None, key, None) != 1 or \
                self._update(self._ctx, buf, self._outl_ref, data, n) != 1 or self._outl.value != n:
            raise OSError("EVP_EncryptUpdate failed")
        return buf.raw


def _self_test(ecb) -> bool:
    tek = bytes(range(16))
    k = rpik(tek)
    blocks = b"".join(gaen.padded_data(2_642_976 + j) for j in range(3))
    return k == gaen.derive_rpik(tek) and ecb.encrypt(k, blocks) == b"".join(gaen.rpis_for_key(tek, 2_642_976, 3))


def _pick_ecb():
    name = ctypes.util.find_library("crypto")
    if name:
        try:
            ecb = _LibcryptoECB(ctypes.CDLL(name))
            if _self_test(ecb):
                return ecb
        except (OSError, AttributeError):
            pass
    return _CryptographyECB()


ecb = _pick_ecb()
