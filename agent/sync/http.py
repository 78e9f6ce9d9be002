"""The thin transport under every backend client: httpx with bounded retries (connection
errors, 5xx and 429, exponential back-off with full jitter on the injected clock) and
typed failures: :class:`~agent.errors.BackendUnreachable` when there is no usable
answer, :class:`~agent.errors.BackendRejected` (with the server's status and code) when
the answer is a refusal."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from ..clock import Clock
from ..errors import BackendRejected, BackendUnreachable

T = TypeVar("T")


class _Retry(Exception):
    """The answer says "try again later" (a 5xx or 429)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def json_bytes(body: dict[str, Any]) -> bytes:
    """The bytes a JSON body is sent as (compact): what request padding counts."""
    return json.dumps(body, separators=(",", ":")).encode()


def _retry_on(status: int) -> None:
    if status >= 500 or status == 429:
        raise _Retry(f"HTTP {status}")


class JsonHttp:
    def __init__(self, base_url: str, *, what: str, clock: Clock, http: httpx.Client | None = None,
                 retries: int = 3, backoff_s: float = 0.5, rng: random.Random | None = None,
                 timeout_s: float = 10.0) -> None:
        """``what`` names the counterpart in messages ("the backend", "the ROBERT server");
        ``timeout_s`` bounds each read and the whole call with its retries."""
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

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` until it answers (raising :class:`_Retry` or a transport error
        means "try again"); :class:`BackendUnreachable` after the retries."""
        why = ""
        # real time, not the injected clock: this bounds real waits on the network
        deadline = time.monotonic() + self.timeout_s
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _Retry as e:
                why = e.why
            except httpx.TimeoutException as e:
                why = f"{type(e).__name__}: no answer within {self.timeout_s:g} s ([sync] timeout_s)"
            except httpx.TransportError as e:
                why = type(e).__name__
            if n == self.retries or time.monotonic() >= deadline:
                break
            self.clock.sleep_blocking(self.rng.uniform(0, self.backoff_s * 2**n))
        raise self._unreachable(why)

    def url(self, path: str) -> str:
        """``path`` under the base URL, or ``path`` itself when it is an absolute URL."""
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The response (any status below 500 but 429); :class:`BackendUnreachable` after
        the retries. ``path``: under the base URL, or an absolute URL."""
        def attempt() -> httpx.Response:
            r = self.http.request(method, self.url(path), **kw)
            _retry_on(r.status_code)
            return r
        return self._retrying(attempt)

    def fetch(self, path: str, *, max_bytes: int) -> bytes:
        """GET a file, streamed and never more than ``max_bytes`` of it:
        :class:`BackendRejected` when it is not there or is larger."""
        def attempt() -> bytes:
            with self.http.stream("GET", self.url(path)) as r:
                _retry_on(r.status_code)
                if r.status_code != 200:
                    raise BackendRejected(f"{path}: HTTP {r.status_code}", status=r.status_code)
                declared = r.headers.get("content-length", "")
                too_large = BackendRejected(f"{path} is larger than {max_bytes} bytes, the most this device "
                                            "accepts ([sync] max_export_bytes)", status=r.status_code)
                if declared.isdigit() and int(declared) > max_bytes:
                    raise too_large
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_large
                    chunks.append(chunk)
                return b"".join(chunks)
        return self._retrying(attempt)

    def post_json(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        """POST a JSON body (compact, as :func:`json_bytes` counts it); the JSON object of
        a 2xx answer, else :class:`BackendRejected` with the server's one-sentence error
        and code."""
        r = self.request("POST", path, content=json_bytes(body),
                         headers={"content-type": "application/json", **(headers or {})})
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
