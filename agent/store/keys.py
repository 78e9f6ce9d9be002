"""Key material of the store: master key sources and the keyring of per-day data keys.

Why the day keys live in a keyring file beside the database and not in it: a key kept
inside the database file would survive in every copy of that file, so deleting it could
never erase a day from a backup taken earlier. The keyring is small (one wrapped key per
retained day), written atomically with mode 0600, and rewritten without the expired day
keys on purge (crypto-erasure). The database holds only ciphertext.

Keyring file (JSON): format version, the master-key verifier, the KDF parameters for a
passphrase (scrypt, stored with the file), and ``days``: day -> AES-256-GCM wrapped key,
with the day number as associated data.

Only the store's single writer (it holds the store's lock) rewrites the keyring, through
one fixed temporary file; a change is kept in memory only once it is on disk (file and
folder fsynced), so no row is ever sealed under a key that a crash or a full disk lost.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import StoreError, StoreKeyError
from ..files import create_private_file, erase_file, write_private_file
from .envelope import KEY_LEN, Envelope, EnvelopeError

KEYRING_FORMAT = 1
_VERIFIER_PLAINTEXT = b"ctagent keyring verifier v1"

#: scrypt defaults: ~100 ms and 32 MiB on a Raspberry Pi 4 class CPU (RFC 7914 guidance
#: for interactive logins is N=2^15, r=8, p=1).
DEFAULT_SCRYPT = {"n": 2**15, "r": 8, "p": 1}


def create_key_file(path: str | os.PathLike[str]) -> Path:
    """A new random 256-bit master key file, created exclusively with mode 0600."""
    return create_private_file(path, base64.b64encode(secrets.token_bytes(KEY_LEN)) + b"\n")


@dataclass(frozen=True)
class KeyFile:
    """Master key read from a 0600 file (base64 of 32 bytes)."""

    path: Path

    def __repr__(self) -> str:
        return f"KeyFile({str(self.path)!r})"

    def derive(self, _kdf: dict | None) -> tuple[bytes, dict | None]:
        p = Path(self.path)
        try:
            st = p.stat()
            raw = p.read_bytes()
        except OSError as e:
            raise StoreKeyError(f"cannot read key file {p}: {e.strerror}") from None
        if st.st_mode & 0o077:
            raise StoreKeyError(f"key file {p} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
        try:
            key = base64.b64decode(raw.strip(), validate=True)
        except ValueError:
            key = b""
        if len(key) != KEY_LEN:
            raise StoreKeyError(f"key file {p} does not hold a base64 256-bit key")
        return key, None


@dataclass(frozen=True)
class Passphrase:
    """Master key derived from a passphrase with scrypt (parameters kept in the keyring)."""

    passphrase: str
    scrypt: dict | None = None  # parameters for a new keyring; tests use smaller ones

    def __repr__(self) -> str:
        return "Passphrase(***)"

    def derive(self, kdf: dict | None) -> tuple[bytes, dict]:
        if not self.passphrase:
            raise StoreKeyError("the passphrase is empty")
        if kdf is None:
            params = dict(self.scrypt or DEFAULT_SCRYPT)
            kdf = {"name": "scrypt", "salt": base64.b64encode(secrets.token_bytes(16)).decode(), **params}
        if kdf.get("name") != "scrypt":
            raise StoreKeyError("this keyring was created with a key file, not a passphrase")
        key = Scrypt(salt=base64.b64decode(kdf["salt"]), length=KEY_LEN, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
            self.passphrase.encode()
        )
        return key, kdf


MasterKeySource = KeyFile | Passphrase


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def keyring_temp_path(path: Path) -> Path:
    """The keyring's one temporary file (written, fsynced, then renamed over the keyring)."""
    return Path(path).with_name(Path(path).name + ".tmp")


def erase_stale_temp_files(path: Path) -> list[Path]:
    """Temporary copies of the keyring left by a crash (and, from older versions, one per
    pid): they hold day keys, possibly ones retention destroyed. Call under the lock."""
    path = Path(path)
    stale = sorted(path.parent.glob(path.name + ".tmp*")) if path.parent.exists() else []
    return [p for p in stale if erase_file(p)]


