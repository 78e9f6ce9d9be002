"""The backend alone over real HTTP on 127.0.0.1 (uvicorn in a thread), on SQLite and
PostgreSQL, on a manual clock: the verification and publish APIs, the lab API key, the
physicians' page, the export job's signed files and the ROBERT registration guard. The
ROBERT client side here is the pure protocol code only."""

import base64
import io
import random
import re
import zipfile

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock import DAY_SECONDS
from agent.protocol import export, gaen, robert
from agent.protocol.export import ReportType
from agent.protocol.gaen import TemporaryExposureKey
from agent.protocol.verification import tek_hmac
from backend import Backend, BackendConfig, db
from backend import verification as verification_module
from backend.errors import ApiError, Code
from backend.robert import SERVER_KEY_CONFIG, RobertConfig, RobertServer, contacts, registrations
from backend.server import BackgroundServer

from .conftest import database_url

pytestmark = pytest.mark.integration

HMAC_KEY = b"k" * 32





def api(url, path, body=None, raw=None, headers=None):
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={"content-type": "application/json", **(headers or {})})
    return httpx.post(url + path, json=body, headers=headers)


def keys_for(now, n_keys=2, seed=0):
    rs = gaen.rolling_start_for_day(now) - 144
    return [TemporaryExposureKey(bytes([seed * 16 + i]) * 16, rs - 144 * i, 144, 0) for i in range(n_keys)]


def publish_body(keys, cert, hmac_key=HMAC_KEY):
    return {"temporaryExposureKeys": [{"key": base64.b64encode(k.key_data).decode(),
                                       "rollingStartNumber": k.rolling_start_interval_number,
                                       "rollingPeriod": k.rolling_period, "transmissionRisk": k.transmission_risk_level}
                                      for k in keys],
            "healthAuthorityID": "x", "verificationPayload": cert, "hmacKey": base64.b64encode(hmac_key).decode(),
            "padding": ""}


def valid_publish(backend, now, n_keys=2, tamper_hmac=False, seed=0):
    """code -> token -> certificate in-process; the publish body."""
    code = backend.verification.issue_code("lab")["code"]
    token = backend.verification.verify_code(code, "t")["token"]
    keys = keys_for(now, n_keys, seed)
    mac = tek_hmac(HMAC_KEY, keys if not tamper_hmac else keys[:1])
    return publish_body(keys, backend.verification.certificate(token, mac)["certificate"])


def count(backend, table):
    with backend.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(table)).scalar()


# -- verify, certificate, publish --------------------------------------------------------

def test_verify_certificate_publish_over_http(backend, live, clock):
    url = live.url
    onset = gaen.rolling_start_for_day(clock.t) - 2 * 144
    issued = backend.verification.issue_code("lab", test_type="likely", symptom_onset_interval=onset)
    assert issued["expiresAtTimestamp"] == int(clock.t) + 15 * 60
    assert issued["longExpiresAtTimestamp"] == int(clock.t) + 86400
    assert issued["expiresAt"] == "Fri, 04 Oct 2024 09:15:00 UTC"  # RFC 1123, as the verification server
    r = api(url, "/api/verify", {"code": issued["code"], "accept": ["confirmed", "likely"]})
    assert r.status_code == 200
    v = r.json()
    assert v["testtype"] == "likely" and v["symptomDate"] == "2024-10-02" and "symptomOnsetInterval" not in v
    keys = keys_for(clock.t)
    r = api(url, "/api/certificate", {"token": v["token"], "ekeyhmac": tek_hmac(HMAC_KEY, keys)})
    assert r.status_code == 200 and "errorCode" not in r.json()
    body = publish_body(keys, r.json()["certificate"])
    r = api(url, "/v1/publish", body)
    assert r.status_code == 200
    answer = r.json()
    assert 1024 <= len(base64.b64decode(answer.pop("padding"))) < 2048
    assert answer == {"revisionToken": "", "insertedExposures": 2, "error": "", "code": ""}
    retry = api(url, "/v1/publish", body).json()
    retry.pop("padding")
    assert retry == answer  # an identical retry: the same answer
    with backend.engine.connect() as c:
        rows = c.execute(sa.select(db.exposures).order_by(db.exposures.c.rolling_start)).fetchall()
    assert [r.report_type for r in rows] == [ReportType.CONFIRMED_CLINICAL_DIAGNOSIS] * 2
    assert [r.days_since_onset for r in rows] == [0, 1]
    assert [r.health_authority for r in rows] == ["lab"] * 2
    assert all(r.export_after == clock.t for r in rows)  # yesterday's keys: no embargo
    # the public key endpoint gives the key the export files are signed with
    pk = httpx.get(url + "/v1/public-key").json()
    assert pk["publicKey"] == backend.public_key_b64 and pk["region"] == "XX" and pk["keyId"] == "ctagent"
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}


