"""The Exposure Key Export file ("Exposure Key Export File Format and Verification",
Google/Apple, v1.2): a zip holding

- ``export.bin``: the 16-byte header ``"EK Export v1    "`` then a serialized
  ``TemporaryExposureKeyExport`` protobuf;
- ``export.sig``: a serialized ``TEKSignatureList``; each signature is ECDSA P-256 over
  SHA-256 of the whole ``export.bin`` (header included), DER encoded (X9.62).

Pure: bytes in, bytes or typed objects out. Every failure is an :class:`ExportError`.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import io
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from google.protobuf.message import DecodeError

from ..errors import ProtocolError
from . import export_pb2
from .gaen import KEY_LEN, TEK_ROLLING_PERIOD, TemporaryExposureKey

try:  # the optional C parser (setup.py); the protobuf runtime does the same work
    from . import _fastexport  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _fastexport = None

#: what export.bin may come as: bytes, or the buffer it was inflated into
Bytes = bytes | bytearray | memoryview

#: the generated protobuf module (protoc writes no type information)
pb: Any = export_pb2

HEADER = b"EK Export v1    "
HEADER_LEN = 16
EXPORT_BIN = "export.bin"
EXPORT_SIG = "export.sig"
#: OID of ecdsa-with-SHA256, the only algorithm the format defines.
ECDSA_SHA256_OID = "1.2.840.10045.4.3.2"
#: Default cap on the uncompressed size of export.bin (500,000 keys take ~15 MB).
DEFAULT_MAX_UNCOMPRESSED = 32 * 1024 * 1024
MAX_SIG_BYTES = 64 * 1024
#: The range of the key fields on the wire (``int32`` / ``sint32`` in export.proto):
#: a value outside it cannot be written to a file at all.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class ExportError(ProtocolError):
    """Base class: an export file could not be read or trusted."""


class ExportFormatError(ExportError):
    """Not a well-formed export file (zip, header, protobuf or key fields)."""


class ExportTooLargeError(ExportError):
    """A zip member is larger than allowed (zip bomb guard)."""


class ExportSignatureError(ExportError):
    """No signature in export.sig verifies export.bin with a trusted key."""


class ReportType(enum.IntEnum):
    UNKNOWN = 0
    CONFIRMED_TEST = 1
    CONFIRMED_CLINICAL_DIAGNOSIS = 2
    SELF_REPORT = 3
    RECURSIVE = 4
    REVOKED = 5


class VariantOfConcern(enum.IntEnum):
    """``TemporaryExposureKey.variant_of_concern`` (field 8): what each type means is the
    health authority's to define (Apple ENVariantOfConcernType)."""

    UNKNOWN = 0
    TYPE_1 = 1
    TYPE_2 = 2
    TYPE_3 = 3
    TYPE_4 = 4


@dataclass(frozen=True, slots=True, repr=False)
class DiagnosisKey(TemporaryExposureKey):
    """A TEK as published by a key server: with its report type and days since onset."""

    report_type: ReportType = ReportType.UNKNOWN
    days_since_onset_of_symptoms: int | None = None
    variant_of_concern: VariantOfConcern = VariantOfConcern.UNKNOWN

    def __repr__(self) -> str:  # never print key material
        return (f"DiagnosisKey(rolling_start_interval_number={self.rolling_start_interval_number}, "
                f"rolling_period={self.rolling_period}, report_type={self.report_type.name})")

    def validate(self) -> None:
        if len(self.key_data) != KEY_LEN:
            raise ExportFormatError(f"key_data must be {KEY_LEN} bytes, got {len(self.key_data)}")
        if not 1 <= self.rolling_period <= TEK_ROLLING_PERIOD:
            raise ExportFormatError(f"rolling_period must be 1..{TEK_ROLLING_PERIOD}, got {self.rolling_period}")
        if not 0 <= self.rolling_start_interval_number <= INT32_MAX:
            raise ExportFormatError(f"rolling_start_interval_number must be 0..{INT32_MAX}")
        if not INT32_MIN <= self.transmission_risk_level <= INT32_MAX:
            raise ExportFormatError("transmission_risk_level is not a 32-bit integer")
        dso = self.days_since_onset_of_symptoms
        if dso is not None and not INT32_MIN <= dso <= INT32_MAX:
            raise ExportFormatError("days_since_onset_of_symptoms is not a 32-bit integer")


