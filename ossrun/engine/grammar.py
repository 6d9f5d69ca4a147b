"""A grammar as plain data: what a request's output must follow, in the terms the engine's token masks need.

Who writes the grammar knows the output format (`ossrun.harmony.grammar` writes gpt-oss's); the
engine only compiles it (`constraints.ConstraintCompiler`) and masks tokens with it. Nothing here
imports torch or llguidance, so the API can build and pass these values through the engine client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled, or a budget it cannot fit in; the message says why (→ 400).
    `schema`: the label of the grammar's schema at fault (`Grammar.schemas`), so that its writer can name the field."""

    def __init__(self, message: str, schema: str | None = None):
        super().__init__(message)
        self.schema = schema


class BudgetTooSmall(GrammarError):
    """Proven: no complete answer of the format fits in `max_tokens`. `field` is the name the caller gave the limit
    (`max_output_tokens` on Responses): the API names it, the engine does not know it."""

    def __init__(self, max_tokens: int, field: str = "max_tokens"):
        self.max_tokens = max_tokens
        super().__init__(f"{field} {max_tokens} cannot hold a valid answer: there is no complete answer of at most "
                         f"{max_tokens} tokens (the format's shortest answer is longer)")

    def named(self, field: str) -> "BudgetTooSmall":
        return BudgetTooSmall(self.max_tokens, field)


@dataclass(frozen=True, slots=True)
class Span:
    """A bounded free-text span of the output (gpt-oss's reasoning): it starts when a header opened by
    `opener` reads `tag` at `body`, and ends at `close`; after `limit` text tokens only `close` is allowed. A `close`
    the limit forced (the model sampled another token) marks the output cut, as the budget guard's refusals do."""

    opener: int
    tag: bytes
    body: int
    close: int
    limit: int


@dataclass(frozen=True, slots=True)
class Grammar:
    """An llguidance Lark grammar over the whole completion, plus what the engine needs to drive it.

    `schemas` are the JSON Schemas inlined in `lark`, each compiled alone first so that an error names
    the schema rather than a line of the wrapper. `final_tokens`: a sampled token among them that
    completes the grammar ends the request. `path_tokens`: what the shortest-completion search tries
    besides forced tokens. `max_tokens`: the completion must be complete within it (None: it may be cut).
    `safeguard`: the grammar only keeps the model from what it should not write (a plain answer's recipient), so an
    engine built without a grammar tokenizer (library use, tests) runs the request without it rather than refusing."""

    lark: str
    schemas: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    final_tokens: tuple[int, ...] = ()
    path_tokens: tuple[int, ...] = ()
    max_tokens: int | None = None
    span: Span | None = None
    safeguard: bool = False