def test_token_and_certificate_negative_cases(backend, live, clock):
    url = live.url
    token = backend.verification.verify_code(backend.verification.issue_code("lab")["code"], "t")["token"]
    r = api(url, "/api/certificate", {"token": token, "ekeyhmac": base64.b64encode(b"short").decode()})
    assert r.status_code == 400 and r.json()["errorCode"] == "hmac_invalid"
    mac = tek_hmac(HMAC_KEY, keys_for(clock.t))
    assert api(url, "/api/certificate", {"token": token, "ekeyhmac": mac}).status_code == 200
    r = api(url, "/api/certificate", {"token": token, "ekeyhmac": mac})  # a token works once
    assert r.status_code == 400 and r.json()["errorCode"] == "token_invalid"
    late = backend.verification.verify_code(backend.verification.issue_code("lab")["code"], "t")["token"]
    clock.advance(11 * 60)
    assert api(url, "/api/certificate", {"token": late, "ekeyhmac": mac}).json()["errorCode"] == "token_invalid"

    body = valid_publish(backend, clock.t)
    clock.advance(16 * 60)
    r = api(url, "/v1/publish", body)
    assert r.status_code == 400 and r.json()["code"] == "certificate_expired"
    # a used certificate with other keys: they do not match its HMAC
    body = valid_publish(backend, clock.t, seed=1)
    assert api(url, "/v1/publish", body).status_code == 200
    other = publish_body(keys_for(clock.t, seed=2), body["verificationPayload"])
    assert api(url, "/v1/publish", other).json()["code"] == "hmac_mismatch"
    r = api(url, "/api/issue", {"testType": "negative"}, headers={"X-API-Key": backend.verification.add_api_key("l")})
    assert r.status_code == 400 and r.json()["errorCode"] == "bad_test_type"


def test_negative_cases_each_clear_and_nothing_stored(backend, live, clock):
    url = live.url
    code = backend.verification.issue_code("lab")["code"]
    assert api(url, "/api/verify", {"code": code}).status_code == 200
    r = api(url, "/api/verify", {"code": code})  # used: "code_invalid" as the verification server says it
    assert r.status_code == 400 and r.json() == {"errorCode": "code_invalid", "error": "the code was already used"}
    old = backend.verification.issue_code("lab")["code"]
    clock.advance(16 * 60)
    r = api(url, "/api/verify", {"code": old})
    assert r.json()["errorCode"] == "code_expired"
    r = api(url, "/api/verify", {"code": "12345678"})
    assert r.json()["errorCode"] == "code_invalid"
    r = api(url, "/api/verify", raw=b'{"code": "1234')
    assert r.status_code == 400 and r.json()["errorCode"] == "unparsable_request"
    r = api(url, "/api/verify", {"code": "12345678", "extra": 1})
    assert r.status_code == 400 and r.json()["errorCode"] == "invalid_request"

    body = valid_publish(backend, clock.t, tamper_hmac=True)
    r = api(url, "/v1/publish", body)
    assert r.status_code == 400 and r.json()["code"] == "hmac_mismatch"
    body = valid_publish(backend, clock.t)
    body["unknownField"] = True
    assert api(url, "/v1/publish", body).json()["code"] == "invalid_request"
    body = valid_publish(backend, clock.t)
    body["padding"] = "A" * 70_000
    r = api(url, "/v1/publish", body)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    body = valid_publish(backend, clock.t)
    body["temporaryExposureKeys"] = body["temporaryExposureKeys"] * 16  # 32 keys
    assert api(url, "/v1/publish", body).json()["code"] == "too_many_keys"
    body = valid_publish(backend, clock.t)
    body["temporaryExposureKeys"][0]["rollingPeriod"] = 145
    assert api(url, "/v1/publish", body).json()["code"] == "key_invalid"
    body = valid_publish(backend, clock.t)
    body["verificationPayload"] = body["verificationPayload"][:-4] + "AAAA"
    assert api(url, "/v1/publish", body).json()["code"] == "certificate_invalid"
    assert count(backend, db.exposures) == 0  # nothing partial from any rejected request

    body = valid_publish(backend, clock.t)
    r = api(url, "/v1/publish", body)
    assert r.status_code == 200 and r.json()["insertedExposures"] == 2
    r = api(url, "/v1/publish", body)  # an identical retry is idempotent
    assert r.status_code == 200 and count(backend, db.exposures) == 2


