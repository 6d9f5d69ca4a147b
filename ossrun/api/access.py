"""Who may call, and how often: the bearer token and the per-client rate limit.

The rate limit keys on the token only when tokens are checked; without auth a made-up bearer value
would buy a fresh budget per request, so there the key is the client's address. The key table is an
LRU with a bound, so a flood of distinct keys cannot grow memory without limit.
"""

from __future__ import annotations

import collections
import hmac
import math
import threading
import time

MAX_KEYS = 10_000
WINDOW_S = 60.0


def bearer_token(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC 7235); None otherwise."""
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant time, so the comparison leaks nothing about how much of a guess was right."""
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


class RateLimiter:
    """A sliding one-minute window per key, for at most `max_keys` keys (least recently seen dropped first)."""

    def __init__(self, per_minute: int, max_keys: int = MAX_KEYS):
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._hits: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        return self.retry_after(key) == 0

    def retry_after(self, key: str) -> int:
        """0 and the hit counted when the request may go; else whole seconds until it may (for `Retry-After`)."""
        if self.per_minute <= 0:
            return 0
        now = time.monotonic()
        with self._lock:
            hits = self._hits.pop(key, None) or collections.deque()
            self._hits[key] = hits  # most recently seen last
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
            while hits and now - hits[0] > WINDOW_S:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return max(1, math.ceil(WINDOW_S - (now - hits[0])))
            hits.append(now)
            return 0

    def __len__(self) -> int:
        return len(self._hits)