class Keyring:
    """Per-day data keys, wrapped by the master key, in a 0600 file."""

    def __init__(self, path: Path, master: bytes, kdf: dict | None, days: dict[int, bytes], *,
                 read_only: bool = False) -> None:
        self.path = Path(path)
        self._master = Envelope(master)
        self._kdf = kdf
        self._wrapped = days  # day -> wrapped blob
        self._cache: dict[int, bytes] = {}
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"Keyring({str(self.path)!r}, days={sorted(self._wrapped)})"

    # -- file ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, source: MasterKeySource) -> Keyring:
        if Path(path).exists():
            raise StoreKeyError(f"keyring {path} already exists")
        master, kdf = source.derive(None)
        ring = cls(path, master, kdf, {})
        ring.save()
        return ring

    @classmethod
    def load(cls, path: Path, source: MasterKeySource, *, read_only: bool = False) -> Keyring:
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("format") != KEYRING_FORMAT:
                raise StoreKeyError(f"keyring {path} has unknown format {doc.get('format')!r}")
            kdf = doc.get("kdf")
            verifier = base64.b64decode(doc["verifier"])
            days = {int(d): base64.b64decode(v) for d, v in doc["days"].items()}
        except StoreKeyError:
            raise
        except FileNotFoundError:
            raise StoreKeyError(f"keyring {path} is missing: without it the store cannot be read") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreKeyError(f"keyring {path} is unreadable: {type(e).__name__}") from None
        if isinstance(source, KeyFile) and kdf is not None:
            raise StoreKeyError("this store is protected by a passphrase, not a key file")
        master, _ = source.derive(kdf)
        try:
            ok = Envelope(master).open(verifier, b"verifier") == _VERIFIER_PLAINTEXT
        except EnvelopeError:
            ok = False
        if not ok:
            raise StoreKeyError("wrong passphrase or key file")
        return cls(path, master, kdf, days, read_only=read_only)

    def save(self, days: dict[int, bytes] | None = None, *,
             new_master: tuple[Envelope, dict | None] | None = None) -> None:
        """Write the keyring with ``days`` (default: the current ones) and, on rotation, a
        new master key and its KDF parameters, durably; only then adopt them in memory.
        A failure (a full disk) leaves memory as it was."""
        if self.read_only:
            raise StoreError(f"the keyring {self.path} was opened read-only")
        days = self._wrapped if days is None else days
        master, kdf = new_master or (self._master, self._kdf)
        doc = {
            "format": KEYRING_FORMAT,
            "kdf": kdf,
            "verifier": _b64(master.seal(_VERIFIER_PLAINTEXT, b"verifier")),
            "days": {str(d): _b64(w) for d, w in sorted(days.items())},
        }
        try:
            write_private_file(self.path, json.dumps(doc, indent=1).encode(), tmp=keyring_temp_path(self.path))
        except OSError as e:
            raise StoreError(f"cannot write the keyring {self.path}: {e.strerror}") from None
        self._wrapped, self._master, self._kdf = days, master, kdf

    # -- day keys -----------------------------------------------------------------
    @staticmethod
    def _aad(day: int) -> bytes:
        return b"day-key|%d" % day

    def days(self) -> list[int]:
        return sorted(self._wrapped)

    def key_for_day(self, day: int, *, create: bool = False) -> bytes | None:
        key = self._cache.get(day)
        if key is not None:
            return key
        wrapped = self._wrapped.get(day)
        if wrapped is None:
            if not create:
                return None
            key = secrets.token_bytes(KEY_LEN)
            # on disk (file and folder fsynced) before any row uses it
            self.save({**self._wrapped, day: self._master.seal(key, self._aad(day))})
        else:
            try:
                key = self._master.open(wrapped, self._aad(day))
            except EnvelopeError:
                raise StoreKeyError(f"the key of day {day} fails authentication (tampered keyring)") from None
        self._cache[day] = key
        return key

    def destroy_days(self, days: list[int]) -> None:
        """Crypto-erasure: forget these day keys, in memory and on disk."""
        if not days:
            return
        self.save({d: w for d, w in self._wrapped.items() if d not in set(days)})
        for d in days:
            self._cache.pop(d, None)

    def rewrap(self, new_source: MasterKeySource) -> None:
        """Key rotation: re-wrap every day key under a new master key, atomically."""
        plain = {d: self.key_for_day(d) for d in self.days()}
        master, kdf = new_source.derive(None)
        envelope = Envelope(master)
        self.save({d: envelope.seal(k, self._aad(d)) for d, k in plain.items() if k is not None},
                  new_master=(envelope, kdf))
