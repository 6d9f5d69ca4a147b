"""What a caller hands the engine and what it gets back: plain data, no tensors.

`SamplingParams` is validated once at construction, so everything below the API can trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum


class Priority(IntEnum):
    """Lower runs first: interactive requests before batch-queue work."""

    INTERACTIVE = 0
    BATCH = 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off; keep tokens at least min_p × the top token's probability (after temperature)
    seed: int | None = None
    repetition_penalty: float = 1.0  # multiplicative (CTRL), on tokens seen in prompt or output
    frequency_penalty: float = 0.0  # additive, × count in the output
    presence_penalty: float = 0.0  # additive, once if present in the output
    # Token ids at or above this are never penalised (by any of the three): a tokenizer's special tokens, which a chat
    # format needs however often the prompt has them (None: every token may be). The caller knows its tokenizer.
    penalty_exempt_from: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded completion
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20
    # (token id, bias) pairs, ids distinct: added to the row's logits after the grammar mask, before everything else.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            # `>= 0` alone lets inf through (and a uniformly random answer out); NaN fails every comparison.
            (0 <= self.temperature < math.inf, "temperature must be a finite number, 0 or more"),
            (0 <= self.top_p <= 1, "top_p must be in [0, 1]"),  # 0: the smallest nucleus, the most likely token alone
            (self.top_k >= 0, "top_k must be non-negative"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (0 < self.repetition_penalty < math.inf, "repetition_penalty must be a finite number greater than 0"),
            (self.penalty_exempt_from is None or self.penalty_exempt_from >= 0, "penalty_exempt_from must be a token id"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        ids = [token for token, _ in self.logit_bias]
        if any(not isinstance(t, int) or t < 0 for t in ids) or len(set(ids)) != len(ids):
            raise ValueError("logit_bias token ids must be distinct non-negative integers")
        if not all(-100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: Priority = Priority.INTERACTIVE
    lora: str | None = None
    # A grammar matcher (structured output); the sampler masks tokens it forbids. None = free.
    constraint: object | None = None
    # The client request it belongs to (the choices × prompts of one HTTP request): groups share the engine's slots
    # and tokens fairly, so one request with 256 choices cannot hold every slot. None = a group of its own.
    group: str | None = None
    # Who sent it (the API's name for a caller, opaque here): clients share the engine fairly first, then each client's
    # groups share its part, so one client's 250 open streams cannot make another's `Hi` wait. None = its group alone.
    client: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token of one request (or, with `token_id` None, only the end of the request).

    `finish_reason`: "stop" (stop token or string), "length" (max_tokens or context), "abort"
    (cancelled), "error". `stop_reason` is the stop token id or stop string that ended it.
    """

    request_id: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_cache_write_tokens: int = 0  # prompt tokens this request made findable in the prefix cache
    num_output_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
