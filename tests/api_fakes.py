"""A scripted stand-in for `AsyncEngine`, so API tests can assert exact frames for reasoning, answers and tool calls.

The tiny random model speaks gibberish and almost never produces a channel header or a tool call;
this engine "generates" whatever harmony text the test sets in `script`, token by token, with the
same `TokenEvent`s the real engine sends (stop tokens, `max_tokens`, logprobs, abort on close).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from ossrun import harmony
from ossrun.engine.errors import ContextLengthError
from ossrun.engine.request import Request, TokenEvent, TokenLogprob


@dataclass
class FakeConfig:
    served_name: str = "@cf/openai/gpt-oss-20b"
    vocab_size: int = harmony.VOCAB_SIZE


@dataclass
class FakeOptions:
    max_num_seqs: int = 64


@dataclass
class FakeAdapters:
    names: set[str] = field(default_factory=set)

    def register(self, name: str, path: Path) -> None:
        self.names.add(name)

    def known(self, name: str) -> bool:
        return name in self.names


@dataclass
class FakeInner:
    options: FakeOptions = field(default_factory=FakeOptions)
    adapters: FakeAdapters = field(default_factory=FakeAdapters)


class FakeEngine:
    """`generate` streams `script` (harmony text; special tokens spelled out) one token per event."""

    def __init__(self, script: str = "<|channel|>final<|message|>Hi<|return|>", max_model_len: int = 4096):
        self.config = FakeConfig()
        self.engine = FakeInner()
        self.max_model_len = max_model_len
        self.script = script
        self.delay = 0.0  # seconds between tokens (cancellation tests)
        self.cached_tokens = 0
        self.fail_after: int | None = None  # emit an engine error after this many tokens
        self.requests: list[Request] = []
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.generated = 0

    # -- the AsyncEngine surface the API uses ------------------------------------------------------
    def validate(self, request: Request) -> None:
        prompt = len(request.prompt_token_ids)
        if prompt + request.params.max_tokens > self.max_model_len:
            raise ContextLengthError(prompt, request.params.max_tokens, self.max_model_len)

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": 0, "kv_blocks_used": len(self.running), "kv_blocks_total": 100,
                "kv_sliding_blocks_used": 0, "generated_tokens_total": self.generated}

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent]:
        self.validate(request)
        self.requests.append(request)
        self.running.add(request.request_id)
        tokens = harmony.encode(self.script, allow_special=True)
        params, prompt = request.params, len(request.prompt_token_ids)
        finished = False
        try:
            for n, token in enumerate(tokens, start=1):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail_after is not None and n > self.fail_after:
                    finished = True
                    yield TokenEvent(request.request_id, None, finish_reason="error", error="scripted failure",
                                     num_prompt_tokens=prompt, num_output_tokens=n - 1)
                    return
                self.generated += 1
                stop = token in params.stop_token_ids
                reason = "stop" if stop else ("length" if n >= params.max_tokens or n == len(tokens) else None)
                logprob = -0.25 if params.logprobs else None
                top = tuple(TokenLogprob(token + i, -0.25 - i) for i in range(params.top_logprobs)) if params.logprobs else ()
                finished = reason is not None
                yield TokenEvent(request.request_id, token, logprob, top, reason, token if stop else None,
                                 num_prompt_tokens=prompt, num_cached_tokens=self.cached_tokens, num_output_tokens=n)
                if finished:
                    return
        finally:
            self.running.discard(request.request_id)
            if not finished:
                self.abort(request.request_id)
