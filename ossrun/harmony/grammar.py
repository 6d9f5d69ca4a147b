"""Structured output in gpt-oss's format: the harmony wrapper of a request's grammar, as data for the engine.

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
model in distribution; `StreamParser` reads it back as a tool call.

Reasoning budget: reasoning is gpt-oss's strength, so it is allowed by default, but it must not eat
the answer (the hosted service returns an empty answer when it does). A grammar built with
`reasoning_budget=n` lets the analysis message run for at most n tokens, then allows only `<|end|>`,
after which the grammar forces the answer's header; `default_reasoning_budget(max_tokens)` keeps a
share of max_tokens for the answer. Budget 0 forbids the analysis message altogether. The API gives a budget only
where the answer must fit (`answer_must_fit`: a JSON answer, a required call): an answer that may be free text, or
be cut, needs no room kept, and a budget would only end the reasoning early. Where the budget ends reasoning the model
would have continued, the engine reports the output cut (finish reason "length"): max_tokens shaped it.

A request that may call no tool and wants free text gets `no_recipient()` instead: no structure, only no `=` in
header text, so that no message is addressed to a recipient.

The builders return `engine.grammar.Grammar` values (plain data); the engine compiles them
(`engine/constraints.py`) with the llguidance view of o200k_harmony built here (`llguidance_tokenizer`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Mapping
from typing import Any, Literal

from ossrun.engine.grammar import Grammar, GrammarError, Span

from .shapes import TOOL_NAME_PATTERN
from .tokenizer import CALL, CHANNEL, END, ENDOFTEXT, MESSAGE, O200K_PATTERN, RETURN, VOCAB_SIZE
from .tokenizer import encode, get_encoding, vocabulary

ToolMode = Literal["auto", "required", "none"]

# JSON whitespace: allowed (models write `{"a": 1}` and pretty-print), but at most 24 characters at
# each place, so a model cannot pad its answer with whitespace until max_tokens.
_JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{1,24}"}
# A name the harmony header parser reads back whole (its recipient pattern, without `/`).
_TOOL_NAME = re.compile(TOOL_NAME_PATTERN)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# A function declared without `parameters` takes none (OpenAI: "Omitting `parameters` defines a function with an empty
# parameter list"), as harmony shows it to the model (`() => any`): its arguments are `{}`.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
_FINAL_TOKENS = (RETURN, CALL)  # the grammar ends with one of them, and the request with it
# What the shortest-completion search tries: complete values before openers (it keeps the first children it finds).
_CLOSERS = ('"', "}", "]", '""', "{}", "[]", '"}', '"]', "}}", "]}", "0", "1", "null", "true", "false", "{", "[", '{"', ",", ":",
            " ", "-")


@functools.cache
def llguidance_tokenizer():
    """llguidance's view of o200k_harmony (~1 s, once per process): the verified offline vocabulary
    plus every special token. Ids at or above the model's vocabulary (`<|reserved_201088|>`) are left
    out. The "EOS" llguidance allows once the grammar is complete is `<|endoftext|>`: the grammar ends
    with `<|return|>` or `<|call|>` itself, and the engine stops there."""
    import llguidance

    encoding = get_encoding()
    special = {}
    for name in encoding.special_tokens_set:
        token = encoding.encode(name, allowed_special="all")[0]
        if token < VOCAB_SIZE:
            special[name] = token
    return llguidance.LLTokenizer.from_tiktoken(
        encoder=vocabulary(), special_tokens=special, pattern=O200K_PATTERN, eos_token=ENDOFTEXT, n_vocab=VOCAB_SIZE
    )


def default_reasoning_budget(max_tokens: int) -> int:
    """Tokens the analysis message may use so the constrained answer still fits in max_tokens.

    The answer keeps a quarter of the budget, and for small budgets half of it up to 256 tokens:
    256 → 128 for reasoning, 1000 → 744, 4096 → 3072. JSON longer than that needs a larger max_tokens.
    """
    reserve = max(max_tokens // 4, min(max_tokens // 2, 256))
    return max(0, max_tokens - reserve)


def json_final(schema: Mapping[str, Any] | None, *, reasoning_budget: int | None = None,
               max_tokens: int | None = None, strict: bool = True) -> Grammar:
    """`response_format`: free reasoning, then a final message that is JSON valid against `schema`
    (None: any JSON object, for `json_object`), then `<|return|>`; complete within `max_tokens` when given.
    `strict` False: keywords the grammar engine does not implement are ignored rather than refused."""
    return _wrapper([_final(schema, structured=True, strict=strict)], reasoning_budget, max_tokens)


def tool_call(name: str, parameters: Mapping[str, Any] | None, *, reasoning_budget: int | None = None,
              max_tokens: int | None = None, strict: bool = True) -> Grammar:
    """A named tool call generated whole: free reasoning, then exactly this call with arguments valid
    against `parameters` (None: any JSON object), then `<|call|>`."""
    return _wrapper([_call(name, parameters, 0, strict)], reasoning_budget, max_tokens)


def arguments(name: str, parameters: Mapping[str, Any] | None, *, max_tokens: int | None = None,
              strict: bool = True) -> Grammar:
    """The arguments of a call whose header the prompt already holds (a forced `tool_choice` is
    prefilled, so it costs no generation budget): JSON valid against `parameters`, then `<|call|>`."""
    _call(name, parameters, 0, strict)  # the same name check as a generated call
    schema = _with_options(_object_only(parameters), strict)
    return Grammar(f"start: args_0 <|call|>\nargs_0: %json {json.dumps(schema)}", ((schema_label(name), schema),),
                   _FINAL_TOKENS, _path_tokens(parameters), max_tokens)


def tools(tools: Mapping[str, Mapping[str, Any] | None], mode: ToolMode, final_schema: Mapping[str, Any] | None = None, *,
          json_final: bool = False, reasoning_budget: int | None = None, max_tokens: int | None = None,
          lenient: Collection[str] = (), final_strict: bool = True) -> Grammar:
    """`tool_choice` "required" (some call), "auto" (a final message or a call whose arguments follow
    its schema) or "none" (no call). `tools` maps names to parameter schemas (None: any JSON object):
    the tools that may be called, so a call of any other recipient is impossible. The final message is
    JSON against `final_schema` when given (any JSON object with `json_final`), else free text; with
    no tool to call and free text, the grammar is `no_recipient()`.
    The tools named in `lenient` (and the final schema unless `final_strict`) are not strict: keywords
    the grammar engine does not implement (`uniqueItems`, `not`, ...) are ignored rather than refused."""
    if mode not in ("auto", "required", "none"):
        raise GrammarError(f"unknown tool_choice {mode!r}")
    if mode == "required" and not tools:
        raise GrammarError('tool_choice "required" needs at least one tool')
    structured = final_schema is not None or json_final
    if (not tools or mode == "none") and not structured:
        return no_recipient()
    answers = [] if mode == "none" else [_call(name, parameters, i, name not in lenient)
                                         for i, (name, parameters) in enumerate(tools.items())]
    if mode != "required":
        answers.append(_final(final_schema, structured, final_strict))
    # With "auto" and a free-text answer, a tiny budget is no error: the model may just answer, or be cut off.
    return _wrapper(answers, reasoning_budget, max_tokens if answer_must_fit(mode, structured) else None)


def answer_must_fit(mode: ToolMode, structured: bool) -> bool:
    """Whether the grammar of `tools` holds its answer to `max_tokens`: a JSON answer (`structured`) or a call that
    must come (`required`) is closed within it. A reasoning budget is worth its cost only then: it leaves the answer
    room; where the model may answer in free text (or be cut off), it would only end the reasoning early."""
    return structured or mode == "required"


# Where `harmony.StreamParser` reads header text (after `<|start|>`, `<|end|>` or `<|channel|>`, and at the start)
# and where message text (after `<|message|>`), as a grammar; a recipient (`to=NAME`) can only be written with an
# `=` in header text. Specials other than harmony's framing are refused, as the parser would ignore them. A message
# ends with `<|return|>` or `<|end|>`, never `<|call|>` (no message is a call), and header text is always followed by
# its `<|message|>`: the parser reads the text of a header that `<|end|>`, `<|start|>` or the end cut short as the
# message's, so a call the grammar stopped (`<|channel|>commentary to` and its arguments) came back as the answer
# `to{"city": …}` (hunt round 22 A-F2). Only an answer with no header at all (a fine-tune's) may end without one.
_NO_RECIPIENT = r"""start: (BARE_TEXT? | head <|message|> text (leave head <|message|> text)* <|end|>?) <|return|>
leave: <|end|> <|start|>? | <|start|> | <|channel|>
head: HEADER_TEXT? ((<|channel|> | <|constrain|>) HEADER_TEXT?)~0..3
text: (TEXT | <|message|> | <|constrain|>)*
BARE_TEXT: /[^=]+/
HEADER_TEXT: /[\t\n\r\x20-\x3c\x3e-\x7e]{1,15}/
TEXT: /(.|\n)+/"""


def no_recipient() -> Grammar:
    """A plain answer (no tool may be called, free text): whatever the model writes, as without a grammar, except an
    `=` in a message header, so that no message can be addressed to a recipient, which the parser would read back as a
    call nobody offered (gpt-oss writes to its built-in `browser` and `python` unasked), and a message ended by
    `<|call|>` or a header that no `<|message|>` follows, which the parser would read back as answer text. No reasoning budget, no
    structure imposed: the parser's leniency (a missing header, odd headers of a fine-tune) stays as it is."""
    return Grammar(_NO_RECIPIENT, (), (RETURN,), safeguard=True)


