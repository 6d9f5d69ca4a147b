"""`ossrun serve`: resolve the model, load it with a progress bar, build the app, run uvicorn.

The composition root: the one place that wires the rooms together (model → engine, with harmony's
tokenizer for stop strings and grammars; the engine → the API through its client interface).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import math
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ossrun.paths import data_dir as default_data_dir

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8787
    api_token: str | None = None
    dtype: str | None = None  # None: float32 for the exact path, bfloat16 for the fast one
    precision: str = "fast"
    device: str = "cpu"
    data_dir: Path | None = None
    rate_limit_per_minute: int = 300
    loras: list[str] = field(default_factory=list)  # NAME=DIR
    max_num_seqs: int = 64
    kv_cache_gib: float = 2.0
    max_batch_requests: int = 1000
    # Under the openai SDKs' 600 s read timeout: a sync request over it gets its 408 (with `x-should-retry: false`)
    # before the SDK gives up, which would otherwise retry it twice, each try a whole generation (hunt round 16 A-F3).
    request_timeout_s: float = 540.0
    max_model_len: int = 128000
    client_timeout_s: float = 30.0  # for a request's headers, and between two pieces of its body
    forwarded_allow_ips: str | None = None  # proxies whose X-Forwarded-For is believed; None: nobody's
    allowed_origins: str | None = None  # web origins (comma-separated, or *) whose pages may call; None: the server's own only
    conversation_date: str = "today"  # the system message's date: `harmony.check_conversation_date`'s settings


class SettingsError(ValueError):
    """A server setting that cannot work (a busy port, a malformed --lora); found before the model loads."""


def _parse_loras(items: list[str]) -> dict[str, Path]:
    loras = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SettingsError(f"--lora takes NAME=DIR, not {item!r}")
        if not Path(path).is_dir():
            raise SettingsError(f"--lora {item}: no such directory")
        if name in loras:
            raise SettingsError(f"--lora {name} is given twice ({loras[name]} and {path}); give each adapter its own name")
        loras[name] = Path(path)
    return loras


def _check_adapters(loras: dict[str, Path], model: str | None) -> None:
    """A broken --lora adapter (unreadable config, missing tensors, shapes of another model) found before the model
    loads, which takes minutes for the 20b, not after it: each is read and checked against the checkpoint's config
    alone, as the engine will read it again (adapters are megabytes)."""
    if not loras:
        return
    from ossrun.model.checkpoint import read_config
    from ossrun.model.lora import load_peft_adapter
    from ossrun.model.resolve import resolve_model

    config = read_config(resolve_model(model))
    for name, path in loras.items():
        load_peft_adapter(path, config, name)


def _check_lora_names(loras: dict[str, Path], data_dir: Path) -> None:
    """A `--lora` name that names a fine-tune in the data directory (its name, or its id) would make one of them
    unreachable, and the fine-tune's uploads would replace the adapter: refused (a fine-tune cannot be renamed)."""
    from ossrun.finetunes import FinetuneStore

    store = FinetuneStore(data_dir)
    for name in loras:
        record = store.get(name)
        if record is not None:
            raise SettingsError(f"--lora {name}: the fine-tune {record.name!r} (id {record.id}) in {data_dir} is named so; "
                                "give the adapter another name")


def _os_reason(exc: OSError) -> str:
    """An OSError's reason in the user's words. mkdir says "File exists" where a file stands in a directory's place,
    which reads as if existing were the fault."""
    if isinstance(exc, FileExistsError) and exc.filename and not Path(exc.filename).is_dir():
        return "a file, not a directory"
    return exc.strerror or str(exc)


KEEPALIVE_VARIABLE = "OSSRUN_SSE_KEEPALIVE_S"


def _keepalive_s() -> float:
    """A silent stream's keep-alive interval (`OSSRUN_SSE_KEEPALIVE_S`, seconds), read once before the model loads.
    Where the API read it, 0 or a negative value (an operator's "off") starved every stream of its frames with
    endless keep-alives at full CPU, and a non-number was a traceback once the model had loaded (hunt round 18 A-F1,
    A-F6); an infinite one would never send any. Unset or empty: the default."""
    from ossrun.api.disconnect import KEEPALIVE_S

    text = os.environ.get(KEEPALIVE_VARIABLE) or None
    if text is None:
        return KEEPALIVE_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise SettingsError(f"{KEEPALIVE_VARIABLE}={text!r}: the keep-alive interval must be a finite number of seconds "
                            f"greater than 0 (unset: {KEEPALIVE_S:g})")
    return value


PID_FILE = "server.lock"  # the pid of the server holding the data directory, for the refusal's message


