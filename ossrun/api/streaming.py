"""Server-sent event streams of each surface (spec §5), driven by the harmony parser's events.

Every stream ends with `data: [DONE]` (Responses: `response.completed` first). A client that goes
away cancels the generator, which aborts the engine request and frees its KV blocks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ossrun import harmony
from ossrun.api import results
from ossrun.api.errors import ApiError
from ossrun.api.service import Outcome, Plan, Service, usage

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def frame(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def error_frame(exc: Exception) -> bytes:
    if isinstance(exc, ApiError):
        return frame({"error": {"message": exc.message, "code": exc.code}})
    log.exception("stream failed")
    return frame({"error": {"message": "internal error", "code": 3000}})


async def _steps(service: Service, plan: Plan, outcome: Outcome) -> AsyncIterator[Any]:
    """Harmony events of the plan's generation, with the outcome's counters kept up to date.

    Metered however it ends: a client that leaves mid-stream has still had its tokens generated."""
    tokens: list[int] = []
    try:
        async for step in service.run(plan):
            service.account(outcome, step, tokens)
            for event in step.events:
                if isinstance(event, harmony.Finished):
                    outcome.finish_reason = event.reason
                yield event
    finally:
        service.metering.record(service.engine.info.served_name, outcome)


async def prompt_stream(service: Service, plan: Plan) -> AsyncIterator[bytes]:
    outcome = Outcome(prompt_tokens=len(plan.prompt_ids))
    calls: dict[int, dict[str, Any]] = {}
    try:
        async for event in _steps(service, plan, outcome):
            if isinstance(event, harmony.ContentDelta):
                yield frame({"response": event.text})
            elif isinstance(event, harmony.ToolCallStart):
                calls[event.index] = {"name": event.name, "arguments": ""}
            elif isinstance(event, harmony.ToolCallArgumentsDelta):
                calls[event.index]["arguments"] += event.text
        last: dict[str, Any] = {"response": "", "usage": usage(outcome, service.metering.prices)}
        if calls:
            last["tool_calls"] = [{"name": c["name"], "arguments": results._arguments_object(c["arguments"])} for c in calls.values()]
        yield frame(last)
    except Exception as exc:
        yield error_frame(exc)
    yield DONE


async def chat_stream(service: Service, plan: Plan, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    chunk_id, created = results.new_id("chatcmpl"), int(time.time())
    outcome = Outcome(prompt_tokens=len(plan.prompt_ids))

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = outcome.stop_reason
        return frame({"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]})

    sent_logprobs = 0  # entries of outcome.logprobs already sent: each content chunk carries its tokens'

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in _steps(service, plan, outcome):
            if isinstance(event, harmony.ReasoningDelta):
                yield chunk({"reasoning_content": event.text})
            elif isinstance(event, harmony.ContentDelta):
                logprobs = {"content": outcome.logprobs[sent_logprobs:]} if plan.params.logprobs else None
                sent_logprobs = len(outcome.logprobs)
                yield chunk({"content": event.text}, logprobs=logprobs)
            elif isinstance(event, harmony.ToolCallStart):
                yield chunk({"tool_calls": [{"index": event.index, "id": event.call_id, "type": "function",
                                             "function": {"name": event.name, "arguments": ""}}]})
            elif isinstance(event, harmony.ToolCallArgumentsDelta):
                yield chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
        yield chunk({}, outcome.finish_reason)
        if include_usage:
            yield frame({"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                         "usage": usage(outcome, service.metering.prices)})
    except Exception as exc:
        yield error_frame(exc)
    yield DONE


async def completion_stream(service: Service, plan: Plan, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """`/v1/completions` with `stream: true`: `text_completion` chunks of every generated token's text."""
    chunk_id, created = results.new_id("cmpl"), int(time.time())
    outcome = Outcome(prompt_tokens=len(plan.prompt_ids))

    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = outcome.stop_reason
        return frame({"id": chunk_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]})

    sent_logprobs, text_offset = 0, 0  # each chunk carries the logprobs of its own tokens

    try:
        async for event in _steps(service, plan, outcome):
            if isinstance(event, harmony.ContentDelta):
                logprobs = None
                if plan.params.logprobs:
                    fresh = outcome.logprobs[sent_logprobs:]
                    logprobs = results.completion_logprobs(fresh, text_offset)
                    sent_logprobs, text_offset = len(outcome.logprobs), text_offset + sum(len(e["token"]) for e in fresh)
                yield chunk(event.text, logprobs=logprobs)
        yield chunk("", "length" if outcome.finish_reason == "length" else "stop")
        if include_usage:
            yield frame({"id": chunk_id, "object": "text_completion", "created": created, "model": model, "choices": [],
                         "usage": usage(outcome, service.metering.prices)})
    except Exception as exc:
        yield error_frame(exc)
    yield DONE


