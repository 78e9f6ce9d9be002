"""`ctagent demo`: a simulated field experiment, end to end through the real code.

scenario (who is where, with known truth) -> fleet (N devices: encrypted store and the
protocol mode each; the embedded backend over real HTTP on 127.0.0.1, all on a virtual
clock) -> simulate (the medium decides who hears whom) -> declare and check (person 0
tests positive, gets a code from the lab API, declares; the export job runs; every other
device makes its server call) -> score (against the truth) -> plot.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path


from ..clock import DAY_SECONDS, ManualClock
from ..config import DEFAULT_PROTOCOL
from ..errors import UserError
from ..exposure.rule import ProximityConfig
from ..modes import mode_class
from .fleet import EXPORT_MIN_KEYS, Fleet
from .plot import plot
from .scenario import ACTIVE, DAY0, SCENARIOS, Scenario
from .score import DemoResult, DemoRow, score
from .simulate import simulate

#: the test result comes in the evening of the last day
RESULT_AT_S = 19 * 3600


def run_demo(*, devices: int = 24, days: int = 2, seed: int = 1, scenario: str = "office",
             protocol: str = DEFAULT_PROTOCOL, out_dir: Path | None = None, tick_s: float = 8.0,
             log: Callable[[str], None] = print, progress: Callable[[str, float], None] | None = None,
             png: bool = True, research_dir: Path | None = None) -> DemoResult:
    """``research_dir``: also rehearse a field experiment: every device records research
    data, and its bundle plus the ground truth land there (an experiment folder for
    ``ctagent experiment analyze``)."""
    mode_class(protocol)  # a clear error for an unknown family
    if devices < 4:
        raise UserError("the demo needs at least 4 devices")
    if not 1 <= days <= 14:
        raise UserError("--days must be between 1 and 14")
    if scenario not in SCENARIOS:
        raise UserError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    wall0 = time.perf_counter()
    rng = random.Random(seed)
    clock = ManualClock(DAY0 + ACTIVE[0])
    cfg = ProximityConfig()
    res = DemoResult(devices=devices, days=days, seed=seed, scenario=scenario, protocol=protocol)
    with Fleet(protocol, devices, days, seed, rng, clock, cfg, research=research_dir is not None) as fleet:
        scen = Scenario(scenario, devices, days, rng)
        log(f"{devices} virtual devices, {days} day(s) of scenario '{scenario}' (seed {seed}), protocol {protocol}; "
            f"{len(scen.events)} situations with ground truth")
        url = fleet.start_backend()
        log(f"embedded backend on {url}")
        fleet.open_modes()
        trace = simulate(fleet, scen, rng, tick_s=tick_s, distance_m=cfg.distance_threshold_m, progress=progress)
        res.sightings, res.rotations = trace.sightings, trace.rotations
        log(f"simulated {res.sightings:,} received advertisements; {res.rotations:,} rotations of identifier "
            "and address")
        _declare_and_check(fleet, days, log, progress)
        score(fleet, trace, cfg.duration_threshold_min, res)
        if research_dir is not None:
            fleet.write_research(Path(research_dir), trace.pair_truth, f"demo-{scenario}-seed{seed}")
            log(f"research bundles and ground truth in {research_dir}")
    res.wall_s = time.perf_counter() - wall0
    if png:
        out = Path(out_dir) if out_dir else Path("demo-out")
        out.mkdir(parents=True, exist_ok=True)
        suffix = "" if protocol == DEFAULT_PROTOCOL else f"-{protocol}"
        res.png = str(out / f"demo-{scenario}{suffix}-seed{seed}.png")
        plot(res, trace, cfg, Path(res.png))
    return res


def _declare_and_check(fleet: Fleet, days: int, log: Callable[[str], None],
                       progress: Callable[[str, float], None] | None) -> None:
    """Person 0's code from the lab API, her declaration, the export job, everyone's server call."""
    clock, modes = fleet.clock, fleet.modes
    lab_key = fleet.backend.verification.add_api_key("demo-lab")
    clock.t = DAY0 + (days - 1) * DAY_SECONDS + RESULT_AT_S
    assert fleet.http is not None
    code = fleet.http.post(fleet.server.url + "/api/issue", json={"testType": "confirmed"},
                           headers={"X-API-Key": lab_key}).json()["code"]
    declared = modes[0].declare(code, clock.t)
    log(f"person 0 tested positive, declared with code {code[:2]}******: {declared.summary}")
    clock.t = DAY0 + days * DAY_SECONDS + 3600  # the last key's embargo is over
    files = fleet.backend.exports.run()
    if files:
        log(f"export job: {len(files)} signed file(s), padded to >= {EXPORT_MIN_KEYS} keys")
    for i, mode in enumerate(modes[1:], 1):
        mode.check(clock.t)
        if progress:
            progress("checking with the server", i / (len(modes) - 1))


__all__ = ["DemoResult", "DemoRow", "run_demo"]
