"""Per-client request limits: a sliding one-minute window per (bucket, client), in
memory (one process), on the backend's clock."""

from __future__ import annotations

from collections import defaultdict, deque

from agent.clock import Clock

from .errors import ApiError, Code

WINDOW_S = 60


class RateLimiter:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._hits: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def check(self, bucket: str, client: str, per_min: int) -> None:
        """Count one request of ``client`` in ``bucket``; :class:`ApiError` when over the limit."""
        now = self.clock.now()
        q = self._hits[(bucket, client)]
        while q and q[0] <= now - WINDOW_S:
            q.popleft()
        if len(q) >= per_min:
            raise ApiError(Code.RATE_LIMITED, f"too many {bucket} requests; try again in a minute")
        q.append(now)