class _ResponsesEvents:
    """Turns harmony events into OpenAI Responses stream events, opening and closing output items."""

    def __init__(self, response_id: str):
        self.response_id = response_id
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.text = ""

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return frame(data, event=kind)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.current["id"], "output_index": len(self.output) - 1}

    def open(self, item: dict[str, Any]) -> list[bytes]:
        frames = self.close()
        self.current, self.text = item, ""
        self.output.append(item)
        frames.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=item))
        if item["type"] == "message":
            frames.append(self.event("response.content_part.added", **self._where(), content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": []}))
        return frames

    def delta(self, text: str) -> bytes:
        self.text += text
        kind = {"reasoning": "response.reasoning_text.delta", "message": "response.output_text.delta",
                "function_call": "response.function_call_arguments.delta"}[self.current["type"]]
        extra = {} if self.current["type"] == "function_call" else {"content_index": 0}
        return self.event(kind, **self._where(), **extra, delta=text)

    def close(self, cut: bool = False) -> list[bytes]:
        """End the open item; `cut`: `max_output_tokens` ended it, so it is `incomplete`."""
        if self.current is None:
            return []
        item, frames = self.current, []
        status = "incomplete" if cut else "completed"
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": self.text}]
            frames.append(self.event("response.reasoning_text.done", **self._where(), content_index=0, text=self.text))
        elif item["type"] == "message":
            part = {"type": "output_text", "text": self.text, "annotations": []}
            item["content"], item["status"] = [part], status
            frames.append(self.event("response.output_text.done", **self._where(), content_index=0, text=self.text))
            frames.append(self.event("response.content_part.done", **self._where(), content_index=0, part=part))
        else:
            item["arguments"], item["status"] = self.text, status
            frames.append(self.event("response.function_call_arguments.done", **self._where(), arguments=self.text))
        frames.append(self.event("response.output_item.done", output_index=len(self.output) - 1, item=item))
        self.current = None
        return frames


async def responses_stream(service: Service, plan: Plan, model: str) -> AsyncIterator[bytes]:
    response_id = results.new_id("resp")
    prices = service.metering.prices
    out = _ResponsesEvents(response_id)
    outcome = Outcome(prompt_tokens=len(plan.prompt_ids))
    shell = results.response_object(None, model, prices, response_id, request=plan.ask.source)
    try:
        yield out.event("response.created", response=shell)
        yield out.event("response.in_progress", response=shell)
        async for event in _steps(service, plan, outcome):
            current = out.current["type"] if out.current else None
            if isinstance(event, harmony.ReasoningDelta):
                if current != "reasoning":
                    for f in out.open({"type": "reasoning", "id": results.new_id("rs"), "summary": [], "content": []}):
                        yield f
                yield out.delta(event.text)
            elif isinstance(event, harmony.ContentDelta):
                if current != "message":
                    for f in out.open({"type": "message", "id": results.new_id("msg"), "role": "assistant", "status": "in_progress", "content": []}):
                        yield f
                yield out.delta(event.text)
            elif isinstance(event, harmony.ToolCallStart):
                for f in out.open(results.function_call_item(event.call_id, event.name, "", status="in_progress")):
                    yield f
            elif isinstance(event, harmony.ToolCallArgumentsDelta):
                yield out.delta(event.text)
            elif isinstance(event, harmony.MessageEnd):  # on the last step of a `length` finish: cut off
                for f in out.close(cut=outcome.finish_reason == "length"):
                    yield f
        for f in out.close(cut=outcome.finish_reason == "length"):
            yield f
        final = results.response_object(outcome, model, prices, response_id, output=out.output, request=plan.ask.source)
        service.responses.remember(response_id, plan.ask.items, plan.ask.store, final)
        yield out.event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
    except Exception as exc:
        yield error_frame(exc)
    yield DONE
