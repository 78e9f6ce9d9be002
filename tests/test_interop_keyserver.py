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
