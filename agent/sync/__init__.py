"""The agent's clients for its backends (httpx): ``keyserver`` (Exposure Notification:
download and verify exports, declare positive), ``robert`` (the ROBERT server), over
``http`` (retries, typed errors)."""

from .http import JsonHttp
from .keyserver import KeyServerClient, SyncResult
from .robert import RobertClient, RobertRegistration, RobertStatus

__all__ = ["JsonHttp", "KeyServerClient", "RobertClient", "RobertRegistration", "RobertStatus", "SyncResult"]