def test_keys_too_old_or_in_future(backend, live, clock):
    for rs, code in ((gaen.rolling_start_for_day(clock.t) - 17 * 144, "key_too_old"),
                     (gaen.en_interval_number(clock.t) + 10, "key_in_future")):
        token = backend.verification.verify_code(backend.verification.issue_code("lab")["code"], "t")["token"]
        keys = [TemporaryExposureKey(b"q" * 16, rs, 144, 0)]
        cert = backend.verification.certificate(token, tek_hmac(b"h" * 32, keys))["certificate"]
        body = {"temporaryExposureKeys": [{"key": base64.b64encode(b"q" * 16).decode(), "rollingStartNumber": rs,
                                           "rollingPeriod": 144}], "verificationPayload": cert,
                "hmacKey": base64.b64encode(b"h" * 32).decode()}
        assert api(live.url, "/v1/publish", body).json()["code"] == code


def test_lab_api_needs_key_and_rate_limits(backend, live):
    assert api(live.url, "/api/issue", {}).status_code == 401
    r = api(live.url, "/api/issue", {}, headers={"X-API-Key": "guess"})
    assert r.status_code == 401 and r.json()["errorCode"] == "unauthorized"
    key = backend.verification.add_api_key("lab-1")
    r = api(live.url, "/api/issue", {"testType": "confirmed"}, headers={"X-API-Key": key})
    assert r.status_code == 200 and len(r.json()["code"]) == 8 and len(r.json()["longCode"]) == 16
    backend.config.rate_verify_per_min = 3
    codes = [api(live.url, "/api/verify", {"code": "00000000"}).status_code for _ in range(4)]
    assert codes[-1] == 429


def test_long_code_outlives_the_short_one(backend, live, clock):
    c = backend.verification.issue_code("lab")
    clock.advance(3600)
    assert api(live.url, "/api/verify", {"code": c["code"]}).json()["errorCode"] == "code_expired"
    r = api(live.url, "/api/verify", {"code": c["longCode"].upper()})  # the long code is case-insensitive
    assert r.status_code == 200 and r.json()["token"]
    clock.advance(DAY_SECONDS)
    c = backend.verification.issue_code("lab")
    assert api(live.url, "/api/verify", {"code": c["longCode"]}).status_code == 200
    r = api(live.url, "/api/verify", {"code": c["code"]})  # short and long are one code: used once
    assert r.status_code == 400 and r.json()["error"] == "the code was already used"


# -- the physicians' page ----------------------------------------------------------------

def login_form(web):
    """The sign-in form's CSRF field (its cookie stays in ``web``)."""
    return {"csrf": re.search(r'name="csrf" value="([0-9a-f]+)"', web.get("/login").text).group(1)}


