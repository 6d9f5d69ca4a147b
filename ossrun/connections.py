"""What the server allows a connection: its request's headers within a deadline, and a place below the open-files limit.

uvicorn times out only a kept-alive connection that stays silent between requests. A connection that never sends a
byte, or stops halfway through its headers, stays open for ever, holding a file descriptor; at the open-files limit
`accept` fails, nobody is served (`/health` included), and asyncio logs every failure with a traceback. So the
server's HTTP protocol closes a connection whose request headers do not come within the client timeout, counted
from when it opened or its previous answer ended; beyond a cap below the limit, a new connection closes the one that
has waited longest for its headers (a real client sends them at once); and the soft limit is raised to the hard one.
A client that stops reading an answer (its buffers full) has the client timeout to take some of it, else the
connection is closed and its request cancelled. A body has its own deadline, in the app (`api.body.BodyClock`, a 408). An answer given while the client is still
sending its request (that 408, or a 400 on a malformed one) is followed by a lingering close (`LingeringTransport`).
A request h11 cannot parse, one with both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1: the request
smuggling setup behind a proxy that frames by `Content-Length`), and a head over MAX_HEAD_BYTES are refused by the app
in its error shape (`REFUSED`), and the connection is closed after the answer.
Should `accept` fail all the same (a burst of
connections past the cap), asyncio retries a second later, and its error is logged once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import struct
import sys
from collections.abc import Callable
from urllib.parse import unquote

log = logging.getLogger(__name__)

try:  # the socket send queue's length (Linux; elsewhere only the transport's buffer is watched)
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ if sys.platform.startswith("linux") else None
except ImportError:
    _OUTQ = None

SPARE_FILES = 256  # file descriptors kept for the server's own files (checkpoint, SQLite, uploads, logs)
LINGER_S = 2.0  # how long a lingering close drops what the client still sends before it closes all the same
# A request's head: its method, target and header names and values, counted as parsed, so the limit is the same
# however the bytes arrive (h11 checks its own only while a head is incomplete: 16 KiB in 1 KiB pieces, unbounded
# in one write). h11's is kept well above it, so a head between the two is parsed and refused here, as a 431 either way.
MAX_HEAD_BYTES = 64 * 1024
H11_BUFFER_BYTES = 4 * MAX_HEAD_BYTES
HEAD_TOO_LARGE = f"Request header fields too large: the request line and headers take over {MAX_HEAD_BYTES // 1024} KiB."
# In a request's scope state: (status, message) of a request the protocol refused, answered by the app (`api.app`).
REFUSED = "ossrun.refused"


def raise_file_limit() -> int | None:
    """The soft limit on open files raised to the hard one (the most the system grants the process, and asking
    needs no privilege; 1024, a usual soft limit, is a thousand idle clients). Returns the limit in force (None:
    unlimited, or unknown)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.debug("open files: the soft limit is the hard one already (%d)", soft)
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open files: soft limit raised from %d to the hard limit %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as exc:  # macOS refuses an unlimited hard limit
            log.debug("open files: the soft limit stays at %d (%s)", soft, exc)
    return None if soft == resource.RLIM_INFINITY else soft


