"""Chat Completions (`/v1/chat/completions`, and `/ai/run` with `messages`): a `chat.completion`, streamed
as `chat.completion.chunk`s (role, reasoning and content deltas with their logprobs, tool-call deltas,
the finish chunk, usage when asked for). A `/v1` request that offered legacy `functions` gets its call as
`function_call` (deltas and message) and `finish_reason: "function_call"`, as OpenAI answers it."""

from __future__ import annotations

import time
from typing import Any

from ossrun import harmony
from ossrun.api import results
from ossrun.api.service import Outcome, usage
from ossrun.api.surfaces.frames import error_frames, frame, nothing_to_keep


class ChatSurface:
    failed = staticmethod(error_frames)
    keep = staticmethod(nothing_to_keep)

    def __init__(self, outcome: Outcome, model: str, prices, with_logprobs: bool, include_usage: bool, legacy_functions: bool = False,
                 usage_nulls: bool = True):
        self.outcome, self.model, self.prices = outcome, model, prices
        self.with_logprobs, self.include_usage, self.legacy = with_logprobs, include_usage, legacy_functions
        self.usage_nulls = include_usage and usage_nulls
        self.id, self.created = results.new_id("chatcmpl"), int(time.time())
        self._sent_logprobs = 0  # entries of outcome.logprobs already sent: each content chunk carries its tokens'

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = self.outcome.stop_reason
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}
        if self.usage_nulls:
            data["usage"] = None  # OpenAI: "all other chunks will also include a usage field, but with a null value"
        return frame(data)

    def opening(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def event(self, event: harmony.Event) -> list[bytes]:
        if isinstance(event, harmony.ReasoningDelta):
            return [self._chunk({"reasoning_content": event.text, "reasoning": event.text})]
        if isinstance(event, harmony.ContentDelta):
            logprobs = results.choice_logprobs(self.outcome.logprobs[self._sent_logprobs:]) if self.with_logprobs else None
            self._sent_logprobs = len(self.outcome.logprobs)
            return [self._chunk({"content": event.text}, logprobs=logprobs)]
        if isinstance(event, harmony.ToolCallStart):
            if self.legacy:
                return [self._chunk({"function_call": {"name": event.name, "arguments": ""}})]
            return [self._chunk({"tool_calls": [{"index": event.index, "id": event.call_id, "type": "function",
                                                 "function": {"name": event.name, "arguments": ""}}]})]
        if isinstance(event, harmony.ToolCallArgumentsDelta):
            if self.legacy:
                return [self._chunk({"function_call": {"arguments": event.text}})]
            return [self._chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})]
        return []

    def closing(self) -> list[bytes]:
        reason = self.outcome.finish_reason
        frames = [self._chunk({}, results.legacy_finish_reason(reason) if self.legacy else reason)]
        if self.include_usage:
            frames.append(frame({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                                 "choices": [], "usage": usage(self.outcome, self.prices)}))
        return frames

    def result(self) -> dict[str, Any]:
        return results.chat_completion(self.outcome, self.model, self.prices, self.with_logprobs, self.id, self.created, self.legacy)