def _claim(data_dir: Path) -> tuple[int, IO[str]]:
    """An exclusive lock on the data directory, held while the server runs (the OS drops it when the process ends,
    however it ends). A second server on the same directory would take the first one's running batch items for
    abandoned, queue and run them again, fail its running background responses, and write the same fine-tunes; it is
    refused before anything loads. The directory itself is locked: a lock file can be deleted (a "stale lock" reflex)
    and a new one made and locked beside the old lock. `PID_FILE` names the holder, and is locked too, as older
    servers lock only it."""
    import fcntl

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        directory = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise SettingsError(f"--data-dir {data_dir}: cannot use it ({_os_reason(exc)})") from None
    try:
        fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(directory)
        raise _in_use(data_dir) from None
    try:
        handle = open(data_dir / PID_FILE, "a+")
    except OSError as exc:  # a directory in its place
        raise SettingsError(f"--data-dir {data_dir}: cannot use it ({_os_reason(exc)})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _in_use(data_dir) from None
    try:  # unbuffered: a write refused now cannot be refused again when the handle closes
        os.ftruncate(handle.fileno(), 0)
        os.write(handle.fileno(), str(os.getpid()).encode())
    except OSError as exc:  # a full disk, a quota: a new data directory's first write (hunt round 18 A-F6)
        handle.close()
        os.close(directory)
        raise _unusable(data_dir, PID_FILE, exc) from None
    return directory, handle


def _in_use(data_dir: Path) -> SettingsError:
    try:
        holder = (data_dir / PID_FILE).read_text().strip() or "unknown"
    except OSError:  # deleted while its server runs
        holder = "unknown"
    return SettingsError(f"{data_dir} is in use by another ossrun server (pid {holder}); give each server its own --data-dir")


def _check_data_dir(data_dir: Path) -> None:
    """The data directory's stores opened once before the model loads (minutes for 20b): a restored bad backup, a
    corrupted `batch.sqlite`, a directory or a file where the other belongs is one line, not a traceback after the load."""
    from ossrun.finetunes import FinetuneStore
    from ossrun.storage import DATABASE

    for name, open_store in ((DATABASE, lambda: _open_database(data_dir / DATABASE)),
                             ("finetunes", lambda: FinetuneStore(data_dir))):
        try:
            open_store()
        except (sqlite3.Error, OSError) as exc:
            raise _unusable(data_dir, name, exc) from None


def _open_database(path: Path) -> None:
    """Both stores of the database file opened (and closed) as the app will open them: the Responses store writes at
    once (a missing table made, responses left running failed), so a lock another process holds is found here too."""
    from ossrun.api.conversations import ResponseStore
    from ossrun.batch.store import SQLiteBatchStore

    SQLiteBatchStore(path).close()
    ResponseStore(path).close()


def _unusable(data_dir: Path, name: str, exc: sqlite3.Error | OSError) -> SettingsError:
    """Why `name` in the data directory cannot be used, and what to do. A directory refusing the writes opening takes
    (a full disk, a quota, permissions) holds files that are fine: freeing space is the fix, not a backup that would
    lose what was stored since; so is another process's write lock. A directory where `batch.sqlite` belongs is in the
    way (SQLite says "unable to open database file" for it too)."""
    from ossrun.storage import DATABASE, LOCKED, write_refusal

    cause = _os_reason(exc) if isinstance(exc, OSError) else str(exc)
    refusal = write_refusal(exc)
    if refusal is not None and LOCKED in refusal:
        return SettingsError(f"--data-dir {data_dir}: {name} cannot be written ({refusal}); end that process's "
                             "transaction, then start again")
    if refusal is not None and not (name == DATABASE and (data_dir / name).is_dir()):
        return SettingsError(f"--data-dir {data_dir}: the data directory refuses writes ({name}: {cause}); free space "
                             "or fix its permissions")
    return SettingsError(f"--data-dir {data_dir}: {name} cannot be used ({cause}); move it aside or restore it from a backup")


def _authority(host: str, port: int) -> str:
    """`host:port` as a URL spells it: an IPv6 literal in brackets (RFC 3986), or `http://::1:8080` is no URL curl
    or an SDK takes."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen(host: str, port: int) -> socket.socket:
    """The listening address bound before the model loads: a busy port (another server?) fails in a line, not
    after minutes of loading, and the "serving at" line is never printed for an address it cannot have."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise SettingsError(f"cannot listen on {_authority(host, port)}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SettingsError(f"cannot listen on {_authority(host, port)}: {exc.strerror or exc}") from None
    return sock


def _browser_settings(settings: ServerSettings, sock: socket.socket) -> dict:
    """`AppSettings`' allowed origins, the `Host` names a loopback server answers besides the local ones (its
    `--host`; on an address other machines reach, any `Host`: `access.BrowserPolicy`), and the proxies believed."""
    from ossrun.api.access import TrustedProxies, host_name, is_loopback, parse_origins

    try:
        origins = parse_origins(settings.allowed_origins)
        proxies = TrustedProxies(settings.forwarded_allow_ips)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if proxies.any:
        log.warning("--forwarded-allow-ips '*' believes X-Forwarded-For from any peer: a client that reaches port %d "
                    "without the proxy names its own address, so the rate limit and the wrong-token limit do not hold "
                    "for it; name the proxy's address or network instead where you can", settings.port)
    loopback = is_loopback(settings.host) or is_loopback(sock.getsockname()[0])
    return {"allowed_origins": origins, "local_hosts": (host_name(settings.host),) if loopback else None,
            "forwarded_allow_ips": settings.forwarded_allow_ips}


def _available_memory(device: str, checkpoint: Path) -> tuple[int, str] | None:
    """(bytes free for the KV cache, where the number comes from), or None where nothing says: the device's free
    memory on CUDA; on the CPU the least of MemAvailable, the cgroup's room and the address-space limit's."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0], f"free on {device}"
    found = []
    for what, read in (("MemAvailable", _mem_available), ("the cgroup's memory.max", _cgroup_room),
                       ("ulimit -v, less what the process and the model's load map", lambda: _address_space_room(checkpoint))):
        try:
            value = read()
        except (OSError, ValueError):
            value = None
        if value is not None:
            found.append((max(value, 0), what))
    return min(found) if found else None


def _mem_available() -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


LOAD_MARGIN = 1 << 30  # address space a load maps besides the weights: threads' stacks and malloc arenas, kernels, tables


def _address_space_room(checkpoint: Path) -> int | None:
    """The room `ulimit -v` (RLIMIT_AS) leaves the KV cache. The limit counts every mapping, not memory used, so
    what the process maps already (`VmSize`: torch's libraries alone are ~0.7 GiB), the weights' files (mapped whole
    by the load to come) and `LOAD_MARGIN` (~0.5 GiB measured on the demo model) come off it first."""
    import resource

    from ossrun.model.checkpoint import weight_files

    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    weights = sum(file.stat().st_size for file in weight_files(checkpoint))
    return soft - _vm_size() - weights - LOAD_MARGIN


def _vm_size() -> int:
    """The process's mapped address space (`VmSize` in /proc/self/status), what RLIMIT_AS limits."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise ValueError("/proc/self/status has no VmSize")


def _cgroup_room() -> int | None:
    limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    if limit == "max":
        return None
    return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())


MAX_CACHE_BYTES = 2**63  # 8 EiB: no machine's memory, and what a tensor's size can count to


def _kv_cache_bytes(settings: ServerSettings) -> int:
    """`--kv-cache-gib` in bytes. A size no machine has is refused before anything loads: above ~1.6e299 GiB the
    bytes are an infinite float, which int() refused with an OverflowError's traceback (hunt round 18 A-F6)."""
    size = settings.kv_cache_gib * 2**30
    if size >= MAX_CACHE_BYTES:
        raise SettingsError(f"--kv-cache-gib {settings.kv_cache_gib:g} is more memory than any machine has (less than "
                            f"{MAX_CACHE_BYTES / 2**30:.0f} GiB)")
    return int(size)


def _check_cache_fits(settings: ServerSettings, checkpoint: Path) -> None:
    """The KV cache is allocated whole at start, `--kv-cache-gib` capped by what `--max-num-seqs` × `--max-model-len`
    can use: one the machine cannot hold would fail after the load (minutes for 20b) with a traceback, or start on
    overcommitted memory and be killed under load. Refused only when the cache alone exceeds the memory there is
    (the weights need more on top; only the address-space limit counts them, as it counts their mapping); the checkpoint's config is all it reads, after the model is resolved (a preset's
    first use writes it, under load_engine's progress) and before it loads. A cache too small for the model is found
    here too."""
    from ossrun.engine.async_engine import resolve_dtype
    from ossrun.engine.engine import EngineOptions, planned_cache_bytes
    from ossrun.model.checkpoint import read_config

    options = EngineOptions(max_num_seqs=settings.max_num_seqs, kv_cache_bytes=_kv_cache_bytes(settings),
                            kv_dtype=resolve_dtype(settings.precision, settings.dtype), max_model_len=settings.max_model_len)
    planned = planned_cache_bytes(read_config(checkpoint), options)
    available = _available_memory(settings.device, checkpoint)
    if available is not None and planned > available[0]:
        raise SettingsError(f"--kv-cache-gib {settings.kv_cache_gib:g} plans a KV cache of {planned / 2**30:.3g} GiB (at most what "
                            f"--max-num-seqs {settings.max_num_seqs} × --max-model-len {settings.max_model_len} tokens use), "
                            f"but only {available[0] / 2**30:.3g} GiB is available ({available[1]}); lower --kv-cache-gib "
                            "(or --max-num-seqs)")


def _stdout_gone() -> None:
    """stdout's reader has gone (`ossrun serve | head -1`, a log filter that ended or restarts). What the server writes
    there (the load's progress, the banner) is informational, so from then on it goes to /dev/null (the rest of
    stdout's buffer too, which would fail again at exit), the server serves on, and stderr says so. It ended the
    process, status 1 and not a word on stderr: rich and click both exit on the BrokenPipeError (hunt round 18 A-F7)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    log.warning("stdout's reader has gone (a closed pipe); serving on without it")


@contextlib.contextmanager
def _informational() -> Iterator[None]:
    """`print`s to stdout that a closed pipe must not stop (`_stdout_gone`)."""
    try:
        yield
    except BrokenPipeError:
        _stdout_gone()


def _progress_console():
    """rich's console on stdout, but a closed pipe is `_stdout_gone`, where rich's own `on_broken_pipe` exits."""
    from rich.console import Console

    class InformationalConsole(Console):
        def on_broken_pipe(self) -> None:
            _stdout_gone()

    return InformationalConsole()


def load_engine(settings: ServerSettings):
    """Resolve and load the model, showing progress (loading a 20b checkpoint maps 13 GB)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ossrun import harmony
    from ossrun.engine.async_engine import AsyncEngine
    from ossrun.harmony.grammar import llguidance_tokenizer
    from ossrun.model.resolve import resolve_model

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False,
                  console=_progress_console()) as progress:
        task = progress.add_task("resolving the model", total=3)
        path = resolve_model(settings.model)
        _check_cache_fits(settings, path)
        progress.update(task, advance=1, description=f"loading {path}")
        engine = AsyncEngine.from_model(path, settings.dtype, settings.device, settings.precision,
                                        decode_token=harmony.token_bytes, grammar_tokenizer=llguidance_tokenizer,
                                        max_num_seqs=settings.max_num_seqs, kv_cache_bytes=_kv_cache_bytes(settings),
                                        max_model_len=settings.max_model_len)
        progress.update(task, advance=1, description="warming up the tokenizer")
        harmony.get_encoding()
        harmony.tokenizer.bpe()  # ~1 s: not on the first request's thread
        progress.update(task, advance=1, description=f"loaded {path}")
    return engine


