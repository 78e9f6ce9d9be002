"""The backend's pure parts: publish validation, certificates, export planning and
padding, error codes, rate limits. No server, no database."""

import ast
import base64
import pathlib
import random
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock import DAY_SECONDS, ManualClock
from agent.errors import CtagentError
from agent.protocol import export, gaen
from agent.protocol.export import ReportType
from agent.protocol.gaen import TemporaryExposureKey
from agent.protocol.verification import tek_hmac
from backend import certificate
from backend.certificate import CertificateClaims
from backend.errors import ApiError, Code
from backend.exports import (
    BatchWindow,
    file_name,
    padding_keys,
    plan_batches,
    split_batches,
    stored_key,
)
from backend.publish import (
    MAX_KEY_AGE_DAYS,
    MAX_KEYS_PER_PUBLISH,
    MAX_ONSET_DAYS,
    MAX_ONSET_REPORT_DAYS,
    ValidatedPublish,
    check_key_count,
    embargo_end,
    onset_plausible,
    symptom_onset,
    validate_publish,
)
from backend import ratelimit
from backend.ratelimit import (
    LOGIN_BACKOFF_FIRST_S,
    LOGIN_BACKOFF_MAX_S,
    LOGIN_FAILURES_KEPT_S,
    LOGIN_FREE_FAILURES,
    WINDOW_S,
    LoginBackoff,
    RateLimiter,
)
from backend.verification import date_interval as onset_interval

NOW = 20_000 * DAY_SECONDS + 9 * 3600  # 09:00 UTC
TODAY = gaen.rolling_start_for_day(NOW)
HMAC_KEY = b"h" * 32
BACKEND_DIR = pathlib.Path(__file__).parent.parent / "backend"


def tek(i: int, rs: int = TODAY - 144, rp: int = 144, tr: int = 0) -> TemporaryExposureKey:
    return TemporaryExposureKey(bytes([i]) * 16, rs, rp, tr)


def request_for(keys, *, hmac_key=HMAC_KEY, **extra) -> dict:
    return {"temporaryExposureKeys": [{"key": base64.b64encode(k.key_data).decode(),
                                       "rollingStartNumber": k.rolling_start_interval_number,
                                       "rollingPeriod": k.rolling_period, "transmissionRisk": k.transmission_risk_level}
                                      for k in keys],
            "hmacKey": base64.b64encode(hmac_key).decode(), "healthAuthorityID": "req-ha", **extra}


def claims_for(keys, **kw) -> CertificateClaims:
    return CertificateClaims(jti="j1", tekmac=tek_hmac(HMAC_KEY, keys), **kw)


def rejected(code: Code, request: dict, claims: CertificateClaims, now: float = NOW) -> None:
    with pytest.raises(ApiError) as e:
        validate_publish(request, claims, now)
    assert e.value.code is code and e.value.status == 400


# -- publish validation ---------------------------------------------------------------

def test_valid_publish_gives_typed_keys():
    keys = [tek(1), tek(2, TODAY - 3 * 144, tr=5)]
    onset = TODAY - 2 * 144
    v = validate_publish(request_for(keys), claims_for(keys, test_type="likely", symptom_onset_interval=onset,
                                                       health_authority="lab"), NOW)
    assert isinstance(v, ValidatedPublish) and v.jti == "j1" and v.health_authority == "lab"
    assert v.report_type is ReportType.CONFIRMED_CLINICAL_DIAGNOSIS and v.symptom_onset_interval == onset
    assert [k.key_data for k in v.keys] == [k.key_data for k in keys]
    assert [k.transmission_risk_level for k in v.keys] == [0, 5]
    assert [k.days_since_onset_of_symptoms for k in v.keys] == [1, -1]
    assert all(k.report_type is ReportType.CONFIRMED_CLINICAL_DIAGNOSIS for k in v.keys)