@dataclass(frozen=True, eq=False, repr=False)
class PackedKeys:
    """Diagnosis keys as arrays, no object per key (a million keys take 27 MB): what the
    export parser produces and the matcher reads. ``key(i)`` is the i-th as a record."""

    key_data: bytes  # n x 16 bytes
    rolling_start: npt.NDArray[np.uint32]
    rolling_period: npt.NDArray[np.uint16]
    transmission_risk: npt.NDArray[np.int32]
    report_type: npt.NDArray[np.uint8]
    days_since_onset: npt.NDArray[np.int32]
    has_days_since_onset: npt.NDArray[np.bool_]
    variant_of_concern: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.rolling_start)

    def __repr__(self) -> str:  # never print key material
        return f"PackedKeys({len(self)} keys)"

    def key(self, i: int) -> DiagnosisKey:
        return DiagnosisKey(
            self.key_data[16 * i : 16 * i + 16], int(self.rolling_start[i]), int(self.rolling_period[i]),
            int(self.transmission_risk[i]), ReportType(int(self.report_type[i])),
            int(self.days_since_onset[i]) if self.has_days_since_onset[i] else None,
            VariantOfConcern(int(self.variant_of_concern[i])))

    def keys(self) -> list[DiagnosisKey]:
        """Every key as a record: for small inputs and tests, never on the hot path."""
        return [self.key(i) for i in range(len(self))]

    @classmethod
    def empty(cls) -> PackedKeys:
        return cls.from_keys(())

    @classmethod
    def from_keys(cls, keys: Iterable[DiagnosisKey]) -> PackedKeys:
        ks = list(keys)
        for k in ks:
            k.validate()
        return cls(
            b"".join(k.key_data for k in ks),
            np.fromiter((k.rolling_start_interval_number for k in ks), np.uint32, len(ks)),
            np.fromiter((k.rolling_period for k in ks), np.uint16, len(ks)),
            np.fromiter((k.transmission_risk_level for k in ks), np.int32, len(ks)),
            np.fromiter((int(k.report_type) for k in ks), np.uint8, len(ks)),
            np.fromiter((k.days_since_onset_of_symptoms or 0 for k in ks), np.int32, len(ks)),
            np.fromiter((k.days_since_onset_of_symptoms is not None for k in ks), np.bool_, len(ks)),
            np.fromiter((int(k.variant_of_concern) for k in ks), np.uint8, len(ks)),
        )

    @classmethod
    def concat(cls, parts: Sequence[PackedKeys]) -> PackedKeys:
        if not parts:
            return cls.empty()
        return cls(b"".join(p.key_data for p in parts), np.concatenate([p.rolling_start for p in parts]),
                   np.concatenate([p.rolling_period for p in parts]),
                   np.concatenate([p.transmission_risk for p in parts]),
                   np.concatenate([p.report_type for p in parts]),
                   np.concatenate([p.days_since_onset for p in parts]),
                   np.concatenate([p.has_days_since_onset for p in parts]),
                   np.concatenate([p.variant_of_concern for p in parts]))

    def take(self, positions: npt.NDArray[np.intp]) -> PackedKeys:
        """The keys at ``positions``, in that order."""
        raw = np.frombuffer(self.key_data, np.uint8).reshape(-1, 16)
        return PackedKeys(raw[positions].tobytes(), self.rolling_start[positions], self.rolling_period[positions],
                          self.transmission_risk[positions], self.report_type[positions],
                          self.days_since_onset[positions], self.has_days_since_onset[positions],
                          self.variant_of_concern[positions])

    def span(self, start: int, stop: int) -> PackedKeys:
        """Keys ``start`` to ``stop`` - 1, without copying the arrays."""
        return PackedKeys(self.key_data[16 * start : 16 * stop], self.rolling_start[start:stop],
                          self.rolling_period[start:stop], self.transmission_risk[start:stop],
                          self.report_type[start:stop], self.days_since_onset[start:stop],
                          self.has_days_since_onset[start:stop], self.variant_of_concern[start:stop])


@dataclass(frozen=True)
class SignatureInfo:
    verification_key_version: str = ""
    verification_key_id: str = ""
    signature_algorithm: str = ECDSA_SHA256_OID


