"""Structured output: one grammar per request over the whole harmony completion, matched by llguidance.

The grammar covers everything the model writes after the prompt's `<|start|>assistant`, not only
the answer, because gpt-oss reasons first and the reasoning must stay free:

    start:     reasoning? answer
    reasoning: <|channel|> "analysis" <|message|> TEXT <|end|> <|start|> "assistant"
    answer:    <|channel|> "final" <|message|> JSON <|return|>                     (response_format)
             | <|channel|> "commentary to=functions.NAME " <|constrain|> "json" <|message|> ARGS <|call|>

TEXT is any text without special tokens (a special token is never text to llguidance, so the model
cannot open a message or spell `<|call|>` inside its reasoning), JSON and ARGS are llguidance's
compilation of the request's JSON Schemas (inline `%json`). The tool call header is the one gpt-oss
itself writes (recipient after the channel, as in OpenAI's harmony guide), so forcing it keeps the
model in distribution; `ossrun.harmony.StreamParser` reads it back as a tool call.

Reasoning budget: reasoning is gpt-oss's strength, so it is allowed by default, but it must not eat
the answer (the hosted service returns an empty answer when it does). A constraint built with
`reasoning_budget=n` lets the analysis message run for at most n tokens, then allows only `<|end|>`,
after which the grammar forces the answer's header; `default_reasoning_budget(max_tokens)` keeps a
share of max_tokens for the answer. Budget 0 forbids the analysis message altogether.

Why llguidance and not xgrammar (bench/constraints.py measures both on o200k_harmony): grammar
compilation ~10x faster (per-request schemas are compiled on the request path), special tokens are
first class (xgrammar's raw-vocabulary tokenizer sees `<|start|>` as text), Lark with inline JSON
Schema expresses the harmony wrapper in one grammar, clear error messages for bad schemas, and no
dependencies (xgrammar pulls triton and a TVM runtime). xgrammar's masks are faster per token
(~10 µs vs ~50 µs), which does not matter here: the mask is computed while the model runs.

Overlap: after `advance` the next mask is computed on the compiler's thread pool (llguidance drops the
GIL while it works), so it runs during the next forward; `allowed_tokens` only waits for it.
Requests without a constraint never reach this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Literal

import llguidance
import torch
from tiktoken.load import load_tiktoken_bpe

from ossrun.harmony.tokenizer import CALL, CHANNEL, END, ENDOFTEXT, MESSAGE, RETURN, VOCAB_FILE, VOCAB_SHA256, VOCAB_SIZE
from ossrun.harmony.tokenizer import ensure_vocab_file, get_encoding, token_bytes

log = logging.getLogger(__name__)

ToolMode = Literal["auto", "required", "none"]

# o200k's pre-tokenisation pattern, as tiktoken_ext.openai_public defines it. llguidance uses it only
# to tokenise text it forces, never to compute masks; tiktoken offers no way to get it without a download.
_O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# JSON whitespace: allowed (models write `{"a": 1}` and pretty-print), but at most 24 characters at
# each place, so a model cannot pad its answer with whitespace until max_tokens.
_JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,24}"}
# A name the harmony header parser reads back whole (its recipient pattern, without `/`).
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Library defaults, but errors without the parser state and the grammar (ours, and long).
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)

_WORDS = (VOCAB_SIZE + 31) // 32  # llguidance's bitmask: bit t % 32 of word t // 32 allows token t
# 256 entries of 8 bools each, as int64: a bitmask byte → its 8 allowed flags in one lookup.
_BYTE_TO_BOOLS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool().view(torch.int64).view(-1)


class GrammarError(ValueError):
    """A schema or tool definition that cannot be compiled; the message is llguidance's reason (→ 400/5006)."""


class ConstraintViolation(RuntimeError):
    """The engine fed a token the grammar forbids (it samples under the mask, so this is a bug)."""


