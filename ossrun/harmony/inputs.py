"""API conversation shapes (Chat Completions `messages`, Responses `input`), parsed → harmony messages.

The input is typed (`shapes.py`: the API parses a body once into these models), so this module only
decides how each turn is spoken in harmony. The API's `system` and `developer` messages do not become
harmony system messages: the harmony system message is model-level metadata (identity, reasoning
effort, channels), so, as OpenAI does for gpt-oss, their text becomes the developer message's
instructions. Everything else maps onto the harmony message it was rendered from when the model
produced it: reasoning → `analysis`, answers → `final`, tool calls → `commentary` addressed to
`functions.NAME` with `<|constrain|>json`, tool results → a `functions.NAME` tool message addressed
back to the assistant.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from openai_harmony import Author, Message, Role, TextContent

from .shapes import (
    Content,
    FunctionCallInput,
    FunctionCallOutputInput,
    InputItem,
    InputMessage,
    ReasoningInput,
    RefusalPart,
    TEXT_PART_TYPES,
    ToolCallFunction,
)
from .shapes import Message as ChatMessage


class RenderError(ValueError):
    """The request cannot be rendered into a prompt; the message says what was wrong (HTTP 400), `param` which
    field (OpenAI's spelling, `messages[1].tool_calls`), when one is to blame."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class _Call:
    """A tool call of the conversation, for the result that answers it."""

    name: str
    rank: int  # its place among the conversation's calls: results are shown in the order of their calls
    call_id: str | None
    where: str  # the field a missing result's 400 names (`messages[1].tool_calls`)
    msg: Message
    cut: bool = False  # cut while its arguments were written: it needs no result


@dataclass(slots=True)
class Converted:
    """What a conversation turns into: developer instructions, and the harmony messages in order."""

    instructions: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    tool_names_by_call_id: dict[str, str] = field(default_factory=dict)
    last_tool_name: str | None = None
    calls_made: int = 0
    # The calls no result has answered yet, by rank, in call order (an OrderedDict: its first entry is found in O(1)
    # however many were taken before), and the rank of each by its id. Ids repeat across turns (clients that number
    # calls per turn, `call_0` in each): an id names the most recent call that carries it.
    waiting: OrderedDict[int, _Call] = field(default_factory=OrderedDict)
    waiting_ids: dict[str, int] = field(default_factory=dict)
    # Each result's call rank (by the message's id()). `messages` holds results in the order the request gave them;
    # `in_call_order` puts them in the order of their calls.
    result_ranks: dict[int, int] = field(default_factory=dict)

    def in_call_order(self, messages: Sequence[Message]) -> list[Message]:
        """`messages` (this conversation's, some left out) with each run of results in the order of the calls they
        answer. Harmony has no place for a call's id: the model pairs parallel calls with their results by position,
        while OpenAI's clients may answer in any order (the ids say which result is whose). One sort per run, so
        n log n at worst (walking back past later results for each, 16,000 results took 13 s: hunt round 22 A-F3);
        a result that answers no call stays where it was given. The renderer calls it after its message-count
        guard, so a conversation too long for the window is refused before this work."""
        ordered: list[Message] = []
        run: list[tuple[int, Message]] = []
        for msg in messages:
            rank = self.result_ranks.get(id(msg))
            if rank is not None:
                run.append((rank, msg))
                continue
            ordered.extend(result for _, result in sorted(run, key=itemgetter(0)))
            run.clear()
            ordered.append(msg)
        ordered.extend(result for _, result in sorted(run, key=itemgetter(0)))
        return ordered


def text_parts(content: Content) -> list[str]:
    """The text pieces of a `content` value: a string, null, or a list of text parts (a refusal's text is the
    assistant's answer, as it was shown to the user)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    return [part.refusal if isinstance(part, RefusalPart) else part.text for part in content]


def _message(author: Author, texts: list[str]) -> Message:
    """A harmony message with the parts joined into one text.

    The library would tokenise separate text contents separately; joining them means a text
    gets the same tokens however the client happened to split it into parts.
    """
    return Message(author=author, content=[TextContent(text="".join(texts))])


def _assistant(texts: list[str], channel: str) -> Message:
    return _message(Author(role=Role.ASSISTANT), texts).with_channel(channel)


def written_json(value: Any) -> str:
    """A JSON value as gpt-oss writes JSON (the harmony guide's calls: `{"location":"Tokyo"}`): compact, characters
    as themselves. `json.dumps`' defaults (`", "`, `\\u00fc`) would show the model text it never wrote, in more
    tokens, and miss the prefix cache of the turn it did write (/ai/run answers a call's arguments as an object)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _arguments(raw: str | dict[str, Any] | None) -> str:
    """Tool-call arguments as the JSON text the model would have written."""
    if raw is None:
        return "{}"
    return raw if isinstance(raw, str) else written_json(raw)


def _add_tool_call(out: Converted, name: str, arguments: str | dict[str, Any] | None, call_id: str | None, where: str,
                   id_field: str, cut: bool = False) -> None:
    """A call of function `name`, made at `where` with its id at `id_field`; `cut`: one cut while its arguments were
    written, which needs no result. A call without an id (the legacy `function_call`) cannot be named as unanswered.
    Two waiting calls with one id would leave no way to say which a result answers: a 400 (an empty id is no name,
    and its calls are answered in order)."""
    msg = _assistant([_arguments(arguments)], "commentary")
    msg = msg.with_recipient(f"functions.{name}").with_content_type("<|constrain|>json")
    out.messages.append(msg)
    out.last_tool_name = name
    if call_id is None and not cut:
        return
    if call_id and call_id in out.waiting_ids:
        raise RenderError(f"{id_field}: tool call id {call_id!r} is repeated among the calls still waiting for their "
                          f"results: each call needs its own id, which its result names", id_field)
    call = _Call(name, out.calls_made, call_id, where, msg, cut)
    out.calls_made += 1
    out.waiting[call.rank] = call
    if call_id is not None:
        out.tool_names_by_call_id[call_id] = name
    if call_id:
        out.waiting_ids[call_id] = call.rank


def _take_call(out: Converted, call_id: str | None, name: str | None) -> _Call | None:
    """The waiting call a result answers, no longer waiting: the one its id names; without an id (or with an empty one,
    which names no call), the first waiting call of function `name` (any first, without a name) or of an empty id.
    None when no call waits for it."""
    if call_id:
        rank = out.waiting_ids.get(call_id)
    elif call_id == "":
        rank = next((r for r, call in out.waiting.items() if call.call_id == ""), None)
    else:
        rank = next((r for r, call in out.waiting.items() if call.name == name), next(iter(out.waiting), None))
    if rank is None:
        return None
    call = out.waiting.pop(rank)
    if call.call_id:
        del out.waiting_ids[call.call_id]
    return call


def _add_tool_result(out: Converted, name: str, texts: list[str], call: _Call | None) -> None:
    """The result of `call` (None: of no call waiting for one), ranked as its call for `Converted.in_call_order`."""
    author = Author(role=Role.TOOL, name=f"functions.{name}")
    msg = _message(author, texts).with_recipient("assistant").with_channel("commentary")
    if call is not None:
        out.result_ranks[id(msg)] = call.rank
    out.messages.append(msg)


def _unanswered_calls(out: Converted) -> tuple[list[str], str] | None:
    """The ids of the calls still waiting for their results and where the first was made, or None."""
    calls = [call for call in out.waiting.values() if not call.cut]
    if not calls:
        return None
    return [call.call_id or "''" for call in calls], calls[0].where


def _add_reasoning(out: Converted, text: str | None) -> None:
    if text:
        out.messages.append(_assistant([text], "analysis"))


def drop_answered_reasoning(messages: Sequence[Message]) -> list[Message]:
    """The messages without the reasoning of turns that are over: those a `final` answer or a user message followed.

    OpenAI's harmony guide: drop earlier chain of thought once the assistant's turn ended in a message to
    the final channel. openai-harmony's `auto_drop_analysis` drops only what comes before the *first* final
    message, so from the third turn on every later turn's reasoning (`reasoning_content` sent back,
    Responses `reasoning` items, a `previous_response_id` chain) would stay in the prompt: tokens paid on
    every turn, and a model led by stale thoughts. As vLLM does, analysis before the *last* final goes.
    A turn cut by `max_tokens` (in its reasoning or inside a call) has no final answer, yet the user's next message
    ends it too (hunt round 12 B-F2, B-F3): the model was never shown reasoning followed by a user message, and the
    demo model answered the new question from the old thoughts (a weather call for "What is the capital of France?").
    As OpenAI's reasoning guide puts it, only the reasoning since the last user message matters; so analysis before
    the last user message goes too. Reasoning after both (the open turn's, before its tool calls) stays.
    """
    over = max((i for i, m in enumerate(messages) if m.author.role == Role.USER
                or m.author.role == Role.ASSISTANT and m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if i > over or m.channel != "analysis"]


# --- a Workers AI `prompt` --------------------------------------------------------------------


def convert_prompt(prompt: str) -> Converted:
    """A Prompt-shape `prompt` (not raw): one user message."""
    return Converted(messages=[_message(Author(role=Role.USER), [prompt])])


# --- Chat Completions `messages` ------------------------------------------------------------


def convert_chat(messages: Sequence[ChatMessage]) -> Converted:
    """Chat Completions messages → instructions and harmony messages."""
    out = Converted()
    for i, msg in enumerate(messages):
        _chat_message(out, msg, f"messages[{i}]")
    _check_chat_results(out, "the end of the conversation")
    return out


def _chat_message(out: Converted, msg: ChatMessage, where: str) -> None:
    texts = text_parts(msg.content)
    if msg.role in ("user", "assistant"):
        _check_chat_results(out, where)
    if msg.role in ("system", "developer"):
        out.instructions.append("".join(texts))
    elif msg.role == "user":
        out.messages.append(_message(Author(role=Role.USER), texts))
    elif msg.role == "assistant":
        _chat_assistant(out, msg, texts, where)
    else:  # tool, or OpenAI's legacy function result (which has a `name` and no id)
        _chat_result(out, msg, texts, where)


def _check_chat_results(out: Converted, before: str) -> None:
    """OpenAI's rule (its 400 in its words): every tool call is answered by a tool message before the next user or
    assistant message, and before the conversation ends. An unanswered call would have the model make up its result."""
    unanswered = _unanswered_calls(out)
    if unanswered is not None:
        ids, where = unanswered
        raise RenderError(f"{where}: An assistant message with 'tool_calls' must be followed by tool messages responding to "
                          f"each 'tool_call_id' (before {before}). The following tool_call_ids did not have response "
                          f"messages: {', '.join(ids)}", where)


def _chat_assistant(out: Converted, msg: ChatMessage, texts: list[str], where: str) -> None:
    """Reasoning, then the text, then the tool calls: the order the model produces them in. OpenAI's `refusal` field
    is text the user was shown, after any `content`, as a refusal part is."""
    if msg.refusal:
        texts = [*texts, msg.refusal]
    reasoning = msg.reasoning_content or msg.reasoning
    _add_reasoning(out, reasoning)
    calls: list[tuple[ToolCallFunction, str | None]] = [(call.function, call.id) for call in msg.tool_calls or []]
    if msg.function_call is not None:  # the legacy single-call field
        calls.append((msg.function_call, None))
    if any(texts) or not (calls or reasoning):
        # Text next to tool calls is a preamble, which harmony puts on the commentary channel.
        out.messages.append(_assistant(texts, "commentary" if calls else "final"))
    for j, (function, call_id) in enumerate(calls):
        _add_tool_call(out, function.name, function.arguments, call_id, f"{where}.tool_calls", f"{where}.tool_calls[{j}].id")


def _chat_result(out: Converted, msg: ChatMessage, texts: list[str], where: str) -> None:
    """A tool (or legacy function) message: the result of the call its tool_call_id names, else of the first call
    still waiting of its `name`, else of the first waiting (clients that omit the id answer the calls just made, in
    order); without an id and with no call waiting, it is shown as the result of its `name`, else of the latest call.
    A tool message with neither an id nor any call before it answers nothing: a 400, as on OpenAI."""
    if msg.tool_call_id is not None and msg.tool_call_id not in out.tool_names_by_call_id:
        raise RenderError(f"{where}: tool_call_id {msg.tool_call_id!r} matches no earlier assistant tool call",
                          f"{where}.tool_call_id")
    if msg.role == "tool" and msg.tool_call_id is None and out.last_tool_name is None:
        raise RenderError(f"{where}: messages with role 'tool' must be a response to a preceding message with 'tool_calls' "
                          f"(this one has no tool_call_id and no call comes before it)", f"{where}.tool_call_id")
    call = _take_call(out, msg.tool_call_id, msg.name)
    if msg.tool_call_id is not None:
        name = _answered(call, msg.tool_call_id, f"{where}.tool_call_id").name
    else:
        name = call.name if call is not None else msg.name or out.last_tool_name or "tool"
    _add_tool_result(out, name, texts, call)


def _answered(call: _Call | None, call_id: str, field: str) -> _Call:
    """The call a result naming `call_id` answers, or a 400 naming `field` when every call with that id has its result:
    the model would read a second result (after a later question, an earlier turn's) as this turn's."""
    if call is None:
        raise RenderError(f"{field.rsplit('.', 1)[0]}: the call {call_id!r} already has its result: each call takes one "
                          f"result, before the next user or assistant message", field)
    return call


# --- Responses `input` ----------------------------------------------------------------------


def convert_responses(input_: str | Sequence[InputItem], instructions: str | None = None, stored: int = 0) -> Converted:
    """Responses `input` (a string or items) and `instructions` → instructions and harmony messages. The first `stored`
    items are a previous response's conversation: errors name the others by their index in the caller's `input`."""
    out = Converted()
    if instructions is not None:
        out.instructions.append(instructions)
    if isinstance(input_, str):
        out.messages.append(_message(Author(role=Role.USER), [input_]))
        return out
    _check_chain_repeats(input_, stored)
    preambles = _preambles(input_)
    for i, item in enumerate(input_):
        _responses_item(out, item, f"input[{i - stored}]" if i >= stored else "previous_response_id", i in preambles)
    _check_responses_outputs(out)
    return out


def _check_chain_repeats(items: Sequence[InputItem], stored: int) -> None:
    """A 400 for a function_call of `input` that repeats a call of the previous response's conversation (its first
    `stored` items): the model would read the call twice. OpenAI refuses duplicate items; send only its output."""
    chained = {item.call_id for item in items[:stored] if isinstance(item, FunctionCallInput) and item.call_id}
    for i, item in enumerate(items[stored:]):
        if isinstance(item, FunctionCallInput) and item.call_id in chained:
            raise RenderError(f"input[{i}]: function_call with call_id {item.call_id!r} is already in the conversation of "
                              f"previous_response_id: send only its function_call_output", f"input[{i}].call_id")


def _preambles(items: Sequence[InputItem]) -> set[int]:
    """The indices of the assistant messages that are preambles: gpt-oss writes text before its tool calls on the
    commentary channel, and a Responses output gives it as a `message` item before the `function_call` items (as chat
    gives it as `content` beside `tool_calls`, rendered as commentary too). Rendered `final`, it would end the turn
    in the middle of its tool loop and make the turn's reasoning look answered (`drop_answered_reasoning`). OpenAI's
    `phase` says which a message is; without it, a message that a function_call follows (reasoning between aside)
    is one."""
    found: set[int] = set()
    call_next = False  # whether the next item after this one, reasoning aside, is a function_call (read backwards: linear)
    for i in range(len(items) - 1, -1, -1):
        item = items[i]
        if isinstance(item, InputMessage) and item.role == "assistant" and item.phase != "final_answer" \
                and (item.phase == "commentary" or call_next):
            found.add(i)
        if not isinstance(item, ReasoningInput):
            call_next = isinstance(item, FunctionCallInput)
    return found


def droppable_items(input_: str | Sequence[InputItem]) -> list[tuple[int, ...]]:
    """What Responses' `truncation: "auto"` may drop from `input_` (a previous response's conversation in front), oldest
    first, each entry the indices of items that go together. A function_call goes with the function_call_outputs that
    answer it (an output alone would answer no call, a call alone would be unanswered: either is a RenderError);
    system and developer messages stay (they are the instructions); the newest item never goes, nor a call it answers,
    nor anything after such a call (only the oldest items go). So dropping the first k entries, for any k, leaves a
    conversation that renders whenever the whole one does, and shorter the larger k is."""
    if isinstance(input_, str):
        return []
    units: list[tuple[int, ...]] = []
    taken: set[int] = set()
    for i, item in enumerate(input_[:-1]):
        if i in taken or (isinstance(item, InputMessage) and item.role in ("system", "developer")):
            continue
        unit = (i,)
        if isinstance(item, FunctionCallInput):
            unit += tuple(j for j in range(i + 1, len(input_)) if isinstance(input_[j], FunctionCallOutputInput)
                          and input_[j].call_id == item.call_id)
        if len(input_) - 1 in unit:
            break
        taken.update(unit)
        units.append(unit)
    return units


def _responses_item(out: Converted, item: InputItem, where: str, preamble: bool = False) -> None:
    if isinstance(item, InputMessage):
        if item.role in ("user", "assistant"):
            _check_responses_outputs(out)
        _responses_message(out, item, "commentary" if preamble else "final")
    elif isinstance(item, FunctionCallInput):
        _add_tool_call(out, item.called, item.arguments, item.call_id, where, f"{where}.call_id",
                       cut=item.status == "incomplete")
    elif isinstance(item, FunctionCallOutputInput):
        if item.call_id not in out.tool_names_by_call_id:
            raise RenderError(f"{where}: call_id {item.call_id!r} matches no earlier function_call item", f"{where}.call_id")
        call = _answered(_take_call(out, item.call_id, None), item.call_id, f"{where}.call_id")
        _add_tool_result(out, call.name, _output_texts(item.output, where), call)
    elif isinstance(item, ReasoningInput):
        _add_reasoning(out, item.text)
    else:  # an `item_reference` the API left unresolved: a bug, never the caller's mistake
        raise TypeError(f"{where}: an input item of type {type(item).__name__} cannot be rendered")


def _check_responses_outputs(out: Converted) -> None:
    """OpenAI's rule (its 400 in its words): every function_call is answered by a function_call_output before the
    next user or assistant message, and before the input ends; a `previous_response_id` that ended in a call needs
    its output in the new `input`. `param` is `input`: the call may be the previous response's, not at an index of it.
    A call cut while its arguments were written was never made: no output is due, and it leaves the prompt."""
    _drop_cut_calls(out)
    unanswered = _unanswered_calls(out)
    if unanswered is not None:
        raise RenderError(f"No tool output found for function call {unanswered[0][0]}: send a function_call_output item "
                          f"with its call_id before the next message", "input")


def _drop_cut_calls(out: Converted) -> None:
    """Leave out the cut calls no output answered (an `incomplete` response continued, as ROUTES.md promises): half a
    call would show the model a call it stopped writing mid-arguments, and no client can answer a call whose
    arguments were cut. Their ids no longer name a call: a later output for one is the usual 400."""
    cut = [call for call in out.waiting.values() if call.cut]
    if not cut:
        return
    dropped = {id(call.msg) for call in cut}
    out.messages = [msg for msg in out.messages if id(msg) not in dropped]
    for call in cut:
        del out.waiting[call.rank]
        if call.call_id is not None:
            out.tool_names_by_call_id.pop(call.call_id, None)
            out.waiting_ids.pop(call.call_id, None)


def _output_texts(output: Any, where: str) -> list[str]:
    """A function_call_output's `output` (any JSON): a string, text parts, or any other value as its JSON text."""
    if output is None:
        return []
    if isinstance(output, str):
        return [output]
    if not isinstance(output, list):
        return [written_json(output)]
    texts = []
    for index, part in enumerate(output):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise RenderError(f"{where}: output part type {kind!r} is not supported: gpt-oss takes text only (text parts)",
                              f"{where}.output[{index}]")
    return texts


def _responses_message(out: Converted, item: InputMessage, channel: str) -> None:
    """`channel`: an assistant message's (`final`, or `commentary` for a preamble)."""
    texts = text_parts(item.content)
    if item.role in ("system", "developer"):
        out.instructions.append("".join(texts))
    elif item.role == "user":
        out.messages.append(_message(Author(role=Role.USER), texts))
    else:  # assistant
        out.messages.append(_assistant(texts, channel))
