"""The agent's BlueZ radio against the real Linux Bluetooth stack: the Debian kernel's
Bluetooth with btvirt virtual controllers and BlueZ's bluetoothd, in a QEMU VM (vm.py).

One VM run (module fixture) does every operation inside (guest.sh, checks.py) and leaves
JSON observations and btmon traces; these tests read them: what BlueZ answered, and what
went on air (the advertiser's HCI commands) and was heard (the listener's reports).

Controllers: a legacy pair (Bluetooth 4.0 LE-only, like a Raspberry Pi 3's) and an extended
pair (Bluetooth 5). btvirt accepts LE Set Random Address while scanning, which a real
controller refuses (Core v5.3 Vol 4 Part E 7.8.4): the trace counts those, so a test can
say "a real chip would have refused this".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import background
from .btsnoop import Controller, OnAir, analyse, flags_of, service_data_of
from .vm import unavailable_reason

pytestmark = [pytest.mark.realstack, pytest.mark.integration]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PRIVACY_MODES = ("off", "device")
KINDS = ("legacy", "extended")


@dataclass
class Run:
    privacy: str
    observations: list[dict[str, Any]]
    pairs: dict[str, tuple[int, int]]
    controllers: dict[int, Controller]

    def op(self, kind: str, op: str) -> dict[str, Any]:
        return next(o for o in self.observations if o["kind"] == kind and o["op"] == op)

    def sender(self, kind: str) -> Controller:
        return self.controllers[self.pairs[kind][0]]

    def listener(self, kind: str) -> Controller:
        return self.controllers[self.pairs[kind][1]]

    def on_air(self, kind: str, op: str) -> list[OnAir]:
        o = self.op(kind, op)
        return [x for x in self.sender(kind).on_air if o["t0"] <= x.t <= o["t1"]]

    def window(self, kind: str, op: str, times: list[float]) -> list[float]:
        o = self.op(kind, op)
        return [t for t in times if o["t0"] <= t <= o["t1"]]


@pytest.fixture(scope="module")
def stack() -> dict[str, Run]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    results, vm, agent_env = background.outcome()  # started with the session (tests/conftest.py)
    try:
        log = (results / "guest.log").read_text() if (results / "guest.log").exists() else ""
        assert not vm.timed_out, f"the VM did not finish in {background.VM_TIMEOUT_S} s:\n{log}\n{vm.console[-2000:]}"
        runs = {}
        wanted = os.environ.get("REALSTACK_PRIVACY", " ".join(PRIVACY_MODES)).split()  # to debug one phase
        for privacy in (p for p in PRIVACY_MODES if p in wanted):
            f = results / f"observations-{privacy}.json"
            checks_log = results / f"checks-{privacy}.log"
            assert f.exists(), f"no observations for Privacy={privacy}:\n{log}\n" + \
                (checks_log.read_text()[-3000:] if checks_log.exists() else vm.console[-2000:])
            data = json.loads(f.read_text())
            pairs = {k: (int(a[3:]), int(b[3:])) for k, (a, b) in data["pairs"].items()}
            assert set(pairs) == set(KINDS), f"controllers found: {data['pairs']}\n{log}"
            runs[privacy] = Run(privacy, data["observations"], pairs,
                                analyse(results / f"trace-{privacy}.btsnoop"))
        f = results / "observations-bumble.json"
        if f.exists():
            data = json.loads(f.read_text())
            pairs = {k: (int(a[3:]), int(b[3:])) for k, (a, b) in data["pairs"].items()}
            runs["bumble"] = Run("off", data["observations"], pairs, analyse(results / "trace-bumble.btsnoop"))
            # what the daemon stored inside the VM, read here with the CLI
            export = subprocess.run([sys.executable, "-m", "cli", "export", "--consent", "--format", "json"],
                                    env=agent_env, cwd=ROOT, capture_output=True, text=True, timeout=60)
            runs["bumble"].observations.append({"kind": "bumble", "op": "export", "exit": export.returncode,
                                                "rows": json.loads(export.stdout) if export.returncode == 0 else [],
                                                "stderr": export.stderr[-1000:]})
        print(f"\nreal-stack VM: {vm.seconds:.0f} s in all\n{log}")
        return runs
    finally:
        if not os.environ.get("REALSTACK_RESULTS"):
            shutil.rmtree(results, ignore_errors=True)


def both(fn):  # a parametrising decorator: every kind and Privacy mode
    return pytest.mark.parametrize("privacy", PRIVACY_MODES)(pytest.mark.parametrize("kind", KINDS)(fn))


def kinds(fn):  # what does not depend on Privacy (seen alike in both) is checked with Privacy off
    return pytest.mark.parametrize("privacy", ["off"])(pytest.mark.parametrize("kind", KINDS)(fn))


# -- the stack's own behaviour (the table in hardware/raspberry-pi.md) ------------------

@kinds
def test_broadcast_goes_out_non_connectable_with_flags_04(stack: dict[str, Run], kind: str, privacy: str) -> None:
    run = stack[privacy]
    assert run.op(kind, "register")["error"] is None
    (air,) = run.on_air(kind, "register")
    assert air.pdu == "ADV_NONCONN_IND" and len(air.data) == 31
    assert flags_of(air.data) == 0x04  # BR/EDR not supported, added by the kernel (LE-only adapter)
    assert service_data_of(air.data) == bytes([1]) * 16 + bytes([0x40, 1, 0, 0])


@kinds
def test_flags_other_than_04_need_a_connectable_peripheral(stack: dict[str, Run], kind: str, privacy: str) -> None:
    """Issue 12 point 9: BlueZ 5.66 refuses Discoverable on a broadcast ("Broadcast cannot set
    flags"); a peripheral with Discoverable gets 0x06 but is connectable (ADV_IND)."""
    run = stack[privacy]
    assert run.op(kind, "register-discoverable")["error"] == \
        "org.bluez.Error.Failed: Failed to parse advertisement."
    (air,) = run.on_air(kind, "register-peripheral-discoverable")
    assert air.pdu == "ADV_IND" and flags_of(air.data) == 0x06


@kinds
def test_extended_honours_min_max_interval_legacy_ignores_it(stack: dict[str, Run], kind: str, privacy: str) -> None:
    run = stack[privacy]
    (default,) = run.on_air(kind, "register")
    (asked,) = run.on_air(kind, "interval-200-270")
    if kind == "extended":
        assert default.interval_ms == (1280.0, 1280.0)  # the kernel's default: far from EN's 200-270 ms
        assert asked.interval_ms == (200.0, 270.0)
    else:
        assert default.interval_ms == asked.interval_ms == (100.0, 150.0)  # the kernel's non-connectable default


@kinds
def test_21_to_23_bytes_of_service_data_are_mangled(stack: dict[str, Run], kind: str, privacy: str) -> None:
    """Accepted by BlueZ, but legacy drops the Flags and extended sends a >31-byte legacy
    PDU (which a real controller refuses): the agent refuses these before registering."""
    run = stack[privacy]
    for n in (21, 23):
        assert run.op(kind, f"service-data-{n}")["error"] is None
        (air,) = run.on_air(kind, f"service-data-{n}")
        if kind == "legacy":
            assert flags_of(air.data) is None and len(air.data) == 8 + n
        else:
            assert flags_of(air.data) == 0x04 and len(air.data) == 11 + n > 31


@kinds
def test_over_long_is_failed_not_invalid_length(stack: dict[str, Run], kind: str, privacy: str) -> None:
    assert stack[privacy].op(kind, "service-data-24")["error"] == \
        "org.bluez.Error.Failed: Failed to register advertisement"


@kinds
def test_one_registration_more_than_supported_is_not_permitted(stack: dict[str, Run], kind: str,
                                                              privacy: str) -> None:
    o = stack[privacy].op(kind, "instances")
    supported = stack[privacy].op(kind, "caps")["caps"]["SupportedInstances"]
    assert o["registered"] == o["active"] == supported == (5 if kind == "legacy" else 3)
    maximum = "org.bluez.Error.NotPermitted: Maximum advertisements reached"
    assert o["errors"] == [{"n": supported + 1, "error": maximum}]


@both
def test_raw_rotation_while_scanning(stack: dict[str, Run], kind: str, privacy: str) -> None:
    """Unregister + register while the same adapter scans: what goes on air."""
    run = stack[privacy]
    air = run.on_air(kind, "rotate-while-scanning")
    payloads = [service_data_of(a.data)[0] for a in air]  # type: ignore[index]
    assert payloads == [20, 21, 22]
    addresses = {a.address for a in air}
    if kind == "legacy" and privacy == "device":
        assert len(addresses) == 1  # the legacy controller keeps its RPA: payload and address do not rotate together
    else:
        assert len(addresses) == 3
    refused = run.window(kind, "rotate-while-scanning", run.sender(kind).random_address_while_scanning)
    if kind == "legacy" and privacy == "off":
        assert len(refused) == 3  # each one a real chip refuses: "Failed to register advertisement"
    else:
        assert refused == []


@both
def test_raw_update_in_place(stack: dict[str, Run], kind: str, privacy: str) -> None:
    """A ServiceData change on a registered advertisement: the address changes except with
    Privacy=device; on a legacy controller it goes through Set Random Address again."""
    run = stack[privacy]
    air = run.on_air(kind, "update-while-scanning")
    assert [service_data_of(a.data)[0] for a in air][-1] == 32  # type: ignore[index]
    addresses = {a.address for a in air}
    assert (len(addresses) == 1) == (privacy == "device")
    refused = run.window(kind, "update-while-scanning", run.sender(kind).random_address_while_scanning)
    assert (len(refused) > 0) == (kind == "legacy" and privacy == "off")


@both
def test_listener_hears_the_frame(stack: dict[str, Run], kind: str, privacy: str) -> None:
    """btvirt's listener gets one report per enable (RSSI 127: not available)."""
    run = stack[privacy]
    (air,) = run.on_air(kind, "register")
    o = run.op(kind, "register")
    heard = [h for h in run.listener(kind).heard if o["t0"] <= h.t <= o["t1"]]
    if kind == "extended":  # btvirt's 4.0 controllers do not report each other
        assert heard and {(h.address, h.data) for h in heard} == {(air.address, air.data)}
        assert {h.rssi for h in heard} == {127}


# -- the agent's BlueZ radio on the real stack -----------------------------------------

@both
def test_agent_rotates_while_scanning_and_updates(stack: dict[str, Run], kind: str, privacy: str) -> None:
    """The daemon's way (bleak scanning on the same adapter all the time): every rotation
    goes on air with a new address, never through a Set Random Address while scanning
    (which a real legacy chip refuses), and the update stays on air."""
    run = stack[privacy]
    o = run.op(kind, "agent-rotate-update")
    assert o["error"] is None, o
    assert o["extended"] is (kind == "extended") and o["active"] == 1 and o["scanning"] and o["errors"] == []
    air = run.on_air(kind, "agent-rotate-update")
    payloads = [service_data_of(a.data)[0] for a in air]  # type: ignore[index]
    assert [p for i, p in enumerate(payloads) if i == 0 or p != payloads[i - 1]] == [40, 41, 42, 43, 50]
    by_payload: dict[int, set[str]] = {}
    for p, a in zip(payloads, air):
        by_payload.setdefault(p, set()).add(a.address)
    rotated = [by_payload[p] for p in (40, 41, 42, 43)]
    if kind == "legacy" and privacy == "device":
        assert len(set().union(*rotated)) == 1  # what doctor reports: set Privacy = off on legacy controllers
    else:
        assert all(len(a) == 1 for a in rotated) and len(set().union(*rotated)) == 4
    assert all(a.interval_ms == ((200.0, 270.0) if kind == "extended" else (100.0, 150.0)) for a in air)
    assert run.window(kind, "agent-rotate-update", run.sender(kind).random_address_while_scanning) == []
    if kind == "legacy":
        assert o["registrations"] == 5 and len(o["quiet_gaps"]) == 5  # start, 3 rotations, the update
        assert max(o["quiet_gaps"]) < 5.0  # measured inside the slow VM; see the report for figures
    else:
        assert o["registrations"] == 4 and o["quiet_gaps"] == []


@both
def test_doctor(stack: dict[str, Run], kind: str, privacy: str) -> None:
    o = stack[privacy].op(kind, "doctor")
    checks = {name: (ok, detail) for name, ok, detail in o["checks"]}
    assert checks["rotation while scanning"][0], checks
    assert ("legacy" in checks["controller"][1]) == (kind == "legacy")
    if kind == "legacy" and privacy == "device":
        assert checks["address rotates with the payload"][0] is False
    else:
        assert "address rotates with the payload" not in checks


@pytest.mark.parametrize("privacy", PRIVACY_MODES)
def test_agent_refuses_a_frame_bluez_would_mangle_before_registering(stack: dict[str, Run], privacy: str) -> None:
    o = stack[privacy].op("legacy", "agent-too-long")
    assert o["refused"].startswith("org.ctagent.Error.AdvertisementTooLong: the advertisement needs 32 bytes")
    assert o["registrations"] == 0 and o["seconds"] < 2  # no retries with back-off


# -- the fake bluetoothd against the real one (tests/fakes/fakebluez.py) ------------------

def _answers(run: Run, observations: list[dict[str, Any]], real: bool) -> dict[tuple[str, str], Any]:
    """What BlueZ answered per (kind, op), in terms both can be compared in: a real-stack
    Set Random Address while scanning counts as the refusal a real chip gives (btvirt
    accepts it; the fake models the chip)."""
    out: dict[tuple[str, str], Any] = {}
    for o in observations:
        key = (o["kind"], o["op"])
        if o["op"] == "caps":
            out[key] = (o["caps"]["SupportedInstances"], bool(o["caps"].get("SupportedSecondaryChannels") not in
                                                              (None, "org.freedesktop.DBus.Error.InvalidArgs")))
        elif o["op"] == "instances":
            out[key] = (o["error"], o["registered"], o["active"], o["errors"])
        elif o["op"] == "rotate-while-scanning":
            if real:
                refused = len(run.window(o["kind"], o["op"], run.sender(o["kind"]).random_address_while_scanning))
            else:
                refused = sum(s["error"] == "org.bluez.Error.Failed: Failed to register advertisement"
                              for s in o["steps"])
            out[key] = (o["error"], refused)
        elif o["op"].startswith(("register", "interval", "service-data", "update")):
            out[key] = o["error"]
    return out


@pytest.mark.parametrize("privacy", PRIVACY_MODES)
def test_fake_bluetoothd_answers_as_the_real_one(stack: dict[str, Run], privacy: str) -> None:
    """The same scenario (checks.raw_checks) against the fake bluetoothd, answer for answer."""
    import asyncio

    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    from tests.fake_bluez_fixture import FakeBluezEnv

    from . import checks

    env = FakeBluezEnv(adapters=4, kinds=("legacy", "legacy", "extended", "extended"), privacy=privacy)
    if not env.start():
        env.stop()
        pytest.skip(env.skip_reason)

    async def scenario() -> list[dict[str, Any]]:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        st = checks.Stack(bus)
        checks.PAIRS.clear()
        checks.PAIRS.update(await checks.find_pairs(st))
        rec = checks.Recorder(privacy)
        for kind in KINDS:
            await checks.raw_checks(st, rec, kind)
        bus.disconnect()
        return rec.observations

    checks.PACE = 0.05
    try:
        fake = asyncio.run(scenario())
    finally:
        checks.PACE = 1.0
        env.stop()
    run = stack[privacy]
    real_answers, fake_answers = _answers(run, run.observations, True), _answers(run, fake, False)
    common = real_answers.keys() & fake_answers.keys()
    assert len(common) >= 8
    assert {k: fake_answers[k] for k in common} == {k: real_answers[k] for k in common}


@both
def test_gatt_status_service_beside_the_broadcast(stack: dict[str, Run], kind: str, privacy: str) -> None:
    """bless registers a connectable advertisement of its own: both go on air (a legacy
    controller time-shares them, each instance with its own address)."""
    run = stack[privacy]
    o = run.op(kind, "gatt-beside-en")
    assert o["error"] is None and o["active"] == 2 and o["en_advertising"], o
    air = run.on_air(kind, "gatt-beside-en")
    pdus = {a.pdu for a in air}
    assert pdus == {"ADV_NONCONN_IND", "ADV_IND"}
    en = {a.address for a in air if a.pdu == "ADV_NONCONN_IND"}
    gatt = {a.address for a in air if a.pdu == "ADV_IND"}
    if not (kind == "legacy" and privacy == "device"):
        assert not en & gatt  # the status service does not link the broadcast's address


# -- bumble's modelled controllers through vhci (agent.ble.bumble.controller) ------------------
# "near" is a legacy-only chip 1 m from "rx" (also legacy), "far" an extended one 8 m away;
# they refuse a new random address while scanning and report the radio model's RSSI.

@pytest.fixture(scope="module")
def bumble(stack: dict[str, Run]) -> Run:
    if "bumble" not in stack:
        pytest.fail("the bumble phase left no observations: see guest.log and checks-bumble.log")
    return stack["bumble"]


REFUSED = "org.bluez.Error.Failed: Failed to register advertisement"


def test_legacy_chip_refuses_a_plain_rotation_while_scanning(bumble: Run) -> None:
    """Issue point 1, reproduced: every registration while the adapter scans fails."""
    o = bumble.op("bumble", "rotate-while-scanning")
    assert [s["error"] for s in o["steps"]] == [REFUSED] * 3
    refusals = bumble.window("bumble", "rotate-while-scanning", [t for t, op, status in bumble.sender("bumble").failures
                                                               if op == 0x2005 and status == 0x0C])
    assert len(refusals) >= 3  # LE Set Random Address: Command Disallowed


def test_legacy_chip_goes_silent_on_a_plain_update_while_scanning(bumble: Run) -> None:
    """Issue point 2, reproduced: BlueZ turns advertising off, cannot turn it on again,
    and still counts the advertisement active."""
    o = bumble.op("bumble", "update-while-scanning")
    assert o["error"] is None and o["active"] == 1
    changes = [on for t, on in bumble.sender("bumble").advertising_changes if o["t0"] <= t <= o["t1"]]
    assert changes and changes[-1] is False


def test_agent_rotates_and_updates_on_the_legacy_chip(bumble: Run) -> None:
    o = bumble.op("bumble", "agent-rotate-update")
    assert o["error"] is None and o["extended"] is False and o["active"] == 1 and o["scanning"], o
    air = bumble.on_air("bumble", "agent-rotate-update")
    payloads = [service_data_of(a.data)[0] for a in air]  # type: ignore[index]
    assert [p for i, p in enumerate(payloads) if i == 0 or p != payloads[i - 1]] == [40, 41, 42, 43, 50]
    assert len({a.address for a in air}) == len(air)
    assert bumble.window("bumble", "agent-rotate-update", [t for t, op, _ in bumble.sender("bumble").failures]) == []
    heard = {service_data_of(h.data)[0] for h in bumble.listener("bumble").heard  # type: ignore[index]
             if o["t0"] <= h.t <= o["t1"] and service_data_of(h.data)}
    assert {41, 42, 43, 50} <= heard


def test_doctor_detects_the_refusal(bumble: Run) -> None:
    o = bumble.op("bumble", "doctor")
    checks = {name: (ok, detail) for name, ok, detail in o["checks"]}
    assert checks["rotation while scanning"][0]
    assert "refuses a rotation while it scans" in checks["rotation while scanning"][1], checks


def test_rssi_follows_the_radio_model(bumble: Run) -> None:
    """The agent's scanner hears 1 m and 8 m with the model's RSSI (path loss 22 dB/decade:
    ~20 dB apart), not btvirt's 127 nor stock bumble's constant -50. Linux turns the
    controller's duplicate filter on for discovery (read off the trace), so each rotation
    of the two advertisers gives one report."""
    import statistics

    o = bumble.op("bumble", "rssi-by-distance")
    assert o["error"] is None and len(o["near"]) >= 5 and len(o["far"]) >= 5, o
    near, far = statistics.median(o["near"]), statistics.median(o["far"])
    assert 10 < near - far < 30 and -60 < near < -30, (near, far)
    assert len(set(o["near"])) > 2 and 127 not in o["near"] + o["far"]
    filters = {dup for t, on, dup in bumble.listener("bumble").scan_changes if on and o["t0"] <= t <= o["t1"]}
    assert filters == {True}


def test_ctagent_run_records_sightings_with_the_modelled_rssi(bumble: Run) -> None:
    """``ctagent run --radio bluez`` on the legacy chip 'rx' hears 'near' (1 m) and 'far'
    (8 m); its store, exported on the host, holds encounters at two RSSI levels."""
    o = bumble.op("bumble", "ctagent-run")
    assert o["error"] is None and o["exit"] == 0, o
    assert o["figures"]["sightings"] >= 12 and o["figures"]["advertiser"]["advertising"], o["figures"]
    rows = bumble.op("bumble", "export")["rows"]
    levels = sorted(r["rssi_mean_dbm"] for r in rows)
    assert len(rows) >= 4 and levels[-1] - levels[0] > 10, levels  # near ~-46, far ~-66 dBm
    assert all(-100 < x < -20 for x in levels)
