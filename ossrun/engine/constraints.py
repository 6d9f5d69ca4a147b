"""Structured output on the engine side: a `Grammar` in, token masks out, matched by llguidance.

The grammar comes as data (`engine/grammar.py`) from whoever knows the output format (gpt-oss's
harmony wrapper is written by `ossrun.harmony.grammar`); this module only compiles it, caches the
compiled matchers, and drives one matcher per request: `allowed_tokens()` before each sampled token,
`choose(token, resample)` on the sampled one near the end of max_tokens, `advance(token)` after it.

Budget: a grammar with `max_tokens` must be complete within it. A bounded breadth-first search (`budget_search.py`) over
the real masks (forced tokens, then the grammar's `path_tokens`, digit runs and the tokenizer's single characters;
inside a string, also the ends of a short string each `pattern` matches (`pattern_sample.py`), with the closing quote) finds a way from the
current state to a complete output; at construction a budget that is proven too short (every
allowed token tried: `budget_search._prove_none`) is a GrammarError, and one the search could not settle runs without the guarantee.
During generation the constraint keeps such a way (`_path`), and within CLOSING_WINDOW tokens of the point where it
takes all the tokens left it is `guarding`: the mask stays the grammar's, and the engine hands each token it sampled
to `choose`, which keeps it when a complete answer is still found within the tokens left after it (the path, a
suffix of it, or a short search from there), else samples again without it (the model's next choices, a few), and
then takes the path's next token. So an answer that fits (with the room the search finds) comes out as without the
guard, and one that would not is changed only where it must be, and reported `cut` (its finish reason is then "length"). A token further from the end
that lengthens the path by more than the window can still overshoot. A grammar's `span` (gpt-oss's reasoning) is a
free-text stretch allowed at most `limit` tokens, after which only its closing token is: at the limit the constraint is
`guarding` too, and `choose` keeps the model's own closing token, or refuses any other and takes the closing token,
which makes the limit, not the model, the span's end: reported `cut` as well.

Overlap: after `advance` the next mask is computed on the compiler's thread pool (llguidance drops the
GIL while it works), so it runs during the next forward; `allowed_tokens` only waits for it.
Requests without a constraint never reach this module.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import llguidance
import torch

from ossrun.engine.budget_search import (TOP, Endings, SearchPruned, SearchTimeout, completion_within, matcher_error, nested,
                                         run_tokens, search_candidates, short_tokens, shortest_completion)
from ossrun.engine.grammar import BudgetTooSmall, Grammar, GrammarError
from ossrun.engine.pattern_sample import pattern_sample

log = logging.getLogger(__name__)

# Errors without the parser state and the grammar (ours, and long). An object's optional properties cost the parser
# 4 items each in one row (the library's default, 2000, fails at ~500 of them): 30,000 is room for OpenAI's 5000
# (7499 at most: more is refused when the schema is checked). A mask visits a row for each length the JSON
# whitespace run (at most 24 characters) may still end at, so within a whitespace run in such an object it visits
# many rows: measured, after `{` and 8 to 20 spaces, 5000 properties need more than 300,000 items and 7499 more
# than 650,000 but at most 1,000,000 (that mask took 0.1 to 0.9 s on 2 busy cores). 300,000 failed mid-answer; the
# limit is twice the most measured, and the check computes a mask in such a run (`_INSIDE`), so a schema beyond it is
# refused before generation.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False, max_items_in_row=30_000, step_max_items=2_000_000)
# llguidance builds its lexer's states lazily, as masks need them, and a compiled grammar's copies share them (every
# request of a cached grammar, and the budget searches), up to max_lexer_states (250,000); past it every mask fails
# ("too many states"). A `pattern` whose automaton is exponential (`.{0,1000}a.{100}`: every position an `a` may have
# been at) reaches it within one answer. So each pattern of a schema is probed when checked: random walks of
# _PATTERN_MASKS masks through a string with only that pattern, on a lexer limited to _PATTERN_STATES. Measured (64
# masks): dates, e-mails, UUIDs, URLs, phone numbers 20-60 states; `^.{1,1000}$` 2,200, `^[\s\S]{0,5000}$` 1,600,
# `^(\w+\s?){1,50}$` 700; exponential ones `.{0,50}a.{10}` 8,600, `.{0,100}a.{20}` 33,000, `.{0,1000}a.{100}` 68,000.
_PATTERN_MASKS, _PATTERN_STATES, _PATTERN_SECONDS = 64, 12_000, 2.0
_PATTERN_LIMITS = llguidance.LLParserLimits(verbose_errors=False, max_items_in_row=30_000, step_max_items=2_000_000,
                                            max_lexer_states=_PATTERN_STATES)
# The errors llguidance gives when the shared lexer is full (see above; the regexes' derivatives count too): a fresh
# compile of the grammar starts empty.
_LEXER_FULL = ("too many states", "too many expressions")
# A request renews its matcher's lexer at most this many times (a request that fills a fresh one alone fails).
_LEXER_RENEWALS = 2
# What a schema's value may start with; the first masks inside it are computed when it is checked.
_OPENERS = ('{"', "{", "[", '"')
# Within an object a whitespace run makes the mask visit the most rows (see _LIMITS): checked too.
_INSIDE = " " * 12
# A budget search that ran out of time says nothing of its format (the machine may have been busy a moment): the format's
# later requests skip it (it costs each up to 2 s) for _RETRY_FIRST_S, then one searches again, and each search that
# runs out again doubles the wait, up to _RETRY_MOST_S. A busy moment used to turn the guard off for the format until a
# restart; a format whose search always runs out costs a request its 2 s now and then.
_RETRY_FIRST_S, _RETRY_MOST_S = 10.0, 600.0
_clock = time.monotonic  # the retry waits' clock (a test steps its own)
# 256 entries of 8 bools each, as int64: a bitmask byte → its 8 allowed flags in one lookup.
_BYTE_TO_BOOLS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool().view(torch.int64).view(-1)

__all__ = ["CLOSING_WINDOW", "Constraint", "ConstraintCompiler", "ConstraintViolation", "Grammar", "GrammarError", "SearchPruned",
           "SearchTimeout", "completion_within", "pattern_sample", "shortest_completion"]


class ConstraintViolation(RuntimeError):
    """The engine fed a token the grammar forbids (it samples under the mask, so this is a bug)."""


class Constraint:
    """One request's grammar state, driven by the engine thread: `allowed_tokens()` before each
    sampled token, `choose(token, resample)` while `guarding`, `advance(token)` after it. The next mask is
    computed on the compiler's pool in between, so it overlaps the next forward."""

    def __init__(self, matcher: llguidance.LLMatcher, pool: ThreadPoolExecutor, grammar: Grammar,
                 tokenizer: llguidance.LLTokenizer, shortest: int | None, candidates: torch.Tensor,
                 runs: frozenset[int] = frozenset(), path: list[int] | None = None,
                 renew: Callable[[], llguidance.LLMatcher] | None = None, endings: Endings = ()):
        """`path`: a way to a complete output from the matcher's state within the budget, when known (the compiler's
        search from the start state, so that the first mask need not search again). `renew`: a matcher at the same
        start state with a lexer of its own (see `_renew_lexer`)."""
        self._matcher = matcher
        self._renew, self._renewals = renew, 0
        self._taken: list[int] = []  # the tokens the matcher consumed since the start state
        self._pool = pool
        self._grammar = grammar
        self._tokenizer = tokenizer
        self._vocab = tokenizer.vocab_size
        self._words = (self._vocab + 31) // 32  # llguidance's bitmask: bit t % 32 of word t // 32 allows token t
        # The whole completion's budget: near its end, no token is taken after which no complete output fits.
        self._left = grammar.max_tokens
        self._shortest = shortest
        self._candidates, self._runs, self._endings = candidates, runs, endings  # what the shortest-completion search tries
        self._nesting = TOP  # how deep in JSON the output is, for the search (see `nested`)
        self._path: list[int] | None = path  # a way to a complete output from the current state, when known
        self._since_search = 0
        # A search that found nothing costs up to budget_search._SEARCH_SECONDS and would find nothing again next token: the next
        # one waits _quiet tokens (CLOSING_WINDOW, doubled after each failure), and after _FAILED_SEARCHES (the
        # compiler's, which found none, counts) or a proof that none fits, the request searches no more.
        self._failures = int(grammar.max_tokens is not None and path is None)
        self._quiet = CLOSING_WINDOW if self._failures else 0
        self.searching = False  # the next mask's computation searches a path (for the scheduler: it may take seconds)
        self._offered: torch.Tensor | None = None  # the last mask `allowed_tokens` gave
        self._chosen: tuple[int, list[int]] | None = None  # the token `choose` kept, and the path after it
        # The guard refused a token the model sampled (or the span's limit ended it): max_tokens, not the model, shaped
        # the answer.
        self.cut = False
        self._bits = torch.zeros(self._words, dtype=torch.int32)
        self._finished = False
        self._error: str | None = None
        self._header: bytearray | None = None  # bytes of the header being read (after the span's opener)
        self._in_span = False
        self.span_tokens = 0
        self._pending: Future[torch.Tensor] = pool.submit(self._compute, self._search_due())

    @property
    def ready(self) -> bool:
        """The next mask is computed (with its budget search): `allowed_tokens` will not wait."""
        return self._pending.done()

    @property
    def is_finished(self) -> bool:
        """The grammar is complete (after one of its final tokens): the request should stop."""
        return self._finished

    def allowed_tokens(self) -> torch.Tensor:
        """bool [vocab] of the tokens allowed next; raises ConstraintViolation once the grammar has failed."""
        if self._error is not None:
            raise ConstraintViolation(self._error)
        mask = self._pending.result()
        if mask.dtype != torch.bool:  # the forbidden ids (see `mask`)
            forbidden, mask = mask, torch.ones(self._vocab, dtype=torch.bool)
            mask[forbidden] = False
        self._offered = mask
        return mask

    def mask(self) -> torch.Tensor:
        """What the sampler applies: `allowed_tokens()`, or the ids (int64) of the forbidden tokens when they are few
        (free text: the special tokens and some bytes; `_FEW_WORDS`) and the budget guard does not need the whole mask.
        The sampler fills those few ids, where a bool mask costs it passes over the vocabulary."""
        if self._error is not None:
            raise ConstraintViolation(self._error)
        found = self._pending.result()
        return self.allowed_tokens() if found.dtype == torch.bool else found

    def _span_closing(self) -> bool:
        """The span has used its `limit` and its closing token is allowed: that token must come next (`choose` takes
        it). While the closing token is not allowed yet (a character split across tokens), the text goes on a token."""
        span = self._grammar.span
        if span is None or not self._in_span or self.span_tokens < span.limit or self._pending.exception() is not None:
            return False
        found = self._pending.result()
        return bool(found[span.close]) if found.dtype == torch.bool else not bool((found == span.close).any())

    @property
    def guarding(self) -> bool:
        """Within CLOSING_WINDOW tokens of the end of max_tokens (beyond the known path's length), or at the span's
        limit: the token sampled under `allowed_tokens()` must go through `choose`, which may refuse it."""
        wait([self._pending])  # the path is searched with the mask
        return self._span_closing() or (self._left is not None and self._path is not None and not self._finished
                                         and self._left - len(self._path) <= CLOSING_WINDOW)

    def choose(self, token: int, resample: Callable[[torch.Tensor], int]) -> int:
        """The token to take, given the one sampled under `allowed_tokens()`; call it while `guarding`.

        A token after which a complete answer is found within the tokens left (`_path_after`) is kept, so an
        answer that fits comes out as without the guard. Else it is refused (`cut` becomes True) and the row
        is sampled again without the tokens refused so far (`resample(mask)` → the new token): the model's
        next choice is checked, up to _CHECKED_CHOICES of them; then the known path's next token is taken.
        At the span's limit, see `_close_span`."""
        if not self.guarding:
            return token
        if self._span_closing():
            return self._close_span(token, resample)
        mask, deadline = None, time.monotonic() + _CHECK_SECONDS
        for checked in range(1, _CHECKED_CHOICES + 1):
            after = self._path_after(token, deadline, wide=checked == 1)
            if after is not None:
                self._chosen = (token, after)
                return token
            self.cut = True
            mask = self._offered.clone() if mask is None else mask
            mask[token] = False
            if checked == _CHECKED_CHOICES or not bool(mask.view(torch.uint8).max()):
                break
            token = resample(mask)
        token = resample(self._only(self._path[0]))
        self._chosen = (token, self._path[1:])
        return token

    def _close_span(self, token: int, resample: Callable[[torch.Tensor], int]) -> int:
        """At the span's limit: the model's own closing token is kept (it ended the span itself, nothing changes);
        any other is refused and the closing token taken (`resample`, for its logprobs), so the limit ended the span
        where the model would have gone on: `cut`, as for a token the budget guard refused (finish reason "length")."""
        close = self._grammar.span.close
        if token == close:
            return token
        self.cut = True
        return resample(self._only(close))

    def advance(self, token_id: int) -> None:
        """Move the grammar past the sampled token and start computing the next mask."""
        wait([self._pending])  # the matcher is not shared: let the running computation end first
        if self._error is not None:
            raise ConstraintViolation(self._error)
        if self._span_closing() and token_id != self._grammar.span.close:  # a caller that skipped `choose`
            self._error = f"token {token_id} ({self._describe(token_id)}) is past the span's limit ({self._grammar.span.limit})"
            raise ConstraintViolation(self._error)
        if not self._matcher.consume_token(token_id) and not (self._renew_lexer() and self._matcher.consume_token(token_id)):
            self._error = f"token {token_id} ({self._describe(token_id)}) is not allowed here: {matcher_error(self._matcher)}"
            raise ConstraintViolation(self._error)
        self._taken.append(token_id)
        self._track_span(token_id)
        if self._left is not None:
            self._left -= 1
            self._quiet = max(0, self._quiet - 1)
            self._nesting = nested(self._nesting, [token_id], self._tokenizer)
            self._follow_path(token_id)
        self._finished = token_id in self._grammar.final_tokens and self._matcher.is_stopped()
        self._pending = self._pool.submit(self._compute, self._search_due())

    def _compute(self, search: bool) -> torch.Tensor:
        try:
            self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._words * 4)
            if self._matcher.is_error() and self._renew_lexer():
                self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._words * 4)
            if self._matcher.is_error():
                raise ConstraintViolation(matcher_error(self._matcher))
            if search:
                self._find_path()
            forbidden = self._forbidden(self._bits) if self._left is None else None  # the budget guard reads whole masks
            return self._unpack(self._bits) if forbidden is None else forbidden
        finally:
            self.searching = False

    def _renew_lexer(self) -> bool:
        """Whether the matcher failed because its lexer is full and was replaced by one with a fresh lexer, at the
        same point: the lexer's states are shared by every copy of the compiled grammar (all its requests, their budget
        searches) and add up over the grammar's life to llguidance's limit (`_LEXER_FULL`), which one request alone
        rarely reaches. The new matcher replays the tokens taken; the compiler's cache keeps it for later requests.
        At most _LEXER_RENEWALS times a request: one that fills a fresh lexer on its own fails."""
        if self._renew is None or self._renewals >= _LEXER_RENEWALS or not _lexer_full(self._matcher):
            return False
        self._renewals += 1
        matcher = self._renew()
        if self._taken and not matcher.consume_tokens(self._taken):
            return False
        log.warning("structured output: the format's lexer was full (%s); renewed after %d tokens",
                    matcher_error(self._matcher), len(self._taken))
        self._matcher = matcher
        return True

    def _search_due(self) -> bool:
        """Whether the next mask's computation searches a way to a complete output (see `_find_path`). Decided
        here, on the engine's thread before its next step, so that the scheduler knows (`searching`)."""
        if self._left is None or self._finished or self._path is not None or self._quiet or self._failures >= _FAILED_SEARCHES:
            return False
        near = self._left <= (self._shortest or 0) + 4 * CLOSING_WINDOW
        if not near and self._since_search < CLOSING_WINDOW:
            return False
        self.searching = True
        return True

    def _find_path(self) -> None:
        """Know a way to a complete output that fits in the tokens left, for `choose` to keep (see `guarding`).

        The path is kept while the sampled tokens leave it valid (checked after each, cheap; `choose` hands over
        the one it found), and searched again when one did not (an opener such as `{"` in a recursive schema),
        each step once within 4 × CLOSING_WINDOW of the end, else every CLOSING_WINDOW tokens at most; after a
        search that found none, only after a pause (`_quiet`), a few times (`_FAILED_SEARCHES`)."""
        self._since_search = 0
        proven, why = False, ""
        try:
            path = shortest_completion(self._matcher, self._grammar, self._candidates, self._tokenizer, limit=self._left,
                                       runs=self._runs, nesting=self._nesting, endings=self._endings)
            proven = path is None
        except (GrammarError, SearchTimeout) as exc:  # GrammarError on the search's copies: the request's matcher reports its own
            path, why = None, str(exc)
        if path:
            self._path, self._shortest, self._failures = path, len(path), 0
            return
        self._failures = _FAILED_SEARCHES if proven else self._failures + 1  # a proof holds for every state after this one
        self._quiet = CLOSING_WINDOW << (self._failures - 1)
        if proven:
            log.warning("structured output: no complete answer fits in the %d tokens left (every token the grammar allows "
                        "was tried): the answer ends cut at max_tokens", self._left)
        else:
            again = (f"the next search in {self._quiet} tokens" if self._failures < _FAILED_SEARCHES
                     else "this request searches no more")
            log.warning("structured output: no complete answer found within the search limits in the %d tokens left (%s); "
                        "%s", self._left, why, again)

    def _path_after(self, token: int, deadline: float, wide: bool) -> list[int] | None:
        """A way to a complete output after `token` that fits in the tokens left after it, or None when none is
        found. Cheapest first: the known path (token is its first, or spells some of its first ones: `":` for
        `"` `:`, or leaves it valid: more text in a string), then, unless the path takes all the tokens left, a
        search from the state after the token (`completion_within`; `wide`: also its wide beam, for the model's
        own choice)."""
        if token in self._grammar.final_tokens:  # allowed, so the output is complete
            return []
        room, path = self._left - 1, self._path
        if token == path[0] and len(path) - 1 <= room:
            return path[1:]
        for k in range(len(path) - 1, max(0, len(path) - room) - 1, -1):  # token, then a suffix of the path: shortest first
            if self._matcher.validate_tokens([token, *path[k:]]) == len(path) - k + 1:
                return path[k:]
        if len(path) > room:  # the path takes every token left: a search would have to beat it (rare; each step costs)
            return None
        state = self._matcher.deep_copy()
        if not state.consume_token(token):
            return None
        return completion_within(state, self._grammar, self._candidates, self._tokenizer, room, deadline, wide,
                                 nested(self._nesting, [token], self._tokenizer), self._endings)

    def _follow_path(self, token: int) -> None:
        """After a sampled token: the known path goes on if still valid, else it is searched again."""
        self._since_search += 1
        chosen, self._chosen = self._chosen, None
        if chosen is not None and chosen[0] == token:
            self._path = chosen[1]
        elif self._path is None:
            return
        elif token == self._path[0]:
            self._path = self._path[1:]
        elif self._matcher.validate_tokens(self._path) != len(self._path):
            self._path = None
        if self._path is not None:
            self._shortest = len(self._path)

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

    def _forbidden(self, bits: torch.Tensor) -> torch.Tensor | None:
        """The ids of the tokens `bits` forbids when they lie in at most _FEW_WORDS of its words (~80 µs), else None."""
        words = (bits != -1).nonzero().flatten()
        if len(words) > _FEW_WORDS:
            return None
        allowed = torch.index_select(_BYTE_TO_BOOLS, 0, bits[words].view(torch.uint8).int()).view(torch.bool).view(-1, 32)
        ids = (words[:, None] * 32 + torch.arange(32))[~allowed]
        return ids[ids < self._vocab]

    def _unpack(self, bits: torch.Tensor) -> torch.Tensor:
        """llguidance's int32 bitmask [ceil(V/32)] → bool [V] of allowed tokens (~40 µs)."""
        return torch.index_select(_BYTE_TO_BOOLS, 0, bits.view(torch.uint8).int()).view(torch.bool)[:self._vocab]

    def _describe(self, token: int) -> str:
        if not 0 <= token < self._vocab:
            return "outside the vocabulary"
        return repr(self._tokenizer.decode_bytes([token]).decode("utf-8", errors="replace"))


