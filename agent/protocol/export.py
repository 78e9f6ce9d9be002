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
import hashlib
import enum
import io
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from google.protobuf.message import DecodeError

from ..errors import ProtocolError
from . import export_pb2
from .gaen import KEY_LEN, TEK_ROLLING_PERIOD, TemporaryExposureKey

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

def _key_to_pb(k: DiagnosisKey, out: Any) -> None:
    k.validate()
    out.key_data = k.key_data
    out.rolling_start_interval_number = k.rolling_start_interval_number
    out.rolling_period = k.rolling_period
    out.transmission_risk_level = k.transmission_risk_level
    if k.report_type != ReportType.UNKNOWN:
        out.report_type = int(k.report_type)
    if k.days_since_onset_of_symptoms is not None:
        out.days_since_onset_of_symptoms = k.days_since_onset_of_symptoms
    if k.variant_of_concern != VariantOfConcern.UNKNOWN:
        out.variant_of_concern = int(k.variant_of_concern)


def _info_to_pb(info: SignatureInfo, out: Any) -> None:
    if info.verification_key_version:
        out.verification_key_version = info.verification_key_version
    if info.verification_key_id:
        out.verification_key_id = info.verification_key_id
    if info.signature_algorithm:
        out.signature_algorithm = info.signature_algorithm


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
    msg = pb.TemporaryExposureKeyExport(
        start_timestamp=start_timestamp,
        end_timestamp=end_timestamp,
        region=region,
        batch_num=batch_num,
        batch_size=batch_size,
    )
    if signature_info is not None:
        _info_to_pb(signature_info, msg.signature_infos.add())
    for k in keys:
        _key_to_pb(k, msg.keys.add())
    for k in revised_keys:
        _key_to_pb(k, msg.revised_keys.add())
    return HEADER + bytes(msg.SerializeToString())


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
    info = SignatureInfo(verification_key_version=key_version, verification_key_id=key_id)
    export_bin = build_export_bin(
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


# --- parsing -----------------------------------------------------------------------

def _key_from_pb(k: Any) -> DiagnosisKey:
    try:
        rt = ReportType(k.report_type)
    except ValueError:
        raise ExportFormatError(f"unknown report_type {k.report_type}") from None
    try:
        voc = VariantOfConcern(k.variant_of_concern)
    except ValueError:
        raise ExportFormatError(f"unknown variant_of_concern {k.variant_of_concern}") from None
    key = DiagnosisKey(
        key_data=bytes(k.key_data),
        rolling_start_interval_number=k.rolling_start_interval_number,
        rolling_period=k.rolling_period,  # proto2 default 144 when absent
        transmission_risk_level=k.transmission_risk_level,
        report_type=rt,
        days_since_onset_of_symptoms=(
            k.days_since_onset_of_symptoms if k.HasField("days_since_onset_of_symptoms") else None
        ),
        variant_of_concern=voc,
    )
    key.validate()
    return key


def _info_from_pb(i: Any) -> SignatureInfo:
    return SignatureInfo(
        verification_key_version=i.verification_key_version,
        verification_key_id=i.verification_key_id,
        signature_algorithm=i.signature_algorithm,
    )


def parse_export_bin(export_bin: bytes) -> Export:
    """Parse a bare export.bin (header + protobuf). No signature is checked."""
    data = bytes(export_bin)
    if len(data) < HEADER_LEN or data[:HEADER_LEN] != HEADER:
        raise ExportFormatError("export.bin does not start with the 'EK Export v1' header")
    msg = pb.TemporaryExposureKeyExport()
    try:
        msg.ParseFromString(data[HEADER_LEN:])
    except (DecodeError, RuntimeError, ValueError) as e:  # RuntimeError: recursion limits in upb
        raise ExportFormatError(f"export.bin protobuf is truncated or malformed: {e}") from None
    except Exception as e:  # pragma: no cover - defensive: the C parser's other failures
        raise ExportFormatError(f"export.bin protobuf could not be parsed: {type(e).__name__}") from None
    if msg.start_timestamp > msg.end_timestamp:
        raise ExportFormatError("start_timestamp is after end_timestamp")
    return Export(
        start_timestamp=msg.start_timestamp,
        end_timestamp=msg.end_timestamp,
        region=msg.region,
        batch_num=msg.batch_num,
        batch_size=msg.batch_size,
        keys=tuple(_key_from_pb(k) for k in msg.keys),
        revised_keys=tuple(_key_from_pb(k) for k in msg.revised_keys),
        signature_infos=tuple(_info_from_pb(i) for i in msg.signature_infos),
    )


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise ExportTooLargeError(f"{info.filename} is {info.file_size} bytes uncompressed, limit {limit}")
    with z.open(info) as f:  # the declared size can lie: read at most limit+1 bytes
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ExportTooLargeError(f"{info.filename} inflates past {limit} bytes")
    return data


def unzip_export(data: bytes, *, max_uncompressed: int = DEFAULT_MAX_UNCOMPRESSED) -> tuple[bytes, bytes]:
    """(export.bin, export.sig) from an export zip; exactly those two members allowed."""
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
            infos = z.infolist()
            names = sorted(i.filename for i in infos)
            if names != sorted([EXPORT_BIN, EXPORT_SIG]):
                raise ExportFormatError(f"export zip must hold exactly export.bin and export.sig, found {names}")
            by_name = {i.filename: i for i in infos}
            export_bin = _read_member(z, by_name[EXPORT_BIN], max_uncompressed)
            export_sig = _read_member(z, by_name[EXPORT_SIG], MAX_SIG_BYTES)
    except ExportError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, NotImplementedError, ...
        raise ExportFormatError(f"not a readable export zip: {type(e).__name__}: {e}") from None
    return export_bin, export_sig


def verify_signature(
    export_bin: bytes, export_sig: bytes, trusted_keys: Sequence[bytes | str | ec.EllipticCurvePublicKey]
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
                pub.verify(bytes(s.signature), bytes(export_bin), ec.ECDSA(hashes.SHA256()))
            except (InvalidSignature, ValueError):
                continue
            return str(s.signature_info.verification_key_id)
    raise ExportSignatureError("no signature in export.sig verifies export.bin with a trusted key")


def parse_export(
    data: bytes,
    *,
    trusted_keys: Sequence[bytes | str | ec.EllipticCurvePublicKey] | None,
    max_uncompressed: int = DEFAULT_MAX_UNCOMPRESSED,
) -> Export:
    """Parse and verify an export file.

    ``data`` is a signed zip; with ``trusted_keys=None`` (an explicit choice: no
    verification) a bare ``export.bin`` or an unsigned reading of a zip is accepted too.
    """
    data = bytes(data)
    if data[:HEADER_LEN] == HEADER:
        if trusted_keys is not None:
            raise ExportSignatureError("a bare export.bin carries no signature; pass trusted_keys=None to read it")
        if len(data) > max_uncompressed:
            raise ExportTooLargeError(f"export.bin is {len(data)} bytes, limit {max_uncompressed}")
        return parse_export_bin(data)
    export_bin, export_sig = unzip_export(data, max_uncompressed=max_uncompressed)
    key_id = None
    if trusted_keys is not None:
        key_id = verify_signature(export_bin, export_sig, trusted_keys)
    exp = parse_export_bin(export_bin)
    if trusted_keys is None:
        return exp
    return Export(**{**exp.__dict__, "verified": True, "verified_key_id": key_id})
