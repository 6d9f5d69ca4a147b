"""`make demo`: start the server on the embedded demo model, show what a user would send and what
comes back (a sync answer, a streamed answer with its reasoning, a tool call and the answer from its
result), then keep serving, with the playground at `/`.

The demo model is a tiny gpt-oss the project trained on a closed world (capitals, small sums,
jokes, the weather tool); `ossrun download openai/gpt-oss-20b` gets the real one.
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
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
DIM, BOLD, RESET = ("\033[2m", "\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


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


def _token() -> str | None:
    """The token the demo's server requires: `serve` reads OSSRUN_API_TOKEN, and the server inherits the demo's
    environment. Sent with every request, as a client of that server must (the demo sent none: a 403 and a traceback,
    hunt round 18 A-F4). The server keeps it rather than starting without: a user who set a token asked for a server
    that other local users cannot call."""
    return os.environ.get("OSSRUN_API_TOKEN") or None


def _auth_headers() -> dict[str, str]:
    token = _token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **_auth_headers()})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _title(text: str) -> None:
    print(f"\n{BOLD}── {text} {'─' * max(0, 70 - len(text))}{RESET}", flush=True)


def _curl(url: str, body: dict) -> None:
    """The request as a user would send it (the token as `serve`'s banner shows it: its variable, never its value)."""
    auth = ' \\\n    -H "Authorization: Bearer $OSSRUN_API_TOKEN"' if _token() else ""
    print(f"$ curl {url}{auth} \\\n    -H 'Content-Type: application/json' \\\n    -d '{json.dumps(body, ensure_ascii=False)}'",
          flush=True)


def sync_answer(base: str) -> None:
    _title("1. A sync answer (Workers AI route)")
    url = f"{base}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}
    _curl(url, body)
    print(json.dumps(_post(url, body), indent=2, ensure_ascii=False), flush=True)


def streamed_answer(base: str) -> None:
    _title("2. A streamed answer with its reasoning (OpenAI SDK)")
    api_key = "os.environ['OSSRUN_API_TOKEN']" if _token() else '"unused"'
    print(f"""from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key={api_key})
stream = client.chat.completions.create(model="{MODEL}", stream=True, reasoning_effort="high",
    messages=[{{"role": "user", "content": "Tell me a joke."}}])
for chunk in stream:  # reasoning_content first, then content, token by token
    ...""", flush=True)
    try:
        from openai import OpenAI
    except ImportError:
        print("(the openai package is not installed: pip install openai)")
        return
    client = OpenAI(base_url=f"{base}/v1", api_key=_token() or "unused")
    stream = client.chat.completions.create(model=MODEL, stream=True, reasoning_effort="high",
                                            messages=[{"role": "user", "content": "Tell me a joke."}])
    section = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning, content = getattr(delta, "reasoning_content", None), delta.content
        for name, piece in (("reasoning", reasoning), ("answer", content)):
            if piece:
                if section != name:
                    section = name
                    print(f"\n{BOLD}[{name}]{RESET} ", end="")
                print(f"{DIM}{piece}{RESET}" if name == "reasoning" else piece, end="", flush=True)
    print(flush=True)


def tool_call(base: str) -> None:
    _title("3. A tool call, then the answer from its result")
    url = f"{base}/v1/chat/completions"
    question = {"role": "user", "content": "What is the weather in Tokyo?"}
    body = {"model": MODEL, "messages": [question], "tools": [WEATHER_TOOL], "temperature": 0}
    _curl(url, body)
    message = _post(url, body)["choices"][0]["message"]
    print(json.dumps({"tool_calls": message["tool_calls"]}, indent=2, ensure_ascii=False), flush=True)
    if not message["tool_calls"]:
        return
    call = message["tool_calls"][0]
    result = {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature_c": 21, "condition": "cloudy"})}
    print(f"\n# your code runs {call['function']['name']}({call['function']['arguments']}) and sends its result back:")
    body = {**body, "messages": [question, {"role": "assistant", "content": None, "tool_calls": [call]}, result]}
    _curl(url, body)
    answer = _post(url, body)["choices"][0]["message"]
    print(json.dumps({"content": answer["content"], "reasoning_content": answer["reasoning_content"]}, indent=2,
                     ensure_ascii=False), flush=True)


STOP_S = 10.0  # how long the server is given to exit before the next, stronger signal


def stop_server(server: subprocess.Popen, interrupted: bool) -> None:
    """Stop the server the demo started. After Ctrl-C the terminal has sent SIGINT to the whole foreground process
    group, the server included: it is shutting down already, so it is waited for, not signalled again (a second
    signal tells `ossrun serve` to stop waiting for its clients), and terminated only if it outlives `STOP_S` (the
    demo alone was interrupted, `kill -INT`). Otherwise (the demo ended, failed or was terminated) it gets the SIGINT.
    Further Ctrl-Cs reach the server themselves; the demo ignores them, or its wait would end in a traceback. A SIGTERM
    meanwhile (an IDE's stop after a `kill -INT`) is passed on to the server at once: `main`'s handler raised
    SystemExit out of the wait, and the demo exited leaving its server running, holding the port and the data
    directory (hunt round 18 A-F5)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    if not interrupted and server.poll() is None:
        server.send_signal(signal.SIGINT)
    for stronger in (server.terminate, server.kill):
        try:
            server.wait(timeout=STOP_S)
            return
        except subprocess.TimeoutExpired:
            stronger()
    server.wait()


def main() -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ossrun.cli", "serve", "--port", str(port)], env=os.environ.copy())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a terminated demo stops its server too (finally below)
    interrupted = False
    try:
        _wait_healthy(base, server)
        sync_answer(base)
        streamed_answer(base)
        tool_call(base)
        print(f"\n{BOLD}The playground is at {base}/ and the server keeps running (Ctrl-C stops it).{RESET}", flush=True)
        server.wait()
    except KeyboardInterrupt:
        interrupted = True
    except Exception:
        if not _went_away(server):
            raise
        interrupted = True
    finally:
        stop_server(server, interrupted)


def _went_away(server: subprocess.Popen) -> bool:
    """Whether a request failed because the server was stopping: a Ctrl-C reaches the demo and the server together,
    and on a busy machine the server's answer to it (a 503, a closed connection) can come before the demo sees its own
    KeyboardInterrupt (CI saw a traceback and exit status 1 so). Then the server exits within STOP_S; a server that
    keeps running means the failure was something else, which is raised."""
    try:
        server.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        return False
    except KeyboardInterrupt:  # the demo's own Ctrl-C, arriving now
        return True
    return True


if __name__ == "__main__":
    main()