GRACE_S = 3.0  # after draining, the longest uvicorn waits for connections before cancelling them


def _draining_server(config, drain: Callable[[], Awaitable[None]]):
    """A uvicorn server whose first exit signal also drains the app, and whose second one ends the wait for clients.

    uvicorn's graceful shutdown waits for every open request to finish; a sync request generating
    thousands of tokens would hold SIGTERM for minutes. Draining ends them all within an engine step.
    """
    import asyncio

    import uvicorn

    from ossrun import connections

    class DrainingServer(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            connections.QuietAcceptErrors(self._loop)
            await super().startup(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn's, without raising the signal that stopped the server again once it has: uvicorn does, for the
            handler before it to act, and asyncio's SIGINT handler then throws a KeyboardInterrupt through the closing
            event loop (a traceback from the app's lifespan when a second one follows). Stopped as asked, `serve` returns
            and the process exits 0; a signal after that (the engine's threads are being joined) exits at once, and one
            in the interpreter's last ~0.5 s (its modules torn down, where Python has put back the default handlers that
            die of the signal: rc -2) is ignored."""
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in uvicorn.server.HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, _exit_now if self.should_exit else handler)
                if self.should_exit:
                    atexit.register(_ignore_exit_signals)

        def handle_exit(self, sig, frame) -> None:
            """The first SIGINT/SIGTERM drains. A second one while shutting down (Ctrl-C pressed twice, or the demo's
            terminal signalling the server's whole process group) means "stop waiting, exit now": every open connection
            is closed as if its client had left (the drain has aborted their requests, which then end quietly), so
            nothing waits out `GRACE_S` for a slow reader."""
            if self.should_exit:
                self._soon(self._close_connections)
                return
            super().handle_exit(sig, frame)
            self._soon(lambda: self._loop.create_task(drain()))

        def _soon(self, callback: Callable[[], object]) -> None:
            """Run `callback` on the server's loop: a signal handler only hands the work over."""
            if self._loop is not None:
                self._loop.call_soon_threadsafe(callback)

        def _close_connections(self) -> None:
            """At once: a plain close of a connection whose client is still sending lingers (`LingeringTransport`:
            LINGER_S, for its answer to arrive), and the server waited that out (hunt round 23 A-F3)."""
            for connection in list(self.server_state.connections):
                connection.transport.close_now()

    return DrainingServer(config)


def _ignore_exit_signals() -> None:
    """At exit, after the threads are joined: Python's finalisation resets a signal handled in Python to the default
    (the process then dies of it) but leaves an ignored one ignored, and nothing is left that a signal could hurry."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _exit_now(sig: int, frame) -> None:
    """A signal after the server has stopped: nothing is left to finish but joining threads (the stores are durable,
    the OS drops the data directory's lock), so the process ends at once, without a KeyboardInterrupt's traceback."""
    os._exit(0)


def serve(settings: ServerSettings) -> None:
    from ossrun import connections
    from ossrun.model.gpt_oss import check_device

    # A fatal signal explained on stderr with every thread's stack: SQLite maps its WAL index (batch.sqlite-shm), and a
    # data directory that stops taking writes under the running server can end it with SIGBUS (README, data directory).
    faulthandler.enable()
    data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
    loras = _parse_loras(settings.loras)
    keepalive_s = _keepalive_s()
    check_device(settings.device)
    _kv_cache_bytes(settings)
    lock = _claim(data_dir)  # noqa: F841  held until the process ends
    _check_data_dir(data_dir)
    _check_lora_names(loras, data_dir)
    _check_adapters(loras, settings.model)
    open_files = connections.raise_file_limit()
    sock = _listen(settings.host, settings.port)
    browser = _browser_settings(settings, sock)
    engine = load_engine(settings)
    try:
        _serve_engine(engine, settings, data_dir, loras, open_files, sock, {**browser, "sse_keepalive_s": keepalive_s})
    finally:  # also when building the app fails (an unusable --lora): the engine's threads end before the interpreter
        engine.shutdown()


def _serve_engine(engine, settings: ServerSettings, data_dir: Path, loras: dict[str, Path], open_files: int, sock: socket.socket,
                  checked: dict) -> None:
    """Build the app on a running engine and serve it until the server stops (the caller shuts the engine down).
    `checked`: the `AppSettings` fields `serve` parsed and checked before the model loaded."""
    import uvicorn

    from ossrun import connections
    from ossrun.api.app import AppSettings, build_app
    from ossrun.model.resolve import preset_warning

    app = build_app(engine, AppSettings(data_dir=data_dir, api_token=settings.api_token,
                                        rate_limit_per_minute=settings.rate_limit_per_minute, loras=loras,
                                        max_batch_requests=settings.max_batch_requests, request_timeout_s=settings.request_timeout_s,
                                        client_timeout_s=settings.client_timeout_s,
                                        conversation_date=settings.conversation_date, **checked))
    base = f"http://{_authority(settings.host, settings.port)}"
    # The token itself never: stdout ends up in journald / docker / k8s logs, often shipped elsewhere.
    auth = ' -H "Authorization: Bearer $OSSRUN_API_TOKEN"' if settings.api_token else ""
    api_key = "os.environ['OSSRUN_API_TOKEN']" if settings.api_token else "'unused'"
    warning = preset_warning(settings.model)
    if warning:  # beside the banner, once the write (its own warning) and the load are over
        log.warning(warning)
    with _informational():
        print(f"ossrun serving {engine.config.served_name} at {base} (data in {data_dir})", flush=True)
        print(f"  curl {base}/client/v4/accounts/local/ai/run/{engine.config.served_name}{auth} "
              f"-H 'Content-Type: application/json' -d '{{\"prompt\": \"Hello\"}}'", flush=True)
        print(f"  OpenAI SDK: OpenAI(base_url='{base}/v1', api_key={api_key})", flush=True)
    # Proxy headers are read by the app, from the proxies named (`api.app.ForwardedHeaders`): uvicorn's would believe
    # 127.0.0.1's by default, where every client of the default --host connects from.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=GRACE_S,
                            http=connections.deadline_protocol(settings.client_timeout_s, connections.cap(open_files)),
                            proxy_headers=False, ws="none")
    _draining_server(config, app.state.drain).run(sockets=[sock])
