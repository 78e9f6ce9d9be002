"""Contract with TousAntiCovid's robert-server (robert-server-ws-rest), both ways:

- our client against robert-server: a stand-in serves exactly what the Kotlin controllers
  answer (201 on register with ``config: []`` and no server key, status with
  ``riskLevel`` and NTP-string dates and no ``atRisk``, report with ``success`` only),
  and the ROBERT mode registers, refreshes its identifiers, finds the risk and reports;
- our server against robert-server's shapes: every answer has the fields and types the
  Kotlin controllers write (``tests/data/interop/robert-server-api.json``, copied from
  them with their paths), plus only the extensions ``backend.robert.EXTENSIONS`` names;
- the app's side: the HELLO's version byte (1, as TousAntiCovid sends), and the code
  formats its report screen takes (6 alphanumeric characters or a UUID).
"""

import base64
import datetime as dt
import json
import pathlib
import random
import re

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ConfigError
from agent.modes.base import DeviceContext
from agent.modes.robert import RobertMode
from agent.protocol import robert
from backend import Backend, BackendConfig
from backend.robert import EXTENSIONS, RobertConfig, RobertServer
from backend.server import BackgroundServer

SHAPES = json.loads((pathlib.Path(__file__).parent / "data/interop/robert-server-api.json").read_text())
#: robert-server's RegisterController.kt answer: no key in it; the app has it built in
START_NTP = robert.ntp_seconds(1_727_740_800)  # the service started 2024-10-01 00:00 UTC


def of_type(value, kind: str) -> bool:
    if kind == "base64":
        return isinstance(value, str) and base64.b64decode(value, validate=True) is not None
    if kind == "ntp-string":
        return isinstance(value, str) and len(value) == 10 and value.isdigit()
    if kind == "date":
        return isinstance(value, str) and dt.date.fromisoformat(value) is not None
    if kind == "date-time":
        return isinstance(value, str) and value.endswith("Z") and dt.datetime.fromisoformat(value) is not None
    return isinstance(value, {"int": int, "str": str, "list": list, "bool": bool}[kind]) and not (
        kind == "int" and isinstance(value, bool))


def assert_shape(doc: dict, shape: str, extensions: frozenset[str] = frozenset()) -> None:
    fields = SHAPES[shape]["fields"]
    assert set(doc) - set(extensions) == set(fields), (shape, sorted(doc))
    for name, kind in fields.items():
        assert of_type(doc[name], kind), (shape, name, doc[name])


# -- our client against robert-server ------------------------------------------------------

