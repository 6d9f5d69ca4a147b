"""`make demo`: start the server on the embedded default model, show one request and its answer, keep serving.

The tiny default model has random weights, so its answer is gibberish; the demo shows the wire
(the route, the envelope, usage) that code written for the hosted model talks to.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ACCOUNT = "local"
MODEL = "@cf/openai/gpt-oss-20b"


def _free_port(preferred: int = 8787) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not become healthy in time")


def main() -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ossrun.cli", "serve", "--port", str(port)], env=os.environ.copy())
    try:
        _wait_healthy(base, server)
        url = f"{base}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
        body = {"prompt": "What is the capital of France?", "max_tokens": 48, "temperature": 0}
        print(f"\n$ curl -X POST {url} -H 'Content-Type: application/json' -d '{json.dumps(body)}'", flush=True)
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            print(json.dumps(json.loads(response.read()), indent=2, ensure_ascii=False), flush=True)
        print(f"\nThe server keeps running at {base} (Ctrl-C stops it).", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
