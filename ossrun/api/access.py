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

A client's address is the connection's, or behind a proxy `--forwarded-allow-ips` names, the one the proxy saw
(`TrustedProxies`): a client that could name its own would void the per-address limits. The engine shares itself
fairly between the same addresses (`client_address`), so one client's many requests cannot crowd out another's.
"""

from __future__ import annotations

import collections
import functools
import hmac
import ipaddress
import logging
import math
import re
import threading
import time
from dataclasses import dataclass

from starlette.requests import HTTPConnection

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


def client_address(request: HTTPConnection) -> str:
    """Who is calling: the connection's peer, or the client a trusted proxy names (`app.ForwardedHeaders` has put it in
    the scope). The rate limit without a token and the wrong-token streaks key on it, and the engine shares its slots
    fairly between such clients before it shares a client's part between its requests (`Submission.client`). Not the
    token: the server has one, which every client of it presents."""
    return request.client.host if request.client else "?"


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


DEFAULT_PORTS = {"http": "80", "https": "443"}
# An origin as a browser serializes it (RFC 6454 §6.2), lower-cased: a scheme, a host (a name or a bracketed IPv6
# literal; no user, path, query or fragment) and maybe a port. `*` is checked apart (`_origin`).
_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^\s/?#@\[\]:]+)(?::([0-9]{1,5}|\*))?")


@dataclass(frozen=True)
class Origin:
    """An origin as compared: lower case, without the scheme's default port (`https://x:443` is `https://x`, which is
    what a browser sends). As an `--allowed-origins` entry, `host` may start with `*.` (any name below that one) and
    `port` may be `*` (any port, or none)."""

    scheme: str
    host: str
    port: str = ""  # "": the scheme's default

    def matches(self, other: Origin) -> bool:
        """Whether `other` (a page's origin) is this one, or one this pattern names."""
        host = other.host.endswith(self.host[1:]) if self.host.startswith("*.") else other.host == self.host
        return self.scheme == other.scheme and host and self.port in ("*", other.port)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port else "")


def _origin(text: str, pattern: bool = False) -> Origin | None:
    """`text` as an `Origin` (a final `/` dropped), or None when no browser sends it: `null`, a user, a path, a query, a
    fragment, a name beyond ASCII (browsers send its xn-- form), port 0 or over 65535; `*` only in a `pattern`, as
    a host's first label or as the port."""
    parts = _ORIGIN.fullmatch(text.strip().rstrip("/").lower())
    if parts is None or not parts[0].isascii():
        return None
    scheme, host, port = parts[1], parts[2], parts[3] or ""
    if "*" in (host.removeprefix("*.") if pattern else host) or host == "*." or (port == "*" and not pattern):
        return None
    if port not in ("", "*"):
        if not 0 < int(port) < 65536:
            return None
        port = str(int(port))
    return Origin(scheme, host, "" if port == DEFAULT_PORTS.get(scheme) else port)


def parse_origins(value: str | None) -> tuple[str, ...]:
    """`--allowed-origins`: comma-separated origins as `Origin` spells them (`https://app.example.com`, a final `/`
    dropped, a default port too), `*.` before a host for every name below it, `:*` for any port, or `*` for any origin.
    ValueError names an entry no browser's `Origin` could ever match (a path, a user, a query, a fragment, no scheme,
    another wildcard): refused at start, not a 403 in the browser."""
    origins = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        origin = ANY_ORIGIN if item == ANY_ORIGIN else _origin(item, pattern=True)
        if origin is None:
            raise ValueError(f"--allowed-origins takes origins as browsers send them, scheme://host[:port] (*.host for the "
                             f"names below host, :* for any port, * alone for any origin), not {item!r}")
        origins.append(str(origin))
    return tuple(origins)


