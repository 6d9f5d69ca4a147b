"""Start the real server (`ossrun serve`) in a subprocess on a free loopback port, and stop it."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

MODEL = "@cf/openai/gpt-oss-20b"


def free_port() -> int:
    """A port free now, below the ephemeral range and in a band of its own for each pytest-xdist worker: a server takes
    seconds to bind its port, and a port the OS hands out (`bind(0)`) in that window could go to another worker's server,
    whose /health the first one's start then takes for its own (its tests talk to the wrong server)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 10_000 + 2_000 * (worker % 10)  # 10000-29999: below Linux's ephemeral ports (32768-60999)
    for _ in range(200):
        port = random.randrange(low, low + 2_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + 1_999}")


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    data_dir: Path
    token: str | None
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run_url(self, model: str = MODEL) -> str:
        return f"{self.base}/client/v4/accounts/acct/ai/run/{model}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()

    def wait_idle(self, within: float = 10) -> dict:
        """The engine's stats once nothing runs or waits, or the last stats seen when `within` runs out."""
        deadline = time.monotonic() + within
        while True:
            stats = self.health()
            if (stats["running"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(model_dir: Path, data_dir: Path, *args: str, token: str | None = None, timeout: float = 120,
                 preexec_fn: Callable[[], None] | None = None, conversation_date: str | None = "none") -> Server:
    """`preexec_fn` runs in the server's process before it starts (to lower a resource limit). `conversation_date`:
    `--conversation-date`, by default `none` (no date: seed-exact answers do not change from day to day); None: serve's
    own default (today's)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"server-{port}.log"
    command = [sys.executable, "-m", "ossrun.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--data-dir", str(data_dir), "--precision", "exact", "--dtype", "float32", *args]
    if conversation_date is not None:
        command += ["--conversation-date", conversation_date]
    if token:
        command += ["--api-token", token]
    env = {name: value for name, value in os.environ.items() if name != "OSSRUN_API_TOKEN"}  # only `token` counts
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn)
    server = Server(process, port, data_dir, token, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.base + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")


def post_json(server: Server, path: str, body: dict, status: int = 200) -> dict:
    """POST `body` at temperature 0 (unless it says otherwise), assert the status, return the JSON answer."""
    response = httpx.post(server.base + path, json={"temperature": 0, **body}, headers=server.headers, timeout=120)
    assert response.status_code == status, response.text
    return response.json()
