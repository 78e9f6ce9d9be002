"""Contract with Google's Exposure Notifications key server (google/exposure-notifications-
server) and the certificates of the verification server: what it computes from a publish
request (days since onset, the two HMAC forms), the certificates it accepts (an outside
verification server's, without ``jti``), what its export files look like (one batch per
file, padding that cannot be told from real keys). Each case takes the official shape or
value, with the file it comes from, and checks what our backend makes of it."""

import base64
import datetime as dt

import pytest

from agent.protocol import gaen
from backend.publish import days_between_intervals
from backend.verification import date_interval

DAY = gaen.TEK_ROLLING_PERIOD
D = date_interval("2024-10-04")  # a UTC midnight


def at(date: str, hh: int = 0, mm: int = 0) -> int:
    """The ENIntervalNumber of a UTC time (Go's IntervalNumber: floor of Unix seconds / 600)."""
    t = dt.datetime.fromisoformat(date).replace(hour=hh, minute=mm, tzinfo=dt.UTC).timestamp()
    return gaen.en_interval_number(t)


# -- days since onset -------------------------------------------------------------------------

# (name, onset, key start, days since onset). The first names are Google's
# TestDaysFromSymptomOnset cases (internal/publish/model/exposure_model_test.go) with the
# onset at UTC midnight, where both rounding rules agree; "basic_v1_publish_*" are the keys
# of its TestTransform "basic_v1_publish" (capture 2020-02-29 11:15:01 UTC, keys one day
# apart from there, onset defaulted to 4 days before the batch time of 2020-03-07, rounded
# down to its UTC midnight: want -3, -2, -1, 0); the last ones are the off-by-one of
# issue 12.3 (an onset late in the day against a key of that day).
DAYS_SINCE_ONSET = [
    ("exact_match", D, D, 0),
    ("next_day", D, D + DAY, 1),
    ("next_day_round_down", D, D + DAY + 66, 1),  # +35 h from the onset: 11:00 the next day
    ("previous_day", D, D - DAY, -1),
    ("previous_day_round_down", D, D - DAY - 6, -2),  # -25 h: 23:00 two days before, by the UTC day
    ("multiple_days", D, D + 8 * DAY + 12, 8),  # +8 days 2 h
    *[(f"basic_v1_publish_{i}", date_interval("2020-03-03"), at("2020-02-29", 11, 10) + i * DAY, want)
      for i, want in enumerate((-3, -2, -1, 0))],
    ("onset_late_in_the_day_key_of_that_day", at("2024-10-04", 14, 30), D, 0),  # was -1
    ("onset_at_23_50_key_of_the_next_day", at("2024-10-04", 23, 50), D + DAY, 1),  # was 0
    ("key_started_mid_day_on_the_onset_day", D, at("2024-10-04", 14), 0),
]


@pytest.mark.parametrize(("name", "onset", "key_start", "want"), DAYS_SINCE_ONSET,
                         ids=[c[0] for c in DAYS_SINCE_ONSET])
def test_days_since_onset_count_utc_days(name, onset, key_start, want):
    assert days_between_intervals(onset, key_start) == want


def test_previous_day_rounding_differs_from_nearest_day_rounding_only_off_midnight():
    """Google's own "previous_day_round_down" (-25 h from an onset at any time -> -1) is a
    nearest-day rule; by UTC days an onset at midnight and a key 25 hours before it are two
    days apart. Keys start at UTC midnight, so this only matters for keys that do not."""
    assert days_between_intervals(D + 72, D + 72 - DAY - 6) == -1  # onset at noon: both rules say -1
    assert days_between_intervals(D, D - DAY - 6) == -2


def test_a_publish_labels_keys_with_the_days_since_the_onset_day(backend_units_publish):
    keys, onset = backend_units_publish
    assert [k.days_since_onset_of_symptoms for k in keys] == [0, -1, 1]
    assert onset == at("2024-10-04", 14, 30)


