"""Backend client: download signed exports, declare positive.

Offline is normal: network failures are retried with exponential back-off and jitter,
then reported in the result, never raised from :meth:`SyncClient.download_exports`.
Progress of downloads is kept in the store (``sync_state``): the ETag of index.txt, the
export files already processed; a file that failed is fetched again next time.
"""

from __future__ import annotations

import base64
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from ..protocol import export, gaen
from ..protocol.schedule import TekRecord
from ..protocol.verification import PublishKey, tek_hmac

log = logging.getLogger("ctagent.sync")

STATE_DONE = "exports.done"
STATE_ETAG = "exports.index_etag"
STATE_LAST_SUCCESS = "sync.last_success"
STATE_PENDING_DECLARATION = "declare.pending"


class SyncError(Exception):
    """The backend answered, but not with what we can use."""


class DeclareError(SyncError):
    """Declaring positive failed: one sentence for the user."""


@dataclass
class SyncResult:
    offline: bool = False
    files_new: int = 0
    files_failed: list[str] = field(default_factory=list)
    keys: list[export.DiagnosisKey] = field(default_factory=list)
    not_modified: bool = False
    processed: list[str] = field(default_factory=list)
    index_etag: str | None = None


def request_with_retries(http: httpx.Client, method: str, url: str, *, retries: int, backoff_s: float,
                         sleep: Callable[[float], None], rng: random.Random, **kw) -> httpx.Response:
    """Retries connection errors and 5xx/429 with exponential back-off and full jitter."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            r = http.request(method, url, **kw)
            if r.status_code < 500 and r.status_code != 429:
                return r
            last = SyncError(f"{method} {url}: HTTP {r.status_code}")
        except httpx.TransportError as e:
            last = e
        if attempt < retries:
            sleep(rng.uniform(0, backoff_s * 2**attempt))
    assert last is not None
    raise last


def post_json(http: httpx.Client, base_url: str, path: str, body: dict, *, error_cls: type[Exception], what: str,
              retries: int, backoff_s: float, sleep: Callable[[float], None], rng: random.Random,
              headers: dict | None = None) -> dict:
    """POST a JSON body (with retries); the JSON answer, or ``error_cls`` with one sentence."""
    try:
        r = request_with_retries(http, "POST", base_url + path, retries=retries, backoff_s=backoff_s, sleep=sleep,
                                 rng=rng, json=body, headers=headers or {})
    except httpx.TransportError as e:
        raise error_cls(f"{what} at {base_url} is unreachable ({type(e).__name__}); "
                        "run the same command again later") from None
    except SyncError as e:
        raise error_cls(str(e)) from None
    try:
        doc = r.json()
    except ValueError:
        raise error_cls(f"{path}: {what} answered HTTP {r.status_code} without JSON") from None
    if r.status_code != 200:
        raise error_cls(doc.get("error") or f"{path}: HTTP {r.status_code}")
    return doc


class SyncClient:
    def __init__(self, base_url: str, *, trusted_keys: list[str], http: httpx.Client | None = None,
                 retries: int = 3, backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, timeout_s: float = 20.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.trusted_keys = trusted_keys
        self.http = http or httpx.Client(timeout=timeout_s)
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self.rng = rng or random.Random()

    def close(self) -> None:
        self.http.close()

    # -- transport ------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        return request_with_retries(self.http, method, self.base_url + path, retries=self.retries,
                                    backoff_s=self.backoff_s, sleep=self.sleep, rng=self.rng, **kw)

    # -- download -------------------------------------------------------------------
    def download_exports(self, store, progress: Callable[[int, int], None] | None = None) -> SyncResult:
        """New export files -> verified keys. Records progress in ``store``; call
        :meth:`mark_processed` once the keys were matched. ``progress(done, total)``
        is called after each file."""
        res = SyncResult()
        done = set(store.get_state(STATE_DONE, []))
        headers = {}
        etag = store.get_state(STATE_ETAG)
        if etag:
            headers["If-None-Match"] = etag
        try:
            r = self._request("GET", "/exports/index.txt", headers=headers)
        except (httpx.TransportError, SyncError) as e:
            log.info("sync: backend unreachable (%s); will retry later", type(e).__name__)
            res.offline = True
            return res
        if r.status_code == 304:
            res.not_modified = True
            store.set_state(STATE_LAST_SUCCESS, time.time())
            return res
        if r.status_code == 404:  # nothing published yet
            return res
        if r.status_code != 200:
            raise SyncError(f"index.txt: HTTP {r.status_code}")
        names = [ln.strip() for ln in r.text.splitlines() if ln.strip()]
        todo = [n for n in names if n not in done]
        for i, name in enumerate(todo, 1):
            if progress:
                progress(i - 1, len(todo))
            if "/" in name or not name.endswith(".zip"):
                log.warning("sync: ignoring odd index entry")
                continue
            try:
                fr = self._request("GET", f"/exports/{name}")
                if fr.status_code != 200:
                    raise SyncError(f"HTTP {fr.status_code}")
                exp = export.parse_export(fr.content, trusted_keys=self.trusted_keys)
            except (httpx.TransportError, SyncError, export.ExportError) as e:
                log.warning("sync: export file failed (%s: %s); retried next sync", type(e).__name__, e)
                res.files_failed.append(name)
                continue
            res.keys.extend(exp.keys)
            res.processed.append(name)
            res.files_new += 1
        if progress and todo:
            progress(len(todo), len(todo))
        res.index_etag = r.headers.get("etag")
        return res

    def mark_processed(self, store, result: SyncResult) -> None:
        done = list(dict.fromkeys(store.get_state(STATE_DONE, []) + result.processed))[-2000:]
        store.set_state(STATE_DONE, done)
        if not result.files_failed and not result.offline:
            if result.index_etag:  # only once every listed file was processed
                store.set_state(STATE_ETAG, result.index_etag)
            store.set_state(STATE_LAST_SUCCESS, time.time())

    # -- declare positive -------------------------------------------------------------
    def _post_json(self, path: str, body: dict) -> dict:
        return post_json(self.http, self.base_url, path, body, error_cls=DeclareError, what="the backend",
                         retries=self.retries, backoff_s=self.backoff_s, sleep=self.sleep, rng=self.rng)

    def declare(self, code: str, teks: list[TekRecord], store, *, now: float) -> dict:
        """verify code -> certificate over the keys' HMAC -> publish. Idempotent: the
        certificate is kept in the store until publish succeeded, so a retry after a
        network failure re-sends the same request."""
        pending = store.get_state(STATE_PENDING_DECLARATION)
        if pending is None:
            if not teks:
                raise DeclareError("there are no keys of the last 14 days to upload")
            token = self._post_json("/api/verify", {"code": code})["token"]
            hmac_key = secrets.token_bytes(32)
            keys = [PublishKey(t.tek, t.rolling_start, t.rolling_period, 0) for t in teks]
            cert = self._post_json("/api/certificate", {"token": token, "ekeyhmac": tek_hmac(hmac_key, keys)})
            pending = {"certificate": cert["certificate"], "hmacKey": base64.b64encode(hmac_key).decode(),
                       "rolling_starts": [t.rolling_start for t in teks]}
            store.set_state(STATE_PENDING_DECLARATION, pending)
        by_start = {t.rolling_start: t for t in teks}
        try:
            chosen = [by_start[s] for s in pending["rolling_starts"]]
        except KeyError:
            store.set_state(STATE_PENDING_DECLARATION, None)
            raise DeclareError("the keys of the pending declaration are gone; ask for a new code") from None
        body = {
            "temporaryExposureKeys": [{"key": base64.b64encode(t.tek).decode(), "rollingStartNumber": t.rolling_start,
                                       "rollingPeriod": t.rolling_period, "transmissionRisk": 0} for t in chosen],
            "healthAuthorityID": "ctagent", "verificationPayload": pending["certificate"],
            "hmacKey": pending["hmacKey"], "padding": base64.b64encode(secrets.token_bytes(self.rng.randint(16, 512))).decode(),
        }
        try:
            resp = self._post_json("/v1/publish", body)
        except DeclareError as e:
            if "unreachable" not in str(e):
                store.set_state(STATE_PENDING_DECLARATION, None)  # rejected: a retry cannot succeed
            raise
        store.set_state(STATE_PENDING_DECLARATION, None)
        store.set_state("declare.done", {"at": now, "keys": len(chosen)})
        return resp


def teks_to_upload(store, now: float, days: int = 14) -> list[TekRecord]:
    """Own TEKs of the last ``days`` days, including today's (embargoed by the server)."""
    since = gaen.rolling_start_for_day(now) // gaen.TEK_ROLLING_PERIOD - days + 1
    return sorted(store.teks(since_day=since), key=lambda t: t.rolling_start)
