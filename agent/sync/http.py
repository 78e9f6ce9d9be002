"""The thin transport under every backend client: httpx with bounded retries (connection
errors, 5xx and 429, exponential back-off with full jitter on the injected clock) and
typed failures: :class:`~agent.errors.BackendUnreachable` when there is no usable
answer, :class:`~agent.errors.BackendRejected` (with the server's status and code) when
the answer is a refusal."""

from __future__ import annotations

import random
from typing import Any

import httpx

from ..clock import Clock
from ..errors import BackendRejected, BackendUnreachable


class JsonHttp:
    def __init__(self, base_url: str, *, what: str, clock: Clock, http: httpx.Client | None = None,
                 retries: int = 3, backoff_s: float = 0.5, rng: random.Random | None = None,
                 timeout_s: float = 20.0) -> None:
        """``what`` names the counterpart in messages ("the backend", "the ROBERT server")."""
        self.base_url = base_url.rstrip("/")
        self.what = what
        self.clock = clock
        self._http, self._owns_http = http, http is None
        self.timeout_s = timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.rng = rng or random.Random()

    @property
    def http(self) -> httpx.Client:
        """The HTTP client: the one given (shared), or our own, made at first use (each
        holds a TLS context of a megabyte or so)."""
        if self._http is None:
            self._http = httpx.Client(timeout=self.timeout_s)
        return self._http

    def close(self) -> None:
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None

    def _unreachable(self, why: str) -> BackendUnreachable:
        return BackendUnreachable(f"{self.what} at {self.base_url} is unreachable ({why}); "
                                  "run the same command again later")

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The response (any status below 500 but 429); :class:`BackendUnreachable` after
        the retries."""
        why = ""
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, self.base_url + path, **kw)
                if r.status_code < 500 and r.status_code != 429:
                    return r
                why = f"HTTP {r.status_code}"
            except httpx.TransportError as e:
                why = type(e).__name__
            if attempt < self.retries:
                self.clock.sleep_blocking(self.rng.uniform(0, self.backoff_s * 2**attempt))
        raise self._unreachable(why)

    def post_json(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        """POST a JSON body; the JSON object of a 2xx answer, else :class:`BackendRejected`
        with the server's one-sentence error and code."""
        r = self.request("POST", path, json=body, headers=headers or {})
        try:
            doc = r.json()
        except ValueError:
            raise BackendRejected(f"{path}: {self.what} answered HTTP {r.status_code} without JSON",
                                  status=r.status_code) from None
        if not isinstance(doc, dict):
            raise BackendRejected(f"{path}: {self.what} answered with JSON that is not an object",
                                  status=r.status_code)
        if not 200 <= r.status_code < 300:
            code = str(doc.get("code") or doc.get("errorCode") or "")
            raise BackendRejected(str(doc.get("error") or f"{path}: HTTP {r.status_code}"), status=r.status_code,
                                  code=code)
        return doc
