"""The server's HTTP protocol (`ossrun.connections`) under uvicorn on a real socket, with an ASGI app that writes
more than the kernel buffers hold: what the ossrun app's streams meet with a client that stops reading. (A token
stream takes half a minute to fill the 4 MB a loopback socket buffers, so the whole server is not used here.)"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from ossrun.connections import deadline_protocol
from tests.server_util import free_port

TIMEOUT_S = 1.0
CHUNK = b"x" * 2**20


class EndlessAnswer:
    """Answers every request with a body that never ends; notes when the server tells it the client is gone."""

    def __init__(self):
        self.disconnected = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the request (no body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        watcher = asyncio.ensure_future(receive())
        while not watcher.done():
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        if watcher.result()["type"] == "http.disconnect":
            self.disconnected.set()


def serve(app) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=deadline_protocol(TIMEOUT_S, None), log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return server, thread, port


def asking_with_a_small_window(port: int) -> socket.socket:
    """A client connection that has sent its request, with a receive buffer of a few KB (the server's fill soon)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def test_a_client_that_reads_nothing_is_disconnected_after_the_client_timeout():
    """Before: uvicorn has no write timeout, so a client that asked for a stream and never read it held its
    connection, and the route's task waiting to write, for ever (its answer in the server's buffers; enough such
    clients exhaust the file descriptors). Now a connection that takes nothing for the client timeout is closed,
    and the app hears `http.disconnect` (an ossrun stream then cancels its request)."""
    app = EndlessAnswer()
    server, thread, port = serve(app)
    try:
        with asking_with_a_small_window(port):
            assert app.disconnected.wait(TIMEOUT_S + 20), "the server still waits to write to a client that reads nothing"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_client_that_reads_slowly_keeps_its_connection():
    """What the write timeout must not do: cut a client that keeps reading, however slowly."""
    app = EndlessAnswer()
    server, thread, port = serve(app)
    try:
        with asking_with_a_small_window(port) as sock:
            started, received = time.monotonic(), 0
            while time.monotonic() - started < 4 * TIMEOUT_S:
                received += len(sock.recv(2**20))
                time.sleep(TIMEOUT_S / 4)
            assert not app.disconnected.is_set() and received > 0
    finally:
        server.should_exit = True
        thread.join(10)