def schema_hints(*schemas: Mapping[str, Any] | None) -> tuple[int, ...]:
    """Tokens of the property names and enum/const values of schemas: what a completion may need to spell."""
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


@functools.cache
def _closer_tokens() -> tuple[int, ...]:
    return (RETURN, CALL, END) + tuple(ids[0] for ids in (encode(t) for t in _CLOSERS) if len(ids) == 1)


def _path_tokens(*schemas: Mapping[str, Any] | None) -> tuple[int, ...]:
    return _closer_tokens() + schema_hints(*schemas)


# One alternative of the `answer` rule, and for one holding JSON its `%json` rule: (rule, what, schema, strict).
_Answer = tuple[str, "tuple[str, str, Mapping[str, Any] | None, bool] | None"]


def _wrapper(answers: list[_Answer], reasoning_budget: int | None, max_tokens: int | None) -> Grammar:
    """The whole-completion grammar: optional reasoning (bounded by its budget), then one of the answers."""
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
    schemas = []
    for rule, what, schema, strict in jsons:
        full = _with_options(schema, strict)
        lines.append(f"{rule}: %json {json.dumps(full)}")
        schemas.append((what, full))
    span = Span(CHANNEL, b"analysis", MESSAGE, END, reasoning_budget) if reasoning_budget is not None else None
    return Grammar("\n".join(lines), tuple(schemas), _FINAL_TOKENS, _path_tokens(*(schema for _, _, schema, _ in jsons)),
                   max_tokens, span)


