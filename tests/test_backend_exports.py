"""The publish -> export path under hostile or concurrent use, over real HTTP on
127.0.0.1, on SQLite and PostgreSQL: a number outside its range never reaches an export
file, a bad stored row never stops a batch."""

import logging

import httpx
import pytest
import sqlalchemy as sa

from agent.protocol import export, gaen
from backend import db
from backend import exports as export_job

from .backend_requests import certified, prepared_publish, publish_body, random_keys

pytestmark = pytest.mark.integration


def exported_keys(backend) -> list[bytes]:
    """Every key in the files index.txt lists (padding included), once per appearance."""
    out = []
    for name in (backend.config.exports_dir / "index.txt").read_text().split():
        exp = export.parse_export((backend.config.exports_dir / name).read_bytes(),
                                  trusted_keys=[backend.public_key_b64])
        out += [k.key_data for k in exp.keys]
    return out


def stored(backend, **where):
    with backend.engine.connect() as c:
        q = sa.select(db.exposures)
        for col, value in where.items():
            q = q.where(getattr(db.exposures.c, col) == value)
        return c.execute(q.order_by(db.exposures.c.id)).fetchall()


# -- point 7: one upload must not stop all exports ----------------------------------------

def test_one_poisoned_upload_does_not_stop_exports(backend, live, clock):
    """An onset of 2**40 outside the certificate's HMAC was stored (SQLite) or answered
    500 (PostgreSQL), and every later export failed with 'Value out of range'."""
    legit = []
    with httpx.Client(base_url=live.url) as http:
        for i in range(20):
            body, keys = prepared_publish(backend, clock.t)
            if i == 10:
                poisoned, _ = prepared_publish(backend, clock.t, symptomOnsetInterval=2**40)
                r = http.post("/v1/publish", json=poisoned)
                assert r.status_code == 400 and r.json()["code"] == "invalid_request"
                assert "symptomOnsetInterval" in r.json()["error"]
            assert http.post("/v1/publish", json=body).json()["insertedExposures"] == 14
            legit += keys
        # a 32-bit onset that makes no sense (far in the future) is ignored, as the key server does
        odd, odd_keys = prepared_publish(backend, clock.t, symptomOnsetInterval=2**31 - 1)
        assert http.post("/v1/publish", json=odd).json()["insertedExposures"] == 14
    assert all(r.days_since_onset is None for r in stored(backend) if r.key_data in odd_keys)
    assert len(stored(backend)) == 294
    clock.advance(3600)
    assert backend.exports.run() != []
    assert sorted(set(exported_keys(backend)) & set(legit + odd_keys)) == sorted(legit + odd_keys)


def test_certificate_onset_wins_and_keys_far_from_it_are_not_saved(backend, live, clock):
    today = gaen.rolling_start_for_day(clock.t)
    keys = random_keys(clock.t, 14)  # 1..14 days old
    onset = today - 2 * gaen.TEK_ROLLING_PERIOD
    body = publish_body(keys, certified(backend, keys, onset=onset), symptomOnsetInterval=today - 10 * 144)
    r = httpx.post(live.url + "/v1/publish", json=body)
    assert r.status_code == 200 and r.json()["insertedExposures"] == 14
    assert sorted(r.days_since_onset for r in stored(backend)) == list(range(-12, 2))  # the certificate's onset

    keys = random_keys(clock.t, 15)
    onset = today  # the 14-day-old key is 14 days before it: saved; the 15-day-old one is not
    body = publish_body(keys, certified(backend, keys, onset=onset))
    r = httpx.post(live.url + "/v1/publish", json=body).json()
    assert r["insertedExposures"] == 14 and r["warnings"] == ["key 14 is 15 days from the symptom onset (over 14): "
                                                              "not saved"]
    assert len(stored(backend)) == 28 and keys[14].key_data not in {r.key_data for r in stored(backend)}


def test_lab_api_refuses_an_onset_out_of_range(backend, live, clock):
    key = backend.verification.add_api_key("lab-1")
    today = gaen.rolling_start_for_day(clock.t)
    for onset, code in ((2**40, "invalid_request"), (today + 2 * 144, "onset_invalid"),
                        (today - 40 * 144, "onset_invalid")):
        r = httpx.post(live.url + "/api/issue", json={"symptomOnsetInterval": onset}, headers={"X-API-Key": key})
        assert r.status_code == 400 and r.json()["code"] == code, onset
    r = httpx.post(live.url + "/api/issue", json={"symptomOnsetInterval": today - 3 * 144}, headers={"X-API-Key": key})
    assert r.status_code == 200


def test_export_sets_a_bad_stored_row_aside(backend, clock, caplog):
    """Rows written around the API (an older version, a hand edit) that no export file
    can hold: the batch goes on without them, each is logged once (no key bytes) and
    stays in the database, out of every file."""
    good, keys = prepared_publish(backend, clock.t)
    backend.publisher.publish(good)
    yesterday = gaen.rolling_start_for_day(clock.t) - gaen.TEK_ROLLING_PERIOD
    base = {"rolling_start": yesterday, "rolling_period": 144, "transmission_risk": 0, "report_type": 1,
            "days_since_onset": None, "health_authority": "x", "received_at": clock.t, "export_after": clock.t}
    bad = [dict(base, key_data=b"\xab" * 15), dict(base, key_data=b"\xac" * 16, report_type=99),
           dict(base, key_data=b"\xad" * 16, rolling_period=0)]
    if backend.engine.dialect.name == "sqlite":  # PostgreSQL's INTEGER cannot even hold these
        bad += [dict(base, key_data=b"\xae" * 16, days_since_onset=2**40),
                dict(base, key_data=b"\xaf" * 16, rolling_start=2**40)]
    with backend.engine.begin() as c:
        c.execute(sa.insert(db.exposures), bad)
    clock.advance(3600)
    with caplog.at_level(logging.INFO, logger="ctagent.backend"):
        assert len(backend.exports.run()) == 1
    assert sorted(set(exported_keys(backend)) & set(keys)) == sorted(keys)
    assert len(stored(backend, batch_id=export_job.QUARANTINED)) == len(bad)
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == len(bad)
    assert not any(b in line for line in lines for b in ("\\xab", "\\xac", "abab", "q6ur", "\\xad", "\\xae"))
    caplog.clear()
    clock.advance(3600)
    with caplog.at_level(logging.INFO, logger="ctagent.backend"):
        backend.exports.run()
    assert not [r for r in caplog.records if "quarantined" in r.getMessage()]  # set aside once, for good
