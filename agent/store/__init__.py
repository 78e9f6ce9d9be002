"""Encrypted SQLite store: own TEKs, encounters, exposures, HELLOs and state.

``core`` (envelope rows, migrations, retention, purge), ``tables`` (typed tables),
``keys`` (master key sources and the keyring of day keys), ``envelope`` (the one AEAD helper).
"""

from ..errors import StoreError, StoreKeyError, StoreVersionError
from .core import DEFAULT_RETENTION_DAYS, SCHEMA_VERSION, Store, keyring_path, purge, store_files
from .keys import KeyFile, MasterKeySource, Passphrase, create_key_file
from .lock import StoreBusy, holder
from .tables import HeardHello, StateRecord

__all__ = [
    "DEFAULT_RETENTION_DAYS", "HeardHello", "KeyFile", "MasterKeySource", "Passphrase", "SCHEMA_VERSION",
    "StateRecord", "Store", "StoreBusy", "StoreError", "StoreKeyError", "StoreVersionError", "create_key_file",
    "holder", "keyring_path", "purge", "store_files",
]