def _authority(host: str) -> tuple[str, str]:
    """A `Host` value's name (lower case, IPv6 in brackets, as an origin spells it) and port ("" when absent)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", "")
    return name, port


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

    @functools.cached_property
    def _patterns(self) -> tuple[Origin, ...]:
        return tuple(origin for text in self.allowed_origins if (origin := _origin(text, pattern=True)) is not None)

    def host_allowed(self, host: str | None) -> bool:
        if self.local_hosts is None or self.any_origin or not host:  # no Host: HTTP/1.0, never a browser
            return True
        name = host_name(host)
        return (name == "localhost" or name.endswith(".localhost") or _is_ip(name) or name in self.local_hosts
                or any(pattern.matches(Origin(pattern.scheme, name, pattern.port)) for pattern in self._patterns))

    def same_origin(self, origin: str, host: str | None, forwarded: bool = False) -> bool:
        """A page of this server's own (the playground): its origin's host and port are the `Host` it sent (a port
        that is the origin's scheme's default may be left out of either). The scheme is not compared: behind a TLS
        proxy the page is https and the server sees http (and a proxy's `X-Forwarded-Proto` is its own hop's, which
        behind a TLS CDN is http too). A proxy's `X-Forwarded-Host` (`forwarded`) without a port is compared by name
        alone: nginx's usual `$host` never carries one, even when the page's origin does (`:8443`); the name is what
        tells this server's page from another site's (`X-Forwarded-Port` is not read: like the scheme it is the
        proxy's own hop's). Not for a loopback name: every local port is another program's page."""
        page = _origin(origin)
        if page is None or host is None:
            return False
        name, port = _authority(host)
        if forwarded and not port and not (name.endswith(".localhost") or is_loopback(name)):
            return page.host == name
        return page.host == name and page.port == ("" if port == DEFAULT_PORTS.get(page.scheme) else port)

    def listed(self, origin: str) -> bool:
        page = _origin(origin)
        return self.any_origin or (page is not None and any(pattern.matches(page) for pattern in self._patterns))


class TrustedProxies:
    """`--forwarded-allow-ips`: the peers whose `X-Forwarded-*` headers are believed (comma-separated IP addresses and
    networks, or `*` for any peer). ValueError names an entry that is neither (a host name never matches a peer)."""

    def __init__(self, value: str | None):
        self.any = False
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in (value or "").split(","):
            item = item.strip()
            if item == "*":
                self.any = True
            elif item:
                try:
                    self.networks.append(_unmapped(ipaddress.ip_network(item, strict=False)))
                except ValueError:
                    raise ValueError(f"--forwarded-allow-ips takes IP addresses and networks (127.0.0.1, 10.0.0.0/8) "
                                     f"or *, not {item!r}") from None

    def __bool__(self) -> bool:
        return self.any or bool(self.networks)

    def trusts(self, address: str | None) -> bool:
        if self.any:
            return True
        ip = _address(address or "")
        return ip is not None and any(ip in network for network in self.networks)

    def client(self, forwarded_for: str) -> str | None:
        """The client an `X-Forwarded-For` (of a trusted peer) names: each proxy appends the address it saw, so the
        rightmost address that is no trusted proxy's (entries left of it are the client's own writing). With `*` every
        address counts as a proxy's, and the rightmost is taken, the one the nearest proxy saw: uvicorn takes the
        leftmost there, which any client picks itself. The address as `str(ipaddress)` spells it (IPv4 for a mapped
        one), so one client is one rate-limit key. None when the header names nobody, or when the entry that decides is
        no IP address (`unknown`, or text a client wrote to forge its log line): then the peer, the proxy, stays the
        client; skipping to the entry left of it would take one the client wrote."""
        hops = [item.strip() for item in forwarded_for.split(",") if item.strip()]
        if not hops:
            return None
        decisive = hops[-1] if self.any else next((hop for hop in reversed(hops) if not self.trusts(_hop_address(hop))), hops[0])
        address = _address(_hop_address(decisive))
        return str(address) if address is not None else None


def _unmapped(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped network (`::ffff:127.0.0.1`, `::ffff:0:0/96`) as the IPv4 one it maps: `_address` reads a peer
    that way (a dual-stack socket's ::ffff:10.0.0.1 is 10.0.0.1), and the server logs an IPv4 peer of `--host ::`
    in the mapped form, which an operator copies into `--forwarded-allow-ips`."""
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is None or network.prefixlen < 96:
        return network
    return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`text` as an IP address, IPv4 for an IPv4-mapped one; None when it is none, or carries an IPv6 zone
    (`fe80::1%eth0`), whose text may be anything."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if getattr(ip, "scope_id", None):
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def _hop_address(hop: str) -> str:
    """An `X-Forwarded-For` entry's address, without a port (`203.0.113.7:4711`, `[2001:db8::1]:4711`); "" when its
    port or brackets are malformed (`_address` then refuses it)."""
    if hop.startswith("["):
        address, _, port = hop[1:].partition("]")
        return address if port == "" or (port[:1] == ":" and port[1:].isdigit()) else ""
    if hop.count(":") == 1:
        address, _, port = hop.partition(":")
        return address if port.isdigit() else ""
    return hop