def test_publish_defaults_and_fallbacks():
    keys = [tek(1)]
    body = request_for(keys)
    del body["temporaryExposureKeys"][0]["rollingPeriod"], body["temporaryExposureKeys"][0]["transmissionRisk"]
    v = validate_publish(body, claims_for(keys), NOW)
    assert v.report_type is ReportType.CONFIRMED_TEST  # no test type in the certificate
    assert v.health_authority == "req-ha"  # no health authority in the certificate
    assert v.symptom_onset_interval is None and v.keys[0].days_since_onset_of_symptoms is None
    # the certificate's onset (signed) wins over the request's (outside its HMAC) ...
    v = validate_publish(request_for(keys, symptomOnsetInterval=TODAY - 144),
                         claims_for(keys, symptom_onset_interval=TODAY - 5 * 144), NOW)
    assert v.keys[0].days_since_onset_of_symptoms == 4
    # ... and the request's is taken when the certificate has none
    v = validate_publish(request_for(keys, symptomOnsetInterval=TODAY - 144), claims_for(keys), NOW)
    assert v.keys[0].days_since_onset_of_symptoms == 0


def test_key_age_limits_are_inclusive():
    oldest = gaen.en_interval_number(NOW) - MAX_KEY_AGE_DAYS * 144
    now_enin = gaen.en_interval_number(NOW)
    for k in (tek(1, oldest - 144), tek(1, now_enin)):  # expired exactly at the limit; starts right now
        validate_publish(request_for([k]), claims_for([k]), NOW)
    k = tek(1, oldest - 145)
    rejected(Code.KEY_TOO_OLD, request_for([k]), claims_for([k]))
    k = tek(1, TODAY - 17 * 144)
    rejected(Code.KEY_TOO_OLD, request_for([k]), claims_for([k]))
    k = tek(1, now_enin + 1)
    rejected(Code.KEY_IN_FUTURE, request_for([k]), claims_for([k]))


@pytest.mark.parametrize("rp", [0, 145, -1])
def test_bad_rolling_period(rp):
    k = tek(1, rp=rp)
    rejected(Code.KEY_INVALID, request_for([k]), claims_for([k]))


@pytest.mark.parametrize("key", [base64.b64encode(b"x" * 15).decode(), base64.b64encode(b"x" * 17).decode(),
                                 "not base64!", ""])
def test_bad_key_data(key):
    k = tek(1)
    body = request_for([k])
    body["temporaryExposureKeys"][0]["key"] = key
    rejected(Code.KEY_INVALID, body, claims_for([k]))


def test_duplicate_key():
    keys = [tek(1), tek(1, TODAY - 2 * 144)]
    rejected(Code.KEY_DUPLICATE, request_for(keys), claims_for(keys))


def test_hmac_mismatch_and_bad_hmac_key():
    keys = [tek(1), tek(2)]
    rejected(Code.HMAC_MISMATCH, request_for(keys), claims_for(keys[:1]))
    rejected(Code.HMAC_MISMATCH, request_for(keys, hmac_key=b"other" * 7), claims_for(keys))
    changed = [tek(1), tek(2, tr=3)]  # a field the HMAC covers
    rejected(Code.HMAC_MISMATCH, request_for(changed), claims_for(keys))
    body = request_for(keys)
    body["hmacKey"] = "***"
    rejected(Code.HMAC_KEY_INVALID, body, claims_for(keys))


@pytest.mark.parametrize("onset", [2**40, -(2**40), 2**31 - 1, TODAY + 2 * 144, TODAY - 40 * 144, "x", True])
def test_an_implausible_request_onset_is_ignored(onset):
    """Outside the certificate and its HMAC: never a reason for a number out of range."""
    keys = [tek(1), tek(2, TODAY - 3 * 144)]
    v = validate_publish(request_for(keys, symptomOnsetInterval=onset), claims_for(keys), NOW)
    assert v.symptom_onset_interval is None
    assert [k.days_since_onset_of_symptoms for k in v.keys] == [None, None]
    assert len(v.keys) == 2 and v.warnings == ()