def default_reasoning_budget(max_tokens: int) -> int:
    """Tokens the analysis message may use so the constrained answer still fits in max_tokens.

    The answer keeps a quarter of the budget, and for small budgets half of it up to 256 tokens:
    256 → 128 for reasoning, 1000 → 744, 4096 → 3072. JSON longer than that needs a larger max_tokens.
    """
    reserve = max(max_tokens // 4, min(max_tokens // 2, 256))
    return max(0, max_tokens - reserve)


def build_tokenizer() -> llguidance.LLTokenizer:
    """llguidance's view of o200k_harmony (~1 s): the verified offline vocabulary plus every special token.

    Ids at or above the model's vocabulary (`<|reserved_201088|>`) are left out. The "EOS" llguidance
    allows once the grammar is complete is `<|endoftext|>`: the grammar ends with `<|return|>` or
    `<|call|>` itself, and the engine stops there.
    """
    ranks = load_tiktoken_bpe(str(ensure_vocab_file() / VOCAB_FILE), expected_hash=VOCAB_SHA256)
    encoding = get_encoding()
    special = {}
    for name in encoding.special_tokens_set:
        token = encoding.encode(name, allowed_special="all")[0]
        if token < VOCAB_SIZE:
            special[name] = token
    return llguidance.LLTokenizer.from_tiktoken(
        encoder=ranks, special_tokens=special, pattern=_O200K_PATTERN, eos_token=ENDOFTEXT, n_vocab=VOCAB_SIZE
    )


class Constraint:
    """One request's grammar state, driven by the engine thread: `allowed_tokens()` before each
    sampled token, `advance(token)` after it. The next mask is computed on the compiler's pool in
    between, so it overlaps the next forward."""

    def __init__(self, matcher: llguidance.LLMatcher, pool: ThreadPoolExecutor, reasoning_budget: int | None,
                 max_tokens: int | None = None, hints: tuple[int, ...] = (), must_fit: bool = True):
        self._matcher = matcher
        self._pool = pool
        self._budget = reasoning_budget
        # The whole completion's budget: near its end the shortest way to a complete answer is forced.
        self._left = max_tokens if must_fit else None  # free text (auto tools) may simply be cut off
        self._hints = hints
        self._closing: list[int] | None = None
        self._shortest: int | None = None
        if self._left is not None:
            path = shortest_completion(matcher, hints)
            self._shortest = len(path) if path is not None else None
            if self._shortest is not None and self._shortest > max_tokens:
                raise GrammarError(f"max_tokens {max_tokens} cannot hold a valid answer: the shortest one found takes "
                                   f"{self._shortest} tokens")
        self._bits = torch.zeros(_WORDS, dtype=torch.int32)
        self._finished = False
        self._error: str | None = None
        self._header: bytearray | None = None  # bytes of the header being read (after <|channel|>)
        self._in_reasoning = False
        self.reasoning_tokens = 0
        self._pending: Future[torch.Tensor] = pool.submit(self._compute)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete (after `<|return|>` or `<|call|>`): the request should stop."""
        return self._finished

    def allowed_tokens(self) -> torch.Tensor:
        """bool [VOCAB_SIZE] of the tokens allowed next; raises ConstraintViolation once the grammar has failed."""
        if self._error is not None:
            raise ConstraintViolation(self._error)
        mask = self._pending.result()
        if self._closing:
            return _only(self._closing[0])
        if self._budget is not None and self._in_reasoning and self.reasoning_tokens >= self._budget and bool(mask[END]):
            # Reasoning budget spent: close the analysis message now. (If <|end|> is not allowed
            # yet — a character split across tokens — the text continues one more token.)
            return _only(END)
        return mask

    def advance(self, token_id: int) -> None:
        """Move the grammar past the sampled token and start computing the next mask."""
        wait([self._pending])  # the matcher is not shared: let the running computation end first
        if self._error is not None:
            raise ConstraintViolation(self._error)
        if not self._matcher.consume_token(token_id):
            self._error = f"token {token_id} ({_describe(token_id)}) is not allowed here: {_reason(self._matcher)}"
            raise ConstraintViolation(self._error)
        self._track_reasoning(token_id)
        if self._closing:
            self._closing.pop(0)
        if self._left is not None:
            self._left -= 1
        self._finished = token_id in (RETURN, CALL) and self._matcher.is_stopped()
        self._pending = self._pool.submit(self._compute)

    def _compute(self) -> torch.Tensor:
        if self._closing:
            return _only(self._closing[0])
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), _WORDS * 4)
        if self._matcher.is_error():
            raise ConstraintViolation(_reason(self._matcher))
        self._watch_budget()
        return _unpack(self._bits)

    def _watch_budget(self) -> None:
        """Near the end of max_tokens, follow the shortest path to a complete answer (a token may lengthen
        that path by a few tokens, hence the slack; the path is searched again every step once close)."""
        if self._left is None or self._shortest is None or self._left > self._shortest + 3 * CLOSING_SLACK:
            return
        path = shortest_completion(self._matcher, self._hints)
        if path is None:
            return
        self._shortest = len(path)
        if len(path) + CLOSING_SLACK >= self._left:
            self._closing = path

    def _track_reasoning(self, token: int) -> None:
        """Follow the message headers to know when the model is inside its analysis text."""
        if token == CHANNEL:
            self._header = bytearray()
        elif token == MESSAGE:
            self._in_reasoning = self._header is not None and bytes(self._header).strip() == b"analysis"
            self._header = None
        elif token == END:
            self._in_reasoning = False
        elif self._header is not None:
            self._header += token_bytes(token)
        elif self._in_reasoning:
            self.reasoning_tokens += 1


# How many tokens one freely sampled token may add to the shortest completion before the search notices.
CLOSING_SLACK = 6
_SEARCH_WIDTH, _SEARCH_DEPTH = 8, 96
_CLOSERS = ('"', "}", "]", '""', "{}", "[]", '"}', '"]', "}}", "]}", "0", "1", "null", "true", "false", "{", "[", '{"', ",", ":",
            " ", "-")  # complete values before openers: the search keeps the first children it finds


def _closer_tokens() -> tuple[int, ...]:
    from ossrun.harmony.tokenizer import encode

    return (RETURN, CALL, END) + tuple(ids[0] for ids in (encode(t) for t in _CLOSERS) if len(ids) == 1)


_PREFERRED: tuple[int, ...] | None = None


def schema_hints(*schemas: Mapping[str, Any] | None) -> tuple[int, ...]:
    """Tokens of the property names and enum/const values of schemas: what a completion may need to spell."""
    from ossrun.harmony.tokenizer import encode

    texts: list[str] = ["final", "commentary", "analysis"]
    stack = [s for s in schemas if isinstance(s, Mapping)]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if isinstance(node.get("properties"), Mapping):
                texts += [json.dumps(k) for k in node["properties"]]
            values = node.get("enum") if isinstance(node.get("enum"), list) else []
            texts += [json.dumps(v) for v in [*values, *([node["const"]] if "const" in node else [])]]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return tuple(dict.fromkeys(t for text in texts[:256] for t in encode(text)))


def shortest_completion(matcher: llguidance.LLMatcher, hints: tuple[int, ...] = ()) -> list[int] | None:
    """A short token path from the matcher's state to a complete answer (ending in `<|return|>`/`<|call|>`),
    or None when the search finds none. Breadth first over forced tokens, closers and the schema's names."""
    global _PREFERRED
    if _PREFERRED is None:
        _PREFERRED = _closer_tokens()
    candidates = _PREFERRED + hints
    frontier: list[tuple[llguidance.LLMatcher, list[int]]] = [(matcher.deep_copy(), [])]
    for _ in range(_SEARCH_DEPTH):
        following = []
        for state, path in frontier:
            forced = state.compute_ff_tokens()
            options = forced[:1] or [t for t in candidates if state.validate_tokens([t]) == 1]
            for token in options:
                if token in (RETURN, CALL):
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
    """Builds constraints: holds llguidance's tokenizer for o200k_harmony (built once per process, ~1 s)
    and an LRU cache of compiled grammars (a request gets a copy of the cached matcher, ~10 µs).
    Thread-safe; compiling a new grammar takes a few ms (drops the GIL) and may be called off the
    event loop."""

    def __init__(self, *, tokenizer: llguidance.LLTokenizer | None = None, cache_size: int = 256, workers: int | None = None):
        self.tokenizer = tokenizer or build_tokenizer()
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers or max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="ossrun-grammar")
        self.compiled = 0  # cache misses

    # -- the three entry points the API uses ---------------------------------------------------
    def json_final(self, schema: Mapping[str, Any] | None, *, reasoning_budget: int | None = None,
                   max_tokens: int | None = None) -> Constraint:
        """`response_format`: free reasoning, then a final message that is JSON valid against
        `schema` (None: any JSON object, for `json_object`), then `<|return|>`; complete within
        `max_tokens` when given (GrammarError if it cannot be)."""
        return self._constraint([_final(schema, structured=True)], reasoning_budget, max_tokens)

    def tool_call(self, name: str, parameters: Mapping[str, Any] | None, *, reasoning_budget: int | None = None,
                  max_tokens: int | None = None) -> Constraint:
        """A named `tool_choice`: free reasoning, then exactly this call with arguments valid against
        `parameters` (None: any JSON object), then `<|call|>`."""
        return self._constraint([_call(name, parameters, 0)], reasoning_budget, max_tokens)

    def arguments(self, name: str, parameters: Mapping[str, Any] | None, *, max_tokens: int | None = None) -> Constraint:
        """The arguments of a call whose header the prompt already holds (a forced `tool_choice` is
        prefilled, so it costs no generation budget): JSON valid against `parameters`, then `<|call|>`."""
        _call(name, parameters, 0)  # the same name check as a generated call
        what = f"parameters of tool {name!r}"
        self._check(what, parameters)
        grammar = f"start: args_0 <|call|>\nargs_0: %json {json.dumps(_with_options(parameters))}"
        matcher = self._cached(grammar) or self._compile(grammar)
        return Constraint(matcher, self._pool, None, max_tokens, schema_hints(parameters))

    def tools(
        self,
        tools: Mapping[str, Mapping[str, Any] | None],
        mode: ToolMode,
        final_schema: Mapping[str, Any] | None = None,
        *,
        json_final: bool = False,
        reasoning_budget: int | None = None,
        max_tokens: int | None = None,
    ) -> Constraint | None:
        """`tool_choice` "required" (some call), "auto" (a final message or a call whose arguments
        follow its schema) or "none" (no call). `tools` maps names to parameter schemas (None: any
        JSON object; pass None for a tool whose schema should not be enforced). The final message is
        JSON against `final_schema` when given (any JSON object with `json_final`), else free text.
        → None when there is nothing to constrain (no tools and a free final message)."""
        if mode not in ("auto", "required", "none"):
            raise GrammarError(f"unknown tool_choice {mode!r}")
        if mode == "required" and not tools:
            raise GrammarError('tool_choice "required" needs at least one tool')
        structured = final_schema is not None or json_final
        if not tools and not structured:
            return None
        answers = [] if mode == "none" else [_call(name, parameters, i) for i, (name, parameters) in enumerate(tools.items())]
        if mode != "required":
            answers.append(_final(final_schema, structured))
        # With "auto" and a free-text answer, a tiny budget is no error: the model may just answer.
        return self._constraint(answers, reasoning_budget, max_tokens, must_fit=structured or mode == "required")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- compilation --------------------------------------------------------------------------
    def _constraint(self, answers: list[_Answer], reasoning_budget: int | None, max_tokens: int | None = None,
                    must_fit: bool = True) -> Constraint:
        if reasoning_budget is not None and reasoning_budget < 0:
            raise ValueError("reasoning_budget must be non-negative")
        reasoning = reasoning_budget is None or reasoning_budget > 0
        lines = [
            "start: " + ("reasoning? " if reasoning else "") + "answer",
            "answer: " + " | ".join(alternative for alternative, _ in answers),
            'reasoning: <|channel|> "analysis" <|message|> TEXT <|end|> <|start|> "assistant"',
            r"TEXT: /(.|\n)*/",
        ]
        jsons = [json_rule for _, json_rule in answers if json_rule is not None]
        for rule, _, schema in jsons:
            lines.append(f"{rule}: %json {json.dumps(_with_options(schema))}")
        grammar = "\n".join(lines)
        matcher = self._cached(grammar)
        if matcher is None:
            for _, what, schema in jsons:
                self._check(what, schema)
            matcher = self._compile(grammar)
        hints = schema_hints(*(schema for _, _, schema in jsons))
        return Constraint(matcher, self._pool, reasoning_budget, max_tokens, hints, must_fit)

    def _check(self, what: str, schema: Mapping[str, Any] | None) -> None:
        """Compile one schema alone, so a failure names the schema's problem, not a line of our wrapper."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(_with_options(schema))
        except ValueError as exc:
            raise GrammarError(f"invalid {what}: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer, limits=_LIMITS)
        if error:
            raise GrammarError(f"invalid {what}: {error}")

    def _cached(self, grammar: str) -> llguidance.LLMatcher | None:
        with self._lock:
            matcher = self._cache.get(grammar)
            if matcher is None:
                return None
            self._cache.move_to_end(grammar)
            return matcher.deep_copy()

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_LIMITS)  # drops the GIL while it compiles
        if matcher.is_error():
            raise GrammarError(_reason(matcher))
        with self._lock:
            self.compiled += 1
            self._cache[grammar] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return matcher.deep_copy()


# One alternative of the `answer` rule, and for one holding JSON its `%json` rule: (rule, what, schema).
_Answer = tuple[str, "tuple[str, str, Mapping[str, Any] | None] | None"]


def _final(schema: Mapping[str, Any] | None, structured: bool) -> _Answer:
    if not structured:
        return '<|channel|> "final" <|message|> TEXT <|return|>', None
    return '<|channel|> "final" <|message|> final_json <|return|>', ("final_json", "response_format schema", schema)


def _call(name: str, parameters: Mapping[str, Any] | None, i: int) -> _Answer:
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise GrammarError(f"tool name {name!r} must match [A-Za-z0-9_.:-]{{1,128}}")
    # The header gpt-oss writes: `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`.
    header = json.dumps(f"commentary to=functions.{name} ")
    return (f'<|channel|> {header} <|constrain|> "json" <|message|> args_{i} <|call|>',
            (f"args_{i}", f"parameters of tool {name!r}", parameters))


def _with_options(schema: Mapping[str, Any] | None) -> dict[str, Any]:
    if schema is None:
        schema = _ANY_OBJECT
    if not isinstance(schema, Mapping):
        raise GrammarError(f"a JSON schema must be a JSON object, not {type(schema).__name__}")
    return {**schema, "x-guidance": _JSON_OPTIONS}


def _only(token: int) -> torch.Tensor:
    mask = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    mask[token] = True
    return mask


def _unpack(bits: torch.Tensor) -> torch.Tensor:
    """llguidance's int32 bitmask [ceil(V/32)] → bool [V] of allowed tokens (~40 µs)."""
    return torch.index_select(_BYTE_TO_BOOLS, 0, bits.view(torch.uint8).int()).view(torch.bool)[:VOCAB_SIZE]


def _reason(matcher: llguidance.LLMatcher) -> str:
    """The first line of the matcher's error (the rest is a `<non-verbose/>` placeholder)."""
    return (matcher.get_error() or "rejected").splitlines()[0]


def _describe(token: int) -> str:
    try:
        return repr(token_bytes(token).decode("utf-8", errors="replace"))
    except ValueError:
        return "outside the vocabulary"
