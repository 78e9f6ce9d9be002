"""Per-client request limits: a sliding one-minute window per (bucket, client); and
the back-off of failed sign-ins per account name. In memory (one process), on the
backend's clock; safe to share between the threads of a server process (the routes run
on a thread pool: unlocked, concurrent requests could lose counts, a way past the limit,
or fail on a table another thread was changing)."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from agent.clock import Clock

from .errors import ApiError, Code

WINDOW_S = 60
#: (bucket, client) pairs remembered at most; beyond, the longest idle are forgotten
#: first (a flood of fresh addresses costs memory for one minute, then nothing)
MAX_TRACKED = 100_000


def _compact(table: OrderedDict, peak: int) -> tuple[OrderedDict, int]:
    """A dict keeps the table of its largest size; copied when it shrank to a quarter
    of it, the memory of a past flood goes back."""
    if peak > 1024 and len(table) < peak // 4:
        return OrderedDict(table), len(table)
    return table, max(peak, len(table))


class RateLimiter:
    """Every pair is forgotten once its last request left the window: the memory held is
    that of the clients of the last minute, at most :data:`MAX_TRACKED` of them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        #: least recently seen first
        self._hits: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._peak = 0
        self._lock = threading.Lock()

    def check(self, bucket: str, client: str, per_min: int) -> None:
        """Count one request of ``client`` in ``bucket``; :class:`ApiError` when over the limit."""
        with self._lock:
            self._check(bucket, client, per_min)

    def _check(self, bucket: str, client: str, per_min: int) -> None:
        now = self.clock.now()
        self._forget(now)
        key = (bucket, client)
        q = self._hits.pop(key, None) or deque()
        while q and q[0] <= now - WINDOW_S:
            q.popleft()
        self._hits[key] = q  # the most recently seen last
        if len(q) >= per_min:
            raise ApiError(Code.RATE_LIMITED, f"too many {bucket} requests; try again in a minute")
        q.append(now)
        while len(self._hits) > MAX_TRACKED:
            self._hits.popitem(last=False)
        self._peak = max(self._peak, len(self._hits))

    def _forget(self, now: float) -> None:
        while self._hits:
            key, q = next(iter(self._hits.items()))
            if q and q[-1] > now - WINDOW_S:
                break
            del self._hits[key]
        self._hits, self._peak = _compact(self._hits, self._peak)

    def __len__(self) -> int:
        return len(self._hits)


#: consecutive failed sign-ins of one account name before each further one must wait
#: (OWASP Authentication Cheat Sheet, "Account Lockout": a threshold, then a lockout
#: that grows; NIST SP 800-63B 5.2.2: no more than 100 consecutive failed attempts)
LOGIN_FREE_FAILURES = 5
#: the wait after the last free failure; it doubles with each failure after it ...
LOGIN_BACKOFF_FIRST_S = 60
#: ... up to this: about 100 guesses a day on one account, never a lockout for good
LOGIN_BACKOFF_MAX_S = 15 * 60
#: an account name whose last failure is older than this starts afresh
LOGIN_FAILURES_KEPT_S = 24 * 3600
#: account names remembered at most (the least recently failed are forgotten first)
LOGIN_MAX_TRACKED = 100_000


@dataclass
class _Failures:
    count: int
    last: float
    until: float


class LoginBackoff:
    """Failed sign-ins per account name, whoever sends them and from wherever: after
    :data:`LOGIN_FREE_FAILURES`, each failure makes the next attempt wait, doubling from
    :data:`LOGIN_BACKOFF_FIRST_S` to :data:`LOGIN_BACKOFF_MAX_S`. Names of no account
    are counted the same way, so the answers tell nothing of which names exist."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self._peak = 0
        self._lock = threading.Lock()

    def check(self, username: str) -> None:
        """:class:`ApiError` while this account name must wait."""
        now = self.clock.now()
        with self._lock:
            self._forget(now)
            f = self._failures.get(username)
        if f is not None and now < f.until:
            minutes = max(1, math.ceil((f.until - now) / 60))
            raise ApiError(Code.RATE_LIMITED, f"too many failed sign-ins for this account; try again in "
                                              f"{minutes} minute{'s' if minutes > 1 else ''}")

    def failed(self, username: str) -> None:
        now = self.clock.now()
        with self._lock:
            f = self._failures.pop(username, None) or _Failures(0, now, now)
            f.count, f.last = f.count + 1, now
            if f.count >= LOGIN_FREE_FAILURES:
                f.until = now + min(LOGIN_BACKOFF_FIRST_S * 2 ** (f.count - LOGIN_FREE_FAILURES), LOGIN_BACKOFF_MAX_S)
            self._failures[username] = f  # the most recent last
            while len(self._failures) > LOGIN_MAX_TRACKED:
                self._failures.popitem(last=False)
            self._peak = max(self._peak, len(self._failures))

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(username, None)

    def _forget(self, now: float) -> None:
        while self._failures:
            _, oldest = next(iter(self._failures.items()))
            if oldest.last > now - LOGIN_FAILURES_KEPT_S:
                break
            self._failures.popitem(last=False)
        self._failures, self._peak = _compact(self._failures, self._peak)

    def __len__(self) -> int:
        return len(self._failures)