def _final(schema: Mapping[str, Any] | None, structured: bool, strict: bool = True) -> _Answer:
    if not structured:
        return '<|channel|> "final" <|message|> TEXT <|return|>', None
    return '<|channel|> "final" <|message|> final_json <|return|>', ("final_json", schema_label(None), schema, strict)


def _call(name: str, parameters: Mapping[str, Any] | None, i: int, strict: bool = True) -> _Answer:
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise GrammarError(f"tool name {name!r} must match [A-Za-z0-9_.:-]{{1,128}}")
    # The header gpt-oss writes: `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`.
    header = json.dumps(f"commentary to=functions.{name} ")
    return (f'<|channel|> {header} <|constrain|> "json" <|message|> args_{i} <|call|>',
            (f"args_{i}", schema_label(name), _object_only(parameters), strict))


def schema_label(tool: str | None) -> str:
    """What a grammar calls one of its schemas (the label a `GrammarError` about it carries as `schema`): the final
    answer's (`tool` None) or the parameters of the tool named `tool`."""
    return "response_format schema" if tool is None else f"parameters of tool {tool!r}"


def _object_only(parameters: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A call's arguments are a JSON object whatever the schema: one without a top-level `type` (bare `properties`, a
    root `anyOf`) would also allow a string or a number, so it gets `type: object` beside its keywords (which JSON
    Schema applies together, and which keeps its `$ref`s resolving against the same root). The API has refused any
    other `type` (`shapes.ObjectSchema`)."""
    if isinstance(parameters, Mapping) and "type" not in parameters:
        return {**parameters, "type": "object"}
    return parameters


def _with_options(schema: Mapping[str, Any] | None, strict: bool = True) -> dict[str, Any]:
    """The schema with our JSON options. Not strict: llguidance's lenient mode, which ignores the keywords
    it does not implement (the output follows the rest of the schema), as OpenAI leaves non-strict schemas unchecked."""
    if schema is None:
        schema = _ANY_OBJECT
    if not isinstance(schema, Mapping):
        raise GrammarError(f"a JSON schema must be a JSON object, not {type(schema).__name__}")
    return {**schema, "x-guidance": {**_JSON_OPTIONS, "lenient": not strict}}
