"""The Exposure Notification key-server client: download signed exports, declare positive.

Offline is normal: :meth:`KeyServerClient.download` reports an unreachable backend in
its result instead of raising.

The index follows the public key server's layout (google/exposure-notifications-server
``docs/getting-started/downloading-export-batches-keys.md``): ``index.txt`` lists, oldest
first, paths relative to an export base URL, of any depth and any suffix (Google writes
``<region>/<start>-<end>-<batch>.zip``); a deployment publishes both on a CDN, so the
index URL and the base URL are settings. An entry that would leave the base (``..``, an
absolute URL, another host) is refused and, like one that cannot be fetched or
verified, counts as failed: the index is then retried at the next sync.

Progress is kept in the store as typed state: the ETag of index.txt and the export
files already processed (clear: they are public file names), the pending declaration
(encrypted: it holds the certificate and the HMAC key). A file that failed is fetched
again next time, and the ETag is kept only once every listed file was processed.
"""

from __future__ import annotations

import base64
import logging
import random
import secrets
from urllib.parse import quote, urlsplit
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from ..clock import Clock
from ..errors import BackendRejected, BackendUnreachable, UserError
from ..protocol import export
from ..protocol.gaen import TemporaryExposureKey
from ..protocol.verification import tek_hmac
from ..records import DeclareResult
from ..store import Store
from .http import JsonHttp, json_bytes

log = logging.getLogger("ctagent.sync")

#: How many processed export file names are remembered (the index lists 14 days).
MAX_REMEMBERED_FILES = 2000
#: The largest export file a device downloads, the same cap as on its content: a real
#: 500,000-key file is about 15 MB.
DEFAULT_MAX_EXPORT_BYTES = export.DEFAULT_MAX_UNCOMPRESSED


#: Every request of a declaration is padded to this many bytes, as the Android reference
#: app pads its own (``Padding.TARGET_PAYLOAD_SIZE_BYTES``): a real declaration, chaff and
#: the official app's requests are the same size on the wire.
PADDED_REQUEST_BYTES = 5000
#: the header that marks cover traffic (the Android app's ``ApiConstants.CHAFF_HEADER``)
CHAFF_HEADERS = {"X-Chaff": "1"}


def padded(body: dict[str, Any], target: int = PADDED_REQUEST_BYTES) -> dict[str, Any]:
    """``body`` with a ``padding`` of random base64 that brings it to ``target`` bytes as
    sent, or just over it; a body of ``target`` bytes or more gets none (Padding.addPadding)."""
    if len(json_bytes(body)) >= target:
        return body
    n = max(1, (target - len(json_bytes({**body, "padding": ""}))) * 3 // 4)
    while True:
        out = {**body, "padding": base64.b64encode(secrets.token_bytes(n)).decode()}
        if len(json_bytes(out)) >= target:
            return out
        n += 1


# -- state kept in the store ----------------------------------------------------------------

@dataclass(frozen=True)
class ProcessedExports:
    STATE_NAME: ClassVar[str] = "exports.done"
    SENSITIVE: ClassVar[bool] = False
    names: tuple[str, ...]

    def to_json(self) -> list[str]:
        return list(self.names)

    @classmethod
    def from_json(cls, doc: Any) -> ProcessedExports:
        return cls(tuple(str(n) for n in doc))


@dataclass(frozen=True)
class IndexEtag:
    STATE_NAME: ClassVar[str] = "exports.index_etag"
    SENSITIVE: ClassVar[bool] = False
    etag: str

    def to_json(self) -> str:
        return self.etag

    @classmethod
    def from_json(cls, doc: Any) -> IndexEtag:
        return cls(str(doc))


@dataclass(frozen=True)
class LastSync:
    """When the last sync that saw every listed file succeeded."""

    STATE_NAME: ClassVar[str] = "sync.last_success"
    SENSITIVE: ClassVar[bool] = False
    at: float

    def to_json(self) -> float:
        return self.at

    @classmethod
    def from_json(cls, doc: Any) -> LastSync:
        return cls(float(doc))


@dataclass(frozen=True)
class PendingDeclaration:
    """A certificate obtained but not yet used to publish: a retry re-sends the same request."""

    STATE_NAME: ClassVar[str] = "declare.pending"
    SENSITIVE: ClassVar[bool] = True
    certificate: str
    hmac_key_b64: str
    rolling_starts: tuple[int, ...]

    def __repr__(self) -> str:
        return f"PendingDeclaration(keys={len(self.rolling_starts)})"

    def to_json(self) -> dict[str, Any]:
        return {"certificate": self.certificate, "hmacKey": self.hmac_key_b64,
                "rolling_starts": list(self.rolling_starts)}

    @classmethod
    def from_json(cls, doc: Any) -> PendingDeclaration:
        return cls(str(doc["certificate"]), str(doc["hmacKey"]), tuple(int(s) for s in doc["rolling_starts"]))


@dataclass(frozen=True)
class Declared:
    STATE_NAME: ClassVar[str] = "declare.done"
    SENSITIVE: ClassVar[bool] = False
    at: float
    keys: int

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "keys": self.keys}

    @classmethod
    def from_json(cls, doc: Any) -> Declared:
        return cls(float(doc["at"]), int(doc["keys"]))


