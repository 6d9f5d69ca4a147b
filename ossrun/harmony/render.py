"""From a parsed conversation (typed: `shapes.py`, converted by `inputs.py`) to prompt token ids.

The rendering itself is `openai-harmony`'s (`render_conversation_for_completion`), so our prompts
match OpenAI's token for token; this module only builds the harmony conversation: a system
message (reasoning effort, channels), a developer message (instructions, the answer's response
format, and the `functions` tool namespace) when there is anything to put in it, then the converted turns (less the
reasoning that a final answer already followed: `inputs.drop_answered_reasoning`), ending with `<|start|>assistant`
so the model writes the reply.

The system message carries the conversation's date (`Current date: YYYY-MM-DD`) when the caller passes one, as the
harmony guide, the weights' chat template, OpenAI's reference servers and vLLM give it; without it the model answers
date-relative questions from a guess near its knowledge cutoff. The server passes the day a request is rendered (UTC)
unless its `--conversation-date` fixes one or leaves it out (`conversation_date`): a fixed date keeps the same
request's tokens (and prefix-cache hits) the same from day to day.
"""

from __future__ import annotations

import datetime
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from openai_harmony import (
    Conversation,
    DeveloperContent,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
)

from .inputs import (Converted, RenderError, convert_chat, convert_prompt, convert_responses, drop_answered_reasoning,
                     written_json)
from .shapes import FunctionDef, InputItem, OpenAIMessage as ChatMessage, Shape, Tool, WrappedTool
from .tokenizer import decode_bytes, encode, get_encoding, is_special

EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
DEFAULT_EFFORT = "medium"
DEFAULT_FORMAT_NAME = "structured_output"  # a response format's name when the request gives none (vLLM's)
# openai-harmony parses the conversation as JSON with serde's 128-level limit; a tool's schema sits
# about a dozen levels down, so 64 leaves room and is far beyond any real schema.
MAX_PARAMETERS_DEPTH = 64
# The fewest tokens a message of the prompt takes: `<|start|>`, its role (a token at least), `<|message|>` and `<|end|>`,
# which an empty user message is, measured with the library's renderer (every other kind takes more). A function tool
# takes `type`, its name, `=`, `()`, `=>`, `any` and `;` (seven tokens, measured); four is a safe floor.
MIN_MESSAGE_TOKENS = 4
MIN_TOOL_TOKENS = 4


class PromptTooLong(RenderError):
    """The conversation cannot fit the tokens the caller has room for, known before it is rendered: its messages and
    tools alone take more (`least` tokens at least; `why` says how many of each). The library renders holding the GIL
    (100,000 one-letter messages: 8.7 s in which no other thread ran, the server's event loop included), so such a
    conversation is refused by its count."""

    def __init__(self, least: int, why: str, limit: int) -> None:
        super().__init__(f"the prompt takes at least {least} tokens ({why}), more than the {limit} it may take")
        self.least, self.why = least, why


