"""The backend's long-lived secrets, each in its own 0600 file in the data folder (0700),
created on first start: ECDSA P-256 signing keys (export files, certificates) and
random secrets (the code pepper, the ROBERT master key)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ConfigError
from agent.files import write_private_file


def private_data_dir(path: Path) -> None:
    """The data folder, created if need be, mode 0700: it holds the keys, the database
    (password, session and code hashes, keys not yet published) and its journals."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError(f"cannot make the data folder {path} private (mode 700): {e.strerror}") from None


def load_or_create_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key kept as unencrypted PKCS#8 PEM (the file's mode protects it)."""
    if path.exists():
        return ec_key_from_pem(path.read_bytes(), str(path))
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_file(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return key


def ec_key_from_pem(pem: bytes, what: str = "key") -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{what}: not an EC private key")
    return key


def load_or_create_secret(path: Path, size: int = 32) -> bytes:
    if not path.exists():
        write_private_file(path, secrets.token_bytes(size))
    return path.read_bytes()
