"""The demo's fleet: N virtual devices, each the real agent (encrypted store, the
protocol mode) plus its place on the simulated medium, and the embedded backend (both
server roles, real HTTP on 127.0.0.1) on the same virtual clock."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ..ble.sim.medium import Medium, MediumConfig, SimDevice
from ..clock import DAY_SECONDS, ManualClock
from ..exposure.calibration import CalibrationTable, DeviceCalibration, bundled_calibration_path
from ..exposure.rule import ProximityConfig
from ..modes import mode_class
from ..modes.base import DeviceContext, ProtocolMode
from ..protocol.robert import EPOCH_SECONDS
from ..experiment.recording import RadioFacts, ResearchRecorder
from ..store import Store
from ..store.keys import KeyFile, create_key_file
from .scenario import ACTIVE, DAY0

#: the device models handed out in turn
MODELS = ("Raspberry Pi 3 Model B", "Raspberry Pi Zero W", "Raspberry Pi 4 Model B")
#: the export job pads files to at least this many keys
EXPORT_MIN_KEYS = 100
HTTP_TIMEOUT_S = 20.0


class Fleet:
    """Use as a context manager: it owns a temporary folder, stores and a server."""

    def __init__(self, protocol: str, devices: int, days: int, seed: int, rng: random.Random, clock: ManualClock,
                 proximity: ProximityConfig, *, research: bool = False) -> None:
        self.mode_cls = mode_class(protocol)
        self.clock = clock
        self.proximity = proximity
        self._tmp = tempfile.TemporaryDirectory(prefix="ctagent-demo-")
        work = Path(self._tmp.name)
        table = CalibrationTable.load(bundled_calibration_path())
        self.calibrations: list[DeviceCalibration] = []
        self.stores: list[Store] = []
        self.rngs: list[random.Random] = []
        self.sim_devices: list[SimDevice] = []
        for i in range(devices):
            cal = table.lookup(MODELS[i % len(MODELS)])
            self.calibrations.append(cal)
            # not durable: a simulated minute's flush need not reach the disk, and the
            # demo's wall time must not depend on the disk's
            # a random key file each, as `ctagent init` makes by default (no passphrase to stretch)
            key = KeyFile(create_key_file(work / f"device-{i:02d}.key"))
            self.stores.append(Store.create(work / f"device-{i:02d}.db", key, clock=clock, durable=False))
            self.rngs.append(random.Random(rng.getrandbits(64)))
            self.sim_devices.append(SimDevice(f"device-{i:02d}", cal.tx_power, cal.rssi_correction))
        self.medium = Medium(self.sim_devices, MediumConfig(), seed=seed)
        self.days = days
        self._work = work
        self.modes: list[ProtocolMode[Any]] = []
        self.http: httpx.Client | None = None
        #: research recording, one per device, when the demo rehearses an experiment
        self.recorders: list[ResearchRecorder] = (
            [ResearchRecorder(s, started_at=clock.now()) for s in self.stores] if research else [])
        for store in self.stores if research else []:
            cfg = MediumConfig()
            store.state.put(RadioFacts("sim", sum(cfg.adv_interval_s) / 2, cfg.duty))

    def label(self, i: int) -> str:
        return self.sim_devices[i].name

    def write_research(self, folder: Path, pair_truth: list[tuple[int, int, float, float, float]],
                       experiment_id: str) -> list[Path]:
        """Every device's research bundle (collected as a device collects its own) and the
        ground truth, in an experiment folder."""
        from ..experiment.collect import collect, utc_iso

        folder.mkdir(parents=True, exist_ok=True)
        out = []
        now = self.clock.now()
        for i, (store, mode) in enumerate(zip(self.stores, self.modes)):
            target = folder / self.label(i)
            collect(store, mode, target, experiment_id=experiment_id, device_label=self.label(i),
                    device_model=self.calibrations[i].model, consent_at=utc_iso(DAY0 + ACTIVE[0]), now=now)
            out.append(target)
        truth = folder / "truth"
        truth.mkdir(exist_ok=True)
        lines = ["a,b,start,end,distance_m"] + [f"{self.label(a)},{self.label(b)},{s!r},{e!r},{d!r}"
                                                for a, b, s, e, d in pair_truth]
        (truth / "pairs.csv").write_text("\n".join(lines) + "\n")
        return out

    def start_backend(self) -> str:
        """The embedded backend, both roles (key server and ROBERT), on the virtual clock."""
        from backend import Backend, BackendConfig
        from backend.robert import RobertConfig, RobertServer
        from backend.server import BackgroundServer

        self.backend = Backend(BackendConfig(self._work / "backend", region="XX", export_min_keys=EXPORT_MIN_KEYS),
                               clock=self.clock)
        robert_server = RobertServer(self.backend, RobertConfig(tuples_epochs=(self.days + 1) * DAY_SECONDS
                                                                 // EPOCH_SECONDS))
        self.server = BackgroundServer(self.backend, robert_server=robert_server).__enter__()
        return self.server.url

    def open_modes(self) -> None:
        """Every device's protocol mode, set up with the server (ROBERT registers). The
        devices share one HTTP client: one process, one connection pool."""
        self.http = httpx.Client(timeout=HTTP_TIMEOUT_S)
        for store, cal, drng in zip(self.stores, self.calibrations, self.rngs):
            ctx = DeviceContext(store=store, clock=self.clock, calibration=cal, proximity=self.proximity,
                                backend_url=self.server.url, trusted_keys=(self.backend.public_key_b64,), rng=drng,
                                random_bytes=drng.randbytes, match_workers=1, http=self.http)
            mode = self.mode_cls(ctx)
            mode.prepare(self.clock.now())
            self.modes.append(mode)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.http is not None:
            self.http.close()
        server = getattr(self, "server", None)
        if server is not None:
            server.__exit__(None, None, None)
        for s in self.stores:
            s.close()
        self._tmp.cleanup()
