"""The engine behind an asyncio front: one thread runs the step loop, coroutines stream its events.

The model's forward releases the GIL for its heavy kernels, so the event loop keeps serving HTTP
while a step runs. Commands (add, abort) cross into the engine thread through an inbox; events
cross back with `call_soon_threadsafe`. Closing a stream early aborts its request, which frees
its KV blocks at the start of the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path

import torch

from ossrun.engine.client import EngineInfo, Submission
from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.errors import AdapterLoadError, AdapterPairMismatchError, ShuttingDownError
from ossrun.engine.grammar import GrammarError
from ossrun.engine.request import Request, TokenEvent
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.config import ModelConfig
from ossrun.model.gpt_oss import GptOss, check_precision

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# What `dtype=None` means: the exact path computes in float32 (equal to transformers at 1e-4);
# the fast path keeps activations and the KV cache in bfloat16 (half the memory traffic).
DEFAULT_DTYPES = {"exact": "float32", "fast": "bfloat16"}


def resolve_dtype(precision: str, dtype: str | None = None) -> torch.dtype:
    """The compute dtype for `precision`: `dtype` if given, else the precision's default."""
    check_precision(precision)
    name = dtype or DEFAULT_DTYPES[precision]
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_engine(model: str | Path, dtype: str | None = None, device: str = "cpu", precision: str = "fast",
                 decode_token: Callable[[int], bytes] | None = None, **options) -> Engine:
    """Load a checkpoint directory into a ready engine (the one place that wires model and options).

    `precision` is "fast" (quantised kernels) or "exact" (the reference computation); `dtype` None
    takes the precision's default (see DEFAULT_DTYPES). The KV cache takes the model's dtype unless
    `kv_dtype` says otherwise. `decode_token` (a token's bytes) lets the engine match stop strings;
    the tokenizer is the caller's (`ossrun.serve.load_engine` passes harmony's).
    """
    compute = resolve_dtype(precision, dtype)
    checkpoint = load_checkpoint(model)
    net = GptOss.from_checkpoint(checkpoint, compute, device, precision)
    kv_dtype = options.pop("kv_dtype", compute)
    if isinstance(kv_dtype, str):
        kv_dtype = DTYPES[kv_dtype]
    return Engine(net, EngineOptions(kv_dtype=kv_dtype, **options), decode_token=decode_token)


