import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol import payload
from agent.protocol.payload import EN_SERVICE_UUID, NotExposureNotification, PayloadError

RPI = bytes(range(16))
AEM = b"\xaa\xbb\xcc\xdd"


def test_build_is_the_spec_layout():
    adv = payload.build_advertisement(RPI, AEM)
    assert len(adv) == 31
    assert adv[:3] == bytes([0x02, 0x01, 0x1A])
    assert adv[3:7] == bytes([0x03, 0x03, 0x6F, 0xFD])
    assert adv[7:11] == bytes([0x17, 0x16, 0x6F, 0xFD])
    assert adv[11:] == RPI + AEM


def test_parse_round_trip_with_and_without_flags():
    for flags in (True, False):
        p = payload.parse_advertisement(payload.build_advertisement(RPI, AEM, include_flags=flags))
        assert (p.rpi, p.aem) == (RPI, AEM)


def test_parse_ignores_unrelated_structures_and_padding():
    name = bytes([5, 0x09]) + b"Pixl"
    manuf = bytes([4, 0xFF, 0x4C, 0x00, 0x01])
    other_sd = bytes([5, 0x16, 0x0A, 0x18, 1, 2])  # service data of another UUID
    raw = name + other_sd + payload.build_advertisement(RPI, AEM, include_flags=False) + manuf + b"\x00\x00"
    p = payload.parse_advertisement(raw)
    assert p.rpi == RPI


@pytest.mark.parametrize("sd_len", [0, 19, 21, 24])
def test_wrong_service_data_length_is_rejected(sd_len):
    raw = bytes([3 + sd_len, 0x16, 0x6F, 0xFD]) + bytes(sd_len)
    with pytest.raises(PayloadError, match="20 bytes"):
        payload.parse_advertisement(raw)


def test_truncated_ad_structure():
    with pytest.raises(PayloadError, match="claims"):
        payload.parse_advertisement(bytes([0x17, 0x16, 0x6F, 0xFD]) + RPI)


def test_not_en_is_a_distinct_error():
    with pytest.raises(NotExposureNotification):
        payload.parse_advertisement(bytes([2, 0x01, 0x06]))
    assert issubclass(NotExposureNotification, PayloadError)


def test_bleak_service_data_dict():
    p = payload.parse_service_data({"0000180a-0000-1000-8000-00805f9b34fb": b"x", EN_SERVICE_UUID: RPI + AEM})
    assert p.aem == AEM
    assert payload.parse_service_data({"FD6F": RPI + AEM}).rpi == RPI
    assert payload.parse_service_data({0xFD6F: RPI + AEM}).rpi == RPI
    with pytest.raises(PayloadError):
        payload.parse_service_data({EN_SERVICE_UUID: RPI})
    with pytest.raises(NotExposureNotification):
        payload.parse_service_data({})


@given(st.binary(max_size=300))
def test_parser_raises_only_its_own_errors(raw):
    try:
        p = payload.parse_advertisement(raw)
    except PayloadError:
        return
    assert len(p.rpi) == 16 and len(p.aem) == 4


@given(st.dictionaries(st.one_of(st.text(max_size=40), st.integers(0, 0xFFFF)), st.binary(max_size=40)))
def test_service_data_parser_raises_only_its_own_errors(d):
    try:
        payload.parse_service_data(d)
    except PayloadError:
        pass


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=4, max_size=4), st.booleans())
def test_round_trip_property(rpi, aem, flags):
    adv = payload.build_advertisement(rpi, aem, include_flags=flags)
    assert len(adv) <= 31
    assert payload.parse_advertisement(adv) == payload.ENPayload(rpi, aem)
