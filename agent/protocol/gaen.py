"""Exposure Notification cryptography, byte-exact to the public
"Exposure Notification - Cryptography Specification" v1.2 (April 2020).

Pure functions over bytes and integers; nothing here reads a clock or does I/O.
Section numbers in comments refer to that specification.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ProtocolError

# The GAEN constants; every other module imports them from here.
#: Length in seconds of one ENIntervalNumber (spec "ENIntervalNumber": 10 minutes).
INTERVAL_SECONDS = 600
#: TEKRollingPeriod: number of intervals a TEK is valid (spec: 144, one UTC day).
TEK_ROLLING_PERIOD = 144
KEY_LEN = 16
RPI_LEN = 16
AEM_LEN = 4
METADATA_LEN = 4
#: Metadata versioning byte: major 01 (bits 7:6), minor 00 (bits 5:4) -> 0b0100_0000.
METADATA_VERSION_1_0 = 0x40

_RPI_INFO = b"EN-RPIK"
_AEM_INFO = b"EN-AEMK"
_RPI_PREFIX = b"EN-RPI" + b"\x00" * 6  # PaddedData_j bytes 0..11 (spec "Rolling Proximity Identifier")


class CryptoInputError(ProtocolError):
    """An argument to an Exposure Notification function has the wrong shape."""


def _check_len(name: str, value: bytes, length: int) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != length:
        got = len(value) if isinstance(value, (bytes, bytearray, memoryview)) else type(value).__name__
        raise CryptoInputError(f"{name} must be {length} bytes, got {got}")


def en_interval_number(unix_seconds: float) -> int:
    """ENIntervalNumber(Time) = Timestamp / (60 x 10), rounded down (spec "ENIntervalNumber")."""
    return int(unix_seconds // INTERVAL_SECONDS)


def interval_start_seconds(enin: int) -> int:
    """Unix time at which interval ``enin`` begins."""
    return enin * INTERVAL_SECONDS


def rolling_start_for_day(unix_seconds: float) -> int:
    """The ENIN of the UTC day start containing ``unix_seconds`` (spec "Temporary Exposure Key":
    i = floor(ENIntervalNumber / TEKRollingPeriod) x TEKRollingPeriod)."""
    return (en_interval_number(unix_seconds) // TEK_ROLLING_PERIOD) * TEK_ROLLING_PERIOD


@dataclass(frozen=True, slots=True)
class TemporaryExposureKey:
    """A TEK and its validity (spec "Temporary Exposure Key"), with the field names of
    ``export.proto``. Own keys, uploaded keys and (as :class:`~agent.protocol.export.DiagnosisKey`)
    downloaded keys are this one record."""

    key_data: bytes
    rolling_start_interval_number: int
    rolling_period: int = TEK_ROLLING_PERIOD
    transmission_risk_level: int = 0

    def __repr__(self) -> str:  # never print key material
        return (f"{type(self).__name__}(rolling_start_interval_number={self.rolling_start_interval_number}, "
                f"rolling_period={self.rolling_period})")

    @property
    def day(self) -> int:
        """The UTC day the key starts on."""
        return self.rolling_start_interval_number // TEK_ROLLING_PERIOD


def new_tek() -> bytes:
    """A fresh Temporary Exposure Key: 16 bytes from the OS CSPRNG (spec "Temporary Exposure Key")."""
    return os.urandom(KEY_LEN)


def _hkdf16(key: bytes, info: bytes) -> bytes:
    # spec "Key Derivation": HKDF(Key, Salt=NULL, Info, OutputLength=16) with SHA-256.
    return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=info).derive(bytes(key))


def derive_rpik(tek: bytes) -> bytes:
    """RPIK_i = HKDF(tek_i, NULL, UTF8("EN-RPIK"), 16) (spec "Rolling Proximity Identifier Key")."""
    _check_len("tek", tek, KEY_LEN)
    return _hkdf16(tek, _RPI_INFO)


def derive_aemk(tek: bytes) -> bytes:
    """AEMK_i = HKDF(tek_i, NULL, UTF8("EN-AEMK"), 16) (spec "Associated Encrypted Metadata Key")."""
    _check_len("tek", tek, KEY_LEN)
    return _hkdf16(tek, _AEM_INFO)


def padded_data(enin: int) -> bytes:
    """PaddedData_j = "EN-RPI" || 0x000000000000 || ENIN_j (32-bit little-endian)."""
    return _RPI_PREFIX + struct.pack("<I", enin & 0xFFFFFFFF)


def rpi(rpik: bytes, enin: int) -> bytes:
    """RPI_i,j = AES128(RPIK_i, PaddedData_j) (spec "Rolling Proximity Identifier")."""
    _check_len("rpik", rpik, KEY_LEN)
    enc = Cipher(algorithms.AES(bytes(rpik)), modes.ECB()).encryptor()
    return enc.update(padded_data(enin)) + enc.finalize()


def rpis_from_rpik(rpik: bytes, rolling_start: int, rolling_period: int = TEK_ROLLING_PERIOD) -> list[bytes]:
    """All RPIs for intervals rolling_start .. rolling_start+rolling_period-1, in one AES call."""
    _check_len("rpik", rpik, KEY_LEN)
    if not 0 < rolling_period <= 0xFFFF:
        raise CryptoInputError(f"rolling_period must be positive, got {rolling_period}")
    blocks = b"".join(padded_data(rolling_start + j) for j in range(rolling_period))
    enc = Cipher(algorithms.AES(bytes(rpik)), modes.ECB()).encryptor()
    out = enc.update(blocks) + enc.finalize()
    return [out[k : k + RPI_LEN] for k in range(0, len(out), RPI_LEN)]


def rpis_for_key(tek: bytes, rolling_start: int, rolling_period: int = TEK_ROLLING_PERIOD) -> list[bytes]:
    """All RPIs of one TEK over its validity, computed in one batched AES-ECB call."""
    return rpis_from_rpik(derive_rpik(tek), rolling_start, rolling_period)


def _aes_ctr(aemk: bytes, rpi_: bytes, data: bytes) -> bytes:
    # spec "Associated Encrypted Metadata": AES128-CTR(AEMK_i, RPI_i,j, Metadata).
    _check_len("aemk", aemk, KEY_LEN)
    _check_len("rpi", rpi_, RPI_LEN)
    _check_len("metadata", data, METADATA_LEN)
    c = Cipher(algorithms.AES(bytes(aemk)), modes.CTR(bytes(rpi_))).encryptor()
    return c.update(bytes(data)) + c.finalize()


def encrypt_aem(aemk: bytes, rpi_: bytes, metadata: bytes) -> bytes:
    """AEM = AES128-CTR(AEMK, IV=RPI, metadata)."""
    return _aes_ctr(aemk, rpi_, metadata)


def decrypt_aem(aemk: bytes, rpi_: bytes, aem: bytes) -> bytes:
    """Inverse of :func:`encrypt_aem` (CTR mode is its own inverse)."""
    return _aes_ctr(aemk, rpi_, aem)


#: the metadata's transmit power range (Bluetooth spec v1.2 "Metadata": -127..+127 dBm)
TX_POWER_MIN_DBM, TX_POWER_MAX_DBM = -127, 127


class MetadataError(ProtocolError):
    """Decrypted AEM metadata is not a version this agent understands."""


@dataclass(frozen=True)
class Metadata:
    """The 4-byte BLE metadata (spec "Associated Encrypted Metadata", Bluetooth spec v1.2 "Metadata").
    Byte 1 is the transmit power in dBm, -127..+127 (the Bluetooth spec's range for it):
    -128 is refused both ways."""

    tx_power_dbm: int
    major: int = 1
    minor: int = 0

    def to_bytes(self) -> bytes:
        if not TX_POWER_MIN_DBM <= self.tx_power_dbm <= TX_POWER_MAX_DBM:
            raise CryptoInputError(f"tx_power_dbm out of range: {self.tx_power_dbm}")
        if not (0 <= self.major <= 3 and 0 <= self.minor <= 3):
            raise CryptoInputError("version fields are 2 bits each")
        version = (self.major << 6) | (self.minor << 4)
        return struct.pack("<Bbxx", version, self.tx_power_dbm)

    @classmethod
    def from_bytes(cls, data: bytes) -> Metadata:
        """Parse decrypted metadata; reject any major version other than 1."""
        if len(data) != METADATA_LEN:
            raise MetadataError(f"metadata must be {METADATA_LEN} bytes, got {len(data)}")
        version, tx = struct.unpack("<Bbxx", bytes(data))
        major, minor = version >> 6, (version >> 4) & 0x3
        if major != 1:
            raise MetadataError(f"unsupported metadata major version {major}")
        if not TX_POWER_MIN_DBM <= tx <= TX_POWER_MAX_DBM:
            raise MetadataError(f"transmit power {tx} dBm is outside {TX_POWER_MIN_DBM}..{TX_POWER_MAX_DBM}")
        return cls(tx_power_dbm=tx, major=major, minor=minor)


def metadata(tx_power_dbm: int) -> bytes:
    """Version 1.0 metadata bytes for a given TX power."""
    return Metadata(tx_power_dbm).to_bytes()
