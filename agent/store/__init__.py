"""Encrypted SQLite store: own TEKs, encounters, exposures and sync state."""

from .keys import KeyFile, Passphrase, StoreKeyError, create_key_file
from .store import DEFAULT_RETENTION_DAYS, SCHEMA_VERSION, Store, StoreError, StoreVersionError, keyring_path

__all__ = [
    "DEFAULT_RETENTION_DAYS", "KeyFile", "Passphrase", "SCHEMA_VERSION", "Store", "StoreError", "StoreKeyError",
    "StoreVersionError", "create_key_file", "keyring_path",
]
