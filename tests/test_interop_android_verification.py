"""Contract with the Exposure Notifications reference app (google/exposure-notifications-
android) and the verification server it talks to (google/exposure-notifications-
verification-server ``pkg/api/api.go``, ``docs/api.md``): each request below is built
exactly as the app builds it (``tests/official_clients.py``, a port of its request
builders), sent over HTTP to our backend, and the answer is checked against what the
app reads from it (``DiagnosisAttestor.captureVerificationCodeResponse``,
``captureCertResponse``, ``DiagnosisKeyUploader.captureRevisionToken``, the ``errorCode``
of an error). Official shape in, our behaviour out."""

import datetime as dt
import json
import pathlib

import httpx
import pytest
import sqlalchemy as sa

from agent.protocol import gaen
from agent.protocol.gaen import TemporaryExposureKey
from backend import db

from . import official_clients as app

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("backend", ["sqlite"], indirect=True)]

#: the verification server's documented shapes (docs/api.md), with their source
SHAPES = json.loads((pathlib.Path(__file__).parent / "data/interop/verification-server-api.json").read_text())


def post(live, path, body, **kw):
    return httpx.post(live.url + path, content=app.body_bytes(body), headers=app.headers(**kw))


def keys(now, n=3):
    """What the app gets from getTemporaryExposureKeyHistory: whole UTC days, risk 0."""
    today = gaen.rolling_start_for_day(now)
    return [TemporaryExposureKey(bytes([0x40 + i]) * 16, today - 144 * (i + 1), 144, 0) for i in range(n)]


def test_the_apps_requests_are_padded_to_5000_bytes(backend, live, clock):
    body = app.verify_body("12345678")
    assert len(app.body_bytes(body)) >= app.TARGET_PAYLOAD_SIZE_BYTES and body["padding"]
    assert set(body) == set(SHAPES["VerifyCodeRequest"]["fields"])


def test_a_whole_declaration_as_the_app_makes_it(backend, live, clock):
    onset = dt.date(2024, 10, 2)  # the ManualClock stands at 2024-10-04 09:00 UTC
    code = backend.verification.issue_code("lab", symptom_onset_interval=app.onset_interval(onset))["code"]
    r = post(live, "/api/verify", app.verify_body(code))
    assert r.status_code == 200, r.text
    v = r.json()
    # what captureVerificationCodeResponse reads: testtype, token, symptomDate (LocalDate.parse)
    assert v["testtype"] == "confirmed" and v["token"]
    assert dt.date.fromisoformat(v["symptomDate"]) == onset
    assert set(v) <= set(SHAPES["VerifyCodeResponse"]["fields"])
    hmac_key, tek = app.new_hmac_key(), keys(clock.t)
    r = post(live, "/api/certificate", app.certificate_body(v["token"], tek, hmac_key))
    assert r.status_code == 200, r.text
    assert set(r.json()) <= set(SHAPES["VerificationCertificateResponse"]["fields"])
    cert = r.json()["certificate"]
    r = post(live, "/v1/publish", app.publish_body(tek, cert, hmac_key, symptom_onset=onset, traveler=True))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["insertedExposures"] == 3 and "revisionToken" in answer  # captureRevisionToken reads it
    with backend.engine.connect() as c:
        dso = sorted(r.days_since_onset for r in c.execute(sa.select(db.exposures)))
    assert dso == [-1, 0, 1]  # keys of Oct 1, 2, 3 against an onset on Oct 2


@pytest.mark.parametrize(("setup", "status", "error_code"), [
    ("used", 400, "code_invalid"),       # "Code invalid or used" (docs/api.md)
    ("expired", 400, "code_expired"),
    ("unknown", 400, "code_invalid"),
    ("likely_for_confirmed_only", 412, "unsupported_test_type"),
])
def test_errors_carry_the_error_code_the_app_reads(backend, live, clock, setup, status, error_code):
    v = backend.verification
    accept = None
    if setup == "used":
        code = v.issue_code("lab")["code"]
        v.verify_code(code, "x")
    elif setup == "expired":
        code = v.issue_code("lab")["code"]
        clock.advance(16 * 60)
    elif setup == "unknown":
        code = "00000000"
    else:
        code, accept = v.issue_code("lab", test_type="likely")["code"], ["confirmed"]
    body = app.verify_body(code) if accept is None else app.add_padding({"code": code, "accept": accept})
    r = post(live, "/api/verify", body)
    assert r.status_code == status
    doc = r.json()
    assert set(doc) == set(SHAPES["ErrorReturn"]["fields"]) and doc["errorCode"] == error_code and doc["error"]