def test_onset_plausibility_window():
    earliest = TODAY - MAX_ONSET_REPORT_DAYS * 144
    now_enin = gaen.en_interval_number(NOW)
    assert onset_plausible(earliest, NOW) and onset_plausible(now_enin, NOW)
    assert not onset_plausible(earliest - 1, NOW) and not onset_plausible(now_enin + 1, NOW)
    assert symptom_onset(None, 0, NOW) is None and symptom_onset(0, None, NOW) is None  # 0: none
    assert symptom_onset(TODAY + 144, TODAY - 144, NOW) == TODAY - 144  # an implausible certificate onset
    assert symptom_onset(TODAY - 2 * 144, TODAY - 144, NOW) == TODAY - 2 * 144


def test_keys_beyond_14_days_from_the_onset_are_not_saved():
    keys = [tek(1, TODAY - 144), tek(2, TODAY - 15 * 144)]
    v = validate_publish(request_for(keys), claims_for(keys, symptom_onset_interval=TODAY), NOW)
    assert [k.key_data for k in v.keys] == [keys[0].key_data]
    assert [k.days_since_onset_of_symptoms for k in v.keys] == [-1]
    assert v.warnings == (f"key 1 is 15 days from the symptom onset (over {MAX_ONSET_DAYS}): not saved",)
    k = tek(1, TODAY - 14 * 144)  # exactly 14 days: saved
    assert validate_publish(request_for([k]), claims_for([k], symptom_onset_interval=TODAY),
                            NOW).keys[0].days_since_onset_of_symptoms == -14


@pytest.mark.parametrize("field,value", [("transmissionRisk", 9), ("transmissionRisk", -1),
                                         ("transmissionRisk", "3"), ("rollingStartNumber", 2**40 + 0.5),
                                         ("rollingPeriod", None), ("rollingStartNumber", True)])
def test_every_number_of_a_key_is_checked(field, value):
    k = tek(1)
    body = request_for([k])
    body["temporaryExposureKeys"][0][field] = value
    rejected(Code.KEY_INVALID, body, claims_for([k]))


def test_api_models_bound_every_number_to_32_bits():
    from pydantic import ValidationError

    from backend.api import IssueRequest, PublishRequest
    body = request_for([tek(1)], verificationPayload="c", symptomOnsetInterval=2**31 - 1)
    PublishRequest(**body)
    for where, value in (("symptomOnsetInterval", 2**31), ("symptomOnsetInterval", -1)):
        with pytest.raises(ValidationError):
            PublishRequest(**dict(body, **{where: value}))
    for field in ("rollingStartNumber", "rollingPeriod"):
        bad = dict(body, temporaryExposureKeys=[dict(body["temporaryExposureKeys"][0], **{field: 2**40})])
        with pytest.raises(ValidationError):
            PublishRequest(**bad)
    with pytest.raises(ValidationError):
        IssueRequest(symptomOnsetInterval=2**40)


def _row(**kw):
    base = {"id": 7, "key_data": b"\x01" * 16, "rolling_start": TODAY, "rolling_period": 144,
            "transmission_risk": 0, "report_type": 1, "days_since_onset": None}
    return SimpleNamespace(**{**base, **kw})


def test_stored_key_of_a_good_row():
    assert stored_key(_row()).rolling_start_interval_number == TODAY
    assert stored_key(_row(days_since_onset=-(2**31))).days_since_onset_of_symptoms == -(2**31)


@pytest.mark.parametrize("field,value", [("days_since_onset", 2**40), ("days_since_onset", 2**31),
                                         ("rolling_start", 2**31), ("rolling_start", -1), ("rolling_period", 145),
                                         ("report_type", 99), ("key_data", b"\x01" * 15),
                                         ("transmission_risk", 2**40)])