# A mask whose forbidden tokens lie in at most this many of its 32-token words goes to the sampler as their ids
# (`Constraint.mask`): free text forbids ~1,400 tokens in ~280 words (o200k_harmony's special tokens, ids 199998 and
# up, and the byte tokens no UTF-8 text continues with there).
_FEW_WORDS = 512
# Within this many tokens of the end of max_tokens (beyond the known path's length), each sampled token is checked:
# one after which no complete answer fits in the tokens left (an opener, whitespace at the very end) is refused.
CLOSING_WINDOW = 32
# A step checks at most this many of the model's choices (the sampled token, then what it samples without the refused
# ones: greedy, its next best), then takes the known path's token. Only the first choice gets the wide search (of at
# most budget_search._CHECK_STATES states; its alternatives, once that is refused, only the narrow one), and a step's
# searches stop after _CHECK_SECONDS (masks that take 0.5 s: 5000 properties). What they miss is refused, never let
# through.
_CHECKED_CHOICES, _CHECK_SECONDS = 4, 0.1
# A request's searches that find nothing (see Constraint._find_path): at most this many, the compiler's included.
_FAILED_SEARCHES = 3
# A pattern's sample longer than this gives the search no endings (each is checked at every state inside a string).
_SAMPLE_CHARS = 256


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
        self._short = short_tokens(tokenizer)
        self._runs = run_tokens(self._short[0], tokenizer)

    def compile(self, grammar: Grammar) -> Constraint:
        """A fresh constraint for one request; GrammarError when the grammar or one of its schemas does
        not compile (or fails at the first state generation would reach), or when no complete output
        is found within `max_tokens`."""
        key = (grammar.lark, grammar.path_tokens)
        found = self._cached(key)
        if found is None:
            for what, schema in grammar.schemas:
                try:
                    self._check(what, schema)
                except GrammarError as exc:  # the label travels with it, for the API to name the field
                    raise GrammarError(str(exc), schema=what) from None
            found = self._compile(key, grammar)
        matcher, entry = found
        path = None
        if grammar.max_tokens is not None:
            try:
                path = entry.shortest(matcher, grammar, self.tokenizer, self._runs)
            except SearchTimeout as exc:  # unknown, not absent: run without the guarantee rather than refuse
                log.warning("structured output: %s; this request's answer may not complete within max_tokens", exc)
                return Constraint(matcher, self._pool, grammar, self.tokenizer, None, entry.candidates, self._runs,
                                  renew=self._renewer(key, grammar), endings=entry.endings)
            if path is None:  # proven: every token the masks allow was tried
                raise BudgetTooSmall(grammar.max_tokens)
        return Constraint(matcher, self._pool, grammar, self.tokenizer, None if path is None else len(path), entry.candidates,
                          self._runs, path, renew=self._renewer(key, grammar), endings=entry.endings)

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
        deadline = time.monotonic() + _PATTERN_SECONDS  # before the first masks, which a pattern's lexer may fail
        for pattern in sorted(set(_patterns(schema))):
            self._probe_pattern(what, pattern, deadline)
        # Generation computes masks, and a parser limit shows only there: compute the first ones now.
        start = llguidance.LLMatcher(self.tokenizer, compiled, log_level=0, limits=_LIMITS)
        first = self._first_mask(what, start)
        for opener in _OPENERS:
            tokens = self.tokenizer.tokenize_str(opener)
            if len(tokens) == 1 and bool(first[tokens[0]]):
                state = start.deep_copy()
                if not state.consume_tokens(tokens):
                    raise GrammarError(f"invalid {what}: {matcher_error(state)}")
                self._first_mask(what, state)
                if opener == "{" and state.consume_tokens(self.tokenizer.tokenize_str(_INSIDE)):
                    self._first_mask(what, state)

    def _probe_pattern(self, what: str, pattern: str, deadline: float) -> None:
        """GrammarError when the pattern's lexer grows past _PATTERN_STATES within _PATTERN_MASKS masks of random
        strings (see _PATTERN_LIMITS): generation would fill llguidance's lexer and fail mid-answer. Seeded, so a
        schema is judged the same each time; a probe past `deadline` (all of a schema's patterns) stops early. A
        pattern that fails otherwise is left to the schema's own compile, which refused it already if generation uses
        it (a lenient schema ignores some places a pattern may sit, such as `not`)."""
        try:
            compiled = llguidance.LLMatcher.grammar_from_json_schema(json.dumps({"type": "string", "pattern": pattern}))
        except ValueError:
            return
        start = llguidance.LLMatcher(self.tokenizer, compiled, log_level=0, limits=_PATTERN_LIMITS)
        if start.is_error():
            return
        rng, state = random.Random(0), start.deep_copy()
        for _ in range(_PATTERN_MASKS):
            if time.monotonic() > deadline:
                return
            bits = torch.zeros((self.tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
            state.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
            if state.is_error():  # it only took allowed tokens: a limit, the lexer's when it grew too fast
                raise GrammarError(f"invalid {what}: pattern {pattern!r} is too complex for the grammar engine "
                                   f"({matcher_error(state)} within {_PATTERN_MASKS} tokens of sample text; a bounded repeat "
                                   "beside what must follow it, such as `.{0,1000}a.{100}`, makes its automaton track "
                                   "every position): use a simpler pattern or maxLength")
            allowed = torch.index_select(_BYTE_TO_BOOLS, 0, bits.view(torch.uint8).int()).view(torch.bool)
            choices = allowed[:self.tokenizer.vocab_size].nonzero().flatten()
            if state.is_stopped() or not len(choices) or not state.consume_token(int(choices[rng.randrange(len(choices))])):
                state = start.deep_copy()  # the string ended: another one (the lexer's states stay, as they add up)

    def _first_mask(self, what: str, state: llguidance.LLMatcher) -> torch.Tensor:
        bits = torch.zeros((self.tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
        state.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        if state.is_error():
            raise GrammarError(f"invalid {what}: {matcher_error(state)}")
        return torch.index_select(_BYTE_TO_BOOLS, 0, bits.view(torch.uint8).int()).view(torch.bool)

    def _renewer(self, key, grammar: Grammar) -> Callable[[], llguidance.LLMatcher]:
        """For a constraint whose lexer is full (`Constraint._renew_lexer`): the grammar compiled again, which starts
        with an empty lexer, made the cached start state for the requests that follow."""
        def renew() -> llguidance.LLMatcher:
            matcher = llguidance.LLMatcher(self.tokenizer, grammar.lark, log_level=0, limits=_LIMITS)
            with self._lock:
                entry = self._cache.get(key)
                if entry is not None:
                    entry.matcher = matcher
            return matcher.deep_copy()
        return renew

    def _endings(self, grammar: Grammar) -> Endings:
        """The ends of each of the grammar's pattern samples (`pattern_sample`) as JSON string text with the closing
        quote, as the tokenizer spells them, fewest tokens first (the search tries them in that order)."""
        samples = {pattern_sample(p) for _, schema in grammar.schemas for p in _patterns(schema)} - {None}
        ends = {json.dumps(sample[i:])[1:] for sample in samples if len(sample) <= _SAMPLE_CHARS for i in range(len(sample))}
        return tuple(sorted({tuple(self.tokenizer.tokenize_str(end)) for end in ends}, key=len))

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
            raise GrammarError(matcher_error(matcher))
        entry = _Entry(matcher, search_candidates(grammar, *self._short), self._endings(grammar))
        with self._lock:
            self.compiled += 1
            self._cache[key] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return matcher.deep_copy(), entry


class _Entry:
    """A compiled grammar in the cache, what its shortest-completion search tries, and the length of
    its shortest complete output once searched (only grammars with a budget need it; every request
    with the same grammar starts from the same state, so a found length holds for any larger budget,
    and a proof that there is none within a budget holds for a smaller one)."""

    def __init__(self, matcher: llguidance.LLMatcher, candidates: torch.Tensor, endings: Endings = ()):
        self.matcher = matcher
        self.candidates, self.endings = candidates, endings
        self._lock = threading.Lock()
        self._shortest: list[int] | None = None  # the shortest complete output found, within the budget it was searched for
        self._none_within = 0  # proven: no complete output of at most this many tokens
        self._unknown_within = 0  # the beam found none within this many, and the proof did not end
        self._retry_at = 0.0  # a search ran out of time: until then (_clock) requests skip it, unguaranteed
        self._retry_wait = 0.0  # the wait the last search out of time set (the next one doubles it)

    def shortest(self, start: llguidance.LLMatcher, grammar: Grammar, tokenizer: llguidance.LLTokenizer,
                 runs: frozenset[int]) -> list[int] | None:
        """A complete output (tokens from the start state) of at most `grammar.max_tokens` tokens, the shortest found,
        or None when it is proven there is none; SearchTimeout (or SearchPruned) when that is not known."""
        with self._lock:
            budget = grammar.max_tokens
            if self._shortest is not None and len(self._shortest) <= budget:
                return list(self._shortest)
            if budget <= self._none_within:
                return None
            if budget <= self._unknown_within:
                raise SearchPruned(f"an earlier search found no complete answer of at most {self._unknown_within} tokens "
                                   f"and could not try them all")
            if _clock() < self._retry_at:
                raise SearchTimeout(f"an earlier search for this format ran out of time (searched again within "
                                    f"{self._retry_wait:g} s of it)")
            try:
                path = shortest_completion(start, grammar, self.candidates, tokenizer, runs=runs, endings=self.endings)
            except SearchPruned:
                self._unknown_within = budget
                raise
            except SearchTimeout:
                self._retry_wait = min(2 * self._retry_wait or _RETRY_FIRST_S, _RETRY_MOST_S)
                self._retry_at = _clock() + self._retry_wait
                raise
            self._retry_wait = 0.0  # in time: a later run out of time is a new busy moment
            if path is None:
                self._none_within = budget
                return None
            if self._shortest is None or len(path) < len(self._shortest):
                self._shortest = path
            return list(self._shortest)


def _patterns(schema: Any) -> Iterator[str]:
    """Every `pattern` string in a JSON Schema, at any depth (a property named "pattern" holds a schema, not a string)."""
    if isinstance(schema, Mapping):
        for key, value in schema.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from _patterns(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _patterns(item)


def _lexer_full(matcher: llguidance.LLMatcher) -> bool:
    """The matcher failed on its lexer's size limits (see _LEXER_FULL)."""
    error = matcher.get_error() or ""
    return any(full in error for full in _LEXER_FULL)
