"""Exposure Key Export: the real published files and our own round trip."""

import io
import json
import zipfile

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import export
from agent.protocol.export import (
    DiagnosisKey, ExportError, ExportFormatError, ExportSignatureError, ExportTooLargeError, ReportType,
)

from .conftest import DATA

FILES = DATA / "export-files"
EXPECTED = json.loads((FILES / "expected.json").read_text())
PUBLIC = json.loads((FILES / "public-keys.json").read_text())["keys"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_files_parse_to_expected_keys(name):
    exp = EXPECTED[name]
    data = (FILES / name).read_bytes()
    trusted = [PUBLIC[name]] if name in PUBLIC else None
    got = export.parse_export(data, trusted_keys=trusted)
    assert got.verified == (trusted is not None)
    assert (got.start_timestamp, got.end_timestamp, got.region) == (exp["start_timestamp"], exp["end_timestamp"],
                                                                     exp["region"])
    assert (got.batch_num, got.batch_size) == (exp["batch_num"], exp["batch_size"])
    assert len(got.keys) == exp["num_keys"] and len(got.revised_keys) == exp["num_revised_keys"]
    want = [
        (bytes.fromhex(k["key_data"]), k["rolling_start_interval_number"], k.get("rolling_period", 144),
         k["transmission_risk_level"])
        for k in exp["keys"]
    ]
    have = [(k.key_data, k.rolling_start_interval_number, k.rolling_period, k.transmission_risk_level)
            for k in got.keys]
    assert have == want


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_real_signed_files_fail_with_another_key(name):
    other = [v for k, v in PUBLIC.items() if k != name]
    with pytest.raises(ExportSignatureError):
        export.parse_export((FILES / name).read_bytes(), trusted_keys=other)


def test_bare_bin_is_refused_when_a_signature_is_required():
    with pytest.raises(ExportSignatureError):
        export.parse_export((FILES / "internals-app-export.bin").read_bytes(), trusted_keys=list(PUBLIC.values()))


@pytest.fixture(scope="module")
def signing_key():
    return ec.generate_private_key(ec.SECP256R1())


def sample_keys(n=3):
    return [
        DiagnosisKey(bytes([i]) * 16, 2_700_000 + 144 * i, 144 - i, 4, ReportType.CONFIRMED_TEST, i - 1)
        for i in range(n)
    ]


def test_round_trip_with_all_fields(signing_key):
    keys = sample_keys()
    blob = export.build_export(keys, signing_key=signing_key, start_timestamp=10, end_timestamp=20, region="FR",
                               key_id="310", key_version="v1")
    got = export.parse_export(blob, trusted_keys=[export.public_key_b64(signing_key)])
    assert got.verified and got.verified_key_id == "310"
    assert list(got.keys) == keys
    assert got.signature_infos[0].signature_algorithm == export.ECDSA_SHA256_OID
    # deterministic apart from the ECDSA nonce: export.bin is byte-identical
    b1, _ = export.unzip_export(blob)
    b2, _ = export.unzip_export(export.build_export(keys, signing_key=signing_key, start_timestamp=10,
                                                    end_timestamp=20, region="FR", key_id="310", key_version="v1"))
    assert b1 == b2 and b1.startswith(b"EK Export v1    ")


def test_pem_and_object_keys_accepted(signing_key):
    from cryptography.hazmat.primitives import serialization
    blob = export.build_export(sample_keys(1), signing_key=signing_key, start_timestamp=0, end_timestamp=1, region="X")
    pem = signing_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    assert export.parse_export(blob, trusted_keys=[pem]).verified
    assert export.parse_export(blob, trusted_keys=[signing_key.public_key()]).verified
    with pytest.raises(ExportError):
        export.parse_export(blob, trusted_keys=["bm90IGEga2V5"])


def _rezip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, d in members.items():
            z.writestr(n, d)
    return buf.getvalue()


def test_tampered_export_bin_fails_verification(signing_key):
    blob = export.build_export(sample_keys(), signing_key=signing_key, start_timestamp=0, end_timestamp=1, region="X")
    b, s = export.unzip_export(blob)
    tampered = bytearray(b)
    tampered[-1] ^= 1
    with pytest.raises(ExportSignatureError):
        export.parse_export(_rezip({"export.bin": bytes(tampered), "export.sig": s}),
                            trusted_keys=[signing_key.public_key()])


def test_structure_errors(signing_key):
    blob = export.build_export(sample_keys(), signing_key=signing_key, start_timestamp=0, end_timestamp=1, region="X")
    b, s = export.unzip_export(blob)
    pub = [signing_key.public_key()]
    with pytest.raises(ExportFormatError, match="exactly"):
        export.parse_export(_rezip({"export.bin": b, "export.sig": s, "extra.txt": b"x"}), trusted_keys=pub)
    with pytest.raises(ExportFormatError, match="exactly"):
        export.parse_export(_rezip({"export.bin": b}), trusted_keys=pub)
    with pytest.raises(ExportFormatError, match="header"):
        export.parse_export_bin(b"EK Export v2    " + b[16:])
    with pytest.raises(ExportFormatError, match="truncated|malformed"):
        export.parse_export_bin(b[:-7])
    with pytest.raises(ExportFormatError):
        export.parse_export(blob[: len(blob) // 2], trusted_keys=pub)
    with pytest.raises(ExportFormatError, match="key_data"):
        export.build_export([DiagnosisKey(b"short", 1)], signing_key=signing_key, start_timestamp=0,
                            end_timestamp=1, region="X")


def test_zip_bomb_is_capped(signing_key):
    bomb = _rezip({"export.bin": export.HEADER + b"\x00" * 5_000_000, "export.sig": b""})
    assert len(bomb) < 20_000
    with pytest.raises(ExportTooLargeError):
        export.parse_export(bomb, trusted_keys=None, max_uncompressed=1_000_000)


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_parsers_raise_only_export_errors(data):
    for fn in (lambda: export.parse_export(data, trusted_keys=None),
               lambda: export.parse_export_bin(export.HEADER + data),
               lambda: export.parse_export(b"PK\x03\x04" + data, trusted_keys=None)):
        try:
            fn()
        except ExportError:
            pass


keys_strategy = st.lists(
    st.builds(
        DiagnosisKey,
        key_data=st.binary(min_size=16, max_size=16),
        rolling_start_interval_number=st.integers(0, 2**31 - 1),
        rolling_period=st.integers(1, 144),
        transmission_risk_level=st.integers(0, 8),
        report_type=st.sampled_from(list(ReportType)),
        days_since_onset_of_symptoms=st.one_of(st.none(), st.integers(-14, 14)),
    ),
    max_size=20,
)


@settings(max_examples=50, deadline=None)
@given(keys_strategy)
def test_round_trip_property(keys):
    b = export.build_export_bin(keys, start_timestamp=1, end_timestamp=2, region="XX")
    assert list(export.parse_export_bin(b).keys) == keys


# --- the C parser against the protobuf runtime -----------------------------------------

def _reading(body: bytes, native: bool):
    """What a parser makes of ``body``: the header and the key arrays, or the error."""
    try:
        p = export.parse_export_bin_packed(export.HEADER + body, native=native)
    except ExportFormatError as e:
        return ("error", "malformed" if "malformed" in str(e) else str(e))
    arrays = [(k.key_data, k.rolling_start.tolist(), k.rolling_period.tolist(), k.transmission_risk.tolist(),
               k.report_type.tolist(), (k.days_since_onset * k.has_days_since_onset).tolist(),
               k.has_days_since_onset.tolist()) for k in (p.keys, p.revised_keys)]
    return (p.start_timestamp, p.end_timestamp, p.region, p.batch_num, p.batch_size, p.signature_infos, arrays)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# pieces of the wire format a parser must read exactly as the runtime does: other wire
# types for known fields, unknown fields and groups, 10-byte varints, int32 overflow, an
# enum value outside the enum, a sint32, repeated scalars (the last wins), bad lengths
_KEY_FIELDS = st.one_of(
    st.builds(lambda b: b"\x0a" + _varint(len(b)) + b, st.binary(min_size=14, max_size=18)),
    st.builds(lambda f, v: bytes([f << 3]) + _varint(v), st.integers(2, 6),
              st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1), st.just(2**32 + 5), st.just(2**63))),
    st.sampled_from([b"\x08\x01", b"\x11" + bytes(8), b"\x1d" + bytes(4), b"\x5b\x08\x01\x5c", b"\x3b\x3c",
                     b"\x20\x00", b"\x20\x91\x01", b"\x28\x09", b"\x32\x01\x00",
                     b"\x78\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]),
)


def _key_message(parts):
    body = b"".join(parts)
    return b"\x3a" + _varint(len(body)) + body


_GOOD_KEY = st.builds(lambda kd, rs, rp, extra: b"\x0a\x10" + kd + b"\x18" + _varint(rs) + b"\x20" + _varint(rp)
                      + extra,
                      st.binary(min_size=16, max_size=16), st.integers(0, 2**31 - 1), st.integers(1, 144),
                      st.sampled_from([b"", b"\x10\x03", b"\x28\x01", b"\x30\x07", b"\x30\x08", b"\x28\x07"]))

_TOP_FIELDS = st.one_of(
    _GOOD_KEY.map(lambda b: b"\x3a" + _varint(len(b)) + b),
    st.lists(_KEY_FIELDS, max_size=6).map(_key_message),
    _GOOD_KEY.map(lambda b: b"\x42" + _varint(len(b)) + b),
    st.builds(lambda v: b"\x09" + v.to_bytes(8, "little"), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: b"\x11" + v.to_bytes(8, "little"), st.integers(0, 2**64 - 1)),
    st.builds(lambda b: b"\x1a" + _varint(len(b)) + b, st.binary(max_size=6)),
    st.builds(lambda f, v: bytes([f << 3]) + _varint(v), st.sampled_from([4, 5, 9, 15]), st.integers(0, 2**64 - 1)),
    st.sampled_from([b"\x32\x06\x22\x04ab12", b"\x32\x02\x08\x01", b"\x38\x01", b"\x0d\x00\x00\x00\x00",
                     b"\x83\x01\x84\x01", b"\x0b", b"\x0c", b"\x07", b"\x3a\x05\x0a\x10", b"\x3a\x80\x80\x80\x80\x10"]),
)


@settings(max_examples=250, deadline=None)
@given(st.lists(_TOP_FIELDS, max_size=8), st.data())
def test_c_parser_reads_what_the_protobuf_runtime_reads(fields, data):
    if export._fastexport is None:
        pytest.skip("the C parser was not built")
    body = b"".join(fields)
    if body and data.draw(st.booleans()):  # and corrupted: cut, a byte changed
        cut = data.draw(st.integers(0, len(body)))
        body = body[:cut] + (bytes([data.draw(st.integers(0, 255))]) + body[cut + 1:] if data.draw(st.booleans())
                             else b"")
    assert _reading(body, True) == _reading(body, False)


def test_c_parser_reads_the_real_files_like_the_runtime():
    if export._fastexport is None:
        pytest.skip("the C parser was not built")
    for name in sorted(EXPECTED):
        data = (FILES / name).read_bytes()
        export_bin, _ = export.unzip_export(data) if data[:2] == b"PK" else (data, b"")
        assert _reading(export_bin[16:], True) == _reading(export_bin[16:], False), name


@settings(max_examples=30, deadline=None)
@given(st.lists(st.builds(
    DiagnosisKey, key_data=st.binary(min_size=16, max_size=16), rolling_start_interval_number=st.integers(0, 2**31 - 1),
    rolling_period=st.integers(1, 144), transmission_risk_level=st.integers(-(2**31), 2**31 - 1),
    report_type=st.sampled_from(list(ReportType)),
    days_since_onset_of_symptoms=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    variant_of_concern=st.sampled_from(list(export.VariantOfConcern))), max_size=30))
def test_keys_are_written_as_the_protobuf_runtime_writes_them(keys):
    """The writer from arrays (C and Python) against the runtime, byte for byte."""
    msg = export.pb.TemporaryExposureKeyExport(start_timestamp=1, end_timestamp=2, region="XX", batch_num=1,
                                               batch_size=1)
    for k in keys:
        o = msg.keys.add()
        o.key_data, o.rolling_start_interval_number = k.key_data, k.rolling_start_interval_number
        o.rolling_period, o.transmission_risk_level = k.rolling_period, k.transmission_risk_level
        if k.report_type != ReportType.UNKNOWN:
            o.report_type = int(k.report_type)
        if k.days_since_onset_of_symptoms is not None:
            o.days_since_onset_of_symptoms = k.days_since_onset_of_symptoms
        if k.variant_of_concern != export.VariantOfConcern.UNKNOWN:
            o.variant_of_concern = int(k.variant_of_concern)
    want = export.HEADER + msg.SerializeToString()
    assert export.build_export_bin(keys, start_timestamp=1, end_timestamp=2, region="XX") == want
    packed = export.PackedKeys.from_keys(keys)
    assert export.encode_keys(packed, native=False) == export.encode_keys(packed)
    assert want.endswith(export.encode_keys(packed))
