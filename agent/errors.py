"""The one error tree of ctagent (agent and backend).

    CtagentError
    ├── UserError              the user can fix it: the CLI prints it as one sentence, exit 1
    │   ├── ConfigError        a setting is wrong (file, key and reason in the message)
    │   ├── StoreError         the encrypted store cannot be used as asked
    │   │   ├── StoreKeyError      wrong passphrase or key file, unusable key material
    │   │   └── StoreVersionError  written by a newer ctagent
    │   ├── CalibrationError   a calibration list cannot be read
    │   ├── InputFileError     a file given on the command line is not in the documented format
    │   ├── RadioError         the radio refused (BlueZ's D-Bus error name kept)
    │   └── BackendError       talking to a backend failed
    │       ├── BackendUnreachable   no answer (offline is normal for a device)
    │       └── BackendRejected      an answer, but a refusal or an unusable one (HTTP status, code)
    └── ProtocolError (also a ValueError)  bytes from outside break a specification:
        payloads, export files, ROBERT data; each parser raises only its own subclass

Anything else that reaches the CLI is a bug: it prints a short message and "run with
--debug for the traceback", exit 2.
"""

from __future__ import annotations


class CtagentError(Exception):
    """Root of every error ctagent raises on purpose."""


class UserError(CtagentError):
    """Something the user can fix; ``str(e)`` is one sentence that says what and how."""


class ConfigError(UserError):
    """A configuration setting is invalid."""


class StoreError(UserError):
    """The store cannot be used as asked."""


class StoreKeyError(StoreError):
    """Wrong passphrase or key file, or unusable key material."""


class StoreVersionError(StoreError):
    """The database was written by a newer ctagent."""


class CalibrationError(UserError):
    """A calibration file cannot be read."""


class InputFileError(UserError):
    """An input file is not in the documented format."""


class RadioError(UserError):
    """The radio refused a request; ``name`` is the stack's error name (e.g. BlueZ's D-Bus error)."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name, self.text = name, text


class BackendError(UserError):
    """Talking to a backend (key server, verification server, ROBERT server) failed."""


class BackendUnreachable(BackendError):
    """The backend did not answer (network down, DNS, timeout, 5xx after retries)."""


class BackendRejected(BackendError):
    """The backend answered with a refusal (``status``, ``code`` as it sent them) or with
    something the client cannot use (``code`` empty)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status, self.code = status, code


class ProtocolError(CtagentError, ValueError):
    """Data from outside does not follow the specification it claims to follow."""
