"""The backend's settings (one dataclass; the CLI and the tests fill it)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the file whose presence says a folder holds a backend (created by ``backend init``/``serve``)
MARKER_FILE = "export-signing-key.pem"


def default_data_dir() -> Path:
    """One well-known place, whatever the current directory: ``$CTAGENT_BACKEND_DIR``,
    else ``$XDG_DATA_HOME/ctagent-backend`` (``~/.local/share/ctagent-backend``). The
    systemd unit sets ``CTAGENT_BACKEND_DIR=/var/lib/ctagent-backend``."""
    if os.environ.get("CTAGENT_BACKEND_DIR"):
        return Path(os.environ["CTAGENT_BACKEND_DIR"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(xdg).expanduser() / "ctagent-backend"


@dataclass
class BackendConfig:
    #: keys, export files and (by default) the SQLite database
    data_dir: Path
    #: SQLAlchemy URL; None: SQLite in ``data_dir``
    database_url: str | None = None
    region: str = "XX"
    export_period_s: int = 3600
    export_max_keys: int = 500_000
    export_min_keys: int = 100  # padded with random keys up to this
    export_retention_days: int = 14
    rate_issue_per_min: int = 60
    rate_verify_per_min: int = 20
    key_id: str = "ctagent"
    key_version: str = "v1"
    #: addresses or networks (``10.0.0.0/8``) of the reverse proxies in front of the
    #: backend: only a request from one of them has its ``X-Forwarded-For`` and
    #: ``X-Forwarded-Proto`` believed (the client address of the rate limits, HTTPS)
    trusted_proxies: tuple[str, ...] = ()
    #: mark the page's cookies Secure always (TLS ends where the backend cannot see it
    #: and no trusted proxy says so); otherwise they are Secure on HTTPS requests
    secure_cookies: bool = False
    #: rehearsals only: export a key this many seconds after its upload even while it is
    #: still being broadcast (None, the default: not before the end of its rolling
    #: period, as the key server does)
    rehearsal_embargo_s: float | None = None
    #: outside verification servers whose certificates publish keys, beside the built-in
    #: one: (issuer, audience, ECDSA P-256 public key as PEM text or a PEM file)
    outside_verifiers: tuple[tuple[str, str, str], ...] = ()

    def exists(self) -> bool:
        """Whether ``data_dir`` already holds a backend (its keys)."""
        return (self.data_dir / MARKER_FILE).is_file()

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'backend.db'}"

    def to_json(self) -> str:
        """The settings as JSON (what ``backend serve --workers`` hands its worker processes)."""
        return json.dumps({**dataclasses.asdict(self), "data_dir": str(self.data_dir)})

    @classmethod
    def from_json(cls, text: str) -> BackendConfig:
        doc: dict[str, Any] = json.loads(text)
        doc["data_dir"] = Path(doc["data_dir"])
        doc["trusted_proxies"] = tuple(doc["trusted_proxies"])
        doc["outside_verifiers"] = tuple(tuple(v) for v in doc["outside_verifiers"])
        return cls(**doc)
