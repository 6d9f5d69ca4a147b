"""Structured output on the engine side: a `Grammar` in, token masks out, matched by llguidance.

The grammar comes as data (`engine/grammar.py`) from whoever knows the output format (gpt-oss's
harmony wrapper is written by `ossrun.harmony.grammar`); this module only compiles it, caches the
compiled matchers, and drives one matcher per request: `allowed_tokens()` before each sampled token,
`advance(token)` after it.

Budget: a grammar with `max_tokens` must be complete within it. A short breadth-first search (forced
tokens, then the grammar's `path_tokens`) finds a way from the current state to a complete output; at
construction a budget shorter than that is a GrammarError, and near the end of the budget the
constraint follows that path. A grammar's `span` (gpt-oss's reasoning) is a free-text stretch allowed
at most `limit` tokens, after which only its closing token is.

Overlap: after `advance` the next mask is computed on the compiler's thread pool (llguidance drops the
GIL while it works), so it runs during the next forward; `allowed_tokens` only waits for it.
Requests without a constraint never reach this module.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import llguidance
import torch

from ossrun.engine.grammar import Grammar, GrammarError

log = logging.getLogger(__name__)

# Library defaults, but errors without the parser state and the grammar (ours, and long).
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
# 256 entries of 8 bools each, as int64: a bitmask byte → its 8 allowed flags in one lookup.
_BYTE_TO_BOOLS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool().view(torch.int64).view(-1)

__all__ = ["CLOSING_SLACK", "Constraint", "ConstraintCompiler", "ConstraintViolation", "Grammar", "GrammarError",
           "shortest_completion"]


class ConstraintViolation(RuntimeError):
    """The engine fed a token the grammar forbids (it samples under the mask, so this is a bug)."""


class Constraint:
    """One request's grammar state, driven by the engine thread: `allowed_tokens()` before each
    sampled token, `advance(token)` after it. The next mask is computed on the compiler's pool in
    between, so it overlaps the next forward."""

    def __init__(self, matcher: llguidance.LLMatcher, pool: ThreadPoolExecutor, grammar: Grammar,
                 tokenizer: llguidance.LLTokenizer, shortest: int | None):
        self._matcher = matcher
        self._pool = pool
        self._grammar = grammar
        self._tokenizer = tokenizer
        self._vocab = tokenizer.vocab_size
        self._words = (self._vocab + 31) // 32  # llguidance's bitmask: bit t % 32 of word t // 32 allows token t
        # The whole completion's budget: near its end the shortest way to a complete output is forced.
        self._left = grammar.max_tokens
        self._closing: list[int] | None = None
        self._shortest = shortest
        self._bits = torch.zeros(self._words, dtype=torch.int32)
        self._finished = False
        self._error: str | None = None
        self._header: bytearray | None = None  # bytes of the header being read (after the span's opener)
        self._in_span = False
        self.span_tokens = 0
        self._pending: Future[torch.Tensor] = pool.submit(self._compute)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete (after one of its final tokens): the request should stop."""
        return self._finished

    def allowed_tokens(self) -> torch.Tensor:
        """bool [vocab] of the tokens allowed next; raises ConstraintViolation once the grammar has failed."""
        if self._error is not None:
            raise ConstraintViolation(self._error)
        mask = self._pending.result()
        if self._closing:
            return self._only(self._closing[0])
        span = self._grammar.span
        if span is not None and self._in_span and self.span_tokens >= span.limit and bool(mask[span.close]):
            # Span budget spent: close it now. (If its closing token is not allowed yet — a character
            # split across tokens — the text continues one more token.)
            return self._only(span.close)
        return mask

    def advance(self, token_id: int) -> None:
        """Move the grammar past the sampled token and start computing the next mask."""
        wait([self._pending])  # the matcher is not shared: let the running computation end first
        if self._error is not None:
            raise ConstraintViolation(self._error)
        if not self._matcher.consume_token(token_id):
            self._error = f"token {token_id} ({self._describe(token_id)}) is not allowed here: {_reason(self._matcher)}"
            raise ConstraintViolation(self._error)
        self._track_span(token_id)
        if self._closing:
            self._closing.pop(0)
        if self._left is not None:
            self._left -= 1
        self._finished = token_id in self._grammar.final_tokens and self._matcher.is_stopped()
        self._pending = self._pool.submit(self._compute)

    def _compute(self) -> torch.Tensor:
        if self._closing:
            return self._only(self._closing[0])
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._words * 4)
        if self._matcher.is_error():
            raise ConstraintViolation(_reason(self._matcher))
        self._watch_budget()
        return self._unpack(self._bits)

    def _watch_budget(self) -> None:
        """Near the end of max_tokens, follow the shortest path to a complete output (a token may lengthen
        that path by a few tokens, hence the slack; the path is searched again every step once close)."""
        if self._left is None or self._shortest is None or self._left > self._shortest + 3 * CLOSING_SLACK:
            return
        path = shortest_completion(self._matcher, self._grammar)
        if path is None:
            return
        self._shortest = len(path)
        if len(path) + CLOSING_SLACK >= self._left:
            self._closing = path

    def _track_span(self, token: int) -> None:
        """Follow the headers to know when the output is inside the bounded span."""
        span = self._grammar.span
        if span is None:
            return
        if token == span.opener:
            self._header = bytearray()
        elif token == span.body:
            self._in_span = self._header is not None and bytes(self._header).strip() == span.tag
            self._header = None
        elif token == span.close:
            self._in_span = False
        elif self._header is not None:
            self._header += self._tokenizer.decode_bytes([token])
        elif self._in_span:
            self.span_tokens += 1

    def _only(self, token: int) -> torch.Tensor:
        mask = torch.zeros(self._vocab, dtype=torch.bool)
        mask[token] = True
        return mask

    def _unpack(self, bits: torch.Tensor) -> torch.Tensor:
        """llguidance's int32 bitmask [ceil(V/32)] → bool [V] of allowed tokens (~40 µs)."""
        return torch.index_select(_BYTE_TO_BOOLS, 0, bits.view(torch.uint8).int()).view(torch.bool)[:self._vocab]

    def _describe(self, token: int) -> str:
        if not 0 <= token < self._vocab:
            return "outside the vocabulary"
        return repr(self._tokenizer.decode_bytes([token]).decode("utf-8", errors="replace"))


