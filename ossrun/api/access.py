"""Who may call, and how often: the bearer token, the per-client rate limit, wrong-token streaks, and which web
pages may drive the server from a browser.

The rate limit keys on the token only when tokens are checked; without auth a made-up bearer value
would buy a fresh budget per request, so there the key is the client's address. The key table is an
LRU with a bound, so a flood of distinct keys cannot grow memory without limit.

Browsers are the one client that acts for someone else: any page the user opens can POST here (a "simple"
request needs no preflight, and this server reads every body as JSON), and a DNS-rebinding page (its own name
pointed at 127.0.0.1) can read the answers too. So, as Ollama (`OLLAMA_ORIGINS`), Jupyter and vite do, a request
that carries a foreign `Origin` is refused unless `--allowed-origins` lists it, and a server on loopback without
a token answers only `Host` names that cannot be rebound: localhost, `*.localhost`, IP literals.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import math
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_KEYS = 10_000
WINDOW_S = 60.0
# Wrong tokens a client address may present per minute before all its requests are refused for a while: bounds a
# word-list guess at 20 a minute, and leaves a client with a mistyped token room to notice.
WRONG_TOKENS_PER_MINUTE = 20
ANY_ORIGIN = "*"


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
        return self._wait(key, count=True)

    def waiting(self, key: str) -> int:
        """`retry_after` without counting a hit: whole seconds `key` must still wait, 0 when it is under the limit."""
        return self._wait(key, count=False)

    def _wait(self, key: str, count: bool) -> int:
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
            if count:
                hits.append(now)
            return 0

    def __len__(self) -> int:
        return len(self._hits)


class WrongTokens:
    """Wrong tokens per client address. Past `per_minute` of them, every request of that address that needs the
    token is refused (429) without its token being looked at, the right one included: a guesser that could still
    tell a hit from a refusal would not be slowed at all. A streak is logged once, as a warning, when it starts;
    it ends when a minute has passed with no wrong token from the address."""

    def __init__(self, per_minute: int = WRONG_TOKENS_PER_MINUTE, max_keys: int = MAX_KEYS):
        self._limiter = RateLimiter(per_minute, max_keys)
        self._streaks: collections.OrderedDict[str, float] = collections.OrderedDict()  # address → its latest wrong token
        self.max_keys = max_keys

    def retry_after(self, client: str) -> int:
        """Seconds `client`'s requests are still refused for (0: look at its token)."""
        return self._limiter.waiting(client)

    def failed(self, client: str) -> None:
        """Count a wrong token from `client`; warn when this one starts a block."""
        self._limiter.retry_after(client)
        blocked = self._limiter.waiting(client) > 0
        now, latest = time.monotonic(), self._streaks.pop(client, None)
        ongoing = latest is not None and now - latest <= WINDOW_S
        if ongoing or blocked:
            self._streaks[client] = now
            while len(self._streaks) > self.max_keys:
                self._streaks.popitem(last=False)
        if blocked and not ongoing:
            log.warning("client %s presented %d wrong API tokens within a minute: its requests are refused (429) until "
                        "fewer fall within the last minute (warned once per streak)", client, self._limiter.per_minute)


def host_name(authority: str) -> str:
    """The name of a `Host` value or an origin's authority: lower case, without port, brackets or a final dot."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.rpartition(":")[0].rstrip(".") if authority.count(":") == 1 else authority.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether a listening address (`--host`) is reachable from this machine only."""
    name = host_name(host) if not _is_ip(host) else host
    return name == "localhost" or (_is_ip(name) and ipaddress.ip_address(name).is_loopback)


def parse_origins(value: str | None) -> tuple[str, ...]:
    """`--allowed-origins`: comma-separated `scheme://host[:port]` (as a browser's `Origin` spells them; a final `/`
    is dropped), or `*` for any. ValueError names a malformed one (a path, no scheme)."""
    origins = []
    for item in (value or "").split(","):
        item = item.strip().rstrip("/").lower()
        if not item:
            continue
        parts = urlsplit(item)
        if item != ANY_ORIGIN and not (parts.scheme and parts.netloc and not parts.path and not parts.query):
            raise ValueError(f"--allowed-origins takes origins such as http://localhost:3000 (scheme://host[:port]), "
                             f"or *, not {item!r}")
        origins.append(item)
    return tuple(origins)


@dataclass(frozen=True)
class BrowserPolicy:
    """Which web pages may call, and which `Host` names are answered.

    `allowed_origins`: origins besides the server's own (`parse_origins`), answered with CORS headers.
    `local_hosts`: when not None the server listens on loopback without a token, and `Host` must be localhost,
    a `*.localhost` name, an IP literal, one of these names or an allowed origin's host: a DNS-rebinding page
    reaches the server under its own name, which is none of them. None: any `Host` (behind a token, or on an
    address other machines reach, where the names clients use are not known).
    """

    allowed_origins: tuple[str, ...] = ()
    local_hosts: tuple[str, ...] | None = None

    @property
    def any_origin(self) -> bool:
        return ANY_ORIGIN in self.allowed_origins

    def host_allowed(self, host: str | None) -> bool:
        if self.local_hosts is None or self.any_origin or not host:  # no Host: HTTP/1.0, never a browser
            return True
        name = host_name(host)
        return (name == "localhost" or name.endswith(".localhost") or _is_ip(name) or name in self.local_hosts
                or any(name == host_name(urlsplit(origin).netloc) for origin in self.allowed_origins))

    def same_origin(self, origin: str, host: str | None) -> bool:
        """A page of this server's own (the playground): its origin's authority is the `Host` it sent. The scheme is
        not compared: behind a TLS proxy the page is https and the server sees http."""
        return host is not None and urlsplit(origin.lower()).netloc == host.strip().lower()

    def listed(self, origin: str) -> bool:
        return self.any_origin or origin.strip().rstrip("/").lower() in self.allowed_origins
