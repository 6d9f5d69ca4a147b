"""Reading a body safely: every malformed body is a 400, never a 500, and a body that stops coming is a 408.

A body sent with `Content-Encoding: gzip` or `deflate` is decoded as it arrives (`Decoder`), a MB at a time, and what
it decodes to counts against the body cap, so a small zip bomb is a 413, not a full memory; another coding is a 415.

`json.loads` recurses (a body nested a thousand deep raises `RecursionError`), and JSON may spell
lone UTF-16 surrogates (`"\\ud800"`) that Python keeps in a `str` but that no encoder can write,
so they fail far away (the tokenizer, the response). Both are refused here, once, at the edge, as are
Python's `NaN`, `Infinity` and `-Infinity` literals, which are not JSON (RFC 8259; `JSON.parse` refuses them).
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from ossrun.api.errors import BODY_TIMEOUT, ApiError, bad_input, param_of, too_large

# No legitimate body nests deeper; tool parameter schemas have their own, smaller limit (harmony).
MAX_DEPTH = 128

# From this size on, a body is parsed (and read into its types) on a worker thread: at ~9 MB the JSON walk and the typed
# parse take about a second, which on the event loop stalled every other request, /health included; on a thread they
# let the loop in every few milliseconds (the interpreter's switch interval). Small bodies stay on the loop (no hop).
OFF_LOOP_BYTES = 256 * 1024

T = TypeVar("T")


def not_json(literal: str) -> Any:
    """`parse_constant` for JSON that must be JSON: Python's `NaN`, `Infinity` and `-Infinity` are not."""
    raise ValueError(f"{literal} is not JSON")


def _integer(literal: str) -> int | float:
    """An integer literal longer than any field's range is read as JavaScript reads it (the hosted validator's
    `JSON.parse`): a double, `inf` past 1e308. Python's int would refuse one of more than 4300 digits (the whole body
    then "not JSON") or fail later when printed; as a double, the field's own range check names it."""
    return int(literal) if len(literal) <= 20 else float(literal)