@dataclass(frozen=True)
class Export:
    start_timestamp: int
    end_timestamp: int
    region: str
    batch_num: int
    batch_size: int
    keys: tuple[DiagnosisKey, ...]
    revised_keys: tuple[DiagnosisKey, ...] = ()
    signature_infos: tuple[SignatureInfo, ...] = ()
    #: True when export.sig was verified against a trusted key.
    verified: bool = False
    #: The verification_key_id of the signature that verified, if any.
    verified_key_id: str | None = field(default=None)


@dataclass(frozen=True)
class PackedExport:
    """An export file as sync reads it: the header, and the keys as arrays."""

    start_timestamp: int
    end_timestamp: int
    region: str
    batch_num: int
    batch_size: int
    keys: PackedKeys
    revised_keys: PackedKeys
    signature_infos: tuple[SignatureInfo, ...] = ()
    verified: bool = False
    verified_key_id: str | None = None

    def to_export(self) -> Export:
        return Export(self.start_timestamp, self.end_timestamp, self.region, self.batch_num, self.batch_size,
                      tuple(self.keys.keys()), tuple(self.revised_keys.keys()), self.signature_infos, self.verified,
                      self.verified_key_id)


# --- keys --------------------------------------------------------------------------

def load_public_key(key: bytes | str | ec.EllipticCurvePublicKey) -> ec.EllipticCurvePublicKey:
    """Accept a key object, PEM text/bytes, DER SubjectPublicKeyInfo, or its base64."""
    pub: PublicKeyTypes
    if isinstance(key, ec.EllipticCurvePublicKey):
        pub = key
    else:
        data = key.encode() if isinstance(key, str) else bytes(key)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                pub = serialization.load_pem_public_key(data)
            else:
                try:
                    der = base64.b64decode(data, validate=True)
                except ValueError:
                    der = data
                pub = serialization.load_der_public_key(der)
        except (ValueError, TypeError) as e:
            raise ExportError(f"not a public key: {e}") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise ExportError("export files are signed with ECDSA P-256 keys only")
    return pub


