"""The backend as one object: the configuration, the clock, the database and the roles
built on them. Callers use the roles directly (``backend.verification.issue_code(...)``,
``backend.exports.run()``); this object only puts them together."""

from __future__ import annotations

from agent.clock import Clock, RealClock

from . import db
from .certificate import AUDIENCE, ISSUER, TrustedIssuer, outside_issuer
from .config import BackendConfig
from .exports import ExportJob
from .httputil import proxy_networks
from .keyfiles import private_data_dir
from .publish import Publisher
from .ratelimit import RateLimiter
from .verification import VerificationService

#: the default clock: wall time (the CLI and a deployed server)
WALL_CLOCK = RealClock()


class Backend:
    def __init__(self, config: BackendConfig, *, clock: Clock = WALL_CLOCK) -> None:
        proxy_networks(config.trusted_proxies)  # a wrong entry is refused before anything starts
        self.config = config
        self.clock = clock
        private_data_dir(config.data_dir)
        self.engine = db.make_engine(config.database)
        self.limiter = RateLimiter(clock)
        self.verification = VerificationService(config, self.engine, clock, self.limiter)
        issuers = [TrustedIssuer(ISSUER, AUDIENCE, self.verification.certificate_public_key, builtin=True),
                   *(outside_issuer(*v) for v in config.outside_verifiers)]
        self.publisher = Publisher(self.engine, clock, issuers, rehearsal_embargo_s=config.rehearsal_embargo_s)
        self.exports = ExportJob(config, self.engine, clock)
        #: the export signing public key the agents trust (base64 SubjectPublicKeyInfo)
        self.public_key_b64 = self.exports.public_key_b64