def json_depth(value: Any) -> int:
    """How many containers deep a JSON value nests (iterative: deep values are what it is for)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping) or isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, Mapping) else item))
    return deepest


@dataclass(frozen=True, slots=True)
class ResponseFormatSection:
    """Structured output stated to the model: the developer message's `# Response Formats` section of OpenAI's
    harmony format guide (a format name, an optional `//` comment, the JSON Schema), as vLLM renders it too.
    The grammar holds the answer to the schema either way; the section tells the model before it reasons
    what it will be held to (a model trained on the format answers the schema's fields, not what it guesses)."""

    schema: Mapping[str, Any]
    name: str | None = None  # None: DEFAULT_FORMAT_NAME
    description: str | None = None

    def text(self) -> str:
        comment = "".join(f"// {line}\n" for line in self.description.splitlines()) if self.description else ""
        return f"# Response Formats\n\n## {self.name or DEFAULT_FORMAT_NAME}\n\n{comment}{written_json(self.schema)}"


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """Prompt token ids plus what the response side needs to know about how they were made."""

    token_ids: list[int]
    tool_names: tuple[str, ...] = ()  # functions offered to the model, in request order
    reasoning_effort: str = DEFAULT_EFFORT
    raw: bool = False  # true: the text was tokenised as is; it need not end with <|start|>assistant


def render_conversation(converted: Converted, tools: Sequence[Tool] = (), effort: str | None = None, *,
           response_format: ResponseFormatSection | None = None, conversation_start_date: str | None = None,
           token_limit: int | None = None) -> RenderedPrompt:
    """Prompt tokens for a converted conversation, the function tools offered, a reasoning effort (low, medium
    or high; None: medium) and the answer's JSON Schema, if any (after the instructions, as vLLM places it).
    Raises RenderError saying what is wrong; PromptTooLong, before rendering, when its messages and tools alone take
    more than `token_limit` tokens."""
    effort = reasoning_effort(effort)
    descriptions = tool_descriptions(tools)
    kept = drop_answered_reasoning(converted.messages)
    if token_limit is not None:
        _refuse_past(token_limit, len(kept), len(descriptions))
    kept = converted.in_call_order(kept)
    stand_ins = StandIns()
    messages = [_system_message(effort, conversation_start_date)]
    # An empty or blank instructions text (LlamaIndex.TS sends `instructions: ""`, templates a newline) says nothing:
    # no empty `# Instructions` section.
    instructions = [*filter(str.strip, converted.instructions), *([response_format.text()] if response_format is not None else [])]
    if instructions or descriptions:
        messages.append(_developer_message([stand_ins.instructions(instructions)] if instructions else [],
                                           stand_ins.tools(descriptions)))
    messages.extend(stand_ins.message(m) for m in kept)
    ids = stand_ins.splice(_render(Conversation.from_messages(messages)))
    return RenderedPrompt(token_ids=ids, tool_names=tuple(t.name for t in descriptions), reasoning_effort=effort)


def _refuse_past(token_limit: int, messages: int, tools: int) -> None:
    """PromptTooLong when `messages` messages and `tools` tools take more than `token_limit` tokens however short."""
    least = MIN_MESSAGE_TOKENS * messages + MIN_TOOL_TOKENS * tools
    if least > token_limit:
        raise PromptTooLong(least, f"{messages} messages" + (f" and {tools} tools" if tools else ""), token_limit)


class EffortConfig(Shape):
    effort: str | None = None


class RenderBody(Shape):
    """The fields of a request body that rendering reads, for callers holding a JSON body rather than
    the API's parsed request (the CLI, the demo model's data, tests)."""

    prompt: str | None = None
    raw: bool = False
    messages: list[ChatMessage] | None = None  # OpenAI's legacy `function` role included
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    tools: list[Tool] | None = None
    functions: list[FunctionDef] | None = None
    tool_choice: Any = None
    reasoning_effort: str | None = None
    reasoning: EffortConfig | None = None


def render_request(body: Mapping[str, Any], *, response_format: ResponseFormatSection | None = None,
                   conversation_start_date: str | None = None) -> RenderedPrompt:
    """Prompt tokens for a JSON request body of the Prompt, Messages or Responses shape: parsed once
    into the typed shapes, then rendered (with the answer's response format, which the API reads from
    the body's `response_format` in any of its spellings). Raises RenderError (a ValueError) saying what is wrong."""
    if not isinstance(body, Mapping):
        raise RenderError("the request body must be a JSON object")
    shapes = [k for k in ("prompt", "messages", "input") if k in body]
    if len(shapes) != 1:
        raise RenderError(f"expected exactly one of 'prompt', 'messages' or 'input', got {shapes or 'none'}")
    try:
        request = RenderBody.model_validate(body)
    except ValidationError as exc:
        raise RenderError(_first_error(exc)) from None
    if request.prompt is not None and request.raw:  # `raw` is a Prompt-shape field; elsewhere it means nothing
        return RenderedPrompt(token_ids=encode(request.prompt, allow_special=True), raw=True)
    if request.messages is not None:
        converted = convert_chat(request.messages)
    elif request.input is not None:
        converted = convert_responses(request.input, request.instructions)
    else:
        converted = convert_prompt(request.prompt)
    tools = [*(request.tools or []), *(request.functions or [])]  # `tool_choice: "none"` too: the grammar refuses calls
    effort = request.reasoning_effort if request.reasoning_effort is not None else (request.reasoning.effort if request.reasoning else None)
    return render_conversation(converted, tools, effort, response_format=response_format,
                               conversation_start_date=conversation_start_date)


class StandIns:
    """The texts a request carries leave the library's rendering, which tokenises holding the GIL (a 9 MB prompt kept
    every other thread, the server's event loop included, waiting for seconds): a short marker word stands in for
    each, and after rendering the marker's tokens are replaced by the text's, from `tokenizer`, which lets other
    threads run. The library then renders only the frame: headers, the system message, the tools.

    A message's text sits between special tokens and is a call of its own to the library's encoder, so its marker
    (lowercase letters only) is tokenised on its own, found exactly, and replaced by the text's `encode`: the
    library's own ids.

    The developer message's instructions share one call with their `# Instructions` heading and the tools, so a
    marker stands in for all of them: after rendering, that piece of the prompt is decoded, the instructions put
    back in the marker's place and the piece encoded again as the library would have.
    """

    def __init__(self) -> None:
        self._prefix = "ossrunstandin" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(12))
        self._count = 0
        self._texts: list[tuple[list[int], str]] = []  # (marker ids, text), in rendering order
        self._pieces: dict[str, str] = {}  # marker → text, in the one piece of the prompt encoded again whole
        self._runs: dict[str, str] = {}  # a tool text's long run → its marker (one marker for each distinct run)

    def _marker(self) -> str:
        n, suffix = self._count, ""
        self._count += 1
        while True:  # n in base 26, letters only
            n, digit = divmod(n, 26)
            suffix += string.ascii_lowercase[digit]
            if n == 0:
                break
        return self._prefix + suffix + "z"

    def _spliced(self, text: str) -> str:
        marker = self._marker()
        self._texts.append((encode(marker), text))
        return marker

    def instructions(self, instructions: list[str]) -> str:
        """The marker standing in for the developer message's instructions, joined as the library joins them."""
        marker = self._marker()
        self._pieces[marker] = "\n\n".join(instructions)
        return marker

    def tools(self, tools: list[ToolDescription]) -> list[ToolDescription]:
        """The tools with a marker standing in for each long run (`_TOOL_RUN`) of their texts: the description and
        every name and string of the parameters' schema. The library's encoder is quadratic in such a run and holds
        the GIL (a 200,000-character description took 14 s, a megabyte minutes). It writes these strings as they
        are, so the developer piece is encoded again with the runs in place, as the instructions are; equal runs
        share a marker (a property's name in `properties` and in `required` stay equal)."""
        return [ToolDescription.new(t.name, self._without_runs(t.description), self._without_runs(t.parameters))
                for t in tools]

    def _without_runs(self, value: Any) -> Any:
        if isinstance(value, str):
            return _TOOL_RUN.sub(self._run_marker, value)
        if isinstance(value, dict):
            return {self._without_runs(k): self._without_runs(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._without_runs(v) for v in value]
        return value

    def _run_marker(self, run: re.Match) -> str:
        if run.group() not in self._runs:
            self._runs[run.group()] = marker = self._marker()
            self._pieces[marker] = run.group()
        return self._runs[run.group()]

    def message(self, message: Message) -> Message:
        """The message with a marker standing in for each of its texts."""
        content = [TextContent(text=self._spliced(c.text)) if isinstance(c, TextContent) else c for c in message.content]
        return message.model_copy(update={"content": content})

    def splice(self, ids: list[int]) -> list[int]:
        """The rendered ids with each marker's tokens replaced by its text's tokens."""
        if self._pieces:
            ids = _encode_again(ids, self._pieces, placed=len(self._pieces) > len(self._runs))
        out, at = [], 0
        for marker, text in self._texts:
            found = _find(ids, marker, at)
            if found < 0:
                raise RenderError("a very long word could not be placed in the prompt")
            out += ids[at:found] + encode(text)
            at = found + len(marker)
        return out + ids[at:]


def _encode_again(ids: list[int], texts: dict[str, str], placed: bool) -> list[int]:
    """`ids` with each piece (the text tokens between two special tokens) that holds markers decoded, each marker's
    text put in its place, and encoded again whole: token bytes spell the text they came from, so this is the piece
    the library would have rendered with the texts in it. Found by text, not by the markers' own tokens: a marker
    glued to the characters before it (`\x00` + a run) is spelled by other tokens. The ids are the frame (message
    texts are spliced afterwards), so this is quick. A marker in a string the library does not write (a schema's
    `pattern`) is in no piece; `placed`: one surely is (the instructions')."""
    markers = re.compile("|".join(sorted(map(re.escape, texts), key=len, reverse=True)))
    out, start, found = [], 0, False
    for end in [k for k, token in enumerate(ids) if is_special(token)] + [len(ids)]:
        piece = decode_bytes(ids[start:end]).decode("utf-8")
        placed_here = markers.sub(lambda m: texts[m.group()], piece)
        if placed_here != piece:
            out += encode(placed_here)
            found = True
        else:
            out += ids[start:end]
        out += ids[end:end + 1]
        start = end + 1
    if placed and not found:
        raise RenderError("the instructions could not be placed in the prompt")
    return out


# A run in a tool's texts that the library's encoder would take quadratic time over (one pre-tokenizer piece: no
# spaces, or only spaces and tabs); shorter runs cost it little.
_TOOL_RUN = re.compile(r"\S{256,}|[^\S\r\n]{256,}")


def _find(ids: list[int], part: list[int], start: int) -> int:
    """Index of the first occurrence of `part` in `ids` at or after `start`, or -1 (its first id found by
    `list.index`: a Python loop over a long prompt's ids held the GIL for a fifth of a second)."""
    try:
        while True:
            start = ids.index(part[0], start)
            if ids[start:start + len(part)] == part:
                return start
            start += 1
    except ValueError:
        return -1


def _render(conversation: Conversation) -> list[int]:
    """The library's rendering; its errors (unexpected in practice) become RenderErrors, not 500s."""
    try:
        return get_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)
    except (HarmonyError, ValueError) as exc:  # ValueError: the library's JSON recursion limit
        raise RenderError(f"the conversation cannot be rendered: {exc}") from exc


