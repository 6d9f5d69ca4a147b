"""All per-request state of a running request, as plain Python (no tensors)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto

from ossrun.engine.kv_cache import SequenceBlocks
from ossrun.engine.request import Request
from ossrun.engine.sampler import SamplingState

_arrival = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True, eq=False)
class Sequence:
    request: Request
    tokens: list[int]  # prompt then output
    sampling: SamplingState
    num_prompt_tokens: int
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of the prompt, served by the prefix cache (first admission)
    num_cache_write_tokens: int = 0  # of the prompt, made findable in the prefix cache by this sequence
    status: Status = Status.WAITING
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    arrival: int = field(default_factory=lambda: next(_arrival))
    admitted_once: bool = False
    last_scheduled_step: int = 0  # the scheduler's step that last ran it (batch rows take turns by it)
    text_tail: str = ""  # recent decoded output, for stop strings
    error: str | None = None  # set when the request must end with an error after this step
    text_decoder: object | None = None  # incremental UTF-8 decoder, created on first use
    adapter: str | None = None  # the LoRA version (`AdapterRegistry` key) it runs with, first token to last

    @classmethod
    def from_request(cls, request: Request) -> "Sequence":
        tokens = list(request.prompt_token_ids)
        return cls(request, tokens, SamplingState(request.params, tokens), len(tokens))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def group(self) -> str:
        """The client request it belongs to: the scheduler shares slots and tokens fairly between groups."""
        return self.request.group or self.request.request_id

    @property
    def client(self) -> str:
        """Who sent it: the scheduler shares slots and tokens fairly between clients, then between a client's groups."""
        return self.request.client or self.group

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def num_to_compute(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: priority class first, then arrival (first come, first served)."""
        return (int(self.request.priority), self.arrival)

    @property
    def grammar_pending(self) -> bool:
        """Its structured output's next mask is still being computed (a step sampling it would wait for it)."""
        constraint = self.request.constraint
        return constraint is not None and not constraint.ready

    @property
    def grammar_searching(self) -> bool:
        """Its structured output's next mask comes with a search for a complete answer (up to seconds)."""
        constraint = self.request.constraint
        return constraint is not None and getattr(constraint, "searching", False)

    def append(self, token_id: int) -> None:
        self.tokens.append(token_id)
        self.sampling.append(token_id)
