"""The agent against hostile or careless input: an export file too large to hold, odd
configuration values, malformed server answers, and every parser fuzzed for a bounded
time (each may raise only the project's own errors)."""

from __future__ import annotations

import base64
import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import load_config
from agent.errors import ConfigError, CtagentError
from agent.exposure.calibration import CalibrationTable
from agent.exposure.evaluate import read_sightings_csv
from agent.modes.base import DeviceContext
from agent.modes.gaen import GaenMode
from agent.protocol import robert
from agent.protocol.payload import iter_ad_structures

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- point 10: an export file too large to hold ------------------------------------------------

class _HugeExportServer(ThreadingHTTPServer):
    """index.txt lists one file; the file is ``size`` bytes of junk, sent in chunks, and
    the server counts what it could send before the client hung up."""

    daemon_threads = True

    def __init__(self, size: int, declare_length: bool = True) -> None:
        self.size, self.sent, self.done = size, 0, threading.Event()
        self.declare_length = declare_length
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _HugeExportServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.endswith("index.txt"):
            body = b"huge.zip\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        if self.server.declare_length:  # else the body ends when the connection closes
            self.send_header("Content-Length", str(self.server.size))
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            while self.server.sent < self.server.size:
                self.wfile.write(chunk)
                self.server.sent += len(chunk)
        except OSError:
            pass  # the client hung up: what we count is what it could have read
        finally:
            self.server.done.set()


@pytest.mark.integration
@pytest.mark.parametrize("declare_length", [True, False])
def test_an_export_file_larger_than_the_cap_is_not_read_and_counts_as_failed(store, clock, declare_length):
    server = _HugeExportServer(size=400 * 2**20, declare_length=declare_length)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        from cryptography.hazmat.primitives.asymmetric import ec

        from agent.protocol.export import public_key_b64
        key = public_key_b64(ec.generate_private_key(ec.SECP256R1()))
        mode = GaenMode(DeviceContext(store=store, clock=clock, backend_url=url, trusted_keys=(key,),
                                      max_export_bytes=2**20, http_retries=0))
        res, _ = mode.sync(clock.t)
        assert res.files_failed == ("huge.zip",) and res.files_new == 0
        assert server.done.wait(10)
        assert server.sent < 64 * 2**20  # the client stopped near its 1 MiB cap, not after 400 MiB
    finally:
        server.shutdown()


# -- point 14: configuration values -----------------------------------------------------------

@pytest.mark.parametrize("setting", [
    "[agent]\nflush_interval_s = nan", "[agent]\nflush_interval_s = inf", "[agent]\nflush_interval_s = 1e400",
    "[sync]\ninterval_s = -inf", "[sync]\njitter_s = nan",
    "[proximity]\ndistance_threshold_m = nan", "[proximity]\ngap_fill_windows = 2.5",
    "[proximity]\ndistance_threshold_m = \"far\"", "[proximity]\nrule = 5",
    "[proximity]\nbucket_weights = [\"a\", 1, 1, 0]", "[proximity]\nattenuation_at_1m_db = inf",
])
def test_non_finite_and_wrongly_typed_settings_are_refused_with_file_key_and_reason(tmp_path, setting):
    path = tmp_path / "ctagent.toml"
    path.write_text(setting + "\n")
    section, line = setting.split("\n")
    key = line.split(" = ")[0]
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert str(path) in str(e.value) and section in str(e.value) and key in str(e.value)


def test_non_finite_environment_overrides_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\$CTAGENT_AGENT_FLUSH_INTERVAL_S"):
        load_config(None, env={"CTAGENT_AGENT_FLUSH_INTERVAL_S": "nan"})