# How many tokens one freely sampled token may add to the shortest completion before the search notices.
CLOSING_SLACK = 6
_SEARCH_WIDTH, _SEARCH_DEPTH = 8, 96


def shortest_completion(matcher: llguidance.LLMatcher, grammar: Grammar) -> list[int] | None:
    """A short token path from the matcher's state to a complete output (ending in a final token), or
    None when the search finds none. Breadth first over forced tokens, then the grammar's path tokens."""
    frontier: list[tuple[llguidance.LLMatcher, list[int]]] = [(matcher.deep_copy(), [])]
    for _ in range(_SEARCH_DEPTH):
        following = []
        for state, path in frontier:
            forced = state.compute_ff_tokens()
            options = forced[:1] or [t for t in grammar.path_tokens if state.validate_tokens([t]) == 1]
            for token in options:
                if token in grammar.final_tokens:
                    return path + [token]
                child = state.deep_copy()
                if child.consume_token(token):
                    following.append((child, path + [token]))
                if len(following) >= _SEARCH_WIDTH:
                    break
            if len(following) >= _SEARCH_WIDTH:
                break
        if not following:
            return None
        frontier = following
    return None


class ConstraintCompiler:
    """Builds constraints from grammars: holds the llguidance tokenizer it is given and an LRU cache of
    compiled grammars with their shortest completion (a request gets a copy of the cached matcher,
    ~10 µs). Thread-safe; compiling a new grammar takes a few ms (drops the GIL) and may be called off
    the event loop."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, *, cache_size: int = 256, workers: int | None = None):
        self.tokenizer = tokenizer
        self._cache: OrderedDict[tuple[str, tuple[int, ...]], _Entry] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers or max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="ossrun-grammar")
        self.compiled = 0  # cache misses

    def compile(self, grammar: Grammar) -> Constraint:
        """A fresh constraint for one request; GrammarError when the grammar or one of its schemas does
        not compile, or when `max_tokens` cannot hold the shortest complete output."""
        key = (grammar.lark, grammar.path_tokens)
        found = self._cached(key)
        if found is None:
            for what, schema in grammar.schemas:
                self._check(what, schema)
            found = self._compile(key, grammar)
        matcher, entry = found
        shortest = entry.shortest(matcher, grammar) if grammar.max_tokens is not None else None
        if grammar.max_tokens is not None and shortest is not None and shortest > grammar.max_tokens:
            raise GrammarError(f"max_tokens {grammar.max_tokens} cannot hold a valid answer: the shortest one found takes "
                               f"{shortest} tokens")
        return Constraint(matcher, self._pool, grammar, self.tokenizer, shortest)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check(self, what: str, schema: Mapping[str, Any]) -> None:
        """Compile one schema alone, so a failure names the schema's problem, not a line of the wrapper."""
        try:
            # As JSON text, not a dict: llguidance's dict conversion refuses integers beyond 64 bits, which JSON allows
            # (its JSON parser takes them, as the %json rules of the whole grammar already hand them over).
            compiled = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(dict(schema)))
        except ValueError as exc:
            raise GrammarError(f"invalid {what}: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(compiled, self.tokenizer, limits=_LIMITS)
        if error:
            raise GrammarError(f"invalid {what}: {error}")

    def _cached(self, key) -> tuple[llguidance.LLMatcher, _Entry] | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            self._cache.move_to_end(key)
            return entry.matcher.deep_copy(), entry

    def _compile(self, key, grammar: Grammar) -> tuple[llguidance.LLMatcher, _Entry]:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar.lark, log_level=0, limits=_LIMITS)  # drops the GIL while it compiles
        if matcher.is_error():
            raise GrammarError(_reason(matcher))
        entry = _Entry(matcher)
        with self._lock:
            self.compiled += 1
            self._cache[key] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return matcher.deep_copy(), entry


class _Entry:
    """A compiled grammar in the cache, and the length of its shortest complete output once searched
    (only grammars with a budget need it; every request with the same grammar starts from the same state)."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher
        self._searched = False
        self._shortest: int | None = None

    def shortest(self, start: llguidance.LLMatcher, grammar: Grammar) -> int | None:
        if not self._searched:
            path = shortest_completion(start, grammar)
            self._shortest, self._searched = (len(path) if path is not None else None), True
        return self._shortest


def _reason(matcher: llguidance.LLMatcher) -> str:
    """The first line of the matcher's error (the rest is a `<non-verbose/>` placeholder)."""
    return (matcher.get_error() or "rejected").splitlines()[0]
