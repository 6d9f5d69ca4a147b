"""API conversation shapes (Chat Completions `messages`, Responses `input`) → harmony messages.

The API's `system` and `developer` messages do not become harmony system messages: the harmony
system message is model-level metadata (identity, reasoning effort, channels), so, as OpenAI
does for gpt-oss, their text becomes the developer message's instructions. Everything else maps
onto the harmony message it was rendered from when the model produced it: reasoning →
`analysis`, answers → `final`, tool calls → `commentary` addressed to `functions.NAME` with
`<|constrain|>json`, tool results → a `functions.NAME` tool message addressed back to the assistant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from openai_harmony import Author, Message, Role, TextContent

TEXT_PART_TYPES = ("text", "input_text", "output_text")


class RenderError(ValueError):
    """The request cannot be rendered into a prompt; the message says what was wrong (HTTP 400)."""


@dataclass(slots=True)
class Converted:
    """What a conversation turns into: developer instructions, and the harmony messages in order."""

    instructions: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    tool_names_by_call_id: dict[str, str] = field(default_factory=dict)
    last_tool_name: str | None = None


def text_parts(content: Any, where: str) -> list[str]:
    """The text pieces of a `content` value: a string, null, or a list of text parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise RenderError(f"{where}: content must be a string, null or a list of parts, not {type(content).__name__}")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise RenderError(f"{where}: content part of type {kind!r} is not supported (only text parts are)")
    return texts


def _message(author: Author, texts: list[str]) -> Message:
    """A harmony message with the parts joined into one text.

    The library would tokenise separate text contents separately; joining them means a text
    gets the same tokens however the client happened to split it into parts.
    """
    return Message(author=author, content=[TextContent(text="".join(texts))])


def _assistant(texts: list[str], channel: str) -> Message:
    return _message(Author(role=Role.ASSISTANT), texts).with_channel(channel)


def _arguments(raw: Any) -> str:
    """Tool-call arguments as the JSON text the model would have written."""
    if raw is None:
        return "{}"
    return raw if isinstance(raw, str) else json.dumps(raw)


def _add_tool_call(out: Converted, name: Any, arguments: Any, call_id: Any, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise RenderError(f"{where}: a tool call needs a function name")
    msg = _assistant([_arguments(arguments)], "commentary")
    out.messages.append(msg.with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))
    out.last_tool_name = name
    if isinstance(call_id, str):
        out.tool_names_by_call_id[call_id] = name


def _add_tool_result(out: Converted, name: str, texts: list[str]) -> None:
    author = Author(role=Role.TOOL, name=f"functions.{name}")
    out.messages.append(_message(author, texts).with_recipient("assistant").with_channel("commentary"))


def _add_reasoning(out: Converted, text: Any) -> None:
    if isinstance(text, str) and text:
        out.messages.append(_assistant([text], "analysis"))


# --- Chat Completions `messages` ------------------------------------------------------------


def convert_chat(messages: Any) -> Converted:
    """Chat Completions messages → instructions and harmony messages."""
    if not isinstance(messages, list):
        raise RenderError("messages must be a list")
    out = Converted()
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise RenderError(f"{where}: a message must be an object")
        _chat_message(out, msg, where)
    return out


def _chat_message(out: Converted, msg: Mapping, where: str) -> None:
    role = msg.get("role")
    texts = text_parts(msg.get("content"), where)
    if role in ("system", "developer"):
        out.instructions.append("".join(texts))
    elif role == "user":
        out.messages.append(_message(Author(role=Role.USER), texts))
    elif role == "assistant":
        _chat_assistant(out, msg, texts, where)
    elif role in ("tool", "function"):
        _add_tool_result(out, _tool_result_name(out, msg, where), texts)
    else:
        raise RenderError(f"{where}: unknown role {role!r} (expected system, developer, user, assistant or tool)")


def _chat_assistant(out: Converted, msg: Mapping, texts: list[str], where: str) -> None:
    """Reasoning, then the text, then the tool calls: the order the model produces them in."""
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    _add_reasoning(out, reasoning)
    calls = msg.get("tool_calls") or []
    if msg.get("function_call"):  # the legacy single-call field
        calls = [*calls, {"function": msg["function_call"]}]
    if not isinstance(calls, list):
        raise RenderError(f"{where}: tool_calls must be a list")
    if any(texts) or not (calls or reasoning):
        # Text next to tool calls is a preamble, which harmony puts on the commentary channel.
        out.messages.append(_assistant(texts, "commentary" if calls else "final"))
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            expected = "{id, type: 'function', function: {name, arguments}}"
            raise RenderError(f"{where}.tool_calls[{j}]: expected {expected}")
        _add_tool_call(out, fn.get("name"), fn.get("arguments"), call.get("id"), f"{where}.tool_calls[{j}]")


def _tool_result_name(out: Converted, msg: Mapping, where: str) -> str:
    """The function a tool message answers: found through its tool_call_id, else its `name`, else the
    latest tool call (clients that omit the id answer the call just made)."""
    call_id = msg.get("tool_call_id")
    if call_id is not None:
        if call_id not in out.tool_names_by_call_id:
            raise RenderError(f"{where}: tool_call_id {call_id!r} matches no earlier assistant tool call")
        return out.tool_names_by_call_id[call_id]
    if isinstance(msg.get("name"), str) and msg["name"]:
        return msg["name"]
    return out.last_tool_name or "tool"


# --- Responses `input` ----------------------------------------------------------------------


def convert_responses(input_: Any, instructions: Any = None) -> Converted:
    """Responses `input` (a string or items) and `instructions` → instructions and harmony messages."""
    out = Converted()
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RenderError("instructions must be a string")
        out.instructions.append(instructions)
    if isinstance(input_, str):
        out.messages.append(_message(Author(role=Role.USER), [input_]))
        return out
    if not isinstance(input_, list):
        raise RenderError("input must be a string or a list of items")
    for i, item in enumerate(input_):
        if not isinstance(item, Mapping):
            raise RenderError(f"input[{i}]: an item must be an object")
        _responses_item(out, item, f"input[{i}]")
    return out


def _responses_item(out: Converted, item: Mapping, where: str) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        _responses_message(out, item, where)
    elif kind == "function_call":
        _add_tool_call(out, item.get("name"), item.get("arguments"), item.get("call_id"), where)
    elif kind == "function_call_output":
        call_id = item.get("call_id")
        if call_id not in out.tool_names_by_call_id:
            raise RenderError(f"{where}: call_id {call_id!r} matches no earlier function_call item")
        output = item.get("output")
        texts = text_parts(output, where) if output is None or isinstance(output, (str, list)) else [json.dumps(output)]
        _add_tool_result(out, out.tool_names_by_call_id[call_id], texts)
    elif kind == "reasoning":
        parts = item.get("content") or []
        _add_reasoning(out, "".join(p.get("text", "") for p in parts if isinstance(p, Mapping)))
    else:
        raise RenderError(f"{where}: input item type {kind!r} is not supported")


def _responses_message(out: Converted, item: Mapping, where: str) -> None:
    role = item.get("role", "user")  # a message item without a role is the user's, as a string input is
    texts = text_parts(item.get("content"), where)
    if role in ("system", "developer"):
        out.instructions.append("".join(texts))
    elif role == "user":
        out.messages.append(_message(Author(role=Role.USER), texts))
    elif role == "assistant":
        out.messages.append(_assistant(texts, "final"))
    else:
        raise RenderError(f"{where}: unknown role {role!r} (expected system, developer, user or assistant)")
