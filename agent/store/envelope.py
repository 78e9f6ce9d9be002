"""The one authenticated-encryption helper: AES-256-GCM, a fresh random 96-bit nonce per
message, ``nonce ‖ ciphertext ‖ tag``, bound to associated data. Used for the store's
rows, the keyring's wrapped day keys and the backend's keys at rest."""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import StoreError

KEY_LEN = 32
NONCE_LEN = 12


class EnvelopeError(StoreError):
    """Ciphertext that fails authentication: the wrong key, or tampered data."""


class Envelope:
    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise ValueError(f"an envelope key is {KEY_LEN} bytes")
        self._aead = AESGCM(bytes(key))

    def __repr__(self) -> str:
        return "Envelope(***)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
        except (InvalidTag, ValueError):
            raise EnvelopeError("ciphertext fails authentication (wrong key or tampered data)") from None
