"""The engine as its callers see it: one narrow, typed interface (plain data in, token events out).

`api/` talks to the engine only through `EngineClient` (the real one is `AsyncEngine`; API tests use a
scripted fake that implements the same protocol). What crosses it: a `Submission` (prompt ids, validated
`SamplingParams`, priority, adapter name, an optional `Grammar` as data, the HTTP request and the client it comes
from, as opaque names) in, `TokenEvent`s out, and the errors of `engine/errors.py`. The engine compiles grammars
itself, so no engine internals leave it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ossrun.engine.errors import AdapterLoadError, AdapterPairMismatchError, ContextLengthError, ShuttingDownError, UnknownAdapterError
from ossrun.engine.grammar import BudgetTooSmall, Grammar, GrammarError, Span
from ossrun.engine.request import Priority, SamplingParams, TokenEvent, TokenLogprob

__all__ = ["AdapterLoadError", "AdapterPairMismatchError", "BudgetTooSmall", "ContextLengthError", "EngineClient", "EngineInfo", "Grammar",
           "GrammarError", "Priority", "SamplingParams", "ShuttingDownError", "Span", "Submission", "TokenEvent", "TokenLogprob", "UnknownAdapterError"]


@dataclass(frozen=True, slots=True)
class Submission:
    """One generation request, as data. `grammar`: what the output must follow (compiled by the engine)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.INTERACTIVE
    adapter: str | None = None
    grammar: Grammar | None = None
    group: str | None = None  # the client request it is one choice/prompt of (None: its own); see `Request.group`
    client: str | None = None  # who sent it, as the caller names clients (None: its group alone); see `Request.client`


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a caller may know about the engine's limits."""

    served_name: str
    max_model_len: int
    max_num_seqs: int
    vocab_size: int  # token ids run 0 .. vocab_size - 1 (logit_bias keys are checked against it)


class EngineClient(Protocol):
    """Everything `api/` may ask of the engine."""

    @property
    def info(self) -> EngineInfo: ...

    def check(self, submission: Submission) -> None:
        """Raise now what `submit` would raise later (ContextLengthError, GrammarError): blocking (a new
        grammar compiles for a few ms), so callers run it off the event loop."""

    def submit(self, submission: Submission) -> AsyncIterator[TokenEvent]:
        """Stream the request's token events; closing the stream early aborts the request."""

    def abort(self, request_id: str) -> None: ...

    def abort_all(self) -> None:
        """Shutdown begins: every running request ends within a step ("abort" events); new ones are refused."""

    def register_adapter(self, name: str, path: Path, install: Callable[[], Path] | None = None, resident: bool = False) -> None:
        """Serve the PEFT LoRA adapter at `path` as `name`'s new version (requests already running keep theirs, and
        no KV is shared between versions); AdapterLoadError (AdapterPairMismatchError: the two files are each valid
        but disagree: rank, target modules), or any error of unreadable files, when it cannot be. `install`, called once the
        adapter is accepted, moves its files to where they stay and returns that folder. `resident`: read once and kept in
        memory, never read again (a `--lora` folder, which may change while the server runs)."""

    def has_adapter(self, name: str) -> bool: ...

    def stats(self) -> dict[str, int]:
        """Counters for /health and /metrics: running and waiting sequences (each choice of each prompt), the
        requests they belong to (`running_requests`: one of its sequences runs; `waiting_requests`: none does), KV blocks, generated tokens (`unread_tokens_total`:
        those generated for streams closed before reading them, counted once their request has ended), and
        `preemptions_total`: running requests whose KV blocks were taken back (recomputed later)."""