def test_stored_key_refuses_what_an_export_file_cannot_hold(field, value):
    with pytest.raises(ValueError) as e:
        stored_key(_row(**{field: value}))
    assert "\\x01" not in str(e.value) and "AQEB" not in str(e.value)  # no key bytes in the reason


def test_first_failing_key_is_named():
    keys = [tek(1), tek(2, rp=200)]
    with pytest.raises(ApiError, match="key 1"):
        validate_publish(request_for(keys), claims_for(keys), NOW)


def test_key_count():
    check_key_count([None] * MAX_KEYS_PER_PUBLISH)
    with pytest.raises(ApiError) as e:
        check_key_count([None] * (MAX_KEYS_PER_PUBLISH + 1))
    assert e.value.code is Code.TOO_MANY_KEYS


def test_embargo_until_the_key_expired():
    v = validate_publish(request_for([tek(1, TODAY)]), claims_for([tek(1, TODAY)]), NOW)
    assert embargo_end(v.keys[0], NOW) == (TODAY + 144) * 600  # today's key: at midnight
    v = validate_publish(request_for([tek(1)]), claims_for([tek(1)]), NOW)
    assert embargo_end(v.keys[0], NOW) == NOW  # yesterday's key: at once


# -- certificates -----------------------------------------------------------------------

def test_certificate_round_trip_expiry_and_wrong_key():
    key = ec.generate_private_key(ec.SECP256R1())
    tok = certificate.sign(key, key_version="v1", jti="abc", tekmac="m", test_type="likely",
                           symptom_onset_interval=None, health_authority="lab", now=NOW, ttl_s=900)
    c = certificate.read(tok, key.public_key(), NOW + 899)
    assert c == CertificateClaims("abc", "m", "likely", None, "lab")
    assert c.report_type is ReportType.CONFIRMED_CLINICAL_DIAGNOSIS
    with pytest.raises(ApiError) as e:
        certificate.read(tok, key.public_key(), NOW + 901)
    assert e.value.code is Code.CERTIFICATE_EXPIRED
    with pytest.raises(ApiError) as e:
        certificate.read(tok, ec.generate_private_key(ec.SECP256R1()).public_key(), NOW)
    assert e.value.code is Code.CERTIFICATE_INVALID
    with pytest.raises(ApiError) as e:
        certificate.read("not.a.jwt", key.public_key(), NOW)
    assert e.value.code is Code.CERTIFICATE_INVALID


def _jwt_with_payload(payload: bytes) -> str:
    return "x." + base64.urlsafe_b64encode(payload).decode() + ".y"


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "x.!!!!.y", _jwt_with_payload(b"[" * 6000),
                                   _jwt_with_payload(b'"iss"'), _jwt_with_payload(b"\xff\xfe")])
def test_a_malformed_certificate_is_refused_in_one_sentence(token):
    """The issuer is read before the one verified decoding: whatever the token holds (no
    JWT, no base64, no JSON object, JSON nested past the parser's recursion), the answer
    is ``certificate_invalid``, never an exception of the parser."""
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ApiError) as e:
        certificate.read(token, key.public_key(), NOW)
    assert e.value.code is Code.CERTIFICATE_INVALID


# -- exports ------------------------------------------------------------------------------

H = 3600


def test_plan_first_run_covers_one_period():
    assert plan_batches(None, 10 * H + 59, H) == BatchWindow(9 * H, 10 * H)
    assert plan_batches(None, 10 * H, H) == BatchWindow(9 * H, 10 * H)  # exactly on a boundary


def test_plan_continues_from_the_last_batch():
    assert plan_batches(7 * H, 10 * H + 1, H) == BatchWindow(7 * H, 10 * H)  # a gap: one longer window
    assert plan_batches(9 * H, 10 * H, H) == BatchWindow(9 * H, 10 * H)


def test_plan_nothing_when_the_period_is_covered():
    assert plan_batches(10 * H, 10 * H + 3599, H) is None
    assert plan_batches(11 * H, 10 * H + 5, H) is None  # the clock went back