def test_physician_signs_in_and_issues_a_code(backend, live, clock):
    with httpx.Client(base_url=live.url) as web:
        r = web.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = web.post("/login", data={"username": "dr.who", "password": "wrong-password", **login_form(web)})
        assert r.status_code == 401 and "wrong user name or password" in r.text and "ctagent_session" not in web.cookies
        r = web.post("/login", data={"username": "dr.who", "password": "tardis-1963", **login_form(web)})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        r = web.get("/")
        assert r.status_code == 200 and "Signed in as dr.who" in r.text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text).group(1)

        r = web.post("/issue", data={"csrf": "0" * 64, "test_type": "confirmed"})  # forged form
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = web.post("/issue", data={"csrf": csrf, "onset": "last tuesday"})
        assert r.status_code == 400 and "not a date" in r.text
        r = web.post("/issue", data={"csrf": csrf, "test_type": "confirmed", "onset": "2024-10-01"})
        assert r.status_code == 200 and "<svg" in r.text and "valid 15 minutes" in r.text
        code = re.search(r'id="code">(\d{8})<', r.text).group(1)
        assert re.search(r'id="long-code">([a-z0-9]{16})<', r.text)
    v = api(live.url, "/api/verify", {"code": code}).json()
    assert v["testtype"] == "confirmed" and v["symptomDate"] == "2024-10-01"
    # without the cookie: back to the login page
    r = httpx.post(live.url + "/issue", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"


def test_login_is_rate_limited(backend, live):
    with httpx.Client(base_url=live.url) as web:
        # a name each: the per-address limit (one account's own back-off: test_backend_security)
        statuses = [web.post("/login", data={"username": f"user-{i}", "password": "guess-guess", **login_form(web)})
                    .status_code for i in range(11)]
    assert statuses == [401] * 10 + [429]


# -- the export job --------------------------------------------------------------------

def test_export_job_writes_verifiable_signed_files(backend, live, clock):
    today = gaen.rolling_start_for_day(clock.t)
    token = backend.verification.verify_code(backend.verification.issue_code("lab")["code"], "t")["token"]
    keys = [TemporaryExposureKey(b"a" * 16, today, 144, 0), TemporaryExposureKey(b"b" * 16, today - 144, 144, 0)]
    cert = backend.verification.certificate(token, tek_hmac(HMAC_KEY, keys))["certificate"]
    assert api(live.url, "/v1/publish", publish_body(keys, cert)).json()["insertedExposures"] == 2

    assert httpx.get(live.url + "/exports/index.txt").text == ""
    ticks = []
    files = backend.exports.run(progress=lambda done, total: ticks.append((done, total)))
    assert len(files) == 1 and ticks == [(1, 1)]  # yesterday's key at once; today's is embargoed
    clock.advance(DAY_SECONDS)
    assert backend.exports.run() != []  # today's key now
    listed = httpx.get(live.url + "/exports/index.txt")
    assert backend.exports.run() == []  # then nothing new: index.txt and its ETag as they were
    again = httpx.get(live.url + "/exports/index.txt", headers={"If-None-Match": listed.headers["etag"]})
    assert again.status_code == 304

    index = listed.text.split()
    assert len(index) == 2
    seen = []
    for name in index:
        r = httpx.get(f"{live.url}/exports/{name}")
        assert r.status_code == 200
        exp = export.parse_export(r.content, trusted_keys=[backend.public_key_b64])
        assert exp.verified and exp.verified_key_id == "ctagent" and exp.region == "XX"
        assert (exp.batch_num, exp.batch_size) == (1, 1) and len(exp.keys) == 50  # padded
        assert re.fullmatch(rf"{exp.start_timestamp}-{exp.end_timestamp}-\d+-00001\.zip", name)
        assert exp.end_timestamp % 3600 == 0 and exp.end_timestamp <= clock.t
        seen += [k for k in exp.keys if k.key_data in (b"a" * 16, b"b" * 16)]
    assert sorted(k.key_data for k in seen) == [b"a" * 16, b"b" * 16]
    assert all(k.report_type is ReportType.CONFIRMED_TEST for k in seen)
    assert count(backend, db.batches) == 2

    # a stranger's key does not verify; neither does a tampered file
    stranger = export.public_key_b64(ec.generate_private_key(ec.SECP256R1()))
    data = (backend.config.exports_dir / index[0]).read_bytes()
    with pytest.raises(export.ExportSignatureError):
        export.parse_export(data, trusted_keys=[stranger])
    b, s = export.unzip_export(data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("export.bin", b[:-1] + bytes([b[-1] ^ 1]))
        z.writestr("export.sig", s)
    with pytest.raises(export.ExportSignatureError):
        export.parse_export(buf.getvalue(), trusted_keys=[backend.public_key_b64])


def test_export_splits_large_batches_and_prunes_the_index(backend, live, clock):
    for seed in range(3):
        assert api(live.url, "/v1/publish", valid_publish(backend, clock.t, n_keys=5, seed=seed)).status_code == 200
    backend.config.export_max_keys = 20
    clock.advance(3600)
    files = backend.exports.run()
    assert len(files) == 3  # 50 keys (15 real, padded), 20 per file
    parsed = [export.parse_export((backend.config.exports_dir / f).read_bytes(), trusted_keys=[backend.public_key_b64])
              for f in files]
    assert [(e.batch_num, e.batch_size, len(e.keys)) for e in parsed] == [(1, 1, 20), (1, 1, 20), (1, 1, 10)]
    assert len({k.key_data for e in parsed for k in e.keys}) == 50
    assert httpx.get(live.url + "/exports/index.txt").text.split() == files
    clock.advance(15 * DAY_SECONDS)  # past the retention period: out of the index
    assert backend.exports.run() == []
    assert httpx.get(live.url + "/exports/index.txt").text == ""


# -- ROBERT --------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def robert_world(request, tmp_path, clock):
    backend = Backend(BackendConfig(tmp_path / "b", database_url=database_url(request)), clock=clock)
    rs = RobertServer(backend, RobertConfig(register_api_key="s3cret", register_per_min=3, min_status_interval_s=1500))
    with BackgroundServer(backend, robert_server=rs) as srv:
        yield backend, rs, srv
    backend.engine.dispose()


def server_key(reg):
    """The server's public key from a registration answer's config (backend.robert.SERVER_KEY_CONFIG)."""
    (key,) = [p["value"] for p in reg["config"] if p["name"] == SERVER_KEY_CONFIG]
    return key


def register(url, private, api_key="s3cret"):
    return httpx.post(url + "/api/v6/register", json={"clientPublicECDHKey": robert.public_key_b64(private)},
                      headers={"X-API-Key": api_key} if api_key else {})


def auth_body(keys, reg, prefix, now):
    ntp = robert.ntp_seconds(now)
    epoch = robert.epoch_id(ntp, reg["timeStart"])
    (t,) = [t for t in robert.decrypt_tuples(keys.k_tuples, reg["tuples"]) if t.epoch == epoch]
    return {"ebid": base64.b64encode(t.ebid).decode(), "epochId": epoch,
            "time": base64.b64encode((ntp & 0xFFFFFFFF).to_bytes(4, "big")).decode(),
            "mac": base64.b64encode(robert.request_mac(keys.k_mac, prefix, t.ebid, epoch, ntp)).decode()}


def test_robert_registration_guard_and_status(robert_world, clock, tmp_path):
    backend, rs, srv = robert_world
    private = ec.generate_private_key(ec.SECP256R1())
    r = register(srv.url, private, api_key=None)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized" and "X-API-Key" in r.json()["error"]
    r = register(srv.url, private)
    assert r.status_code == 201  # as robert-server's RegisterController
    reg = r.json()
    assert server_key(reg) == rs.server_public_key and reg["timeStart"] == rs.start_ntp
    keys = robert.ecdh_keys(private, server_key(reg))
    assert len(robert.decrypt_tuples(keys.k_tuples, reg["tuples"])) == rs.cfg.tuples_epochs
    r = httpx.post(srv.url + "/api/v6/register", json={"clientPublicECDHKey": "bm9wZQ=="},
                   headers={"X-API-Key": "s3cret"})
    assert r.status_code == 400 and r.json()["code"] == "key_invalid"  # was "invalid_key"
    r = httpx.post(srv.url + "/api/v6/register", json={"clientPublicECDHKey": "x"}, headers={"X-API-Key": "s3cret"})
    assert r.status_code == 400
    r = register(srv.url, private)
    assert r.status_code == 429 and r.json()["code"] == "rate_limited"
    clock.advance(60)
    assert register(srv.url, private).status_code == 201  # the window slid
    assert count(backend, registrations) == 2

    # status: authenticated, not replayable, not too frequent
    body = auth_body(keys, reg, robert.PREFIX_STATUS, clock.t)
    forged = dict(body, mac=base64.b64encode(bytes(32)).decode())
    r = httpx.post(srv.url + "/api/v6/status", json=forged)
    assert r.status_code == 401 and r.json()["code"] == "bad_mac"
    r = httpx.post(srv.url + "/api/v6/status", json=body)
    assert r.status_code == 200 and r.json()["riskLevel"] == 0 and "lastContactDate" not in r.json()
    r = httpx.post(srv.url + "/api/v6/status", json=body)
    assert r.status_code == 400 and r.json()["code"] == "replayed"
    clock.advance(60)
    r = httpx.post(srv.url + "/api/v6/status", json=auth_body(keys, reg, robert.PREFIX_STATUS, clock.t))
    assert r.status_code == 429 and r.json()["code"] == "too_frequent"
    r = httpx.post(srv.url + "/api/v6/status", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "unparsable_request"
    r = httpx.post(srv.url + "/api/v6/status", json=[1, 2])
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    clock_doc = httpx.get(srv.url + "/api/v6/clock").json()
    assert clock_doc == {"serviceStartDate": "2024-10-04", "time": "2024-10-04T09:02:00.000Z",
                         "epoch": rs.current_epoch()}

    # the server keys are sealed at rest and survive a restart
    again = RobertServer(Backend(BackendConfig(tmp_path / "b", database_url=backend.config.database_url), clock=clock))
    assert again.k_s == rs.k_s and again.server_public_key == rs.server_public_key
    assert b"k_s" not in (tmp_path / "b" / "robert-keys.enc").read_bytes()
    again.engine.dispose()


def test_robert_report_claims_a_code_once(robert_world, clock):
    backend, _, srv = robert_world
    bob = ec.generate_private_key(ec.SECP256R1())
    reg_b = register(srv.url, bob).json()
    keys_b = robert.ecdh_keys(bob, server_key(reg_b))
    ntp = robert.ntp_seconds(clock.t)
    epoch = robert.epoch_id(ntp, reg_b["timeStart"])
    (t,) = [t for t in robert.decrypt_tuples(keys_b.k_tuples, reg_b["tuples"]) if t.epoch == epoch]
    hellos = []
    for i in range(10):  # what a contact heard from bob, every 4 s
        h = robert.parse_hello(robert.build_hello(keys_b.k_mac, t.ecc, t.ebid, ntp + 4 * i))
        hellos.append({"timeCollectedOnDevice": ntp + 4 * i, "timeFromHelloMessage": h.time16,
                       "mac": base64.b64encode(h.mac).decode(), "rssiCalibrated": -50})
    hellos.append(dict(hellos[0], mac=base64.b64encode(bytes(5)).decode()))  # forged: dropped
    contacts_in = [{"ebid": base64.b64encode(t.ebid).decode(), "ecc": base64.b64encode(t.ecc).decode(), "ids": hellos}]
    code = backend.verification.issue_code("lab")["code"]
    r = httpx.post(srv.url + "/api/v6/report", json={"token": code, "contacts": [{"ebid": "!!"}]})
    assert r.status_code == 400 and count(backend, contacts) == 0  # malformed: the code is not claimed
    r = httpx.post(srv.url + "/api/v6/report", json={"token": code, "contacts": contacts_in})
    assert r.status_code == 200
    answer = r.json()
    assert answer.pop("reportValidationToken").count(".") == 2  # a JWT, as robert-server's
    assert answer == {"success": True, "message": "Successful operation", "accepted": 10, "dropped": 1}
    assert count(backend, contacts) == 10
    r = httpx.post(srv.url + "/api/v6/report", json={"token": code, "contacts": contacts_in})
    assert r.status_code == 400 and r.json()["code"] == "code_used" and count(backend, contacts) == 10
    # a proximity list may be far larger than the other routes' bodies
    big = {"token": "x", "contacts": [], "pad": "A" * 100_000}
    assert httpx.post(srv.url + "/api/v6/report", json=big).json()["code"] == "code_invalid"
    assert httpx.post(srv.url + "/api/v6/status", json=big).status_code == 413


def test_a_code_that_collides_with_a_stored_one_is_drawn_again(backend, monkeypatch):
    """A drawn code whose short or long form is stored already is not inserted and another
    is drawn; when every draw collides the answer is 503 code_space_exhausted and nothing
    is stored."""
    first = backend.verification.issue_code("lab")
    draws = iter([int(first["code"]), 12345678])  # the stored code, then a new one
    monkeypatch.setattr(verification_module.secrets, "randbelow", lambda _n: next(draws))
    second = backend.verification.issue_code("lab")
    assert second["code"] == "12345678"

    monkeypatch.setattr(verification_module.secrets, "randbelow", lambda _n: 12345678)
    with pytest.raises(ApiError) as refused:
        backend.verification.issue_code("lab")
    assert refused.value.code is Code.CODE_SPACE_EXHAUSTED
    with backend.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(db.codes)).scalar_one() == 2
    # the long code collides alone: drawn again as well
    distinct = random.Random(7)
    monkeypatch.setattr(verification_module.secrets, "randbelow", distinct.randrange)
    monkeypatch.setattr(verification_module.secrets, "choice", lambda seq: seq[0])
    long_first = backend.verification.issue_code("lab")
    with pytest.raises(ApiError) as refused:
        backend.verification.issue_code("lab")
    assert refused.value.code is Code.CODE_SPACE_EXHAUSTED and long_first["longCode"] == "a" * 16


def test_a_code_and_a_token_raced_from_eight_threads_are_each_used_once(backend):
    """Eight verifications of one code at once: one token, seven code_invalid; eight
    certificate requests with that token at once: one certificate, seven token_invalid.
    (On PostgreSQL each is one statement: the claim and its token, the token's use and its
    certificate; on SQLite one transaction.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    v = backend.verification
    code = v.issue_code("lab")["code"]
    gate = threading.Barrier(8)

    def at_once(call):
        gate.wait()
        try:
            return call()
        except ApiError as e:
            return e.code

    with ThreadPoolExecutor(8) as pool:
        verified = list(pool.map(lambda i: at_once(lambda: v.verify_code(code, f"client-{i}")), range(8)))
    tokens = [r["token"] for r in verified if isinstance(r, dict)]
    assert len(tokens) == 1 and sorted(r for r in verified if not isinstance(r, dict)) == [Code.CODE_INVALID] * 7
    ekeyhmac = base64.b64encode(bytes(32)).decode()
    with ThreadPoolExecutor(8) as pool:
        certified = list(pool.map(lambda _: at_once(lambda: v.certificate(tokens[0], ekeyhmac)), range(8)))
    assert sum(isinstance(r, dict) for r in certified) == 1
    assert [r for r in certified if not isinstance(r, dict)] == [Code.TOKEN_INVALID] * 7
    with backend.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(db.tokens)).scalar_one() == 1
        assert c.execute(sa.select(sa.func.count()).select_from(db.certificates)).scalar_one() == 1
