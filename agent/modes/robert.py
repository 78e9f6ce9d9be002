"""ROBERT (StopCovid / TousAntiCovid), centralized: register with the server, broadcast
a HELLO per epoch (a new EBID and address every 15 minutes, a fresh HELLO on the same
address within it), keep the HELLOs heard in the encrypted store, ask the server for the
risk status, report the heard HELLOs with a health authority code, unregister, delete
the exposure history."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from ..clock import utc_day
from ..errors import ConfigError, UserError
from ..protocol import robert
from ..protocol.payload import PayloadError, find_service_data
from ..protocol.schedule import random_nrpa
from ..records import DaySummary, DeclareResult, Exposure
from ..store import HeardHello
from ..sync.robert import RobertClient, RobertRegistration, RobertStatus, StatusAnswer
from ..ble.base import SimulatedPeer
from .base import Broadcast, CheckResult, DeviceContext, ProtocolMode, ServerAccount, ServerSchedule

log = logging.getLogger("ctagent.robert")

#: HELLOs of this many days are reported when declaring.
REPORT_DAYS = 14
#: /status at most once per two epochs (the deployed app's pace), jittered by up to 10 minutes.
STATUS_SCHEDULE = ServerSchedule(first_delay_s=(60.0, 600.0), interval_s=2 * robert.EPOCH_SECONDS, jitter_s=600.0)


@dataclass(frozen=True)
class RobertLeft:
    """The user left the server (`ctagent unregister`) at ``at``: the daemon does not
    register again by itself; `ctagent register` joins again."""

    STATE_NAME: ClassVar[str] = "robert.left"
    SENSITIVE: ClassVar[bool] = False
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at}

    @classmethod
    def from_json(cls, doc: Any) -> RobertLeft:
        return cls(float(doc["at"]))


NOT_REGISTERED = ("this device is not registered with the ROBERT server: `ctagent register` registers it "
                  "(so does `ctagent run`)")


class RobertMode(ProtocolMode[bytes]):
    name = "robert"
    server_call = "risk status"
    service_uuid16 = robert.ROBERT_SERVICE_UUID16
    samples_per_scan = 1  # the deployed app keeps one HELLO per peer per scan
    decides_on_device = False  # the server scores the risk

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        if not ctx.backend_url:
            raise ConfigError("[sync] backend_url: ROBERT mode needs its server")
        self.tx_power = int(round(ctx.calibration.tx_power))
        self.client = RobertClient(ctx.backend_url, clock=ctx.clock, http=ctx.http, rng=ctx.rng,
                                   retries=ctx.http_retries, api_key=ctx.api_key or None, captcha=ctx.captcha,
                                   timeout_s=ctx.http_timeout_s)
        #: the server's ECDH key from this device's configuration; robert-server does not
        #: send it (the official app has it built in)
        self.server_public_key = ctx.server_public_key
        self.registration = self.store.state.get(RobertRegistration)
        self._pending: list[HeardHello] = []
        #: a simulator's blocks (record_block): times, HELLOs, RSSIs
        self._pending_blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._epoch: int | None = None  # the epoch whose EBID is on air

    @property
    def registered(self) -> bool:
        return self.registration is not None

    def _registration(self) -> RobertRegistration:
        if self.registration is None:
            raise UserError(NOT_REGISTERED)
        return self.registration

    def _keep(self, reg: RobertRegistration | None) -> None:
        self.registration = reg
        if reg is None:
            self.store.state.clear(RobertRegistration)
        else:
            self.store.state.put(reg)

    # -- registration ---------------------------------------------------------------------
    def register(self) -> None:
        """ECDH with the server's key: K_mac and K_tuples, and the first identifiers."""
        private = ec.generate_private_key(ec.SECP256R1())
        answer = self.client.register(robert.public_key_b64(private))
        server_key = self.server_public_key or answer.server_public_key_b64
        if not server_key:
            raise ConfigError("[sync] robert_server_public_key: the ROBERT server does not send its public key (as "
                              "robert-server does not); set it from the server's configuration")
        try:
            keys = robert.ecdh_keys(private, server_key)
            reg = RobertRegistration(keys.k_mac, keys.k_tuples, answer.time_start).with_tuples(answer.tuples_b64)
        except robert.RobertError as e:
            raise UserError(f"the ROBERT server's registration cannot be used: {e}") from None
        self._keep(reg)
        self.store.state.clear(RobertLeft)
        log.info("robert registered")

    def prepare(self, now: float) -> None:
        if not self.registered and self.store.state.get(RobertLeft) is None:
            self.register()

    def refuse_to_run(self) -> str | None:
        left = self.store.state.get(RobertLeft)
        if left is None or self.registered:
            return None
        from ..clock import iso_time

        return (f"this device left the ROBERT server (`ctagent unregister`, {iso_time(left.at)}): it does not "
                "advertise or register by itself; `ctagent register` joins again")

    # -- broadcasting ---------------------------------------------------------------------
    def broadcast(self, now: float) -> Broadcast | None:
        """A new identity each epoch; within it a fresh HELLO every ``robert.HELLO_REFRESH_S``."""
        reg = self.registration
        if reg is None:
            return None
        ntp, epoch, ebid, ecc = reg.identity(now)
        service_data = robert.service_data(robert.build_hello(reg.k_mac, ecc, ebid, ntp), self.tx_power)
        new_identity = epoch != self._epoch
        self._epoch = epoch
        next_epoch = robert.epoch_start_ntp(epoch + 1, reg.time_start) - robert.NTP_UNIX_OFFSET
        return Broadcast(service_data, "", new_identity, min(now + robert.HELLO_REFRESH_S, next_epoch))

    # -- hearing ----------------------------------------------------------------------------
    def decode(self, service_data: Mapping[Any, Any]) -> bytes | None:
        try:
            value = find_service_data(service_data, robert.ROBERT_SERVICE_UUID16)
            return None if value is None else robert.parse_hello(value).to_bytes()
        except (PayloadError, robert.RobertError):
            return None

    def record(self, t: float, payload: bytes, rssi: int, tx_power: int | None = None) -> None:
        self._pending.append(HeardHello(t, payload, rssi))

    def record_block(self, times: np.ndarray, ids: np.ndarray, rssis: np.ndarray, payloads: Sequence[bytes]) -> None:
        heard = np.unique(ids)
        hellos = np.array([payloads[i] for i in heard.tolist()], dtype="S16").reshape(len(heard))
        self._pending_blocks.append((times, hellos[np.searchsorted(heard, ids)], rssis))

    @property
    def pending(self) -> int:
        """HELLOs heard and not yet written."""
        return len(self._pending) + sum(len(b[0]) for b in self._pending_blocks)

    def flush(self, now: float, *, final: bool = False) -> int:
        n = self.store.hellos.add(self._pending)
        self._pending = []
        if self._pending_blocks:
            times, hellos, rssis = (np.concatenate(a) for a in zip(*self._pending_blocks))
            n += self.store.hellos.add_arrays(times, hellos, rssis)
            self._pending_blocks = []
        return n

    # -- the server -------------------------------------------------------------------------
    @property
    def server_schedule(self) -> ServerSchedule:
        return STATUS_SCHEDULE

    def status(self, now: float) -> StatusAnswer:
        """/status: new identifiers, the risk; an exposure is recorded (once a day) when at risk."""
        reg = self._registration()
        answer = self.client.status(reg, now)
        if answer.tuples_b64:
            try:
                self._keep(reg.with_tuples(answer.tuples_b64))
            except robert.RobertError as e:
                raise UserError(f"the ROBERT server's identifiers cannot be used: {e}") from None
        self.store.state.put(RobertStatus(now, answer.at_risk, answer.risk_level, answer.risk))
        if answer.at_risk:
            self.store.exposures.add(Exposure(day=utc_day(now), protocol=self.name, decided_by="server",
                                              found_at=now, risk=answer.risk))
        return answer

    def check(self, now: float, progress: Callable[[int, int], None] | None = None) -> CheckResult:
        if not self.registered:
            return CheckResult(now, False, "robert status skipped: not registered yet",
                               "not registered yet: nothing to ask the server", problem=NOT_REGISTERED)
        a = self.status(now)
        message = ("AT RISK: see `ctagent exposures`" if a.at_risk else "not at risk")
        return CheckResult(now, False, f"robert status at_risk={a.at_risk}", message, a.at_risk,
                           {"atRisk": a.at_risk, "riskLevel": a.risk_level})

    def _hellos_to_report(self, now: float) -> list[HeardHello]:
        return self.store.hellos.all(since_day=utc_day(now) - REPORT_DAYS + 1)

    def declare_prompt(self, now: float) -> str:
        self.flush(now)
        return (f"Upload the {len(self._hellos_to_report(now))} HELLO(s) your device heard in the last "
                f"{REPORT_DAYS} days to the server? It will tell the people concerned they are at risk.")

    def declare(self, code: str, now: float) -> DeclareResult:
        """/report: the HELLOs heard, then forget them."""
        self.flush(now)
        hellos = self._hellos_to_report(now)
        answer = self.client.report(code, hellos)
        self.store.hellos.clear()
        if answer.accepted is None:  # robert-server says only that it took the report
            summary = f"reported: {len(hellos)} HELLO(s) sent; the server accepted the report"
        else:
            summary = f"reported: {answer.accepted} HELLO(s) accepted, {answer.dropped} dropped by the server"
        problem = None
        if not hellos:
            summary = ("reported: the server knows you tested positive; this device heard no HELLO in the last "
                       f"{REPORT_DAYS} days, so nobody is told they are at risk")
        elif answer.accepted == 0:
            problem = (f"the server could verify none of the {len(hellos)} HELLO(s) this device heard: they came "
                       "from devices it did not register (another server's, or simulated peers) or were heard "
                       "outside its time tolerance (check this device's clock: `ctagent doctor`); nobody is "
                       "told they are at risk")
        return DeclareResult(sent=len(hellos), accepted=answer.accepted, dropped=answer.dropped, summary=summary,
                             problem=problem)

    @property
    def account(self) -> ServerAccount:
        return self

    def unregister(self, now: float) -> None:
        self.client.unregister(self._registration(), now)
        self._keep(None)
        self.store.state.put(RobertLeft(now))

    def delete_history(self, now: float) -> None:
        self.client.delete_history(self._registration(), now)

    # -- status -----------------------------------------------------------------------------
    def status_fields(self) -> dict[str, Any]:
        st = self.store.state.get(RobertStatus)
        left = self.store.state.get(RobertLeft)
        return {"registered": self.registered, "left_at": left.at if left and not self.registered else None,
                "at_risk": st.at_risk if st else None, "risk_level": st.risk_level if st else None,
                "hellos_pending": self.pending}

    def heard_by_day(self) -> list[DaySummary]:
        ids: dict[int, set[bytes]] = {}
        samples: dict[int, int] = {}
        minutes: dict[int, set[tuple[bytes, int]]] = {}
        for t, hello, _ in self.store.hellos.all():
            day, identifier = utc_day(t), hello[:9]  # ECC ‖ EBID: one identifier per epoch
            ids.setdefault(day, set()).add(identifier)
            samples[day] = samples.get(day, 0) + 1
            minutes.setdefault(day, set()).add((identifier, int(t // 60)))
        return [DaySummary(d, len(ids[d]), samples[d], len(minutes[d])) for d in sorted(ids)]

    def last_server_success(self) -> float | None:
        st = self.store.state.get(RobertStatus)
        return st.at if st else None

    def own_identifiers(self) -> list[tuple[str, bytes, int, int]]:
        """The EBIDs of the epochs the registration holds (the research log's broadcasts
        have those of the epochs already gone)."""
        reg = self.registration
        return [] if reg is None else [("ebid", ebid, epoch, 1) for epoch, (ebid, _) in sorted(reg.tuples.items())]

    # -- simulation -------------------------------------------------------------------------
    @classmethod
    def simulated_peer(cls, rng: random.Random, tx_power_dbm: int) -> SimulatedPeer:
        return _RobertPeer(random.Random(rng.getrandbits(64)), tx_power_dbm)


class _RobertPeer:
    """A simulated ROBERT device: well-formed HELLOs of identifiers no server issued (a
    dry run: a real server drops them), a new EBID and address every epoch."""

    def __init__(self, rng: random.Random, tx_power_dbm: int) -> None:
        self.rng = rng
        self.tx_power = tx_power_dbm
        self._epoch: int | None = None
        self._ids = b""
        self._address = ""

    def advertisement(self, now: float) -> tuple[str, dict[str, bytes]]:
        ntp = robert.ntp_seconds(now)
        epoch = ntp // robert.EPOCH_SECONDS
        if epoch != self._epoch:
            self._epoch, self._ids = epoch, self.rng.randbytes(9)  # ECC ‖ EBID
            self._address = random_nrpa(self.rng)
        hello = self._ids + robert.time16(ntp) + self.rng.randbytes(5)
        return self._address, {robert.ROBERT_SERVICE_UUID: robert.service_data(hello, self.tx_power)}
