"""One function from any of the API's input shapes to prompt token ids.

The rendering itself is `openai-harmony`'s (`render_conversation_for_completion`), so our prompts
match OpenAI's token for token; this module only builds the harmony conversation: a system
message (reasoning effort, channels), a developer message (instructions and the `functions`
tool namespace) when there is anything to put in it, then the converted turns, ending with
`<|start|>assistant` so the model writes the reply.

Rendering is deterministic: the system message carries no conversation start date unless the
caller passes one, so the same request always gives the same tokens (and the same prefix-cache hits).
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from typing import Any, Mapping

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

from .inputs import Converted, RenderError, convert_chat, convert_responses
from .tokenizer import encode, get_encoding, has_long_run

EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
DEFAULT_EFFORT = "medium"
# openai-harmony parses the conversation as JSON with serde's 128-level limit; a tool's schema sits
# about a dozen levels down, so 64 leaves room and is far beyond any real schema.
MAX_PARAMETERS_DEPTH = 64


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
class RenderedPrompt:
    """Prompt token ids plus what the response side needs to know about how they were made."""

    token_ids: list[int]
    tool_names: tuple[str, ...] = ()  # functions offered to the model, in request order
    reasoning_effort: str = DEFAULT_EFFORT
    raw: bool = False  # true: the text was tokenised as is; it need not end with <|start|>assistant


def render_request(body: Mapping[str, Any], *, conversation_start_date: str | None = None) -> RenderedPrompt:
    """Prompt tokens for a request body (parsed JSON) of the Prompt, Messages or Responses shape.

    Raises RenderError (a ValueError) saying what is wrong when the body cannot be rendered.
    """
    if not isinstance(body, Mapping):
        raise RenderError("the request body must be a JSON object")
    converted = _convert(body)
    if converted is None:  # raw prompt
        return RenderedPrompt(token_ids=encode(body["prompt"], allow_special=True), raw=True)
    effort = reasoning_effort(body)
    tools = tool_descriptions(body)
    stand_ins = StandIns()
    messages = [_system_message(effort, conversation_start_date)]
    if converted.instructions or tools:
        messages.append(_developer_message([stand_ins.text(t) for t in converted.instructions], tools))
    messages.extend(stand_ins.message(m) for m in converted.messages)
    ids = stand_ins.splice(_render(Conversation.from_messages(messages)))
    return RenderedPrompt(token_ids=ids, tool_names=tuple(t.name for t in tools), reasoning_effort=effort)


class StandIns:
    """Texts with a pathological run (see `tokenizer.MAX_RUN`) leave the library's rendering, which
    would tokenise them in one quadratic call under the GIL: a short marker word stands in for each,
    and after rendering the marker's tokens are replaced by the text's bounded encoding.

    A message's text sits between special tokens and instructions between blank lines, so the marker
    (lowercase letters only) is tokenised on its own and found exactly; a message's ids are the same
    as the library's whenever its own encoding of the text would be.
    """

    def __init__(self) -> None:
        self._prefix = "ossrunstandin" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(12))
        self._texts: list[tuple[list[int], str]] = []  # (marker ids, text), in rendering order

    def text(self, text: str) -> str:
        """`text`, or the marker standing in for it."""
        if not has_long_run(text):
            return text
        n, suffix = len(self._texts), ""
        while True:  # n in base 26, letters only
            n, digit = divmod(n, 26)
            suffix += string.ascii_lowercase[digit]
            if n == 0:
                break
        marker = self._prefix + suffix + "z"
        self._texts.append((encode(marker), text))
        return marker

    def message(self, message: Message) -> Message:
        if not any(isinstance(c, TextContent) and has_long_run(c.text) for c in message.content):
            return message
        content = [TextContent(text=self.text(c.text)) if isinstance(c, TextContent) else c for c in message.content]
        return message.model_copy(update={"content": content})

    def splice(self, ids: list[int]) -> list[int]:
        """The rendered ids with each marker's tokens replaced by its text's tokens."""
        out, at = [], 0
        for marker, text in self._texts:
            found = _find(ids, marker, at)
            if found < 0:
                raise RenderError("a very long word could not be placed in the prompt")
            out += ids[at:found] + encode(text)
            at = found + len(marker)
        return out + ids[at:]


def _find(ids: list[int], part: list[int], start: int) -> int:
    """Index of the first occurrence of `part` in `ids` at or after `start`, or -1."""
    for i in range(start, len(ids) - len(part) + 1):
        if ids[i:i + len(part)] == part:
            return i
    return -1


def _render(conversation: Conversation) -> list[int]:
    """The library's rendering; its errors (unexpected in practice) become RenderErrors, not 500s."""
    try:
        return get_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)
    except (HarmonyError, ValueError) as exc:  # ValueError: the library's JSON recursion limit
        raise RenderError(f"the conversation cannot be rendered: {exc}") from exc


