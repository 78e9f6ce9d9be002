"""The agent's client for the backend (httpx)."""

from .client import DeclareError, SyncClient, SyncError, SyncResult

__all__ = ["DeclareError", "SyncClient", "SyncError", "SyncResult"]