class RobertServerDouble:
    """Answers as robert-server's controllers do, with the real protocol underneath (its
    keys, SKINNY EBIDs, sealed tuples); records the requests it got."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.public_key_b64 = robert.public_key_b64(self.private)
        self.skinny = robert.Skinny64_192(b"s" * 24)
        self.k_g = b"g" * 32
        self.requests: list[tuple[str, dict]] = []
        self.keys: robert.SessionKeys | None = None
        self.at_risk = False

    def _tuples(self) -> str:
        assert self.keys is not None
        first = robert.epoch_id(robert.ntp_seconds(self.clock.t), START_NTP)
        tuples = []
        for e in range(first, first + 96):
            ebid = self.skinny.encrypt(e.to_bytes(3, "big") + b"\x00\x00\x00\x00\x07")
            tuples.append(robert.Tuple(e, ebid, robert.make_ecc(self.k_g, ebid, 0x21)))
        return robert.encrypt_tuples(self.keys.k_tuples, tuples)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v6")
        body = json.loads(request.content) if request.content else {}
        self.requests.append((path, body))
        if path == "/register":  # RegisterController.kt
            self.keys = robert.ecdh_keys(self.private, body["clientPublicECDHKey"])
            return httpx.Response(201, json={"tuples": self._tuples(), "timeStart": START_NTP, "config": []})
        if path == "/status":  # StatusController.kt
            answer = {"tuples": self._tuples(), "config": [], "riskLevel": 0, "analyticsToken": "a.b.c"}
            if self.at_risk:
                ntp = robert.ntp_seconds(self.clock.t)
                answer.update(riskLevel=4, lastContactDate=str(ntp - 86_400), lastRiskScoringDate=str(ntp),
                              declarationToken="d.e.f")
            return httpx.Response(200, json=answer)
        if path == "/report":  # ReportController.kt
            return httpx.Response(200, json={"success": True, "message": "Successful operation",
                                             "reportValidationToken": "r.s.t"})
        return httpx.Response(404)


@pytest.fixture
def against_robert_server(clock, new_store):
    double = RobertServerDouble(clock)
    http = httpx.Client(transport=httpx.MockTransport(double))

    def mode(server_key: str, name: str = "phone") -> RobertMode:
        return RobertMode(DeviceContext(store=new_store(name), clock=clock, backend_url="https://robert.example/",
                                        rng=random.Random(1), http=http, http_retries=0,
                                        server_public_key=server_key, captcha=("ABCDE", "captcha-id-1")))
    yield double, mode
    http.close()


def test_our_client_registers_with_robert_server(against_robert_server, clock):
    double, mode = against_robert_server
    phone = mode(double.public_key_b64)
    phone.prepare(clock.t)
    assert phone.registered
    path, body = double.requests[0]
    assert path == "/register" and set(SHAPES["RegisterRequest"]["required"]) <= set(body)
    assert (body["captcha"], body["captchaId"]) == ("ABCDE", "captcha-id-1")
    assert phone.broadcast(clock.t) is not None  # the identifiers of robert-server's tuples are on the air


def test_without_the_servers_key_registration_says_which_setting(against_robert_server, clock):
    _, mode = against_robert_server
    with pytest.raises(ConfigError, match="robert_server_public_key"):
        mode("").prepare(clock.t)


def test_our_client_reads_robert_servers_status_and_report(against_robert_server, clock):
    double, mode = against_robert_server
    phone = mode(double.public_key_b64)
    phone.prepare(clock.t)
    clock.advance(3600)
    check = phone.check(clock.t)
    assert check.exposed is False
    path, body = double.requests[-1]
    assert path == "/status" and set(SHAPES["AuthentifiedRequest"]["required"]) <= set(body)
    double.at_risk = True
    clock.advance(2 * robert.EPOCH_SECONDS)
    check = phone.check(clock.t)
    assert check.exposed is True
    assert [e.protocol for e in phone.store.exposures.all()] == ["robert"]
    other = mode(double.public_key_b64, "other")
    other.prepare(clock.t)
    phone.record(clock.t, phone.decode({robert.ROBERT_SERVICE_UUID: other.broadcast(clock.t).service_data}), -50)
    result = phone.declare("ABC123", clock.t)  # robert-server answers success only
    assert result.sent == 1 and result.accepted is None and "accepted the report" in result.summary
    path, body = double.requests[-1]
    assert path == "/report" and set(body) == {"token", "contacts"} and len(body["contacts"]) == 1


# -- our server against robert-server's shapes ------------------------------------------------

@pytest.fixture
def our_server(tmp_path, clock):
    backend = Backend(BackendConfig(tmp_path / "b"), clock=clock)
    rs = RobertServer(backend, RobertConfig(min_status_interval_s=1500))
    with BackgroundServer(backend, robert_server=rs) as srv:
        yield backend, rs, srv
    backend.engine.dispose()


def official_register(url: str, private) -> httpx.Response:
    """RegisterRequest as the app sends it (openapi-robert-server-v1.yml)."""
    return httpx.post(url + "/api/v6/register", json={
        "captcha": "ABCDE", "captchaId": "0d4b9c6c9a5b4a8e9c2f0c1b2a3d4e5f",
        "clientPublicECDHKey": robert.public_key_b64(private),
        "pushInfo": {"token": "push-token", "locale": "fr-FR", "timezone": "Europe/Paris"}})


@pytest.mark.integration
def test_our_server_answers_robert_servers_shapes(our_server, clock, new_store):
    backend, rs, srv = our_server
    private = ec.generate_private_key(ec.SECP256R1())
    r = official_register(srv.url, private)
    assert r.status_code == 201
    reg = r.json()
    assert_shape(reg, "RegisterSuccessResponse")
    r = httpx.get(srv.url + "/api/v6/clock")
    assert r.status_code == 200
    assert_shape(r.json(), "ClockResponse")

    # two devices of ours through our server: bob's HELLOs put alice at risk
    def device(name):
        mode = RobertMode(DeviceContext(store=new_store(name), clock=clock, backend_url=srv.url, http_retries=0,
                                        rng=random.Random(len(name))))
        mode.prepare(clock.t)
        return mode
    alice, bob = device("alice"), device("bob")
    for _ in range(20 * 15):
        sd = bob.broadcast(clock.t).service_data
        alice.record(clock.t, alice.decode({robert.ROBERT_SERVICE_UUID: sd}), -45)
        clock.advance(4)
    keys = robert.ecdh_keys(private, rs.server_public_key)
    status = httpx.post(srv.url + "/api/v6/status", json=_auth(keys, reg, clock.t)).json()
    assert_shape(status, "ExposureStatusResponse.none", EXTENSIONS["status"])
    code = backend.verification.issue_code("lab", code_format="robert")["code"]
    report = httpx.post(srv.url + "/api/v6/report", json=_report_body(alice, code, clock.t))
    assert report.status_code == 200
    assert_shape(report.json(), "ReportBatchResponse", EXTENSIONS["report"])
    clock.advance(2 * robert.EPOCH_SECONDS)
    status = httpx.post(srv.url + "/api/v6/status", json=bob.client._auth(bob.registration, robert.PREFIX_STATUS,
                                                                            clock.t)).json()
    assert status["riskLevel"] == 4
    assert_shape(status, "ExposureStatusResponse.high", EXTENSIONS["status"])


def _auth(keys, reg, now):
    ntp = robert.ntp_seconds(now)
    epoch = robert.epoch_id(ntp, reg["timeStart"])
    (t,) = [t for t in robert.decrypt_tuples(keys.k_tuples, reg["tuples"]) if t.epoch == epoch]
    return {"ebid": base64.b64encode(t.ebid).decode(), "epochId": epoch,
            "time": base64.b64encode((ntp & 0xFFFFFFFF).to_bytes(4, "big")).decode(),
            "mac": base64.b64encode(robert.request_mac(keys.k_mac, robert.PREFIX_STATUS, t.ebid, epoch, ntp)).decode()}


def _report_body(mode: RobertMode, code: str, now: float) -> dict:
    """The report our client would send (ReportBatchRequest), built by the client itself."""
    sent: dict = {}
    mode.flush(now)

    def capture(path, body, headers=None):
        sent.update(body)
        return {"success": True}
    original = mode.client.transport.post_json
    mode.client.transport.post_json = capture  # type: ignore[method-assign]
    try:
        mode.client.report(code, mode._hellos_to_report(now))
    finally:
        mode.client.transport.post_json = original  # type: ignore[method-assign]
    return sent


# -- the app's side: HELLO version byte, report codes ----------------------------------------

def test_the_hello_is_broadcast_with_version_1(against_robert_server, clock):
    double, mode = against_robert_server
    phone = mode(double.public_key_b64)
    phone.prepare(clock.t)
    sd = phone.broadcast(clock.t).service_data
    assert len(sd) == 18 and sd[16] == 1  # HELLO (16) ‖ version ‖ TX power


@pytest.mark.integration
@pytest.mark.parametrize("which", ["code", "longCode"])
@pytest.mark.parametrize("case", [str, str.lower, str.upper])
def test_reports_take_the_apps_code_formats(our_server, clock, which, case):
    backend, _, srv = our_server
    issued = backend.verification.issue_code("lab", code_format="robert")
    assert re.fullmatch(r"[A-Z0-9]{6}", issued["code"])
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", issued["longCode"])
    r = httpx.post(srv.url + "/api/v6/report", json={"token": case(issued[which]), "contacts": []})
    assert r.status_code == 200 and r.json()["success"] is True
    r = httpx.post(srv.url + "/api/v6/report", json={"token": case(issued[which]), "contacts": []})
    assert r.status_code == 400 and r.json()["code"] == "code_used"  # once