def test_plan_other_period():
    assert plan_batches(None, 1_000_000, 6 * H) == BatchWindow(1_000_000 // (6 * H) * 6 * H - 6 * H,
                                                               1_000_000 // (6 * H) * 6 * H)


def test_split_batches():
    assert split_batches([], 3) == []
    assert split_batches([1, 2, 3], 3) == [[1, 2, 3]]
    assert split_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert file_name(BatchWindow(10, 20), 7, 2) == "10-20-7-00002.zip"  # the batch's id: unique per batch


def test_padding_keys_copy_the_real_keys_but_their_bytes():
    real = [export.DiagnosisKey(bytes([i]) * 16, TODAY - (i + 1) * 144, 144, 0, ReportType.CONFIRMED_TEST, i - 2)
            for i in range(5)]
    keys = padding_keys(500, real, random.Random(7))
    assert len(keys) == 500 and len({k.key_data for k in keys}) == 500
    assert not {k.key_data for k in keys} & {k.key_data for k in real}
    fields = {(k.rolling_start_interval_number, k.rolling_period, k.transmission_risk_level, k.report_type,
               k.days_since_onset_of_symptoms) for k in real}
    for k in keys:
        k.validate()
        assert (k.rolling_start_interval_number, k.rolling_period, k.transmission_risk_level, k.report_type,
                k.days_since_onset_of_symptoms) in fields
    assert padding_keys(3, real, random.Random(7)) == keys[:3]  # the random source decides everything
    assert padding_keys(0, [], random.Random(7)) == []
    with pytest.raises(ValueError):
        padding_keys(1, [], random.Random(7))
    # they survive an export file
    signing = ec.generate_private_key(ec.SECP256R1())
    blob = export.build_export(keys, signing_key=signing, start_timestamp=0, end_timestamp=1, region="XX")
    assert export.parse_export(blob, trusted_keys=[export.public_key_b64(signing)]).keys == tuple(keys)


# -- error codes -------------------------------------------------------------------------

def _backend_sources():
    return {p.name: p.read_text() for p in sorted(BACKEND_DIR.glob("*.py"))}


def test_every_api_error_uses_a_code_constant():
    calls = 0
    for name, src in _backend_sources().items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("ApiError", "error_response"):
                calls += 1
                first = node.args[0] if node.args else None
                ok = (isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name)
                      and first.value.id == "Code" and first.attr in Code.__members__)
                ok = ok or (name in ("errors.py", "httputil.py", "app.py")
                            and isinstance(first, (ast.Name, ast.Attribute)))
                assert ok, f"{name}:{node.lineno}: the code must be a Code constant"
    assert calls > 30