# -- results -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyncResult:
    offline: bool = False
    #: why the backend counted as unreachable (one sentence), when offline
    offline_reason: str = ""
    not_modified: bool = False
    files_new: int = 0
    files_failed: tuple[str, ...] = ()
    #: keys in the files processed (each file's keys went to ``on_keys`` as arrays)
    key_count: int = 0
    processed: tuple[str, ...] = ()
    index_etag: str | None = None


def new_export_names(index_text: str, done: Collection[str]) -> list[str]:
    """The entries of index.txt not processed yet, in order."""
    names = [ln.strip() for ln in index_text.splitlines() if ln.strip()]
    return [n for n in names if n not in done]


def export_url(base_url: str, entry: str) -> str:
    """The absolute URL of an index entry under ``base_url``; ValueError when the entry
    is not a plain relative path (``..``, ``.``, empty segments, an absolute path or URL,
    a query, control characters) or would land on another host."""
    if (not entry or entry.startswith("/") or "\\" in entry or ":" in entry.split("/")[0]
            or any(c in entry for c in "?#") or any(ord(c) < 0x21 or ord(c) == 0x7F for c in entry)):
        raise ValueError("not a relative path")
    parts = entry.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("a path segment is empty, '.' or '..'")
    url = base_url.rstrip("/") + "/" + "/".join(quote(p, safe="-._~+=,@") for p in parts)
    if urlsplit(url).netloc != urlsplit(base_url).netloc:
        raise ValueError("another host")
    return url


# -- the client -------------------------------------------------------------------------------