def _first_error(error: ValidationError) -> str:
    """The deepest of pydantic's errors (in a union, the branch that got furthest), as a JSON pointer and what was found."""
    item = max(error.errors(), key=lambda e: len(e["loc"]))
    path = "/".join(str(p) for p in item["loc"] if not (isinstance(p, str) and (p[:1].isupper() or "[" in p or p in _TYPE_TAGS)))
    found = repr(item["input"])
    return f"at '/{path}': {item['msg']} (got {found[:60] + '…' if len(found) > 60 else found})"


_TYPE_TAGS = ("str", "list", "dict", "int", "float", "bool", "function-after")


def reasoning_effort(effort: str | None) -> str:
    """A reasoning effort, lower case; medium when absent."""
    if effort is None:
        return DEFAULT_EFFORT
    if effort.lower() not in EFFORTS:
        raise RenderError(f"reasoning effort must be one of low, medium, high, not {effort!r}")
    return effort.lower()


def tool_descriptions(tools: Sequence[Tool]) -> list[ToolDescription]:
    """The function tools, in either spelling (`{type: function, function: {...}}` or the flat
    `{name, description, parameters}`), as harmony describes them; names must be unique.
    (`tool_choice: "none"` keeps them: the prompt, and its prefix cache, stay those of the turns that called them, and
    the request's grammar refuses a call.)"""
    out = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise RenderError(f"tool names must be unique, got {names}", "tools")
    return out