def test_no_code_spelled_as_a_string_outside_errors_module():
    values = {c.value for c in Code}
    for name, src in _backend_sources().items():
        if name == "errors.py":
            continue
        literals = {n.value for n in ast.walk(ast.parse(src))
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & values, f"{name} spells {literals & values} as strings"


def test_every_code_used_somewhere_and_statuses():
    src = "\n".join(s for n, s in _backend_sources().items() if n != "errors.py")
    assert [c for c in Code if f"Code.{c.name}" not in src] == []
    assert len({c.value for c in Code}) == len(Code)
    assert Code.RATE_LIMITED.status == 429 and Code.TOO_FREQUENT.status == 429
    assert Code.BODY_TOO_LARGE.status == 413
    assert {c for c in Code if c.status == 401} == {Code.UNAUTHORIZED, Code.BAD_LOGIN, Code.BAD_MAC}
    assert {c for c in Code if c.status == 503} == {Code.CODE_SPACE_EXHAUSTED, Code.ID_SPACE_EXHAUSTED}
    e = ApiError(Code.CODE_USED, "the code was already used")
    assert isinstance(e, CtagentError) and e.status == 400 and str(e) == e.message
    assert e.body() == {"code": "code_used", "error": "the code was already used"}


# -- rate limits, page helpers -----------------------------------------------------------

def test_rate_limiter_sliding_minute():
    clock = ManualClock(NOW)
    lim = RateLimiter(clock)
    lim.check("verify", "a", 2)
    clock.advance(30)
    lim.check("verify", "a", 2)
    with pytest.raises(ApiError) as e:
        lim.check("verify", "a", 2)
    assert e.value.code is Code.RATE_LIMITED and e.value.status == 429
    lim.check("verify", "b", 2)  # per client
    lim.check("issue", "a", 2)  # per bucket
    clock.advance(30)  # the first request left the window
    lim.check("verify", "a", 2)


def test_rate_limiter_forgets_idle_clients():
    """60,000 one-off clients held 45 MB for good."""
    import gc
    import tracemalloc

    clock = ManualClock(NOW)
    lim = RateLimiter(clock)
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(60_000):
            lim.check("verify", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 20)
            if i % 10_000 == 0:
                clock.advance(1)
        busy = tracemalloc.get_traced_memory()[0]
        clock.advance(WINDOW_S)
        lim.check("verify", "192.0.2.1", 20)
        gc.collect()
        idle = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(lim) == 1
    assert idle < busy / 20 and idle < 1_000_000, f"{busy / 1e6:.1f} MB busy, {idle / 1e6:.1f} MB idle"


def test_rate_limiter_counts_exactly_when_threads_share_it():
    """The routes run on a thread pool: under load the limiter failed a request
    ("OrderedDict mutated during iteration", a 500 in benchmarks.bench_load), and two
    threads could each miss the other's count, a way past the limit."""
    import sys
    import threading

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        clock = ManualClock(NOW)
        lim = RateLimiter(clock)
        accepted, errors = [], []

        def client(n: int) -> None:
            for i in range(400):
                try:
                    lim.check("verify", "shared", 1000)
                    accepted.append(1)
                except ApiError:
                    pass
                except Exception as e:  # the unlocked table's failures
                    errors.append(e)
                lim.check("verify", f"own-{n}-{i}", 1000)
                if i % 50 == 0:
                    clock.advance(0.001)  # old clients leave: each check walks the table's head

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors and len(accepted) == 1000


def test_rate_limiter_holds_at_most_its_cap(monkeypatch):
    monkeypatch.setattr(ratelimit, "MAX_TRACKED", 100)
    clock = ManualClock(NOW)
    lim = RateLimiter(clock)
    for i in range(1000):
        lim.check("login", f"c{i}", 1)
    assert len(lim) == 100
    with pytest.raises(ApiError):
        lim.check("login", "c999", 1)  # the most recent are the ones kept


def test_login_backoff_doubles_up_to_its_cap_and_forgets():
    clock = ManualClock(NOW)
    b = LoginBackoff(clock)
    for _ in range(LOGIN_FREE_FAILURES - 1):
        b.check("dr.who")
        b.failed("dr.who")
    b.check("dr.who")  # still free
    waits = []
    for _ in range(7):
        b.failed("dr.who")
        start = clock.t
        while True:
            try:
                b.check("dr.who")
                break
            except ApiError as e:
                assert e.code is Code.RATE_LIMITED and "this account" in e.message
                clock.advance(30)
        waits.append(clock.t - start)
    assert waits == [LOGIN_BACKOFF_FIRST_S * 2**i for i in range(4)] + [LOGIN_BACKOFF_MAX_S] * 3
    b.check("someone-else")  # per account name
    b.succeeded("dr.who")
    b.failed("dr.who")
    b.check("dr.who")  # a success starts the count afresh
    clock.advance(LOGIN_FAILURES_KEPT_S)
    b.check("x")
    assert len(b) == 0  # old failures are forgotten


def test_onset_interval():
    assert onset_interval("2024-10-01") == gaen.rolling_start_for_day(1_727_740_800)
    with pytest.raises(ValueError):
        onset_interval("yesterday")


# -- chaff ---------------------------------------------------------------------------------

async def test_chaff_is_answered_in_the_time_and_size_of_a_real_answer():
    """ChaffMiddleware times and measures real answers; chaff is held until the time a real
    answer took (one drawn from the last 100) and padded to its size."""
    import json

    from backend.chaff import ChaffMiddleware, ChaffTracker

    now, slept = [0.0], []

    async def sleep(s):
        slept.append(round(s, 6))

    async def real_route(scope, receive, send):  # the route takes 0.25 s, answers 1,800 bytes
        now[0] += 0.25
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 1800})

    tracker = ChaffTracker(timer=lambda: now[0], sleep=sleep, rng=random.Random(1))
    mw = ChaffMiddleware(real_route, tracker)
    scope = {"type": "http", "method": "POST", "path": "/v1/publish", "headers": []}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def ignore(message):
        pass
    await mw(scope, receive, ignore)
    sent = []

    async def keep(message):
        sent.append(message)
        now[0] += 0.01  # answering takes a little time; the wait was decided before
    chaff = dict(scope, headers=[(b"x-chaff", b"1")])
    now[0] += 0.05  # reading the body
    await mw(chaff, receive, keep)
    assert slept == [0.25]  # 0.25 s from the start of the request, as the real answer took
    body = sent[1]["body"]
    assert sent[0]["status"] == 200 and abs(len(body) - 1800) <= 2
    assert set(json.loads(body)) == {"revisionToken", "insertedExposures", "error", "code", "padding"}