def test_a_refused_test_type_leaves_the_code_usable(backend, live, clock):
    code = backend.verification.issue_code("lab", test_type="likely")["code"]
    r = post(live, "/api/verify", app.add_padding({"code": code, "accept": ["confirmed"]}))
    assert r.status_code == 412
    r = post(live, "/api/verify", app.add_padding({"code": code, "accept": ["likely"]}))  # likely => confirmed too
    assert r.status_code == 200 and r.json()["testtype"] == "likely"


def test_accept_names_only_known_types(backend, live, clock):
    code = backend.verification.issue_code("lab")["code"]
    r = post(live, "/api/verify", app.add_padding({"code": code, "accept": ["positive"]}))
    assert r.status_code == 400 and r.json()["errorCode"] == "invalid_test_type"


def test_certificate_errors_as_the_app_reads_them(backend, live, clock):
    r = post(live, "/api/certificate", app.certificate_body("not-a-token", keys(clock.t), app.new_hmac_key()))
    assert r.status_code == 400 and r.json()["errorCode"] == "token_invalid"
    r = post(live, "/api/certificate", app.add_padding({"token": "t", "ekeyhmac": "c2hvcnQ="}))
    assert r.status_code == 400 and r.json()["errorCode"] == "hmac_invalid"


def test_issue_api_takes_the_verification_servers_request(backend, live, clock):
    key = backend.verification.add_api_key("lab")
    body = {**SHAPES["IssueCodeRequest"]["example"], "symptomDate": "2024-10-01", "testDate": "2024-10-03"}
    r = httpx.post(live.url + "/api/issue", json=body, headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    issued = r.json()
    assert set(SHAPES["IssueCodeResponse"]["fields"]) - {"uuid", "padding", "error", "errorCode"} <= set(issued)
    assert issued["expiresAt"].endswith(" UTC") and issued["expiresAtTimestamp"] == int(clock.t) + 15 * 60
    v = backend.verification.verify_code(issued["code"], "x")
    assert v["symptomDate"] == "2024-10-01"  # the symptom date wins over the test date, as there


# -- chaff (X-Chaff: 1) ------------------------------------------------------------------------

def test_chaff_as_the_app_sends_it_looks_like_success_and_changes_nothing(backend, live, clock):
    """The app's cover traffic (UploadCoverTrafficWorker): a fake code, token and keys,
    padded like real requests, with X-Chaff: 1. The answers are success-shaped and the size
    of real answers; no code is used and no key stored."""
    code = backend.verification.issue_code("lab")["code"]
    real = post(live, "/api/verify", app.verify_body(code))  # one real answer to look like
    assert real.status_code == 200
    spare = backend.verification.issue_code("lab")["code"]
    r = post(live, "/api/verify", app.verify_body(spare), cover_traffic=True)
    assert r.status_code == 200 and set(r.json()) == {"testtype", "token", "padding"}
    assert abs(len(r.content) - len(real.content)) <= 3
    assert post(live, "/api/verify", app.verify_body(spare)).status_code == 200  # the chaffed code was not used
    tek = keys(clock.t)
    r = post(live, "/api/certificate", app.certificate_body("fake-token", tek, app.new_hmac_key()), cover_traffic=True)
    assert r.status_code == 200 and r.json()["certificate"].count(".") == 2
    r = post(live, "/v1/publish", app.publish_body(tek, "fake.cert.ificate", app.new_hmac_key()), cover_traffic=True)
    assert r.status_code == 200 and r.json()["insertedExposures"] == 0
    with backend.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(db.exposures)).scalar() == 0