@pytest.fixture
def backend_units_publish():
    """A publish validated at 2024-10-05 12:00 with an onset at 14:30 on Oct 4: keys of
    Oct 4, 3 and 5."""
    from agent.protocol.gaen import TemporaryExposureKey
    from agent.protocol.verification import tek_hmac
    from backend.certificate import CertificateClaims
    from backend.publish import validate_publish

    now = dt.datetime(2024, 10, 5, 12, tzinfo=dt.UTC).timestamp()
    hmac_key = b"h" * 32
    keys = [TemporaryExposureKey(bytes([i + 1]) * 16, D + d * DAY, DAY, 0) for i, d in enumerate((0, -1, 1))]
    onset = at("2024-10-04", 14, 30)
    body = {"temporaryExposureKeys": [{"key": base64.b64encode(k.key_data).decode(),
                                       "rollingStartNumber": k.rolling_start_interval_number,
                                       "rollingPeriod": k.rolling_period, "transmissionRisk": 0} for k in keys],
            "hmacKey": base64.b64encode(hmac_key).decode()}
    v = validate_publish(body, CertificateClaims("j", tek_hmac(hmac_key, keys), symptom_onset_interval=onset), now)
    return v.keys, v.symptom_onset_interval


# -- the two HMAC forms ----------------------------------------------------------------------

def google_hmacs(keys, secret: bytes) -> list[str]:
    """pkg/verification/utils.go CalculateAllAllowedExposureKeyHMAC, line by line: sort by
    the base64 key, "%s.%d.%d.%d" (and "%s.%d.%d" while every risk is 0), join with ","."""
    import hashlib
    import hmac

    keys = sorted(keys, key=lambda k: base64.b64encode(k.key_data).decode())
    per_key = [f"{base64.b64encode(k.key_data).decode()}.{k.rolling_start_interval_number}.{k.rolling_period}."
               f"{k.transmission_risk_level}" for k in keys]
    alt = [f"{base64.b64encode(k.key_data).decode()}.{k.rolling_start_interval_number}.{k.rolling_period}"
           for k in keys]
    out = [hmac.new(secret, ",".join(per_key).encode(), hashlib.sha256).digest()]
    if all(k.transmission_risk_level == 0 for k in keys):
        out.append(hmac.new(secret, ",".join(alt).encode(), hashlib.sha256).digest())
    return [base64.b64encode(m).decode() for m in out]


def publish_validation(keys, tekmac: str, secret: bytes = b"s" * 32):
    from backend.certificate import CertificateClaims
    from backend.publish import validate_publish

    now = dt.datetime(2024, 10, 5, 12, tzinfo=dt.UTC).timestamp()
    body = {"temporaryExposureKeys": [{"key": base64.b64encode(k.key_data).decode(),
                                       "rollingStartNumber": k.rolling_start_interval_number,
                                       "rollingPeriod": k.rolling_period,
                                       "transmissionRisk": k.transmission_risk_level} for k in keys],
            "hmacKey": base64.b64encode(secret).decode()}
    return validate_publish(body, CertificateClaims("j", tekmac), now)


@pytest.mark.parametrize("form", [0, 1], ids=["key.rsin.rp.tr", "key.rsin.rp"])
def test_both_hmac_forms_publish_keys_of_risk_0(form):
    from agent.protocol.gaen import TemporaryExposureKey

    keys = [TemporaryExposureKey(bytes([i + 7]) * 16, D - i * DAY, DAY, 0) for i in range(3)]
    assert len(publish_validation(keys, google_hmacs(keys, b"s" * 32)[form]).keys) == 3


def test_the_3_field_form_is_refused_once_a_risk_is_not_0():
    from agent.protocol.gaen import TemporaryExposureKey
    from backend.errors import ApiError, Code

    keys = [TemporaryExposureKey(b"\x07" * 16, D, DAY, 0), TemporaryExposureKey(b"\x08" * 16, D - DAY, DAY, 3)]
    assert len(google_hmacs(keys, b"s" * 32)) == 1  # Google computes no 3-field form here either
    three_fields = google_hmacs([TemporaryExposureKey(k.key_data, k.rolling_start_interval_number, DAY, 0)
                                 for k in keys], b"s" * 32)[1]
    with pytest.raises(ApiError) as e:
        publish_validation(keys, three_fields)
    assert e.value.code is Code.HMAC_MISMATCH
    assert len(publish_validation(keys, google_hmacs(keys, b"s" * 32)[0]).keys) == 2


# -- certificates of an outside verification server -------------------------------------------

OUTSIDE_ISSUER, OUTSIDE_AUDIENCE = "gov.example.verification", "gov.example.keyserver"


