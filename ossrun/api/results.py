"""The JSON objects of each surface (spec §3), built from one `Outcome`; `surfaces/` decides when."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from typing import Any

from ossrun import harmony
from ossrun.api.ask import final_format
from ossrun.api.body import not_json
from ossrun.api.schemas import (AllowedToolsChoice, FlatAllowedToolsChoice, FlatNamedToolChoice, NamedToolChoice, NamespaceTool,
                                ResponseFormat, ResponsesInput, Tool, WebSearchTool, tool_spec)
from ossrun.api.service import Outcome, usage


# OpenAI's own spellings: Responses objects and their items use `_`, chat and text completions `-`.
_UNDERSCORED = ("resp", "msg", "rs", "fc", "fco")


def new_id(prefix: str, key: str | None = None) -> str:
    """A fresh id, or with `key` one of the same shape that is the same for the same key (its digest)."""
    digits = secrets.token_hex(12) if key is None else hashlib.sha256(key.encode()).hexdigest()[:24]
    return f"{prefix}{'_' if prefix in _UNDERSCORED else '-'}{digits}"


def _number(literal: str, kind: type) -> Any:
    """A number of the model's JSON as the hosted runtime's `JSON.parse` reads it and `JSON.stringify` writes it again:
    one beyond a double's range (JSON and the grammar allow any exponent: `935E100151070`) is Infinity there, written
    null. Python's inf is no JSON: it was a 500 sync, `Infinity` in a stream's frame and in the batch store."""
    return kind(literal) if math.isfinite(float(literal)) else None


def model_json(text: str) -> Any:
    """The model's JSON text as a value (`_number`), where a shape carries it parsed (the Prompt shape's JSON answer and
    its tool calls' `arguments`); the text as it is when it is not JSON (cut by `max_tokens`, a call no grammar held)
    or nests deeper than Python's parser goes."""
    try:
        return json.loads(text, parse_float=lambda literal: _number(literal, float),
                          parse_int=lambda literal: _number(literal, int), parse_constant=not_json)
    except (ValueError, RecursionError):
        return text


def prompt_result(outcome: Outcome, prices, json_mode: bool = False, with_logprobs: bool = False) -> dict[str, Any]:
    """Workers AI's result; in JSON mode `response` is the parsed object, as the hosted JSON mode returns it (the text as
    it is when `max_tokens` cut it). `finish_reason` (`stop`, `tool_calls`, `length`), which the hosted shape lacks, is
    the signal that an answer was cut: without it, reasoning that ate the whole budget was an empty `response` and a
    200 (the contract's §9). `with_logprobs` (`logprobs: true`, which the shape's schema offers): the answer's tokens,
    spelled as chat's."""
    answer = model_json(outcome.content) if json_mode else outcome.content
    result: dict[str, Any] = {"response": answer, "finish_reason": outcome.finish_reason, "usage": usage(outcome, prices)}
    if outcome.tool_calls:
        result["tool_calls"] = prompt_tool_calls(outcome)
    if with_logprobs:
        result["logprobs"] = choice_logprobs(outcome.logprobs)
    return result


def choice_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A choice's (or a frame's) `logprobs`: the text's tokens under `content`, and OpenAI's `refusal` beside, always
    null (gpt-oss never writes a refusal part); OpenAI's schema requires both keys."""
    return {"content": entries, "refusal": None}


def prompt_tool_calls(outcome: Outcome) -> list[dict[str, Any]]:
    return [{"name": c.name, "arguments": model_json(c.arguments)} for c in outcome.tool_calls]


def chat_tool_calls(outcome: Outcome) -> list[dict[str, Any]]:
    return [{"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in outcome.tool_calls]


def legacy_finish_reason(reason: str) -> str:
    """A request that offered `functions` ends on a call with OpenAI's legacy reason."""
    return "function_call" if reason == "tool_calls" else reason


def chat_completion(outcome: Outcome, model: str, prices, with_logprobs: bool, completion_id: str | None = None,
                    created: int | None = None, legacy_functions: bool = False) -> dict[str, Any]:
    """`legacy_functions`: the call as `message.function_call` (a completion holds at most one: harmony stops at the call)."""
    message: dict[str, Any] = {"role": "assistant", "content": outcome.content if outcome.content or not outcome.tool_calls else None,
                               "reasoning_content": outcome.reasoning or None, "reasoning": outcome.reasoning or None,
                               "refusal": None, "tool_calls": chat_tool_calls(outcome)}
    finish_reason = outcome.finish_reason
    if legacy_functions:
        calls, message["tool_calls"] = message["tool_calls"], []
        if calls:
            message["function_call"] = calls[0]["function"]
        finish_reason = legacy_finish_reason(finish_reason)
    return {
        "id": completion_id or new_id("chatcmpl"),
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": choice_logprobs(outcome.logprobs) if with_logprobs else None,
            "finish_reason": finish_reason,
            "stop_reason": outcome.stop_reason,
        }],
        "usage": usage(outcome, prices),
    }