def test_a_configuration_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "ctagent.toml"
    path.write_bytes(b"[agent]\ndevice_model = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError, match="not UTF-8") as e:
        load_config(path, env={})
    assert str(path) in str(e.value)


# -- point 14: malformed server answers ------------------------------------------------------

K_TUPLES = bytes(range(32))


def sealed(plain: bytes) -> str:
    """A tuple bundle the server could send: authentic (sealed with the right key), hostile inside."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    iv = os.urandom(12)
    return base64.b64encode(iv + AESGCM(K_TUPLES).encrypt(iv, plain, None)).decode()


@pytest.mark.parametrize("plain", [
    b"[" * 5000 + b"]" * 5000,                                             # RecursionError before
    b'[{"epochId": 1e400, "key": {"ebid": "AAAAAAAAAAA=", "ecc": "AA=="}}]',  # OverflowError before
    b'[{"epochId": NaN, "key": {"ebid": "AAAAAAAAAAA=", "ecc": "AA=="}}]',
    b'[{"epochId": 1, "key": []}]', b'{"epochId": 1}', b'[1, 2]', b'[{"epochId": "1", "key": {"ebid": 5}}]',
    b'[{"epochId": 99999999999999999999999, "key": {"ebid": "AAAAAAAAAAA=", "ecc": "AA=="}}]',
    b"\xff\xfe", b"",
])
def test_malformed_tuple_bundles_raise_only_robert_errors(plain):
    with pytest.raises(robert.RobertError):
        robert.decrypt_tuples(K_TUPLES, sealed(plain))


# -- fuzz: every parser of outside input raises only the project's own errors ------------------

def only_own_errors(fn, *args):
    try:
        fn(*args)
    except CtagentError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=20)


@FUZZ
@given(json_values)
def test_fuzz_tuple_bundles(doc):
    only_own_errors(robert.decrypt_tuples, K_TUPLES, sealed(json.dumps(doc, allow_nan=True).encode()))


@FUZZ
@given(st.text(max_size=400))
def test_fuzz_tuple_bundle_transport(blob):
    only_own_errors(robert.decrypt_tuples, K_TUPLES, blob)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_ad_structures(raw):
    only_own_errors(lambda r: list(iter_ad_structures(r)), raw)


@FUZZ
@given(st.text(max_size=600))
def test_fuzz_calibration_lists(text):
    only_own_errors(CalibrationTable.from_csv_text, "oem,device,model,rssi_correction,tx,calibration_confidence\n"
                    + text)
    only_own_errors(CalibrationTable.from_csv_text, text)


@FUZZ
@given(st.text(max_size=600))
def test_fuzz_sightings_files(text):
    only_own_errors(read_sightings_csv, "pair,timestamp,rssi,tx_power\n" + text)
    only_own_errors(read_sightings_csv, text)


toml_lines = st.lists(st.sampled_from([
    "[agent]", "[radio]", "[sync]", "[proximity]", "[notify]", "flush_interval_s = {v}", "retention_days = {v}",
    "interval_s = {v}", "duty_cycle = {v}", "distance_threshold_m = {v}", "gap_fill_windows = {v}",
    "bucket_weights = {v}", "trusted_keys = {v}", "protocol = {v}", "kind = {v}", "rule = {v}",
]), max_size=8)
toml_values = st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-1", "2.5", "\"x\"", "[]", "[1, \"a\"]",
                               "true", "\"20,10\"", "9223372036854775808", "{}"])


@FUZZ
@given(toml_lines, st.lists(toml_values, min_size=8, max_size=8), st.binary(max_size=40))
def test_fuzz_configuration_files(tmp_path_factory, lines, values, junk):
    path = tmp_path_factory.mktemp("cfg") / "ctagent.toml"
    path.write_bytes("\n".join(line.format(v=v) for line, v in zip(lines, values)).encode() + b"\n" + junk)
    try:
        cfg = load_config(path, env={})
    except ConfigError:
        return
    for value in (cfg.agent.flush_interval_s, cfg.sync.interval_s, cfg.sync.jitter_s,
                  cfg.proximity.distance_threshold_m, cfg.proximity.attenuation_at_1m_db):
        assert math.isfinite(value)  # what loads is usable


# -- issue 12.2: a key server's index as Google's server and a CDN publish it -----------------

class _CdnServer(ThreadingHTTPServer):
    """Files by path, as a CDN serves a key server's exports; counts the requests."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requested = files, []
        super().__init__(("127.0.0.1", 0), _CdnHandler)


class _CdnHandler(BaseHTTPRequestHandler):
    server: _CdnServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requested.append(self.path)
        body = self.server.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.send_header("ETag", '"index-v1"')
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.mark.integration
def test_an_index_in_googles_layout_with_folders_and_any_suffix(store, clock):
    """google/exposure-notifications-server docs/getting-started/downloading-export-batches-keys.md:
    index entries are relative paths to append to the export base URL; assume neither
    their depth nor their suffix. Entries that leave the base (``..``, absolute URLs,
    other hosts) are refused and count as failed, so the index is retried."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.protocol.export import DiagnosisKey, build_export, public_key_b64
    from agent.sync.keyserver import IndexEtag

    signing = ec.generate_private_key(ec.SECP256R1())

    def export_file(seed: int) -> bytes:
        keys = [DiagnosisKey(bytes([seed, i]) * 8, 2_880_000) for i in range(3)]
        return build_export(keys, signing_key=signing, start_timestamp=0, end_timestamp=1, region="XX")

    index = ("XX/1600000000-1600003600-00001.zip\nXX/v2/batch-2\n../secret.zip\nhttps://evil.example/x.zip\n"
             "//evil.example/y.zip\n/abs.zip\n")
    server = _CdnServer({"/cdn/XX/index.txt": index.encode(),
                         "/cdn/XX/1600000000-1600003600-00001.zip": export_file(1),
                         "/cdn/XX/v2/batch-2": export_file(2)})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        mode = GaenMode(DeviceContext(store=store, clock=clock, backend_url=base + "/api",
                                      trusted_keys=(public_key_b64(signing),), http_retries=0,
                                      index_url=base + "/cdn/XX/index.txt", export_base_url=base + "/cdn/"))
        res, _ = mode.sync(clock.t)
        assert res.files_new == 2 and res.key_count == 6
        assert set(res.files_failed) == {"../secret.zip", "https://evil.example/x.zip", "//evil.example/y.zip",
                                         "/abs.zip"}
        assert all(p.startswith("/cdn/XX/") for p in server.requested)  # nothing outside the base was asked
        assert store.state.get(IndexEtag) is None  # not every entry was processed: the index is retried
        res, _ = mode.sync(clock.t)
        assert res.files_new == 0 and len(res.files_failed) == 4  # processed files are not fetched again
    finally:
        server.shutdown()


@pytest.mark.parametrize("entry,url", [
    ("XX/1600000000-1600003600-00001.zip", "https://cdn.example.org/keys/XX/1600000000-1600003600-00001.zip"),
    ("a/b/c/d", "https://cdn.example.org/keys/a/b/c/d"), ("f.bin", "https://cdn.example.org/keys/f.bin"),
    ("sp ace.zip", None), ("../x", None), ("a/../x", None), ("a//b", None), ("./x", None), ("/x", None),
    ("//evil.example/x", None), ("https://evil.example/x", None), ("x?y=1", None), ("x#y", None), ("a\\b", None),
    ("c:/x", None), ("", None),
])
def test_index_entries_resolve_under_the_base_or_are_refused(entry, url):
    from agent.sync.keyserver import export_url
    if url is None:
        with pytest.raises(ValueError):
            export_url("https://cdn.example.org/keys/", entry)
    else:
        assert export_url("https://cdn.example.org/keys/", entry) == url


@FUZZ
@given(st.text(max_size=60))
def test_fuzz_index_entries_never_leave_the_base(entry):
    from urllib.parse import urlsplit

    from agent.sync.keyserver import export_url
    base = "https://cdn.example.org/keys/"
    try:
        url = export_url(base, entry)
    except ValueError:
        return
    assert url.startswith(base) and urlsplit(url).netloc == "cdn.example.org" and "/../" not in url


def test_the_configured_export_cap_is_the_clients_default():
    from agent.config import SyncSection
    from agent.sync.keyserver import DEFAULT_MAX_EXPORT_BYTES
    assert SyncSection().max_export_bytes == DEFAULT_MAX_EXPORT_BYTES
    assert "max_export_bytes = 33554432" in __import__("agent.config", fromlist=["TEMPLATE"]).TEMPLATE