def cap(open_files: int | None) -> int | None:
    """Connections beyond which the one waiting longest for its headers is closed (None: no cap)."""
    return None if open_files is None else max(open_files - SPARE_FILES, open_files // 2)


class LingeringTransport:
    """A connection's transport whose `close`, while the client is still sending its request, lingers: it stops
    writing (a FIN after the answer), drops what still comes, and closes when the client does or after LINGER_S.

    Closing a socket at once with the request unread loses the answer just written: bytes that reach the kernel
    after the close are answered with a reset, and a byte already there unread turns the close itself into a reset,
    which discards the answer on the client's side before it reads it (RFC 7230 §6.6; nginx's `lingering_close`).
    Everything but `close` and `is_closing` is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, still_sending: Callable[[], bool]):
        self._transport = transport
        self._still_sending = still_sending
        self._timer: asyncio.TimerHandle | None = None
        self.lingering = False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        if not self._still_sending() or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # after what is buffered
        self._transport.resume_reading()  # flow control may have paused it
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, self.close_now)

    def close_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.close()


def _without_bytes(error: Exception) -> str:
    """h11's message without the client's bytes it quotes (`illegal request line: bytearray(b'…')`)."""
    return re.sub(r":? (?:bytearray\()?b['\"].*", "", str(error), flags=re.DOTALL)


def head_refusal(request) -> tuple[int, str] | None:
    """Why an `h11.Request` that h11 accepted is refused (status, message); None: it is not."""
    names = {name for name, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return 400, ("Invalid HTTP request: both Content-Length and Transfer-Encoding; a request frames its body one "
                     "way (RFC 9112 §6.1)")
    size = len(request.method) + len(request.target) + sum(len(name) + len(value) for name, value in request.headers)
    return (431, HEAD_TOO_LARGE) if size > MAX_HEAD_BYTES else None


def deadline_protocol(timeout_s: float, max_connections: int | None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for a request's headers, a cap on connections, and refusals
    answered by the app."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

    class CheckedConnection(h11.Connection):
        """h11's connection, refusing what h11 lets through (`head_refusal`) as h11 refuses what it cannot parse, and
        keeping why for the answer (uvicorn's handler of h11's errors is told nothing)."""
        refusal: tuple[int, str] | None = None
        request: h11.Request | None = None  # the request refused, when h11 parsed it

        def next_event(self):
            try:
                event = super().next_event()
            except h11.RemoteProtocolError as exc:
                too_large = exc.error_status_hint == 431  # h11's own limit on an incomplete head
                self.refusal = (431, HEAD_TOO_LARGE) if too_large else (400, f"Invalid HTTP request: {_without_bytes(exc)}")
                raise
            if isinstance(event, h11.Request) and (refusal := head_refusal(event)):
                self.refusal, self.request = refusal, event
                raise h11.RemoteProtocolError(refusal[1], error_status_hint=refusal[0])
            return event

    class DeadlineProtocol(H11Protocol):
        # Connections waiting for a request's headers, the longest-waiting first (a dict keeps insertion order).
        waiting: dict[DeadlineProtocol, None] = {}
        _deadline: asyncio.TimerHandle | None = None
        _write_stall: asyncio.TimerHandle | None = None
        refused = False  # nothing more is read on this connection

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.conn = CheckedConnection(h11.SERVER, H11_BUFFER_BYTES)

        def connection_made(self, transport) -> None:
            super().connection_made(LingeringTransport(transport, self._client_still_sending))
            self._watch_headers()
            if max_connections is not None and len(self.connections) > max_connections:
                self._make_room()

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering or self.refused:
                return  # the rest of a request already answered, or refused (a pipelined one after it included)
            super().data_received(data)
            self._watch_headers()

        def eof_received(self) -> bool | None:
            if self.transport.lingering:
                self.transport.close_now()
            return super().eof_received()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_headers()

        def pause_writing(self) -> None:
            """The client is not taking what is written as fast as it comes (the buffers are full): from now on it
            must take some of it within each client timeout, else the connection is closed and its request
            cancelled (uvicorn has no write timeout). While paused nothing is added, so the buffer shrinking is
            the client reading."""
            super().pause_writing()
            if self._write_stall is None:
                self._watch_writes(self._unsent())

        def _watch_writes(self, unsent: int) -> None:
            self._write_stall = self.loop.call_later(timeout_s, self._check_writes, unsent)

        def _unsent(self) -> int:
            """Bytes written and not yet taken by the client: the transport's buffer, and on Linux the socket's
            send queue (the kernel buffers megabytes, and lets the transport write again only once a third of
            them is free: a slow reader would look stalled for minutes)."""
            unsent = self.transport.get_write_buffer_size()
            sock = self.transport.get_extra_info("socket")
            if sock is not None and _OUTQ is not None:
                with contextlib.suppress(OSError):
                    unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0" * 4))[0]
            return unsent

        def _check_writes(self, unsent_before: int) -> None:
            unsent = self._unsent()
            if unsent < unsent_before:
                self._watch_writes(unsent)
            else:
                self._write_stall = None
                log.info("closing the connection from %s: it took nothing of the answer for %g s", self.client, timeout_s)
                self.transport.abort()

        def resume_writing(self) -> None:
            self._stop_write_stall()
            super().resume_writing()

        def _stop_write_stall(self) -> None:
            if self._write_stall is not None:
                self._write_stall.cancel()
                self._write_stall = None

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request h11 refused was a bare text/plain 400: no request id, not counted, logged
            without its client, and a head over h11's limit a 400, not a 431. The app answers it instead, in the
            surface's error shape (`api.app`): a request whose body was malformed by its route (which reads the
            refusal from the scope's state when it reads the body), any other by a request of its own. Nothing more
            is read from the connection, which closes after the answer."""
            if self.refused:
                return
            self.refused = True
            self.flow.pause_reading()
            refusal = self.conn.refusal or (400, msg)
            log.warning("refused a request from %s (%d): %s", self.client[0] if self.client else "?", *refusal)
            if self.cycle is not None and not self.cycle.response_complete:  # in the body of a request being answered
                if self.cycle.response_started:
                    self.transport.close()
                else:
                    self.cycle.scope["state"][REFUSED] = refusal
                    self.cycle.message_event.set()
                return
            self._answer_refusal(refusal)

        def _answer_refusal(self, refusal: tuple[int, str]) -> None:
            """Runs the app on a request that carries the refusal: the one h11 parsed (its method and target, for the
            route and the error shape), or `- -` for one it could not."""
            request = self.conn.request
            raw_path, _, query = request.target.partition(b"?") if request else (b"-", b"", b"")
            scope = {"type": "http", "asgi": {"version": self.asgi_version, "spec_version": "2.3"}, "http_version": "1.1",
                     "server": self.server, "client": self.client, "scheme": self.scheme,
                     "method": request.method.decode("ascii") if request else "-", "root_path": self.root_path,
                     "path": self.root_path + (unquote(raw_path.decode("latin-1")) if request else ""),
                     "raw_path": raw_path, "query_string": query, "headers": [],
                     "state": {**self.app_state, REFUSED: refusal}}
            self.cycle = RequestResponseCycle(scope=scope, conn=self.conn, transport=self.transport, flow=self.flow,
                                              logger=self.logger, access_logger=self.access_logger, access_log=self.access_log,
                                              default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
                                              on_response=self.on_response_complete)
            self.cycle.more_body = False
            task = self.loop.create_task(self.cycle.run_asgi(self.app))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

        def _should_upgrade(self) -> bool:
            """Never: the server speaks HTTP only (the hosted API has no WebSocket transport). An upgrade request is
            answered as the plain request it also is, by the routes, in the surface's shape, with its request id and
            log line; uvicorn would refuse it with a bare 403 (no route takes a WebSocket) that reads as a token
            problem, or warn of a missing WebSocket library."""
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_watch()
            self._stop_write_stall()
            if self.transport.lingering:
                self.transport.close_now()  # the timer cancelled
            super().connection_lost(exc)

        def _client_still_sending(self) -> bool:
            """Whether the client may still be sending the request just answered (its body, or a malformed one)."""
            return self.conn.their_state in (h11.SEND_BODY, h11.ERROR)

        def _watch_headers(self) -> None:
            """The clock runs while no request is being answered (none yet, or the last answer is sent); it starts
            once per wait, so bytes trickling in do not restart it."""
            idle = self.cycle is None or self.cycle.response_complete
            if not idle or self.transport.is_closing():
                self._stop_watch()
            elif self._deadline is None:
                self._deadline = self.loop.call_later(timeout_s, self._close, "no complete request headers in time")
                self.waiting[self] = None

        def _stop_watch(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
                self.waiting.pop(self, None)

        def _make_room(self) -> None:
            oldest = next((c for c in self.waiting if c is not self), None)
            if oldest is not None:
                oldest._close(f"{len(self.connections)} connections, and it waited longest for its headers")

        def _close(self, why: str) -> None:
            self._stop_watch()
            if not self.transport.is_closing():
                log.debug("closing the connection from %s: %s", self.client, why)
                self.transport.close()

    return DeadlineProtocol


ACCEPT_FAILED = "socket.accept() out of system resource"


class QuietAcceptErrors:
    """An event loop exception handler that reports failed `accept`s once a minute with their count. asyncio logs
    each with its traceback, up to the listen backlog of them per try (CPython issue 151615): megabytes a second
    of log while the process is out of file descriptors. Everything else goes to the handler it replaces."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every_s: float = 60.0):
        self.previous = loop.get_exception_handler()
        self.every_s = every_s
        self.last = -math.inf
        self.count = 0
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") != ACCEPT_FAILED:
            return self.previous(loop, context) if self.previous else loop.default_exception_handler(context)
        self.count += 1
        if loop.time() - self.last >= self.every_s:
            log.error("cannot accept connections (%s; %d failures since the last report), retrying every second",
                      context.get("exception"), self.count)
            self.last, self.count = loop.time(), 0