def _convert(body: Mapping[str, Any]) -> Converted | None:
    """The conversation of whichever shape the body has; None for a raw prompt."""
    shapes = [k for k in ("prompt", "messages", "input") if k in body]
    if len(shapes) != 1:
        raise RenderError(f"expected exactly one of 'prompt', 'messages' or 'input', got {shapes or 'none'}")
    # `raw` is a Prompt-shape field; the shared sampling schema lets other shapes send it, and there it means nothing.
    if shapes == ["messages"]:
        return convert_chat(body["messages"])
    if shapes == ["input"]:
        return convert_responses(body["input"], body.get("instructions"))
    if not isinstance(body["prompt"], str):
        raise RenderError("prompt must be a string")
    if body.get("raw"):
        return None
    return convert_chat([{"role": "user", "content": body["prompt"]}])


def reasoning_effort(body: Mapping[str, Any]) -> str:
    """`reasoning_effort` (Chat) or `reasoning.effort` (Responses), lower case; medium when absent."""
    effort = body.get("reasoning_effort")
    reasoning = body.get("reasoning")
    if effort is None and isinstance(reasoning, Mapping):
        effort = reasoning.get("effort")
    if effort is None:
        return DEFAULT_EFFORT
    if not isinstance(effort, str) or effort.lower() not in EFFORTS:
        raise RenderError(f"reasoning effort must be one of low, medium, high, not {effort!r}")
    return effort.lower()


def tool_descriptions(body: Mapping[str, Any]) -> list[ToolDescription]:
    """The function tools of `tools` (any of the three shapes) and legacy `functions`.

    `tool_choice: "none"` offers none: a model that is not shown tools cannot call them.
    """
    if body.get("tool_choice") == "none":
        return []
    raw_tools = [*(body.get("tools") or []), *(body.get("functions") or [])]
    tools = [_tool(t, f"tools[{i}]") for i, t in enumerate(raw_tools)]
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise RenderError(f"tool names must be unique, got {names}")
    return tools


def _tool(tool: Any, where: str) -> ToolDescription:
    """One tool in any shape: `{name, description, parameters}`, `{type: function, function: {...}}`
    or the Responses API's flat `{type: function, name, description, parameters, strict}`."""
    if not isinstance(tool, Mapping):
        raise RenderError(f"{where}: a tool must be an object")
    if tool.get("type", "function") != "function":
        raise RenderError(f"{where}: tool type {tool.get('type')!r} is not supported (only function tools are)")
    spec = tool["function"] if isinstance(tool.get("function"), Mapping) else tool
    name, params, description = spec.get("name"), spec.get("parameters"), spec.get("description") or ""
    if not isinstance(name, str) or not name:
        raise RenderError(f"{where}: a tool needs a name")
    if not isinstance(description, str):
        raise RenderError(f"{where}: description must be a string")
    if params is not None and not isinstance(params, Mapping):
        raise RenderError(f"{where}: parameters must be a JSON schema object")
    if params is not None and json_depth(params) > MAX_PARAMETERS_DEPTH:
        raise RenderError(f"{where}: parameters nest deeper than {MAX_PARAMETERS_DEPTH} levels")
    return ToolDescription.new(name, description, dict(params) if params is not None else None)


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
