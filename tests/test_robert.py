"""ROBERT protocol core against the official vectors (tests/data/robert.json)."""

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol import robert

from .conftest import DATA

V = json.loads((DATA / "robert.json").read_text())
D = V["derived_not_official"]


@pytest.mark.parametrize("vec", V["skinny64_192"])
def test_skinny64_192_official_vectors(vec):
    c = robert.Skinny64_192(bytes.fromhex(vec["key"]))
    assert c.encrypt(bytes.fromhex(vec["plaintext"])).hex() == vec["ciphertext"]
    assert c.decrypt(bytes.fromhex(vec["ciphertext"])).hex() == vec["plaintext"]


@given(st.binary(min_size=24, max_size=24), st.binary(min_size=8, max_size=8))
def test_skinny_round_trip(key, block):
    c = robert.Skinny64_192(key)
    assert c.decrypt(c.encrypt(block)) == block


def test_hello_official_vector():
    h = V["hello"]
    assert robert.ntp_seconds(h["current_time_millis"] / 1000) == h["ntp_seconds"]
    assert robert.time16(h["ntp_seconds"]).hex() == h["time16"]
    hello = robert.build_hello(h["k_mac_utf8"].encode(), bytes.fromhex(h["ecc"]), bytes.fromhex(h["ebid"]),
                               h["ntp_seconds"])
    assert hello.hex() == h["hello"]
    parsed = robert.parse_hello(hello)
    assert robert.verify_hello_mac(h["k_mac_utf8"].encode(), parsed)
    for rejected in h["rejected_time_millis"]:  # other seconds give other HELLOs
        other = robert.build_hello(h["k_mac_utf8"].encode(), bytes.fromhex(h["ecc"]), bytes.fromhex(h["ebid"]),
                                   robert.ntp_seconds(rejected / 1000))
        assert other != hello


def test_hello_parse_official_vector():
    p = robert.parse_hello(bytes.fromhex(V["hello_parse"]["hello"]))
    assert p.time16 == V["hello_parse"]["time16"]
    # 0xFD64 service data: HELLO ‖ version ‖ TX power, 18 bytes or more
    sd = robert.service_data(bytes.fromhex(V["hello_parse"]["hello"]), -12)
    assert len(sd) == 18 and robert.parse_hello(sd + b"\x00").to_bytes().hex() == V["hello_parse"]["hello"]
    with pytest.raises(robert.RobertError):
        robert.parse_hello(sd[:15])


def test_derived_chain_ebid_ecc_keys_hello_and_request_mac():
    k_s, k_g = bytes.fromhex(D["K_S_skinny64_192"]), bytes.fromhex(D["K_G_aes256"])
    ebid = robert.make_ebid(k_s, D["epoch"], bytes.fromhex(D["ID_A"]))
    assert ebid.hex() == D["EBID"]
    assert robert.open_ebid(k_s, ebid) == (D["epoch"], bytes.fromhex(D["ID_A"]))
    ecc = robert.make_ecc(k_g, ebid, int(D["CC"], 16))
    assert ecc.hex() == D["ECC"] and robert.open_ecc(k_g, ebid, ecc) == 0x21
    client = ec.derive_private_key(int(D["client_priv_scalar"], 16), ec.SECP256R1())
    server = ec.derive_private_key(int(D["server_priv_scalar"], 16), ec.SECP256R1())
    assert robert.public_key_b64(client) == D["client_pub_x509_der_b64"]
    keys_c = robert.ecdh_keys(client, D["server_pub_x509_der_b64"])
    keys_s = robert.ecdh_keys(server, D["client_pub_x509_der_b64"])
    assert keys_c == keys_s
    assert keys_c.k_mac.hex() == D['K_mac=HMAC(ss,"mac") [impl]']
    assert keys_c.k_tuples.hex() == D['K_tuples=HMAC(ss,"tuples") [impl]']
    ntp = robert.ntp_seconds(D["unix_time"])
    assert ntp == D["ntp_seconds"] and robert.time16(ntp).hex() == D["time16"]
    assert robert.build_hello(keys_c.k_mac, ecc, ebid, ntp).hex() == D["HELLO(ecc|ebid|time16|mac40)"]
    mac = robert.request_mac(keys_c.k_mac, robert.PREFIX_STATUS, ebid, D["epoch"], ntp)
    assert mac.hex() == D["ESR_mac(full 32 bytes)"]
    assert robert.verify_request_mac(keys_s.k_mac, robert.PREFIX_STATUS, ebid, D["epoch"], ntp, mac)
    assert not robert.verify_request_mac(keys_s.k_mac, robert.PREFIX_UNREGISTER, ebid, D["epoch"], ntp, mac)


def test_tuples_round_trip_and_tamper():
    k = bytes(range(32))
    tuples = [robert.Tuple(e, bytes([e]) * 8, bytes([e])) for e in range(5)]
    blob = robert.encrypt_tuples(k, tuples)
    assert robert.decrypt_tuples(k, blob) == tuples
    raw = bytearray(base64.b64decode(blob))
    raw[20] ^= 1
    with pytest.raises(robert.RobertError):
        robert.decrypt_tuples(k, base64.b64encode(bytes(raw)).decode())
    with pytest.raises(robert.RobertError):
        robert.decrypt_tuples(bytes(32), blob)


def test_epochs_and_time_reconstruction():
    start = robert.ntp_seconds(1_600_000_000)
    assert robert.epoch_id(start + 899, start) == 0 and robert.epoch_id(start + 900, start) == 1
    assert robert.epoch_start_ntp(3, start) == start + 2700
    ntp = start + 123_456
    assert robert.reconstruct_ntp(ntp & 0xFFFF, ntp + 30) == ntp
    assert robert.reconstruct_ntp(0xFFFF, 0x20000 + 5) == 0x1FFFF


@given(st.binary(max_size=40))
def test_hello_parser_raises_only_its_error(data):
    try:
        robert.parse_hello(data)
    except robert.RobertError:
        pass


def test_robert_risk_scoring():
    from agent.exposure.robert_rule import RobertRiskConfig, at_risk, epoch_weighted_minutes, total_risk

    cfg = RobertRiskConfig()
    close = [(t, -40.0) for t in range(0, 900, 10)]  # a full epoch, 12 packets per window
    m = epoch_weighted_minutes(close, 0, cfg)
    assert m == pytest.approx(15.0)
    assert total_risk(m) == pytest.approx(1 - 2.718281828 ** (-0.0071 * 15), rel=1e-6)
    assert at_risk(m, 1) and not at_risk(m, 8)  # last contact too old
    fourteen = [(t, -40.0) for t in range(0, 840, 10)]
    assert not at_risk(epoch_weighted_minutes(fourteen, 0, cfg), 0)
    far = [(t, -80.0) for t in range(0, 900, 10)]
    assert epoch_weighted_minutes(far, 0, cfg) == 0
    # readings above -5 dBm are dropped; a single packet has a wide delta (39 dB)
    assert epoch_weighted_minutes([(5, 0.0)], 0, cfg) == 0
    one = epoch_weighted_minutes([(5, -47.0)], 0, cfg)
    assert one == pytest.approx(2 * (-47 + 66) / 39)
    # samples outside the epoch do not count
    assert epoch_weighted_minutes([(900, -40.0), (-1, -40.0)], 0, cfg) == 0
