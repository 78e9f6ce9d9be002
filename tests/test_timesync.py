"""The clock check (issue: a Raspberry Pi has no real-time clock): what the machine says
of its clock, what the daemon does with it, and what `doctor` and `status` show."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

import cli
from agent.clock import VirtualClock
from agent.timesync import NOT_BEFORE, ClockGuard, ClockState, clock_verdict, doctor_check, probe

from .helpers import DAY
from .test_daemon import make

NOW = NOT_BEFORE + 30 * DAY
# `chronyc -n -c tracking` on a synchronised Debian 12 machine (chrony 4.3)
CHRONY_SYNCED = ("A29FC87B,162.159.200.123,4,1764751112.503104901,0.000123456,-0.000045000,0.000210000,"
                 "-12.345,0.001,0.020,0.012000000,0.001500000,1030.5,Normal\n")
CHRONY_UNSYNCED = "00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,0.000,0.000,1.0,1.0,0.0," \
                  "Not synchronised\n"


def runner(outputs: dict[str, str | None]):
    return lambda argv: outputs.get(argv[0])


def test_chrony_is_read_first_with_its_offset_and_error_bound():
    s = probe(NOW, run=runner({"chronyc": CHRONY_SYNCED}), kernel=lambda: (False, 16.0))
    assert s.synchronized is True and s.source == "chrony" and s.service == "chrony"
    assert s.offset_s == pytest.approx(0.000123456)
    assert s.max_error_s == pytest.approx(0.000123456 + 0.012 / 2 + 0.0015)
    s = probe(NOW, run=runner({"chronyc": CHRONY_UNSYNCED}), kernel=lambda: (True, 0.1))
    assert s.synchronized is False and s.service == "chrony"


def test_timesyncd_through_timedatectl_then_the_kernel_alone():
    s = probe(NOW, run=runner({"timedatectl": "NTP=yes\nNTPSynchronized=no\n"}), kernel=lambda: (False, 16.0))
    assert (s.synchronized, s.source, s.service, s.max_error_s) == (False, "timedatectl", "systemd-timesyncd", None)
    s = probe(NOW, run=runner({"timedatectl": "NTP=yes\nNTPSynchronized=yes\n"}), kernel=lambda: (True, 0.25))
    assert (s.synchronized, s.max_error_s) == (True, 0.25)
    s = probe(NOW, run=runner({}), kernel=lambda: (True, 0.05))
    assert (s.synchronized, s.source, s.service, s.max_error_s) == (True, "kernel", None, 0.05)
    s = probe(NOW, run=runner({}), kernel=lambda: None)
    assert (s.synchronized, s.source) == (None, "none")
    assert not probe(NOT_BEFORE - 1, run=runner({}), kernel=lambda: None).plausible
    assert ClockState.from_json(json.loads(json.dumps(s.to_json()))) == s


def state(**kw) -> ClockState:
    return ClockState(**{"checked_at": NOW, "plausible": True, "synchronized": True, "source": "chrony",
                         "max_error_s": 0.01, "offset_s": 0.001, "service": "chrony", **kw})


@pytest.mark.parametrize("clock, policy, waited, ok, says", [
    (state(), "auto", 0, True, None),
    (state(), "strict", 0, True, None),
    (state(plausible=False, checked_at=0.0), "auto", 1e6, False, "1970-01-01"),  # never with a 1970 clock
    (state(plausible=False, checked_at=0.0), "strict", 0, False, "wrong"),
    (state(plausible=False, checked_at=0.0), "off", 0, True, None),
    (state(synchronized=False), "auto", 10, False, "waiting up to 300 s"),  # a time service will set it
    (state(synchronized=False), "auto", 300, True, "wrong time"),  # then go on, with a warning
    (state(synchronized=False, service=None, source="kernel"), "auto", 0, True, "no time service"),
    (state(synchronized=False), "strict", 1e6, False, "strict"),
    (state(max_error_s=120.0), "strict", 0, False, "error bound is 120 s"),
    (state(max_error_s=120.0), "auto", 0, True, "error bound"),
    (state(synchronized=None, service=None, source="none"), "auto", 0, True, "unknown"),
])
def test_the_verdict(clock, policy, waited, ok, says):
    v = clock_verdict(clock, policy=policy, waited_s=waited, sync_wait_s=300, max_error_s=60)
    assert v.ok is ok
    assert (v.reason is None) if says is None else (says in (v.reason or ""))


def test_doctor_fails_a_wrong_or_unsynchronised_clock_and_says_what_to_do():
    assert doctor_check(state()) == (True, state().describe())
    ok, detail = doctor_check(state(plausible=False, checked_at=0.0))
    assert not ok and "set the time" in detail
    ok, detail = doctor_check(state(synchronized=False, service=None, source="kernel"))
    assert not ok and "apt install systemd-timesyncd" in detail
    r = CliRunner().invoke(cli.main, ["doctor", "--json"])
    doc = json.loads(r.output)
    assert doc["checks"][0]["name"] == "clock" and isinstance(doc["checks"][0]["ok"], bool)
    assert r.exit_code == (0 if doc["ok"] else 1)


async def test_the_daemon_waits_for_a_right_clock_before_its_radios_start(tmp_path):
    clock = VirtualClock(NOW)
    readings = iter([state(plausible=False, checked_at=0.0)] * 3 + [state()] * 1000)
    guard = ClockGuard(lambda now: next(readings))
    d, adv = make(tmp_path, clock, clock_guard=guard)
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(NOW + 12)  # three readings of a 1970 clock, 5 s apart
    st = d.status()
    assert st["mode"] == "waiting for clock" and adv.rotations == 0 and st["sightings"] == 0
    assert "wrong" in st["clock_problem"] and st["clock"]["plausible"] is False
    await clock.run_until(NOW + 600)
    st = d.status()
    assert st["mode"] == "normal" and adv.rotations >= 1 and st["sightings"] > 0
    assert st["clock_problem"] is None and st["clock"]["synchronized"] is True
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0


async def test_an_unsynchronised_clock_without_a_time_service_is_a_degraded_mode(tmp_path):
    clock = VirtualClock(NOW)
    guard = ClockGuard(lambda now: state(checked_at=now, synchronized=False, service=None, source="kernel"))
    d, adv = make(tmp_path, clock, clock_guard=guard)
    run = asyncio.create_task(d.run(install_signals=False))
    await clock.run_until(NOW + 600)
    st = d.status()
    assert st["mode"] == "degraded" and adv.rotations >= 1  # it advertises, and says what is wrong
    assert "no time service" in st["clock_problem"] and "clock:" in d._status_line()
    d.stop()
    assert await asyncio.wait_for(run, 5) == 0


def test_status_shows_the_clock_and_the_setting_is_checked(tmp_path):
    cfg = tmp_path / "ctagent.toml"
    env = {"CTAGENT_CONFIG": str(cfg)}
    r = CliRunner().invoke(cli.main, ["init", "--data-dir", str(tmp_path / "d"), "--radio", "sim"], env=env)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli.main, ["status"], env=env)
    assert r.exit_code == 0 and "\nclock        " in r.output, r.output
    r = CliRunner().invoke(cli.main, ["status", "--json"], env=env)
    assert set(json.loads(r.output)["clock"]) >= {"plausible", "synchronized", "source", "max_error_s"}
    r = CliRunner().invoke(cli.main, ["status"], env={**env, "CTAGENT_AGENT_CLOCK_CHECK": "sometimes"})
    assert r.exit_code == 1 and "[agent] clock_check: must be one of 'auto', 'strict', 'off'" in r.output