def responses_usage(outcome: Outcome, prices) -> dict[str, Any]:
    base = usage(outcome, prices)
    return {"input_tokens": outcome.prompt_tokens, "output_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "input_tokens_details": {"cached_tokens": outcome.cached_tokens, "cache_write_tokens": outcome.cache_write_tokens},
            "output_tokens_details": {"reasoning_tokens": outcome.reasoning_tokens},
            "cost_usd": base["cost_usd"], "neurons": base["neurons"]}


def function_call_item(call_id: str, name: str, arguments: str, item_id: str | None = None, status: str = "completed",
                       namespace: str | None = None) -> dict[str, Any]:
    """`namespace`: the call is of a function of that namespace tool (`name` is the function's own name)."""
    item = {"type": "function_call", "id": item_id or new_id("fc"), "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
    return {**item, "namespace": namespace} if namespace else item


# Request fields a Responses object repeats back, with OpenAI's value when the request left them out (`text`: OpenAI
# always names the answer's format, plain text when none was asked).
ECHOED = {"instructions": None, "previous_response_id": None, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
          "temperature": 1.0, "top_p": 1.0, "max_output_tokens": None,
          "reasoning": {"effort": harmony.reasoning_effort(None), "summary": None}, "text": {"format": {"type": "text"}},
          "store": True, "metadata": None, "top_logprobs": 0, "background": False, "truncation": "disabled"}


def echoed(request: ResponsesInput | None, sampling: dict[str, float] | None = None) -> dict[str, Any]:
    """The echoed fields as the request set them (JSON), OpenAI's defaults for the others; `sampling`: the
    temperature and top_p the request was sampled with (`/ai/run`'s defaults differ from OpenAI's), as OpenAI echoes
    them; tools and a named tool_choice (or allowed_tools) in the Responses spelling, whichever spelling the request used."""
    if request is None:
        return {**ECHOED, **(sampling or {})}
    copied = set(ECHOED) - {"tools", "text", "reasoning"}  # those three are built below, from their known keys
    fields = {**ECHOED, **request.model_dump(mode="json", include=copied, exclude_unset=True, exclude_none=True, by_alias=True),
              **(sampling or {})}
    if request.sent_tools:
        fields["tools"] = [echoed_tool(tool) for tool in request.sent_tools]
    if isinstance(request.tool_choice, NamedToolChoice):  # chat's spelling
        fields["tool_choice"] = {"type": "function", "name": request.tool_choice.function.name}
    if isinstance(request.tool_choice, FlatNamedToolChoice):  # its own keys only: another is ignored, so not echoed
        fields["tool_choice"] = {"type": "function", "name": request.tool_choice.name}
    if isinstance(request.tool_choice, (AllowedToolsChoice, FlatAllowedToolsChoice)):  # either spelling, its entries too
        allowed = request.tool_choice.allowed_tools if isinstance(request.tool_choice, AllowedToolsChoice) else request.tool_choice
        fields["tool_choice"] = {"type": "allowed_tools", "mode": allowed.mode,
                                 "tools": [{"type": "function", "name": name} for name in allowed.names()]}
    fields["text"] = echoed_text(request)
    # As OpenAI echoes it for a reasoning model: the effort the prompt was rendered with and the summary asked, both
    # always there (a client reading `response.reasoning.effort` gets the one used, not null).
    # Only OpenAI's keys: another key of `reasoning` (or `text`) is ignored, so not echoed (no token pays for it).
    fields["reasoning"] = {"effort": harmony.reasoning_effort(request.reasoning and request.reasoning.effort),
                           "summary": request.reasoning.summary if request.reasoning else None,
                           **(request.reasoning.model_dump(mode="json", include={"generate_summary"}, exclude_none=True)
                              if request.reasoning else {})}
    return fields


def echoed_text(request: ResponsesInput) -> dict[str, Any]:
    """`text` as OpenAI echoes it, its `format` always set: the format the answer was held to (`text.format`, or the
    `response_format` this shape also takes, which wins as in `ask.from_responses`) in the Responses spelling, and
    `{"type": "text"}` when none was asked."""
    sent = request.text.model_dump(mode="json", include={"verbosity"}, exclude_none=True) if request.text else {}
    asked = request.response_format or (request.text.format if request.text else None)
    return {**sent, "format": responses_format(asked) if asked is not None else {"type": "text"}}


def responses_format(fmt: ResponseFormat) -> dict[str, Any]:
    """A format in any of its spellings (chat's wrapper, Workers AI's bare schema, the Responses' flat one) as a
    Responses `text.format`: a `json_schema` flat, with the name the model was told (`structured_output` when the
    request gave none), its schema and `strict` as applied."""
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    final = final_format(fmt)
    spelled = {"type": "json_schema", "name": final.name or "structured_output", "schema": final.schema, "strict": final.strict}
    return spelled if final.description is None else {**spelled, "description": final.description}


def function_tool(tool: Tool) -> dict[str, Any]:
    """A tool as OpenAI's Responses objects echo it (`FunctionTool`: SDKs read `name` and `type` there), from the
    chat spelling or the flat one with or without `type`. `strict` as it was applied: absent is false here."""
    spec = tool_spec(tool)
    return {"type": "function", "name": spec.name, "description": spec.description, "parameters": spec.parameters,
            "strict": spec.strict is True}


def echoed_tool(tool: Any) -> dict[str, Any]:
    """A function tool as `function_tool`; a namespace with its functions so; web search as sent."""
    if isinstance(tool, NamespaceTool):
        return {"type": "namespace", "name": tool.name, "description": tool.description, "tools": [function_tool(t) for t in tool.tools]}
    if isinstance(tool, WebSearchTool):
        return tool.model_dump(mode="json", exclude_none=True)
    return function_tool(tool)


def response_object(outcome: Outcome | None, model: str, prices, response_id: str, created_at: int,
                    output: list[dict[str, Any]] | None = None, request: ResponsesInput | None = None,
                    sampling: dict[str, float] | None = None, completed_at: int | None = None) -> dict[str, Any]:
    """A Responses `response` with the given output items; with `outcome` None it is the in-progress shell.
    `created_at` is the response's one creation time: every event and the stored copy carry the same; `completed_at`,
    when it finished, is null unless the status is `completed` (OpenAI's rule). `error` and
    `incomplete_details` are always there, null when unset, as OpenAI sends them (openai-node types them as required:
    `if (response.error !== null)` fires on a missing key)."""
    status = "in_progress" if outcome is None else ("incomplete" if outcome.finish_reason == "length" else "completed")
    text = "".join(part["text"] for item in output or [] if item["type"] == "message" for part in item["content"])
    return {"id": response_id, "object": "response", "created_at": created_at, "model": model, "status": status,
            "completed_at": completed_at if status == "completed" else None, "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "output": output or [], "output_text": text,
            "usage": responses_usage(outcome, prices) if outcome is not None else None, **echoed(request, sampling)}


def with_current_keys(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored response as `response_object` builds it now: one kept by an older version lacks `error`,
    `incomplete_details`, `completed_at` (not known then) and `truncation` (it was not truncated) and has `text: null` (plain text then, unless it had a
    `response_format`, which it no longer says)."""
    return {"error": None, "incomplete_details": None, "truncation": ECHOED["truncation"], "completed_at": None, **stored,
            "text": stored.get("text") or dict(ECHOED["text"])}


class LegacyLogprobs:
    """Legacy completions' logprobs objects from chat-style entries, chunk after chunk.

    A token holding only part of a UTF-8 character (emoji, CJK) is spelled `bytes:\\xNN...` as OpenAI's
    legacy completions spell it: its "replace" decoding (U+FFFD) would give different alternatives the same
    key in `top_logprobs`. `text_offset` is where the token's text starts in `text`: bytes decoded so far, so
    a character split over three tokens gives them one offset and the next token the one after it."""

    def __init__(self, offset: int = 0) -> None:
        self._offset = offset
        self._decoder = harmony.TextDecoder()

    def take(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        offsets = []
        for entry in entries:
            data = bytes(entry["bytes"])
            offsets.append(self._offset + self._decoder.starts_new_character(data))
            self._offset += len(self._decoder.feed_bytes(data))
        return {"tokens": [legacy_token(e) for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [legacy_top(e) for e in entries], "text_offset": offsets}


def legacy_top(entry: dict[str, Any]) -> dict[str, float]:
    """The top alternatives and the sampled token: OpenAI's legacy completions "always return the logprob of the
    sampled token, so there may be up to logprobs+1 elements" (vLLM does the same), and scoring code reads
    `top_logprobs[i][tokens[i]]`."""
    top = {legacy_token(t): t["logprob"] for t in entry["top_logprobs"]}
    top.setdefault(legacy_token(entry), entry["logprob"])
    return top


def legacy_token(entry: dict[str, Any]) -> str:
    """The token's text, or `bytes:\\xf0\\x9f` where its bytes are not whole UTF-8 characters."""
    data = bytes(entry["bytes"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def completion_finish(outcome: Outcome) -> str:
    return "length" if outcome.finish_reason == "length" else "stop"


def text_completion(outcome: Outcome, model: str, prices, with_logprobs: bool = False, completion_id: str | None = None,
                    created: int | None = None, echo: str = "") -> dict[str, Any]:
    """`echo`: the prompt's text, before the answer's (`echo: true`)."""
    return {"id": completion_id or new_id("cmpl"), "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "text": echo + outcome.content, "logprobs": LegacyLogprobs().take(outcome.logprobs) if with_logprobs else None,
                         "finish_reason": completion_finish(outcome), "stop_reason": outcome.stop_reason}],
            "usage": usage(outcome, prices)}
