"""`ctagent demo`: a simulated field experiment, end to end through the real code.

N virtual devices run the real agent (encrypted store, rotation schedule, aggregation,
proximity rule, matching) on the simulated medium (``agent.ble.sim``) and a virtual
clock, through a scenario with known ground truth. Person 0 tests positive, gets a code
from the embedded backend (real HTTP on 127.0.0.1, lab API), declares; the export job
runs; every other device syncs over HTTP, verifies the signed file and decides. The
result is compared with who truly spent >= 15 minutes within 1 m of person 0 on a day.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .agent import Agent
from .ble.sim import Medium, MediumConfig, SimDevice
from .exposure.calibration import CalibrationTable, bundled_calibration_path
from .exposure.encounter import SECONDS_PER_DAY
from .exposure.evaluate import Confusion
from .exposure.rule import ProximityConfig
from .store import Passphrase, Store

DAY0 = 20_400 * SECONDS_PER_DAY  # a Monday, 2025-11-10 00:00 UTC
ACTIVE = (7.5 * 3600, 18 * 3600)
DESK_SPACING_M = 2.5
ROOM_SPACING_M = 60.0
ROOM_SIZE = 6
SCENARIOS = ("office", "train")


@dataclass
class Event:
    start: float
    end: float
    positions: dict[int, tuple[float, float]]
    room: int
    label: str


@dataclass
class DemoResult(Confusion):
    devices: int = 0
    days: int = 0
    seed: int = 0
    scenario: str = ""
    rows: list[dict] = field(default_factory=list)
    sightings: int = 0
    rotations: int = 0
    wall_s: float = 0.0
    png: str | None = None
    protocol: str = "gaen"

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["precision"], d["recall"] = self.precision, self.recall
        return d


def circle(center, n, radius, phase=0.0):
    return [(center[0] + radius * math.cos(phase + 2 * math.pi * k / n),
             center[1] + radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def build_events(scenario: str, n: int, days: int, rng: random.Random) -> list[Event]:
    """Known situations with person 0 (the future positive) and around her."""
    ev: list[Event] = []
    others = list(range(1, n))
    for day in range(days):
        base = DAY0 + day * SECONDS_PER_DAY
        h = lambda x: base + x * 3600  # noqa: E731
        if scenario == "train" or day > 0:
            # morning train: person 0 seated next to one person (0.5 m), others 1.4-3 m away
            seat, mid = rng.choice(others), [p for p in rng.sample(others, min(5, len(others)))]
            pos = {0: (500.0, 0.0), seat: (500.5, 0.0)}
            for k, p in enumerate(x for x in mid if x != seat):
                pos[p] = (500.0 + 1.4 + 0.5 * k, 1.0 + 0.3 * k)
            ev.append(Event(h(7.6), h(7.6 + rng.uniform(0.45, 0.7)), pos, 99, "train"))
        if scenario == "office":
            # meeting of six around a table (radius 0.8 m: neighbours 0.8 m, others 1.4-1.6 m)
            members = [0] + rng.sample(others, min(5, len(others)))
            pts = circle((5.0, 12.0), len(members), 0.8, rng.uniform(0, 1))
            ev.append(Event(h(10), h(10 + rng.choice([0.5, 0.75])), dict(zip(members, pts)), 0, "meeting"))
            # lunch queue: everyone in line 0.8 m apart, 12 minutes (< 15 on its own)
            line = [0] + rng.sample(others, len(others))
            ev.append(Event(h(12), h(12.2), {p: (200.0 + 0.8 * k, 0.0) for k, p in enumerate(line)}, 50, "queue"))
            # coffee: person 0 and one colleague at 0.6 m for 20 min, two more at 1.3 m
            trio = rng.sample(others, min(3, len(others)))
            pos = {0: (300.0, 0.0), trio[0]: (300.6, 0.0)}
            for k, p in enumerate(trio[1:]):
                pos[p] = (300.0, 1.3 * (1 if k == 0 else -1))
            ev.append(Event(h(15), h(15 + 1 / 3), pos, 51, "coffee"))
    return ev


def desk(i: int) -> tuple[tuple[float, float], int]:
    room, k = divmod(i, ROOM_SIZE)
    return (room * ROOM_SPACING_M + (k % 3) * DESK_SPACING_M, (k // 3) * DESK_SPACING_M), room


def run_demo(*, devices: int = 24, days: int = 2, seed: int = 1, scenario: str = "office",
             protocol: str = "gaen", out_dir: Path | None = None, tick_s: float = 8.0,
             log: Callable[[str], None] = print, progress: Callable[[str, float], None] | None = None,
             png: bool = True) -> DemoResult:
    if protocol not in ("gaen", "robert"):
        raise ValueError(f"unknown protocol {protocol!r}; choose gaen or robert")
    if devices < 4:
        raise ValueError("the demo needs at least 4 devices")
    if not 1 <= days <= 14:
        raise ValueError("--days must be between 1 and 14")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    from agent.sync import SyncClient
    from agent.sync.client import teks_to_upload
    from backend.core import Backend, BackendConfig
    from backend.robert import RobertConfig, RobertServer
    from backend.server import BackgroundServer

    from .protocol import robert as rb
    from .robert_agent import RobertDevice

    wall0 = time.perf_counter()
    rng = random.Random(seed)
    res = DemoResult(devices=devices, days=days, seed=seed, scenario=scenario)
    res.protocol = protocol
    tmp = tempfile.TemporaryDirectory(prefix="ctagent-demo-")
    work = Path(tmp.name)
    out = Path(out_dir) if out_dir else Path("demo-out")
    clock_t = [DAY0 + ACTIVE[0]]
    clock = lambda: clock_t[0]  # noqa: E731

    cal_table = CalibrationTable.load(bundled_calibration_path())
    models = ["Raspberry Pi 3 Model B", "Raspberry Pi Zero W", "Raspberry Pi 4 Model B"]
    cfg = ProximityConfig()
    agents: list[Agent] = []
    sim_devices: list[SimDevice] = []
    for i in range(devices):
        cal = cal_table.lookup(models[i % len(models)])
        store = Store.create(work / f"device-{i:02d}.db", Passphrase(f"demo-{i}", scrypt={"n": 2**12, "r": 8, "p": 1}),
                             clock=clock)
        drng = random.Random(rng.getrandbits(64))
        agents.append(Agent(store, calibration=cal, config=cfg, rng=drng, tek_factory=lambda r=drng: r.randbytes(16),
                            match_workers=1))
        sim_devices.append(SimDevice(f"device-{i:02d}", cal.tx_power, cal.rssi_correction))
    medium = Medium(sim_devices, MediumConfig(), seed=seed)
    events = build_events(scenario, devices, days, rng)
    log(f"{devices} virtual devices, {days} day(s) of scenario '{scenario}' (seed {seed}), protocol {protocol}; "
        f"{len(events)} situations with ground truth")

    # The embedded backend (real HTTP on 127.0.0.1), on the virtual clock.
    backend = Backend(BackendConfig(work / "backend", region="XX", export_min_keys=100), clock=clock)
    rserver = RobertServer(backend, RobertConfig(tuples_epochs=(days + 1) * 96)) if protocol == "robert" else None
    server = BackgroundServer(backend, robert_server=rserver).__enter__()
    log(f"embedded backend on {server.url}")
    rdevs: list[RobertDevice] = []
    if protocol == "robert":
        rrng = random.Random(seed ^ 0x0B0B)  # its own stream: the scenario stays the same as in GAEN mode
        for i, a in enumerate(agents):
            d = RobertDevice(a.store, server.url, rng=random.Random(rrng.getrandbits(64)), sleep=lambda s: None,
                             tx_power=int(sim_devices[i].tx_cal_dbm))
            d.register()
            rdevs.append(d)
        log(f"{devices} devices registered with the ROBERT server (ECDH, encrypted identifier tuples)")

    # --- the simulated days -----------------------------------------------------------
    rpis = [b""] * devices
    aems = [b""] * devices
    next_rot = [0.0] * devices
    close_min = np.zeros((days, devices))  # truth: minutes within 1 m of person 0, per day
    trace_t, trace_d, trace_a = [], [], []
    counter = [0]

    sds = [b""] * devices  # ROBERT service data being broadcast
    heard_this_tick: set[tuple[int, int]] = set()
    last_epoch = [None]

    def deliver(rx: int, tx: int, ts: float, rssi: int) -> None:
        if protocol == "gaen":
            agents[rx].aggregator.add_raw(ts, rpis[tx], aems[tx], rssi)
        else:
            if (rx, tx) in heard_this_tick:  # the ROBERT app keeps one HELLO per peer per scan
                return
            heard_this_tick.add((rx, tx))
            rdevs[rx].on_hello(ts, sds[tx], rssi)
        counter[0] += 1

    carriages: list[list[str]] = []
    total_ticks = days * int((ACTIVE[1] - ACTIVE[0]) / tick_s)
    done_ticks = 0
    for day in range(days):
        for i in range(devices):  # carriage of the day: hand/table 60%, pocket 25%, bag 15%
            medium.set_carriage(i, rng.choices(["table", "pocket", "bag"], [0.6, 0.25, 0.15])[0])
        carriages.append([dv.carriage for dv in sim_devices])
        t = DAY0 + day * SECONDS_PER_DAY + ACTIVE[0]
        end = DAY0 + day * SECONDS_PER_DAY + ACTIVE[1]
        next_flush = t + 60
        active = np.ones(devices, dtype=bool)
        while t < end:
            clock_t[0] = t
            if protocol == "gaen":
                for i, a in enumerate(agents):
                    if t >= next_rot[i]:
                        rot = a.rotate(t)
                        rpis[i], aems[i], next_rot[i] = rot.payload.rpi, rot.payload.aem, rot.next_at
            else:  # a fresh HELLO (new time16 and MAC); a new EBID and address every epoch
                heard_this_tick.clear()
                epoch = rb.epoch_id(rb.ntp_seconds(t), rserver.start_ntp)
                if epoch != last_epoch[0]:
                    last_epoch[0] = epoch
                    res.rotations += devices
                sds = [d.service_data(t) for d in rdevs]
            pos = np.empty((devices, 2))
            room = np.empty(devices, dtype=int)
            for i in range(devices):
                (pos[i, 0], pos[i, 1]), room[i] = desk(i)
            for e in events:
                if e.start <= t < e.end:
                    for p, xy in e.positions.items():
                        pos[p] = xy
                        room[p] = e.room
            pos += np.asarray(medium.rng.normal(0, 0.05, pos.shape))
            d = medium.tick(t, tick_s, pos, room, active, deliver)
            close_min[day] += (d[:, 0] <= cfg.distance_threshold_m) * (tick_s / 60)
            trace_t.append(t)
            trace_d.append(d[:, 0].copy())
            trace_a.append(medium.last_attenuation[:, 0].copy())  # device i hearing person 0
            t += tick_s
            if t >= next_flush:
                for a in (agents if protocol == "gaen" else rdevs):
                    a.flush(t) if protocol == "gaen" else a.flush()
                next_flush = t + 60
            done_ticks += 1
            if progress and done_ticks % 200 == 0:
                progress("simulating", done_ticks / total_ticks)
        for a in agents:
            a.flush(end, final=True)
        for d in rdevs:
            d.flush()
    if progress:
        progress("simulating", 1.0)
    res.sightings = counter[0]
    if protocol == "gaen":
        res.rotations = sum(a.stats.rotations for a in agents)
    what = "RPI+address" if protocol == "gaen" else "EBID (HELLO)+address"
    log(f"simulated {res.sightings:,} received advertisements; {res.rotations:,} {what} rotations")

    # --- test, declare, export, sync over real HTTP --------------------------------------
    try:
        srv = server
        lab_key = backend.add_api_key("demo-lab")
        client = SyncClient(srv.url, trusted_keys=[backend.public_key_b64], sleep=lambda s: None)
        clock_t[0] = DAY0 + (days - 1) * SECONDS_PER_DAY + 19 * 3600  # the test result comes in the evening
        code = client.http.post(srv.url + "/api/issue", json={"testType": "confirmed"},
                                headers={"X-API-Key": lab_key}).json()["code"]
        p0 = agents[0]
        if protocol == "gaen":
            resp = client.declare(code, teks_to_upload(p0.store, clock_t[0]), p0.store, now=clock_t[0])
            log(f"person 0 tested positive, declared with code {code[:2]}****** : "
                f"{resp['insertedExposures']} key(s) published")
            clock_t[0] = DAY0 + days * SECONDS_PER_DAY + 3600  # the last key's embargo is over
            files = backend.run_export()
            log(f"export job: {len(files)} signed file(s), padded to >= 100 keys")
            for i, a in enumerate(agents[1:], 1):
                a.sync(client, clock_t[0])
                if progress:
                    progress("syncing", i / (devices - 1))
        else:
            resp = rdevs[0].report(code, clock_t[0])
            log(f"person 0 tested positive, reported the HELLOs heard with code {code[:2]}******: "
                f"{resp['accepted']:,} verified by the server, {resp['dropped']} dropped")
            clock_t[0] = DAY0 + days * SECONDS_PER_DAY + 3600
            for i, d in enumerate(rdevs[1:], 1):
                d.status(clock_t[0])
                if progress:
                    progress("status", i / (devices - 1))
        client.close()
    finally:
        server.__exit__(None, None, None)

    # --- compare with the truth -----------------------------------------------------------
    for i in range(1, devices):
        truth_min = float(close_min[:, i].max())
        day_of = int(close_min[:, i].argmax())
        truth = truth_min >= cfg.duration_threshold_min
        exps = agents[i].store.exposures()
        notified = bool(exps)
        counted = max((e["minutes"] or 0.0 for e in exps), default=0.0)  # ROBERT: the server decides
        outcome = ("TP" if truth and notified else "FN" if truth else "FP" if notified else "TN")
        res.add(truth, notified)
        res.rows.append({"device": i, "true_close_minutes": round(truth_min, 1), "truly_exposed": truth,
                         "notified": notified, "minutes_counted": counted, "outcome": outcome,
                         "carriage": f"{carriages[day_of][0]}/{carriages[day_of][i]}"})
    for a in agents:
        a.store.close()
    res.wall_s = time.perf_counter() - wall0
    if png:
        out.mkdir(parents=True, exist_ok=True)
        suffix = "" if protocol == "gaen" else "-robert"
        res.png = str(out / f"demo-{scenario}{suffix}-seed{seed}.png")
        _plot(res, np.array(trace_t), np.array(trace_d), np.array(trace_a), cfg, Path(res.png))
    tmp.cleanup()
    return res


def _plot(res: DemoResult, t: np.ndarray, d: np.ndarray, att: np.ndarray, cfg: ProximityConfig, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    interesting = [r for r in res.rows if r["outcome"] != "TN" or r["true_close_minutes"] >= 5][:8]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    hours = (t - DAY0) / 3600
    gap = np.append(np.diff(t) > 60, False)  # nights are not simulated: break the lines there
    for r in interesting:
        i = r["device"]
        near = np.where((d[:, i] < 5) & ~gap, d[:, i], np.nan)
        label = f"device {i}: {r['outcome']} ({r['true_close_minutes']:.0f} true min, {r['carriage']})"
        (line,) = ax.plot(hours, near, lw=1, label=label)
        ax2.plot(hours, np.where((d[:, i] < 5) & ~gap, att[:, i], np.nan), lw=0.8, color=line.get_color())
    ax.axhline(cfg.distance_threshold_m, color="k", ls="--", lw=1, label=f"{cfg.distance_threshold_m:g} m threshold")
    ax2.axhline(cfg.attenuation_at(cfg.distance_threshold_m), color="k", ls="--", lw=1)
    ax2.set_xlabel("hours since day 1, 00:00 UTC (virtual time)")
    ax.set_ylabel("true distance to person 0 (m)")
    ax2.set_ylabel("mean attenuation (dB)\n(body, walls, shadowing)")
    ax.set_ylim(0, 5)
    ax.set_title(f"ctagent demo '{res.scenario}' ({res.protocol}), seed {res.seed}: who was near the positive person "
                 f"(TP {res.tp}, FP {res.fp}, FN {res.fn}, TN {res.tn})")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def result_json(res: DemoResult) -> str:
    return json.dumps(res.to_dict(), indent=1, default=float)