def test_a_serving_process_moves_its_start_up_objects_out_of_the_collectors_reach(tmp_path, monkeypatch):
    """A full collection walked every module, route and model of the app: 90-220 ms with
    the GIL held in a worker under load (benchmarks.bench_load), every request in flight
    stalled. The workers of ``backend serve --workers`` build their app frozen
    (``gc.freeze``); what requests make is all a collection walks."""
    import gc

    from backend import Backend, BackendConfig
    from backend.server import WORKER_SETTINGS_ENV, worker_app, worker_settings

    config = BackendConfig(tmp_path / "backend")
    Backend(config, clock=ManualClock(NOW)).engine.dispose()
    monkeypatch.setenv(WORKER_SETTINGS_ENV, worker_settings(config, 2, None))
    gc.unfreeze()
    try:
        worker_app()
        assert gc.get_freeze_count() > 10_000  # the interpreter's modules and the app
    finally:
        gc.unfreeze()


def test_daemon_threads_run_work_and_reuse_idle_threads_up_to_the_limit():
    import threading
    import time
    from concurrent.futures import wait

    from backend.httputil import DaemonThreads

    pool = DaemonThreads(max_workers=3, name="t")
    assert [pool.submit(lambda x: x * 2, i).result(5) for i in range(20)] == [i * 2 for i in range(20)]
    assert pool._threads == 1  # one after the other: the idle thread took each
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    gate = threading.Event()
    running = [pool.submit(gate.wait, 5) for _ in range(5)]
    time.sleep(0.2)
    assert pool._threads == 3  # five waiting, three threads: the limit
    gate.set()
    done, _ = wait(running, timeout=5)
    assert len(done) == 5 and all(f.result() for f in done)


@pytest.mark.integration
def test_a_blocked_daemon_thread_does_not_keep_the_process_from_exiting():
    """A stopping server exits while a thread is still blocked (on a database that stopped
    answering): ThreadPoolExecutor would join it at exit."""
    import subprocess
    import sys
    import time

    code = ("import time; from backend.httputil import DaemonThreads\n"
            "DaemonThreads(2, 't').submit(time.sleep, 60); time.sleep(0.1); print('exiting', flush=True)")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "exiting" in out.stdout and time.monotonic() - started < 15
