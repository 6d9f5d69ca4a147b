"""A scripted engine client, so API tests can assert exact frames for reasoning, answers and tool calls.

The tiny random model speaks gibberish and almost never produces a channel header or a tool call;
this engine "generates" whatever harmony text the test sets in `script`, token by token, with the
same `TokenEvent`s the real engine sends (stop tokens, `max_tokens`, logprobs, abort on close).
It implements `ossrun.engine.client.EngineClient` structurally (no inheritance): grammars are compiled
by the real compiler, so a schema the engine would refuse is refused here too, but not enforced.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ossrun import harmony
from ossrun.engine.client import ContextLengthError, EngineInfo, Submission, TokenEvent, TokenLogprob, UnknownAdapterError


@functools.cache
def _compiler():
    from ossrun.engine.constraints import ConstraintCompiler
    from ossrun.harmony.grammar import llguidance_tokenizer

    return ConstraintCompiler(llguidance_tokenizer(), workers=1)


class NameSet:
    """Adapters as names only (`register` any folder); a test may put a real `AdapterRegistry` in its place."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def register(self, name: str, path: Path, install: Callable[[], Path] | None = None, resident: bool = False) -> None:
        if install is not None:
            install()
        self.names.add(name)

    def known(self, name: str) -> bool:
        return name in self.names


class FakeEngine:
    """`submit` streams `script` (harmony text; special tokens spelled out) one token per event."""

    served_name = "@cf/openai/gpt-oss-20b"

    def __init__(self, script: str = "<|channel|>final<|message|>Hi<|return|>", max_model_len: int = 4096):
        self.max_model_len = max_model_len
        self.max_num_seqs = 64
        self.adapters = NameSet()
        self.script = script
        self.delay = 0.0  # seconds between tokens (cancellation tests)
        self.cached_tokens = 0
        self.fail_after: int | None = None  # emit an engine error after this many tokens
        self.requests: list[Submission] = []
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.generated = 0

    # -- the EngineClient protocol ----------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.served_name, self.max_model_len, self.max_num_seqs, harmony.VOCAB_SIZE)

    def check(self, submission: Submission) -> None:
        prompt = len(submission.prompt_token_ids)
        if prompt + submission.params.max_tokens > self.max_model_len:
            raise ContextLengthError(prompt, submission.params.max_tokens, self.max_model_len)
        if submission.adapter is not None and not self.has_adapter(submission.adapter):
            raise UnknownAdapterError(submission.adapter)
        if submission.grammar is not None:
            _compiler().compile(submission.grammar)

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": 0, "running_requests": len(self.running), "waiting_requests": 0,
                "kv_blocks_used": len(self.running), "kv_blocks_total": 100,
                "kv_sliding_blocks_used": 0, "generated_tokens_total": self.generated, "unread_tokens_total": 0,
                "preemptions_total": 0}

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def abort_all(self) -> None:
        self.aborted.extend(self.running)

    def register_adapter(self, name: str, path: Path, install: Callable[[], Path] | None = None, resident: bool = False) -> None:
        self.adapters.register(name, path, install, resident)

    def has_adapter(self, name: str) -> bool:
        return self.adapters.known(name)

    def shutdown(self) -> None:
        pass

    async def submit(self, submission: Submission) -> AsyncIterator[TokenEvent]:
        self.check(submission)
        self.requests.append(submission)
        rid = submission.request_id
        self.running.add(rid)
        tokens = harmony.encode(self.script, allow_special=True)
        params, prompt = submission.params, len(submission.prompt_token_ids)
        finished = False
        try:
            for n, token in enumerate(tokens, start=1):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail_after is not None and n > self.fail_after:
                    finished = True
                    yield TokenEvent(rid, None, finish_reason="error", error="scripted failure",
                                     num_prompt_tokens=prompt, num_output_tokens=n - 1)
                    return
                self.generated += 1
                stop = token in params.stop_token_ids
                reason = "stop" if stop else ("length" if n >= params.max_tokens or n == len(tokens) else None)
                logprob = -0.25 if params.logprobs else None
                top = tuple(TokenLogprob(token + i, -0.25 - i) for i in range(params.top_logprobs)) if params.logprobs else ()
                finished = reason is not None
                yield TokenEvent(rid, token, logprob, top, reason, token if stop else None,
                                 num_prompt_tokens=prompt, num_cached_tokens=self.cached_tokens, num_output_tokens=n)
                if finished:
                    return
        finally:
            self.running.discard(rid)
            if not finished:
                self.abort(rid)
