"""Exposure Notification cryptography against the published test vectors
(google/exposure-notifications-internals TestVectors.java, copied to tests/data/gaen.json)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol import gaen


def test_interval_number_and_rolling_start(gaen_vectors):
    t = gaen_vectors["key_generation_unix_seconds"]
    assert gaen.en_interval_number(t) == gaen_vectors["rolling_start_interval_number"]
    assert gaen.en_interval_number(t + 599.999) == gaen_vectors["rolling_start_interval_number"]
    assert gaen.en_interval_number(t + 600) == gaen_vectors["rolling_start_interval_number"] + 1
    assert gaen.rolling_start_for_day(t + 86_399) == gaen_vectors["rolling_start_interval_number"]
    assert gaen.TEK_ROLLING_PERIOD == gaen_vectors["rolling_period"] == 144


def test_key_derivation(gaen_vectors):
    tek = bytes.fromhex(gaen_vectors["tek"])
    assert gaen.derive_rpik(tek).hex() == gaen_vectors["rpik"]
    assert gaen.derive_aemk(tek).hex() == gaen_vectors["aemk"]


def test_every_rpi_and_aem(gaen_vectors):
    tek = bytes.fromhex(gaen_vectors["tek"])
    rpik, aemk = gaen.derive_rpik(tek), gaen.derive_aemk(tek)
    meta = bytes.fromhex(gaen_vectors["ble_metadata"])
    assert len(gaen_vectors["vectors"]) == 144
    for v in gaen_vectors["vectors"]:
        assert gaen.padded_data(v["enin"]).hex() == v["padded_data"]
        r = gaen.rpi(rpik, v["enin"])
        assert r.hex() == v["rpi"]
        assert gaen.encrypt_aem(aemk, r, meta).hex() == v["aem"]
        assert gaen.decrypt_aem(aemk, r, bytes.fromhex(v["aem"])) == meta


def test_batched_rpis_match_vectors(gaen_vectors, monkeypatch):
    tek = bytes.fromhex(gaen_vectors["tek"])
    rpis = gaen.rpis_for_key(tek, gaen_vectors["rolling_start_interval_number"])
    assert [r.hex() for r in rpis] == [v["rpi"] for v in gaen_vectors["vectors"]]
    # one AES context for the whole key, not one per RPI
    calls = []
    real = gaen.Cipher
    monkeypatch.setattr(gaen, "Cipher", lambda *a, **k: calls.append(1) or real(*a, **k))
    gaen.rpis_for_key(tek, 0, 144)
    assert len(calls) == 1


def test_metadata_vector(gaen_vectors):
    m = gaen.Metadata.from_bytes(bytes.fromhex(gaen_vectors["ble_metadata"]))
    assert (m.major, m.minor, m.tx_power_dbm) == (1, 0, 8)
    assert gaen.metadata(8).hex() == gaen_vectors["ble_metadata"]
    assert gaen.metadata(-20) == bytes([0x40, 0xEC, 0, 0])


def test_metadata_rejects_other_major_versions():
    with pytest.raises(gaen.MetadataError):
        gaen.Metadata.from_bytes(bytes([0x80, 0, 0, 0]))
    with pytest.raises(gaen.MetadataError):
        gaen.Metadata.from_bytes(b"\x40\x00\x00")


def test_new_tek_is_random():
    a, b = gaen.new_tek(), gaen.new_tek()
    assert len(a) == 16 and a != b


@pytest.mark.parametrize("bad", [b"", b"x" * 15, b"x" * 17, "not bytes"])
def test_wrong_key_lengths_raise_typed_error(bad):
    with pytest.raises(gaen.CryptoInputError):
        gaen.derive_rpik(bad)
    with pytest.raises(gaen.CryptoInputError):
        gaen.rpi(bad, 1)


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.integers(-127, 127))
def test_aem_round_trip(aemk, rpi_, tx):
    meta = gaen.metadata(tx)
    aem = gaen.encrypt_aem(aemk, rpi_, meta)
    assert gaen.Metadata.from_bytes(gaen.decrypt_aem(aemk, rpi_, aem)).tx_power_dbm == tx


@given(st.binary(min_size=16, max_size=16), st.integers(0, 2**31 - 200), st.integers(1, 144))
def test_batched_equals_single(tek, start, period):
    rpik = gaen.derive_rpik(tek)
    batched = gaen.rpis_for_key(tek, start, period)
    assert len(batched) == period
    assert batched[0] == gaen.rpi(rpik, start) and batched[-1] == gaen.rpi(rpik, start + period - 1)


def test_metadata_transmit_power_is_minus_127_to_127():
    """Bluetooth spec v1.2 "Metadata": byte 1 is the transmit power, -127..+127 dBm."""
    assert gaen.Metadata.from_bytes(gaen.metadata(-127)).tx_power_dbm == -127
    with pytest.raises(gaen.CryptoInputError):
        gaen.metadata(-128)
    with pytest.raises(gaen.MetadataError):
        gaen.Metadata.from_bytes(bytes([0x40, 0x80, 0, 0]))  # version 1.0, -128 dBm