class KeyServerClient:
    def __init__(self, base_url: str, *, trusted_keys: Sequence[str], clock: Clock,
                 http: httpx.Client | None = None, retries: int = 3, backoff_s: float = 0.5,
                 rng: random.Random | None = None, timeout_s: float = 10.0,
                 max_export_bytes: int = DEFAULT_MAX_EXPORT_BYTES, index_url: str = "",
                 export_base_url: str = "") -> None:
        """``base_url``: the key server's API (verify, certificate, publish); the exports
        are at ``index_url`` and under ``export_base_url`` (default: ``<base_url>/exports/``)."""
        self.trusted_keys = list(trusted_keys)
        self.max_export_bytes = max_export_bytes
        self.export_base_url = export_base_url or base_url.rstrip("/") + "/exports/"
        self.index_url = index_url or self.export_base_url.rstrip("/") + "/index.txt"
        self.clock = clock
        self.rng = rng or random.Random()
        self.transport = JsonHttp(base_url, what="the backend", clock=clock, http=http, retries=retries,
                                  backoff_s=backoff_s, rng=self.rng, timeout_s=timeout_s)

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    def close(self) -> None:
        self.transport.close()

    # -- download -------------------------------------------------------------------
    def download(self, store: Store, on_keys: Callable[[export.PackedKeys], None],
                 progress: Callable[[int, int], None] | None = None) -> SyncResult:
        """New export files, one at a time: fetched, export.sig verified, export.bin read
        into arrays, handed to ``on_keys`` and let go (a million keys never sit in memory
        at once). Call :meth:`commit` once they were matched. ``progress(done, total)`` is
        called after each file."""
        done_state = store.state.get(ProcessedExports)
        done = set(done_state.names) if done_state else set()
        etag = store.state.get(IndexEtag)
        headers = {"If-None-Match": etag.etag} if etag else {}
        try:
            r = self.transport.request("GET", self.index_url, headers=headers)
        except BackendUnreachable as e:
            log.info("sync: backend unreachable; will retry later")
            return SyncResult(offline=True, offline_reason=str(e))
        if r.status_code == 304:
            store.state.put(LastSync(self.clock.now()))
            return SyncResult(not_modified=True)
        if r.status_code == 404:  # nothing published yet
            return SyncResult()
        if r.status_code != 200:
            raise BackendRejected(f"index.txt: HTTP {r.status_code}", status=r.status_code)
        todo = new_export_names(r.text, done)
        key_count = 0
        failed: list[str] = []
        processed: list[str] = []
        for i, name in enumerate(todo, 1):
            if progress:
                progress(i - 1, len(todo))
            try:
                url = export_url(self.export_base_url, name)
            except ValueError as e:
                log.warning("sync: index entry refused (%s); the index is retried next sync", e)
                failed.append(name)
                continue
            try:
                data = self.transport.fetch(url, max_bytes=self.max_export_bytes)
                export_bin, export_sig = export.unzip_export(data)
                del data  # the zip goes before the keys' arrays come
                exp = export.parse_verified(export_bin, export_sig, trusted_keys=self.trusted_keys)
                del export_bin
            except (BackendUnreachable, BackendRejected, export.ExportError) as e:
                log.warning("sync: export file failed (%s: %s); retried next sync", type(e).__name__, e)
                failed.append(name)
                continue
            on_keys(exp.keys)
            key_count += len(exp.keys)
            processed.append(name)
            del exp
        if progress and todo:
            progress(len(todo), len(todo))
        return SyncResult(files_new=len(processed), files_failed=tuple(failed), key_count=key_count,
                          processed=tuple(processed), index_etag=r.headers.get("etag"))

    def commit(self, store: Store, result: SyncResult) -> None:
        """Remember what ``result`` processed (after its keys were matched)."""
        old = store.state.get(ProcessedExports)
        names = list(dict.fromkeys((old.names if old else ()) + result.processed))[-MAX_REMEMBERED_FILES:]
        records: list[Any] = [ProcessedExports(tuple(names))]
        if not result.files_failed and not result.offline:
            if result.index_etag:  # only once every listed file was processed
                records.append(IndexEtag(result.index_etag))
            records.append(LastSync(self.clock.now()))
        store.state.put_many(records)  # together: one sync to the disk

    # -- declare positive -------------------------------------------------------------
    def declare(self, code: str, teks: Sequence[TemporaryExposureKey], store: Store, *, now: float) -> DeclareResult:
        """verify code -> certificate over the keys' HMAC -> publish. Idempotent: the
        certificate is kept (encrypted) until publish succeeded, so a retry after a
        network failure re-sends the same request."""
        pending = store.state.get(PendingDeclaration)
        if pending is None:
            if not teks:
                raise UserError("there are no keys of the last 14 days to upload")
            token = self.transport.post_json("/api/verify", padded({"code": code}))["token"]
            hmac_key = secrets.token_bytes(32)
            keys = [TemporaryExposureKey(t.key_data, t.rolling_start_interval_number, t.rolling_period, 0)
                    for t in teks]
            cert = self.transport.post_json("/api/certificate",
                                            padded({"token": token, "ekeyhmac": tek_hmac(hmac_key, keys)}))
            pending = PendingDeclaration(cert["certificate"], base64.b64encode(hmac_key).decode(),
                                         tuple(t.rolling_start_interval_number for t in teks))
            store.state.put(pending)
        by_start = {t.rolling_start_interval_number: t for t in teks}
        try:
            chosen = [by_start[s] for s in pending.rolling_starts]
        except KeyError:
            store.state.clear(PendingDeclaration)
            raise UserError("the keys of the pending declaration are gone; ask for a new code") from None
        body = {
            "temporaryExposureKeys": [{"key": base64.b64encode(t.key_data).decode(),
                                       "rollingStartNumber": t.rolling_start_interval_number,
                                       "rollingPeriod": t.rolling_period, "transmissionRisk": 0} for t in chosen],
            "healthAuthorityID": "ctagent", "verificationPayload": pending.certificate,
            "hmacKey": pending.hmac_key_b64,
        }
        try:
            resp = self.transport.post_json("/v1/publish", padded(body))
        except BackendRejected:
            store.state.clear(PendingDeclaration)  # refused: a retry with this certificate cannot succeed
            raise
        store.state.clear(PendingDeclaration)
        store.state.put(Declared(now, len(chosen)))
        inserted = int(resp["insertedExposures"])
        return DeclareResult(sent=len(chosen), accepted=inserted, summary=f"published: {inserted} key(s)")

    # -- cover traffic --------------------------------------------------------------------
    def send_chaff(self, user_delay_s: float = 0.0) -> int:
        """A declaration's requests as chaff (``X-Chaff: 1``): /api/verify, then after
        ``user_delay_s`` /api/certificate, then /v1/publish, each padded as a real one and
        with fields of the real lengths (a code, a token, an HMAC, 14 keys, a certificate),
        as the Android app's UploadCoverTrafficWorker sends them. The answers are not read;
        a failure is no one's concern. How many requests got an answer."""
        def chaff(path: str, body: dict[str, Any]) -> bool:
            try:
                r = self.transport.request("POST", path, content=json_bytes(padded(body)),
                                           headers={"content-type": "application/json", **CHAFF_HEADERS})
                return r.status_code < 500
            except BackendUnreachable:
                return False
        fake_keys = [{"key": base64.b64encode(secrets.token_bytes(16)).decode(),
                      "rollingStartNumber": 2_650_847, "rollingPeriod": 144, "transmissionRisk": 0}
                     for _ in range(14)]
        sent = int(chaff("/api/verify", {"code": f"{secrets.randbelow(10**8):08d}"}))
        self.clock.sleep_blocking(user_delay_s)
        sent += chaff("/api/certificate", {"token": secrets.token_urlsafe(32),
                                           "ekeyhmac": base64.b64encode(secrets.token_bytes(32)).decode()})
        sent += chaff("/v1/publish", {"temporaryExposureKeys": fake_keys, "healthAuthorityID": "ctagent",
                                      "verificationPayload": secrets.token_urlsafe(400),
                                      "hmacKey": base64.b64encode(secrets.token_bytes(32)).decode()})
        log.info("sync: cover traffic sent requests=%d", sent)
        return sent
