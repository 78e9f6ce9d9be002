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