def public_key_b64(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """base64 DER SubjectPublicKeyInfo, the form agents are configured with."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def key_fingerprint(public_key_b64: str) -> str:
    """``SHA256:<base64>`` of the DER public key, as OpenSSH prints key fingerprints:
    short enough to compare by eye between the backend's and a device's screen."""
    digest = hashlib.sha256(base64.b64decode(public_key_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --- building ----------------------------------------------------------------------

def _info_to_pb(info: SignatureInfo, out: Any) -> None:
    if info.verification_key_version:
        out.verification_key_version = info.verification_key_version
    if info.verification_key_id:
        out.verification_key_id = info.verification_key_id
    if info.signature_algorithm:
        out.signature_algorithm = info.signature_algorithm


def _varint(v: int) -> bytes:
    v &= 0xFFFFFFFFFFFFFFFF  # a negative int32 is written as its 64-bit two's complement
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _encode_keys_python(keys: PackedKeys, field: int) -> bytes:
    tag = bytes([field << 3 | 2])
    out = []
    kd = keys.key_data
    for i, (risk, start, period, report, dso, has, variant) in enumerate(zip(
            keys.transmission_risk.tolist(), keys.rolling_start.tolist(), keys.rolling_period.tolist(),
            keys.report_type.tolist(), keys.days_since_onset.tolist(), keys.has_days_since_onset.tolist(),
            keys.variant_of_concern.tolist())):
        body = b"\x0a\x10" + kd[16 * i : 16 * i + 16] + b"\x10" + _varint(risk) + b"\x18" + _varint(start) + \
            b"\x20" + _varint(period)
        if report:
            body += b"\x28" + _varint(report)
        if has:
            body += b"\x30" + _varint((dso << 1) ^ (dso >> 31))
        if variant:
            body += b"\x40" + _varint(variant)
        out.append(tag + _varint(len(body)) + body)
    return b"".join(out)


def encode_keys(keys: PackedKeys, *, field: int = 7, native: bool = True) -> bytes:
    """The keys as repeated field ``field`` (7: keys, 8: revised_keys) of a
    TemporaryExposureKeyExport, byte for byte what the protobuf runtime writes (tested):
    appended to the serialized fields 1-6 they make export.bin's protobuf."""
    if _fastexport is not None and native:
        return bytes(_fastexport.encode(field, len(keys), keys.key_data, keys.rolling_start.astype("<u4"),
                                        keys.rolling_period.astype("<u2"), keys.transmission_risk.astype("<i4"),
                                        keys.report_type.astype(np.uint8), keys.days_since_onset.astype("<i4"),
                                        keys.has_days_since_onset.astype(np.uint8),
                                        keys.variant_of_concern.astype(np.uint8)))
    return _encode_keys_python(keys, field)


def build_export_bin_packed(
    keys: PackedKeys,
    *,
    start_timestamp: int,
    end_timestamp: int,
    region: str,
    batch_num: int = 1,
    batch_size: int = 1,
    signature_info: SignatureInfo | None = None,
    revised_keys: PackedKeys | None = None,
) -> bytes:
    """export.bin: the header, fields 1-6 (protobuf runtime), then the keys (7) and
    revised keys (8) written from their arrays (fields in number order, as the runtime
    writes them). The keys must be valid (:meth:`PackedKeys.from_keys` checks them)."""
    msg = pb.TemporaryExposureKeyExport(
        start_timestamp=start_timestamp,
        end_timestamp=end_timestamp,
        region=region,
        batch_num=batch_num,
        batch_size=batch_size,
    )
    if signature_info is not None:
        _info_to_pb(signature_info, msg.signature_infos.add())
    parts = [HEADER, bytes(msg.SerializeToString()), encode_keys(keys)]
    if revised_keys is not None and len(revised_keys):
        parts.append(encode_keys(revised_keys, field=8))
    return b"".join(parts)


def build_export_bin(
    keys: Iterable[DiagnosisKey],
    *,
    start_timestamp: int,
    end_timestamp: int,
    region: str,
    batch_num: int = 1,
    batch_size: int = 1,
    signature_info: SignatureInfo | None = None,
    revised_keys: Iterable[DiagnosisKey] = (),
) -> bytes:
    return build_export_bin_packed(
        PackedKeys.from_keys(keys), start_timestamp=start_timestamp, end_timestamp=end_timestamp, region=region,
        batch_num=batch_num, batch_size=batch_size, signature_info=signature_info,
        revised_keys=PackedKeys.from_keys(revised_keys))


def sign_export_bin(
    export_bin: bytes, signing_key: ec.EllipticCurvePrivateKey, *, signature_info: SignatureInfo,
    batch_num: int = 1, batch_size: int = 1,
) -> bytes:
    """Serialized TEKSignatureList with one ECDSA-P256-SHA256 signature over export.bin."""
    sig = signing_key.sign(export_bin, ec.ECDSA(hashes.SHA256()))
    lst = pb.TEKSignatureList()
    s = lst.signatures.add()
    _info_to_pb(signature_info, s.signature_info)
    s.batch_num = batch_num
    s.batch_size = batch_size
    s.signature = sig
    return bytes(lst.SerializeToString())


def build_export_packed(
    keys: PackedKeys,
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    start_timestamp: int,
    end_timestamp: int,
    region: str,
    key_id: str = "ctagent",
    key_version: str = "v1",
    batch_num: int = 1,
    batch_size: int = 1,
) -> bytes:
    """A complete signed export zip (export.bin + export.sig) of keys as arrays."""
    info = SignatureInfo(verification_key_version=key_version, verification_key_id=key_id)
    export_bin = build_export_bin_packed(
        keys, start_timestamp=start_timestamp, end_timestamp=end_timestamp, region=region,
        batch_num=batch_num, batch_size=batch_size, signature_info=info,
    )
    sig = sign_export_bin(export_bin, signing_key, signature_info=info, batch_num=batch_num, batch_size=batch_size)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        # Fixed timestamps so the same input gives the same file (ETags stay stable).
        for name, data in ((EXPORT_BIN, export_bin), (EXPORT_SIG, sig)):
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
    return buf.getvalue()


def build_export(
    keys: Iterable[DiagnosisKey],
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    start_timestamp: int,
    end_timestamp: int,
    region: str,
    key_id: str = "ctagent",
    key_version: str = "v1",
    batch_num: int = 1,
    batch_size: int = 1,
) -> bytes:
    """A complete signed export zip (export.bin + export.sig)."""
    return build_export_packed(PackedKeys.from_keys(keys), signing_key=signing_key, start_timestamp=start_timestamp,
                               end_timestamp=end_timestamp, region=region, key_id=key_id, key_version=key_version,
                               batch_num=batch_num, batch_size=batch_size)


# --- parsing -----------------------------------------------------------------------

def _info_from_pb(i: Any) -> SignatureInfo:
    return SignatureInfo(
        verification_key_version=i.verification_key_version,
        verification_key_id=i.verification_key_id,
        signature_algorithm=i.signature_algorithm,
    )


def _text(value: str | bytes) -> str:
    """A proto2 string field as text (the protobuf runtime hands over bytes that are not UTF-8)."""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _packed_from_arrays(raw: tuple[Any, ...]) -> PackedKeys:
    n, key_data, start, period, risk, report, dso, has_dso, variant = raw
    return PackedKeys(key_data, np.frombuffer(start, "<u4", n), np.frombuffer(period, "<u2", n),
                      np.frombuffer(risk, "<i4", n), np.frombuffer(report, np.uint8, n),
                      np.frombuffer(dso, "<i4", n), np.frombuffer(has_dso, np.bool_, n),
                      np.frombuffer(variant, np.uint8, n))


def _first_invalid(keys: Any) -> str | None:
    """DiagnosisKey.validate's message for the first invalid key of a protobuf list, else None."""
    for k in keys:
        try:
            DiagnosisKey(bytes(k.key_data), k.rolling_start_interval_number, k.rolling_period).validate()
        except ExportFormatError as e:
            return str(e)
    return None


def _packed_from_pb(keys: Any) -> PackedKeys:
    """The keys of a protobuf list as arrays, each message read once (one pass, not one
    per field); ExportFormatError with validate()'s message for the first invalid one."""
    n = len(keys)
    if not n:
        return PackedKeys.empty()
    kd, rs, rp, trl, rt, dso, has, voc = zip(*[
        (k.key_data, k.rolling_start_interval_number, k.rolling_period, k.transmission_risk_level, k.report_type,
         k.days_since_onset_of_symptoms, k.HasField("days_since_onset_of_symptoms"), k.variant_of_concern)
        for k in keys])
    start = np.array(rs, np.int64)
    period = np.array(rp, np.int64)
    if not ((np.fromiter(map(len, kd), np.int64, n) == KEY_LEN).all() and (start >= 0).all()
            and ((period >= 1) & (period <= TEK_ROLLING_PERIOD)).all()):
        raise ExportFormatError(_first_invalid(keys) or "a key is invalid")
    return PackedKeys(b"".join(kd), start.astype(np.uint32), period.astype(np.uint16), np.array(trl, np.int32),
                      np.array(rt, np.uint8), np.array(dso, np.int32), np.array(has, np.bool_),
                      np.array(voc, np.uint8))


def _parse_protobuf(body: bytes | memoryview) -> PackedExport:
    """The protobuf runtime's reading, the reference the C parser is tested against."""
    msg = pb.TemporaryExposureKeyExport()
    try:
        msg.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as e:  # RuntimeError: recursion limits in upb
        raise ExportFormatError(f"export.bin protobuf is truncated or malformed: {e}") from None
    except Exception as e:  # pragma: no cover - defensive: the C parser's other failures
        raise ExportFormatError(f"export.bin protobuf could not be parsed: {type(e).__name__}") from None
    if msg.start_timestamp > msg.end_timestamp:
        raise ExportFormatError("start_timestamp is after end_timestamp")
    keys = _packed_from_pb(msg.keys)  # keys first: their first invalid one is the error, as validate() says
    revised = _packed_from_pb(msg.revised_keys)
    return PackedExport(msg.start_timestamp, msg.end_timestamp, _text(msg.region), msg.batch_num, msg.batch_size,
                        keys, revised, tuple(_info_from_pb(i) for i in msg.signature_infos))


def _parse_native(body: bytes | memoryview) -> PackedExport:
    try:
        start, end, region, batch_num, batch_size, infos, keys, revised, key_error, revised_error = \
            _fastexport.parse(body)
    except ValueError as e:
        raise ExportFormatError(str(e)) from None
    sig_infos = []
    for raw in infos:  # first: the runtime reads them with the rest, before any check
        info = pb.SignatureInfo()
        try:
            info.ParseFromString(raw)
        except Exception as e:  # the protobuf C parser fails in several ways: all of them are a bad file
            raise ExportFormatError(f"export.bin protobuf is truncated or malformed: {type(e).__name__}") from None
        sig_infos.append(_info_from_pb(info))
    if start > end:
        raise ExportFormatError("start_timestamp is after end_timestamp")
    for error in (key_error, revised_error):
        if error is not None:
            raise ExportFormatError(error)
    return PackedExport(start, end, _text(region), batch_num, batch_size, _packed_from_arrays(keys),
                        _packed_from_arrays(revised), tuple(sig_infos))


def parse_export_bin_packed(export_bin: Bytes, *, native: bool = True) -> PackedExport:
    """Parse a bare export.bin (header + protobuf) into arrays, no object per key. No
    signature is checked. ``native=False`` reads it with the protobuf runtime."""
    if len(export_bin) < HEADER_LEN or export_bin[:HEADER_LEN] != HEADER:
        raise ExportFormatError("export.bin does not start with the 'EK Export v1' header")
    body = memoryview(export_bin)[HEADER_LEN:]
    if _fastexport is not None and native:
        return _parse_native(body)
    return _parse_protobuf(body)


def parse_export_bin(export_bin: bytes) -> Export:
    """Parse a bare export.bin (header + protobuf). No signature is checked."""
    return parse_export_bin_packed(bytes(export_bin)).to_export()


#: a zip's local file header (APPNOTE.TXT 4.3.7): signature, version, flags, method, time,
#: date, CRC-32, compressed size, size, name length, extra field length
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def _read_member(data: bytes, info: zipfile.ZipInfo, limit: int) -> bytearray:
    """A member's bytes, inflated straight from ``data`` (no copy of its compressed bytes),
    at most ``limit`` of them, its CRC-32 checked."""
    if info.file_size > limit:
        raise ExportTooLargeError(f"{info.filename} is {info.file_size} bytes uncompressed, limit {limit}")
    if info.flag_bits & 0x1:
        raise ExportFormatError(f"{info.filename} is encrypted")
    sig, _, _, _, _, _, _, _, _, name_len, extra_len = _LOCAL_HEADER.unpack_from(data, info.header_offset)
    start = info.header_offset + _LOCAL_HEADER.size
    name = bytes(data[start : start + name_len])
    if sig != b"PK\x03\x04" or name not in (info.orig_filename.encode(), info.orig_filename.encode("cp437", "replace")):
        raise ExportFormatError(f"{info.filename}: its local header does not match the zip's directory")
    start += name_len + extra_len
    raw = memoryview(data)[start : start + info.compress_size]
    if len(raw) != info.compress_size:
        raise ExportFormatError(f"{info.filename} is cut short")
    out: bytearray | None
    if info.compress_type == zipfile.ZIP_STORED:
        out = bytearray(raw[: limit + 1])
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        out = _inflate(raw, info.file_size, limit)
        if out is None:
            raise ExportFormatError(f"{info.filename}: its deflate stream is cut short")
    else:
        raise ExportFormatError(f"{info.filename}: compression method {info.compress_type} is not allowed")
    if len(out) > limit:
        raise ExportTooLargeError(f"{info.filename} inflates past {limit} bytes")
    if zlib.crc32(out) != info.CRC:
        raise ExportFormatError(f"{info.filename}: CRC-32 does not match")
    return out


def _inflate(raw: memoryview, size: int, limit: int) -> bytearray | None:
    """A raw deflate stream inflated into one buffer of the declared ``size`` (grown if
    that lied), in steps of 256 KiB in and at most 1 MiB out: never more than ``limit``
    + 1 bytes, never a second copy of the whole. None when the stream ends early."""
    out = bytearray(size)
    inflate = zlib.decompressobj(-15)
    pos = 0
    for off in range(0, len(raw), 1 << 18):
        data: bytes | memoryview = raw[off : off + (1 << 18)]
        while data and not inflate.eof:
            chunk = inflate.decompress(data, min(1 << 20, limit + 1 - pos))
            data = inflate.unconsumed_tail
            end = pos + len(chunk)
            if end > len(out):
                out.extend(bytes(end - len(out)))
            out[pos:end] = chunk
            pos = end
            if pos > limit:
                return out  # the caller says it is too large
        if inflate.eof:
            break
    if not inflate.eof:
        return None
    del out[pos:]
    return out


def unzip_export(data: bytes, *, max_uncompressed: int = DEFAULT_MAX_UNCOMPRESSED) -> tuple[bytearray, bytes]:
    """(export.bin, export.sig) from an export zip; exactly those two members allowed.
    export.bin is the buffer it was inflated into (every reader here takes one)."""
    data = bytes(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:  # the directory only: BytesIO shares the bytes
            infos = z.infolist()
        names = sorted(i.filename for i in infos)
        if names != sorted([EXPORT_BIN, EXPORT_SIG]):
            raise ExportFormatError(f"export zip must hold exactly export.bin and export.sig, found {names}")
        by_name = {i.filename: i for i in infos}
        export_bin = _read_member(data, by_name[EXPORT_BIN], max_uncompressed)
        export_sig = bytes(_read_member(data, by_name[EXPORT_SIG], MAX_SIG_BYTES))
    except ExportError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, struct.error, ...
        raise ExportFormatError(f"not a readable export zip: {type(e).__name__}: {e}") from None
    return export_bin, export_sig


def verify_signature(
    export_bin: Bytes, export_sig: bytes, trusted_keys: Sequence[bytes | str | ec.EllipticCurvePublicKey]
) -> str:
    """Return the key id of the first signature that verifies with a trusted key."""
    pubs = [load_public_key(k) for k in trusted_keys]
    if not pubs:
        raise ExportSignatureError("no trusted public key configured")
    lst = pb.TEKSignatureList()
    try:
        lst.ParseFromString(bytes(export_sig))
    except Exception as e:  # the protobuf C parser fails in several ways: all of them are a bad file
        raise ExportFormatError(f"export.sig is malformed: {type(e).__name__}") from None
    if not lst.signatures:
        raise ExportSignatureError("export.sig holds no signature")
    # signature_algorithm is informative only: early files wrote "ECDSA p-256 SHA-256"
    # instead of the OID, and P-256/SHA-256 is the only algorithm the format defines.
    for s in lst.signatures:
        for pub in pubs:
            try:
                pub.verify(bytes(s.signature), export_bin, ec.ECDSA(hashes.SHA256()))
            except (InvalidSignature, ValueError):
                continue
            return str(s.signature_info.verification_key_id)
    raise ExportSignatureError("no signature in export.sig verifies export.bin with a trusted key")


def parse_export_packed(
    data: bytes,
    *,
    trusted_keys: Sequence[bytes | str | ec.EllipticCurvePublicKey] | None,
    max_uncompressed: int = DEFAULT_MAX_UNCOMPRESSED,
) -> PackedExport:
    """Verify and parse an export file, its keys as arrays: export.sig is checked
    against ``trusted_keys`` before export.bin is read at all.

    ``data`` is a signed zip; with ``trusted_keys=None`` (an explicit choice: no
    verification) a bare ``export.bin`` or an unsigned reading of a zip is accepted too.
    """
    data = bytes(data)
    if data[:HEADER_LEN] == HEADER:
        if trusted_keys is not None:
            raise ExportSignatureError("a bare export.bin carries no signature; pass trusted_keys=None to read it")
        if len(data) > max_uncompressed:
            raise ExportTooLargeError(f"export.bin is {len(data)} bytes, limit {max_uncompressed}")
        return parse_export_bin_packed(data)
    export_bin, export_sig = unzip_export(data, max_uncompressed=max_uncompressed)
    if trusted_keys is None:
        return parse_export_bin_packed(export_bin)
    return parse_verified(export_bin, export_sig, trusted_keys=trusted_keys)


def parse_verified(export_bin: Bytes, export_sig: bytes, *,
                   trusted_keys: Sequence[bytes | str | ec.EllipticCurvePublicKey]) -> PackedExport:
    """export.bin read into arrays once export.sig verified it with a trusted key."""
    key_id = verify_signature(export_bin, export_sig, trusted_keys)
    exp = parse_export_bin_packed(export_bin)
    return dataclasses.replace(exp, verified=True, verified_key_id=key_id)


def parse_export(
    data: bytes,
    *,
    trusted_keys: Sequence[bytes | str | ec.EllipticCurvePublicKey] | None,
    max_uncompressed: int = DEFAULT_MAX_UNCOMPRESSED,
) -> Export:
    """Parse and verify an export file (see :func:`parse_export_packed`), one record per key."""
    return parse_export_packed(data, trusted_keys=trusted_keys, max_uncompressed=max_uncompressed).to_export()