def outside_certificate(private_key, tekmac: str, now: float, **claims) -> str:
    """A certificate exactly as the verification server signs it
    (pkg/controller/certapi/certificate.go HandleCertificate): reportType,
    symptomOnsetInterval when the code had a date, tekmac, aud, iss, iat, exp (+15 min),
    nbf (-1 s), the key id in ``kid``; no ``jti``. trisk and testDateInterval as
    pkg/api/v1 VerificationClaims allows them."""
    import jwt

    body = {"reportType": "confirmed", "symptomOnsetInterval": 0, "testDateInterval": 0, "trisk": [],
            "tekmac": tekmac, "aud": OUTSIDE_AUDIENCE, "iss": OUTSIDE_ISSUER, "iat": int(now),
            "exp": int(now) + 15 * 60, "nbf": int(now) - 1, **claims}
    return jwt.encode(body, private_key, algorithm="ES256", headers={"kid": "v1"})


@pytest.fixture
def outside(tmp_path, clock):
    """A backend trusting an outside verification server, served over HTTP."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from backend import Backend, BackendConfig
    from backend.server import BackgroundServer

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "verifier.pem"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    b = Backend(BackendConfig(tmp_path / "b", outside_verifiers=((OUTSIDE_ISSUER, OUTSIDE_AUDIENCE, str(pem)),)),
                clock=clock)
    with BackgroundServer(b) as srv:
        yield b, srv, key
    b.engine.dispose()


def android_publish(keys, cert, secret: bytes):
    from . import official_clients as app

    return app.body_bytes(app.publish_body(keys, cert, base64.b64encode(secret).decode()))


@pytest.mark.integration
def test_an_outside_verification_servers_certificate_publishes_keys(outside, clock):
    import httpx
    import sqlalchemy as sa

    from agent.protocol.gaen import TemporaryExposureKey
    from backend import db

    backend, srv, key = outside
    today = gaen.rolling_start_for_day(clock.t)
    keys = [TemporaryExposureKey(bytes([0x50 + i]) * 16, today - (i + 1) * DAY, DAY, 0) for i in range(2)]
    secret = b"q" * 32
    cert = outside_certificate(key, google_hmacs(keys, secret)[1], clock.t, reportType="likely",
                               symptomOnsetInterval=today - 2 * DAY)
    r = httpx.post(srv.url + "/v1/publish", content=android_publish(keys, cert, secret))
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["insertedExposures"] == 2
    again = httpx.post(srv.url + "/v1/publish", content=android_publish(keys, cert, secret)).json()
    assert {**again, "padding": ""} == {**first, "padding": ""}  # a retry: the first answer
    with backend.engine.connect() as c:
        rows = c.execute(sa.select(db.exposures).order_by(db.exposures.c.rolling_start)).fetchall()
    assert [(r.report_type, r.days_since_onset, r.health_authority) for r in rows] == [
        (2, 0, OUTSIDE_ISSUER), (2, 1, OUTSIDE_ISSUER)]
    # another certificate of that server for other keys is a new publish
    more = [TemporaryExposureKey(b"\x60" * 16, today - 3 * DAY, DAY, 0)]
    r = httpx.post(srv.url + "/v1/publish", content=android_publish(
        more, outside_certificate(key, google_hmacs(more, secret)[0], clock.t), secret))
    assert r.status_code == 200 and r.json()["insertedExposures"] == 1


@pytest.mark.integration
@pytest.mark.parametrize(("change", "code"), [
    ({"iss": "someone.else"}, "certificate_invalid"),
    ({"aud": "another.keyserver"}, "certificate_invalid"),
    ({"reportType": "negative"}, "certificate_invalid"),
    ({"nbf": 10**10}, "certificate_invalid"),
    ({"exp": 1}, "certificate_expired"),
])
def test_an_outside_certificate_is_checked_as_the_key_server_checks_it(outside, clock, change, code):
    import httpx

    from agent.protocol.gaen import TemporaryExposureKey

    _, srv, key = outside
    keys = [TemporaryExposureKey(b"\x61" * 16, gaen.rolling_start_for_day(clock.t) - DAY, DAY, 0)]
    cert = outside_certificate(key, google_hmacs(keys, b"q" * 32)[0], clock.t, **change)
    r = httpx.post(srv.url + "/v1/publish", content=android_publish(keys, cert, b"q" * 32))
    assert r.status_code == 400 and r.json()["code"] == code


def test_serve_refuses_an_outside_verifier_key_it_cannot_read(tmp_path):
    from click.testing import CliRunner

    import cli

    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    r = CliRunner().invoke(cli.main, ["backend", "--data-dir", str(tmp_path / "b"), "serve", "--trust-verifier",
                                      OUTSIDE_ISSUER, OUTSIDE_AUDIENCE, str(bad)])
    assert r.exit_code == 1 and "is not a PEM public key" in r.output


# -- export.proto -----------------------------------------------------------------------------

def test_export_proto_numbers_what_google_numbers_and_reserves_what_it_reserves():
    """internal/pb/export/export.proto: SignatureInfo reserves 1 and 2 (app_bundle_id,
    android_package); TemporaryExposureKey fields 1-6; variant_of_concern is field 8."""
    from agent.protocol import export_pb2 as pb

    key = pb.TemporaryExposureKey.DESCRIPTOR
    assert {f.name: f.number for f in key.fields} == {
        "key_data": 1, "transmission_risk_level": 2, "rolling_start_interval_number": 3, "rolling_period": 4,
        "report_type": 5, "days_since_onset_of_symptoms": 6, "variant_of_concern": 8}
    info = pb.SignatureInfo.DESCRIPTOR
    assert [f.number for f in info.fields] == [3, 4, 5]
    assert "app_bundle_id" not in info.fields_by_name and "android_package" not in info.fields_by_name


def test_a_key_with_a_variant_of_concern_reads_and_writes_as_field_8():
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.protocol import export
    from agent.protocol.export import DiagnosisKey, ReportType, VariantOfConcern

    k = DiagnosisKey(b"\x01" * 16, D, DAY, 0, ReportType.CONFIRMED_TEST, 0, VariantOfConcern.TYPE_2)
    blob = export.build_export_bin([k], start_timestamp=0, end_timestamp=1, region="XX")
    assert b"\x40\x02" in blob  # tag (8 << 3 | varint), value 2
    assert export.parse_export_bin(blob).keys[0].variant_of_concern is VariantOfConcern.TYPE_2
    for native in (True, False):  # the C reader and the protobuf runtime alike
        assert export.parse_export_bin_packed(blob, native=native).keys.key(0).variant_of_concern == 2
    signing = ec.generate_private_key(ec.SECP256R1())
    zipped = export.build_export([k], signing_key=signing, start_timestamp=0, end_timestamp=1, region="XX")
    parsed = export.parse_export(zipped, trusted_keys=[export.public_key_b64(signing)])
    assert parsed.keys[0].variant_of_concern is VariantOfConcern.TYPE_2


# -- export files: padding and batches --------------------------------------------------------

def real_uploads(now: float, rng, people: int = 40) -> list[dict]:
    """Rows as declarations leave them: each person uploads the keys of 7-14 whole UTC
    days (risk 0, period 144, as the agent and the Android app upload), of a confirmed or
    likely test, with days since an onset 0-5 days ago (or none)."""
    today = gaen.rolling_start_for_day(now)
    rows = []
    for _ in range(people):
        report = rng.choice((1, 1, 1, 2))
        onset_days_ago = rng.choice((None, 0, 1, 2, 3, 4, 5))
        for d in range(1, rng.randint(7, 14) + 1):
            rows.append({"key_data": rng.randbytes(16), "rolling_start": today - d * DAY, "rolling_period": DAY,
                         "transmission_risk": 0, "report_type": report,
                         "days_since_onset": None if onset_days_ago is None else onset_days_ago - d,
                         "health_authority": "x", "received_at": now, "export_after": 0.0})
    return rows


def features(keys, now: float):
    """One-hot of every field an observer sees: start day, period, risk, report type,
    days since onset (or none); key bytes are uniformly random in both classes."""
    import numpy as np

    today = gaen.rolling_start_for_day(now)
    cols = []
    for k in keys:
        row = [0.0] * (16 + 2 + 9 + 6 + 31)
        row[min(15, max(0, (today - k.rolling_start_interval_number) // DAY))] = 1
        row[16 + (k.rolling_period == DAY)] = 1
        row[18 + k.transmission_risk_level] = 1
        row[27 + int(k.report_type)] = 1
        dso = k.days_since_onset_of_symptoms
        row[33 + (30 if dso is None else dso + 15)] = 1
        cols.append(row)
    return np.array(cols)


def logistic_regression_accuracy(x, y, rng_seed: int = 0) -> float:
    """Held-out accuracy (half the keys) of an L2 logistic regression fitted on the other half."""
    import numpy as np

    order = np.random.default_rng(rng_seed).permutation(len(y))
    train, test = order[: len(y) // 2], order[len(y) // 2:]
    xb = np.hstack([x, np.ones((len(y), 1))])
    w = np.zeros(xb.shape[1])
    for _ in range(2000):
        p = 1 / (1 + np.exp(-xb[train] @ w))
        w -= 0.5 * (xb[train].T @ (p - y[train]) / len(train) + 1e-3 * w)
    predicted = (1 / (1 + np.exp(-xb[test] @ w))) > 0.5
    return float((predicted == y[test]).mean())


@pytest.mark.integration
def test_padding_keys_cannot_be_told_from_real_ones(tmp_path, clock):
    """An export padded to twice its real keys: a classifier on every field the file shows
    does no better than chance on held-out keys. Before, padding had risk 1-8 and no days
    since onset while real keys had risk 0: "risk == 0" picked out the real keys exactly."""
    import random

    import numpy as np
    import sqlalchemy as sa

    from agent.protocol import export
    from backend import Backend, BackendConfig, db
    from backend.exports import ExportJob

    rng = random.Random(12)
    backend = Backend(BackendConfig(tmp_path / "b", export_min_keys=0), clock=clock)
    rows = real_uploads(clock.t, rng)
    with backend.engine.begin() as c:
        c.execute(sa.insert(db.exposures), rows)
    backend.config.export_min_keys = 2 * len(rows)
    job = ExportJob(backend.config, backend.engine, clock, rng=random.Random(3))
    names = job.run()
    assert len(names) == 1
    parsed = export.parse_export((backend.config.exports_dir / names[0]).read_bytes(),
                                 trusted_keys=[backend.public_key_b64])
    real = {r["key_data"] for r in rows}
    y = np.array([k.key_data in real for k in parsed.keys], dtype=float)
    assert y.sum() == len(rows) and len(y) == 2 * len(rows)
    x = features(parsed.keys, clock.t)
    accuracy = logistic_regression_accuracy(x, y)
    # chance is 0.5; with ~430 held-out keys one standard deviation is 0.024: 4 of them
    assert accuracy < 0.6, accuracy
    # the tell of before: risk 0 is every key now, real or not
    assert {k.transmission_risk_level for k in parsed.keys} == {0}
    # and no combination of fields appears among padding that no real key has
    real_fields = {(k.rolling_start_interval_number, k.rolling_period, k.report_type, k.days_since_onset_of_symptoms)
                   for k in parsed.keys if k.key_data in real}
    assert {(k.rolling_start_interval_number, k.rolling_period, k.report_type, k.days_since_onset_of_symptoms)
            for k in parsed.keys} == real_fields
    backend.engine.dispose()


@pytest.mark.integration
def test_every_export_file_is_a_batch_of_its_own(tmp_path, clock):
    """Google's export worker writes each file as batch 1 of 1 ("to avoid a device side
    issue"; the Android verifier wants every file of a batch in one call)."""
    import random

    import sqlalchemy as sa

    from agent.protocol import export
    from backend import Backend, BackendConfig, db

    backend = Backend(BackendConfig(tmp_path / "b", export_min_keys=0, export_max_keys=100), clock=clock)
    rows = real_uploads(clock.t, random.Random(5), people=30)
    with backend.engine.begin() as c:
        c.execute(sa.insert(db.exposures), rows)
    names = backend.exports.run()
    assert len(names) == -(-len(rows) // 100) > 1
    seen = set()
    for name in names:
        blob = (backend.config.exports_dir / name).read_bytes()
        parsed = export.parse_export(blob, trusted_keys=[backend.public_key_b64])
        assert (parsed.batch_num, parsed.batch_size) == (1, 1)
        seen |= {k.key_data for k in parsed.keys}
    assert seen == {r["key_data"] for r in rows}
    index = (backend.config.exports_dir / "index.txt").read_text().split()
    assert index == names
    backend.engine.dispose()