def parse_json(raw: bytes) -> Any:
    """The body's JSON value, or a 400 saying what is wrong with it."""
    try:
        value = json.loads(raw, parse_constant=not_json, parse_int=_integer)
    except RecursionError:
        raise bad_input(f"Error: the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # also UnicodeDecodeError: bytes that are not UTF-8
        raise bad_input("Error: the body is not valid JSON") from None
    check_value(value)
    return value


async def parse_body(raw: bytes, into: Callable[[Any], T]) -> T:
    """`into(the body's JSON value)`: a typed request, or a 400; on a worker thread for a large body."""
    if len(raw) < OFF_LOOP_BYTES:
        return into(parse_json(raw))
    return await asyncio.to_thread(lambda: into(parse_json(raw)))


def check_value(value: Any) -> None:
    """Iteratively (a recursive walk would fail on exactly the bodies it must refuse): depth and strings."""
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise bad_input(f"Error: at '{_pointer(path)}': the body nests deeper than {MAX_DEPTH} levels")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _check_text(key, path)
                stack.append((child, depth + 1, (*path, key)))


def _pointer(path: tuple[str | int, ...]) -> str:
    return "/" + "/".join(map(str, path))


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    """A lone surrogate is a 400 naming where it is (OpenAI's `param` too: the field is known)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_input(f"Error: at '{_pointer(path)}': the string holds a lone UTF-16 surrogate (not valid Unicode)",
                        param_of(path)) from None


# Content codings a request body may come in (RFC 9110 §8.4.1; "x-gzip" is gzip's old name).
CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}


def decoder(content_encoding: str, limit: int) -> Decoder | None:
    """The decoder of a body sent with this `Content-Encoding` (None: as is), or a 415 naming a coding we cannot decode.
    One coding at most: stacked codings are legal HTTP that no client of this API sends."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip().lower() not in ("", "identity")]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in CODINGS:
        raise ApiError(415, 3000, f"Unsupported Content-Encoding {content_encoding[:100]!r}: send the body as is, or in "
                                  f"one of gzip, deflate", headers={"Accept-Encoding": "gzip, deflate"})
    return Decoder(CODINGS[codings[0]], limit)


# Decoded bytes handed on at a time. Compressed data inflates up to a thousandfold (a 250 kB gzip held 250 MB), so a
# network chunk is never decoded whole: the route gets its decoded bytes in pieces of this size, one at a time.
DECODED_PIECE = 1024 * 1024


class Decoder:
    """Inflates a body chunk by chunk, never past `limit` decoded bytes (413); a corrupt or truncated stream is a
    400 naming the coding. gzip may hold several members (RFC 1952); deflate is the zlib format (RFC 9110), or the
    raw deflate stream some clients send, told apart by the zlib header."""

    def __init__(self, coding: str, limit: int):
        self.coding, self.limit, self.decoded = coding, limit, 0
        self._stream = None  # zlib's decompressor, made once the first two bytes are here
        self._head = b""

    def pieces(self, data: bytes, final: bool) -> Iterator[bytes]:
        """The decoded bytes of the next chunk of the body, in pieces of at most DECODED_PIECE bytes, each inflated
        only when asked for (so no more than one is in memory); `final`: the body ends with this chunk."""
        if self._stream is None:
            data, self._head = self._head + data, b""
            if not data or (len(data) < 2 and not final):
                self._head = data
                return  # an empty body stays empty
            self._stream = self._new(data)
        try:
            full = False  # the last piece filled its room: zlib may hold more output though all input is taken
            while data or full:
                if self._stream.eof:  # bytes after the end: gzip's next member, or garbage
                    if not data:
                        break
                    if self.coding != "gzip":
                        raise zlib.error("data after the end of the stream")
                    self._stream = self._new(data)
                room = min(DECODED_PIECE, self.limit - self.decoded + 1)
                piece = self._stream.decompress(data, room)
                self.decoded += len(piece)
                if self.decoded > self.limit:
                    raise too_large(self.limit)
                data, full = self._stream.unconsumed_tail or self._stream.unused_data, len(piece) == room
                if piece:
                    yield piece
        except zlib.error:
            raise self._corrupt() from None
        if final and not self._stream.eof:
            raise self._corrupt()

    def _new(self, data: bytes):
        if self.coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)

    def _corrupt(self) -> ApiError:
        return bad_input(f"Error: the body is not a complete {self.coding} stream (Content-Encoding: {self.coding})")


# Beyond the client timeout, a body must average this many bytes a second (64 kbit/s: any real link does better).
MIN_BODY_RATE = 8 * 1024


class BodyClock:
    """Time allowed for the rest of a body: each piece within `patience_s`, and in all at most `patience_s` plus a
    second per MIN_BODY_RATE bytes received, so a 10 MB body may take minutes and a 300 MB adapter hours, but a
    client trickling a byte at a time cannot hold its connection (and the route's task) for long.

    Only time spent waiting for the client counts: while the route is busy with what came, TCP holds the rest back.
    A body that misses its time is a 408 with `Connection: close` (the rest of it may still be on its way).
    """

    def __init__(self, patience_s: float):
        self.patience_s = patience_s
        self.waited = 0.0
        self.received = 0

    def allowed_s(self) -> float:
        return min(self.patience_s, self.patience_s + self.received / MIN_BODY_RATE - self.waited)

    async def next(self, receive: Callable[[], Awaitable[dict]]) -> dict:
        """The next ASGI message of the body, or a 408 when it does not come in time."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(self.allowed_s(), 0.0)):
                message = await receive()
        except TimeoutError:
            raise ApiError(*BODY_TIMEOUT, headers={"Connection": "close"}) from None
        finally:
            self.waited += time.monotonic() - started
        self.received += len(message.get("body", b""))
        return message