def _tool(tool: Tool, where: str) -> ToolDescription:
    spec = tool.function if isinstance(tool, WrappedTool) else tool
    if spec.parameters is not None and json_depth(spec.parameters) > MAX_PARAMETERS_DEPTH:
        raise RenderError(f"{where}: parameters nest deeper than {MAX_PARAMETERS_DEPTH} levels")
    return ToolDescription.new(spec.name, spec.description or "", dict(spec.parameters) if spec.parameters is not None else None)


TODAY, NO_DATE = "today", "none"  # the `--conversation-date` settings other than a fixed date


def check_conversation_date(setting: str) -> str:
    """A `--conversation-date` setting, checked once where it is given: `today`, `none` or a date YYYY-MM-DD (a
    ValueError saying so otherwise)."""
    if setting not in (TODAY, NO_DATE):
        try:
            datetime.date.fromisoformat(setting)
        except ValueError:
            raise ValueError(f"--conversation-date takes {TODAY!r}, {NO_DATE!r} or a date YYYY-MM-DD, not {setting!r}") from None
        if len(setting) != 10:  # fromisoformat also reads 20251203 and 2025-W49-3
            raise ValueError(f"--conversation-date takes a date as YYYY-MM-DD, not {setting!r}")
    return setting


def conversation_date(setting: str) -> str | None:
    """The date a prompt rendered now states under a checked setting: today's in UTC, the fixed one, or None (none)."""
    if setting == TODAY:
        return datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return None if setting == NO_DATE else setting


def _system_message(effort: str, conversation_start_date: str | None) -> Message:
    content = SystemContent.new().with_reasoning_effort(EFFORTS[effort])
    if conversation_start_date is not None:
        content = content.with_conversation_start_date(conversation_start_date)
    return Message.from_role_and_content(Role.SYSTEM, content)


def _developer_message(instructions: list[str], tools: list[ToolDescription]) -> Message:
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions("\n\n".join(instructions))
    if tools:
        content = content.with_function_tools(tools)
    return Message.from_role_and_content(Role.DEVELOPER, content)


def tool_call_prefix(name: str) -> list[int]:
    """The assistant header of a call to `functions.NAME`, to append to a prompt that ends in
    `<|start|>assistant`: generation then continues inside that call's JSON arguments (a forced
    `tool_choice`). Parse the completion with `StreamParser(prompt_ids=...)` to pick the call up."""
    from .tokenizer import encode

    return encode(f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>", allow_special=True)