class AsyncEngine:
    """The engine behind the `EngineClient` protocol (`engine/client.py`). `grammar_tokenizer` builds the
    llguidance tokenizer that grammars compile against (about a second, on a thread of its own from the start);
    without it, a submission with a grammar is a GrammarError."""

    def __init__(self, engine: Engine, grammar_tokenizer: Callable[[], object] | None = None):
        self.engine = engine
        self._grammar_tokenizer = grammar_tokenizer
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, object]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # streams closed early, by request id: the tokens they read (their request's last event is still to come)
        self._closed: dict[str, int] = {}
        self._unread_tokens = 0  # tokens generated for closed streams after their last read
        self._stopped = False
        self._draining = False  # set by abort_all: shutdown has begun, nothing new is taken
        self._thread = threading.Thread(target=self._run, name="ossrun-engine", daemon=True)
        self._thread.start()
        if grammar_tokenizer is not None:  # most requests come with a grammar: built now, not in the first one (seconds)
            threading.Thread(target=self._compiler_for, name="ossrun-grammar-tokenizer", daemon=True).start()

    @classmethod
    def from_model(cls, model: str | Path, dtype: str | None = None, device: str = "cpu", precision: str = "fast",
                   decode_token: Callable[[int], bytes] | None = None, grammar_tokenizer: Callable[[], object] | None = None,
                   **options) -> "AsyncEngine":
        return cls(build_engine(model, dtype, device, precision, decode_token, **options), grammar_tokenizer)

    @property
    def config(self) -> ModelConfig:
        return self.engine.model.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def validate(self, request: Request) -> None:
        self.engine.validate(request)

    def stats(self) -> dict[str, int]:
        return {**self.engine.stats(), "unread_tokens_total": self._unread_tokens}

    # -- the EngineClient protocol ---------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.config.served_name, self.max_model_len, self.engine.options.max_num_seqs,
                          self.engine.model.config.vocab_size)

    def check(self, submission: Submission) -> None:
        self._request(submission)

    async def submit(self, submission: Submission) -> AsyncIterator[TokenEvent]:
        async with aclosing(self.generate(self._request(submission))) as events:  # closing this one aborts the request
            async for event in events:
                yield event

    def register_adapter(self, name: str, path: Path, install: Callable[[], Path] | None = None, resident: bool = False) -> None:
        from ossrun.model.lora import AdapterError, AdapterPairMismatch

        try:
            self.engine.adapters.register(name, path, install, resident)
        except AdapterPairMismatch as exc:
            raise AdapterPairMismatchError(str(exc)) from None
        except AdapterError as exc:
            raise AdapterLoadError(str(exc)) from None

    def has_adapter(self, name: str) -> bool:
        return self.engine.adapters.known(name)

    def _request(self, submission: Submission) -> Request:
        """The engine's request for a submission, its grammar compiled; context and grammar errors raised."""
        request = Request(submission.request_id, list(submission.prompt_token_ids), submission.params, submission.priority,
                          submission.adapter, group=submission.group, client=submission.client)
        self.validate(request)
        if submission.grammar is not None and not (submission.grammar.safeguard and self._grammar_tokenizer is None):
            request.constraint = self._compiler_for().compile(submission.grammar)
        return request

    def _compiler_for(self):
        with self._compiler_lock:
            if self._compiler is None:
                if self._grammar_tokenizer is None:
                    raise GrammarError("structured output is not available: the engine has no grammar tokenizer")
                from ossrun.engine.constraints import ConstraintCompiler

                self._compiler = ConstraintCompiler(self._grammar_tokenizer())
            return self._compiler

    # -- the coroutine side --------------------------------------------------------------------
    async def generate(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Submit a request and stream its events; leaving the loop early cancels the request."""
        if self._draining:
            raise ShuttingDownError("the server is shutting down")
        self.validate(request)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id} is already running")
            self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(("add", request))
        self._wake.set()
        finished, read = False, 0
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = event.finished
                read += event.token_id is not None
                yield event
                if finished:
                    return
        finally:
            if finished:
                with self._lock:
                    self._streams.pop(request.request_id, None)
            else:  # the request goes on until the abort lands: its last event says how many tokens it made
                self.abort(request.request_id)
                self._closed[request.request_id] = read
                while not queue.empty():
                    self._arrived(request.request_id, queue, queue.get_nowait())

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def abort_all(self) -> None:
        """Shutdown begins: end every request at the engine's next step (their streams get an "abort"
        event) and refuse new ones, so the server's open connections close within a step."""
        self._draining = True
        with self._lock:
            self._inbox.append(("abort_all", None))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopped:
            self._apply_inbox()
            if not self.engine.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # a failed step must not kill the loop: fail its requests, keep serving
                log.exception("engine step failed")
                events = self._fail_all(exc)
            for event in events:
                self._deliver(event.request_id, event)

    def _apply_inbox(self) -> None:
        with self._lock:
            commands, self._inbox = self._inbox, []
        for kind, payload in commands:
            if kind == "abort":
                self.engine.abort(payload)
                continue
            if kind == "abort_all":
                for event in self.engine.abort_all():
                    self._deliver(event.request_id, event)
                continue
            try:
                self.engine.add(payload)
            except Exception as exc:
                self._deliver(payload.request_id, exc)

    def _fail_all(self, exc: Exception) -> list[TokenEvent]:
        return self.engine.abort_all(finish_reason="error", error=f"engine step failed: {exc}")

    def _deliver(self, request_id: str, item: object) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(self._arrived, request_id, queue, item)
        except RuntimeError:  # its event loop has closed: nobody can read the stream, and raising would end this thread
            with self._lock:
                self._streams.pop(request_id, None)
                self._inbox.append(("abort", request_id))
            self._closed.pop(request_id, None)

    def _arrived(self, request_id: str, queue: asyncio.Queue, item: object) -> None:
        """On the stream's loop: an event for its reader, or, once the stream was closed early, nothing until the
        request's last event, whose count of output tokens says how many were generated and never read."""
        read = self._closed.get(request_id)
        if read is None:
            queue.put_nowait(item)
            return
        if isinstance(item, TokenEvent) and not item.finished:
            return
        del self._closed[request_id]
        with self._lock:
            self._streams.pop(request_id, None)
        if isinstance(item, TokenEvent):
            self._unread_tokens += max(0, item.num_output_tokens - read)
